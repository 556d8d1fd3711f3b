"""Checkpointing through PyTorch Lightning, side by side, in one process run.

The same LightningModule (an MLP of ``--layers`` x ``--width``, AdamW, seeded random data)
trains once per method, checkpointing every ``--every`` optimizer steps:

- no checkpoint;
- ``ModelCheckpoint(every_n_train_steps=N)`` with Lightning's ``TorchCheckpointIO``;
- the same with ``AsyncCheckpointIO`` (tensors cloned on the training thread, written by a
  thread);
- ``AsymCheckCallback(every=N)`` (host shared memory + local files).

For a like-for-like "durable", the ModelCheckpoint rows write through a ``TorchCheckpointIO``
that fsyncs the file, as AsymCheck's local tier does. Per method: the training-thread stall
per checkpoint (ModelCheckpoint: the time in its ``on_train_batch_end``; AsymCheck:
``handle.stall_s``, the save plus the step gate), the mean iteration time against no
checkpoint, and the time from the save until the checkpoint is durable on local disk. Writes
``benchmarks/results/lightning.json`` and the "PyTorch Lightning" section of ``REPORT.md``.

    python benchmarks/lightning_ckpt.py            # ~1 minute on 2 cores
    python benchmarks/lightning_ckpt.py --quick    # a smoke run (results in a tmp dir)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import write_report_section

import asymcheck
from asymcheck.integrations.lightning import AsymCheckCallback

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("none", "ModelCheckpoint", "ModelCheckpoint+AsyncCheckpointIO", "AsymCheck")


class MLP(pl.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class FsyncIO(TorchCheckpointIO):
    """Lightning's torch.save writer, plus an fsync; records when each write is durable."""

    def __init__(self) -> None:
        super().__init__()
        self.durable_at: list[float] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.durable_at.append(time.perf_counter())


class TimedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose training-thread time per save is recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float]] = []  # (start, end) of each save

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        before = self._last_global_step_saved
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, *args, **kwargs)
        if self._last_global_step_saved != before:
            self.calls.append((t0, time.perf_counter()))


class Clock(pl.Callback):
    """Wall time at the start of every batch (an iteration runs from one start to the next)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


class AsymDurable(pl.Callback):
    """For each AsymCheck save: its handle and when it became durable on the local tier."""

    def __init__(self, ckpt: AsymCheckCallback) -> None:
        self.ckpt = ckpt
        self.saves: list[tuple[float, asymcheck.SaveHandle, list[float]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        h = self.ckpt.last_handle
        if h is None or (self.saves and self.saves[-1][1] is h):
            return
        done: list[float] = []

        def wait() -> None:
            h.durable("local").wait(timeout=600)
            done.append(time.perf_counter())

        threading.Thread(target=wait, daemon=True).start()
        self.saves.append((time.perf_counter() - h.stall_s, h, done))  # ~ when the save began


def loader(args: argparse.Namespace) -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    n = args.batch * 16
    data = torch.utils.data.TensorDataset(torch.randn(n, args.width, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


def run(method: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = MLP(args.width, args.layers)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # + AdamW
    directory = work / method.replace("+", "-")
    clock = Clock()
    callbacks: list[pl.Callback] = [clock]
    plugins: list[Any] = []
    io = FsyncIO()
    mc: TimedModelCheckpoint | None = None
    asym: AsymDurable | None = None
    if method.startswith("ModelCheckpoint"):
        mc = TimedModelCheckpoint(dirpath=directory, every_n_train_steps=args.every,
                                  save_top_k=1, save_last=False)
        callbacks.append(mc)
        plugins.append(AsyncCheckpointIO(io) if "Async" in method else io)
    elif method == "AsymCheck":
        ckpt = AsymCheckCallback(every=args.every,
                                 policy=asymcheck.default_policy(directory), resume=False)
        asym = AsymDurable(ckpt)
        callbacks += [ckpt, asym]
    trainer = pl.Trainer(max_steps=args.warmup + args.iterations, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=mc is not None,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, plugins=plugins, default_root_dir=str(directory))
    t0 = time.perf_counter()
    trainer.fit(model, loader(args))  # teardown drains AsyncCheckpointIO and AsymCheck
    wall = time.perf_counter() - t0
    iters = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)][args.warmup:]
    timed_from = clock.starts[args.warmup]
    stalls: list[float] = []
    durable: list[float] = []
    if mc is not None:
        calls = [(a, b) for a, b in mc.calls if a >= timed_from]
        stalls = [b - a for a, b in calls]
        ends = [t for t in io.durable_at if t >= timed_from]
        durable = [end - a for (a, _), end in zip(calls, ends, strict=False)]
    elif asym is not None:
        saves = [(t, h, d) for t, h, d in asym.saves if t >= timed_from]
        stalls = [h.stall_s for _, h, _ in saves]
        durable = [d[0] - t for t, _, d in saves if d]
        modes = [h.metrics.get("mode") for _, h, _ in saves]
    out: dict[str, Any] = {"method": method, "iteration_s": iters, "stall_s": stalls,
                           "durable_s": durable, "state_bytes": state_bytes, "wall_s": wall}
    if asym is not None:
        out["asymcheck_modes"] = modes
    shutil.rmtree(directory, ignore_errors=True)
    if asym is not None:
        shm = asymcheck.default_policy(directory).staging.url.removeprefix("shm://")
        shutil.rmtree(Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm")) / shm,
                      ignore_errors=True)
    return out


def summarize(method: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per method: the median over rounds of the mean iteration time; stalls and
    times to durable of every round together."""
    stalls = [v for r in rounds for v in r["stall_s"]]
    durable = [v for r in rounds for v in r["durable_s"]]
    out: dict[str, Any] = {
        "method": method, "rounds": len(rounds),
        "iteration_s_mean": statistics.median(statistics.fmean(r["iteration_s"])
                                              for r in rounds),
        "iteration_s_mean_per_round": [statistics.fmean(r["iteration_s"]) for r in rounds],
        "checkpoints": len(stalls),
        "stall_s_median": statistics.median(stalls) if stalls else None,
        "stall_s_max": max(stalls) if stalls else None,
        "durable_s_median": statistics.median(durable) if durable else None,
        "state_bytes": rounds[0]["state_bytes"]}
    if "asymcheck_modes" in rounds[0]:
        out["asymcheck_modes"] = [m for r in rounds for m in r["asymcheck_modes"]]
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms"


def report(result: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in result["runs"]}
    none, mc = rows["none"], rows["ModelCheckpoint"]
    a = result["args"]
    la, after = result["machine"]["load_average"], result["machine"].get("load_average_after")
    load = "-" if la is None else f"{la[0]:.1f}"
    if la is not None and after:
        load += f" before, {after[0]:.1f} after"
    lines = [
        "## PyTorch Lightning",
        "",
        f"`python benchmarks/lightning_ckpt.py`: an MLP of {a['layers']} x {a['width']} "
        f"(AdamW, {rows['AsymCheck']['state_bytes'] / 1e6:.0f} MB of state), batch {a['batch']},"
        f" {a['iterations']} timed iterations after {a['warmup']} ({a['rounds']} interleaved "
        "rounds per method), a checkpoint every "
        f"{a['every']} optimizer steps, through Lightning {result['lightning']} on "
        f"{result['machine']['cores']} CPU cores (load average {load}); one process run. "
        "Stall: the training "
        "thread's wait per checkpoint (AsymCheck: the save plus the step gate); durable: from "
        "the save to the checkpoint on local disk (fsync'd in every row).",
        "",
        "| method | stall median (max) | stall ÷ ModelCheckpoint | iteration ÷ no checkpoint "
        "| durable median | durable ÷ ModelCheckpoint |",
        "|---|---|---|---|---|---|"]
    for m in METHODS:
        r = rows[m]
        lines.append(
            f"| {m} | {_ms(r['stall_s_median'])}"
            f"{'' if r['stall_s_max'] is None else ' (' + _ms(r['stall_s_max']) + ')'} | "
            f"{_ratio(r['stall_s_median'], mc['stall_s_median'])} | "
            f"{_ratio(r['iteration_s_mean'], none['iteration_s_mean'])} | "
            f"{_ms(r['durable_s_median'])} | "
            f"{_ratio(r['durable_s_median'], mc['durable_s_median'])} |")
    modes = ", ".join(rows["AsymCheck"].get("asymcheck_modes", []))
    per_round = ", ".join(f"{m} " + "/".join(f"{v * 1e3:.0f}" for v in
                                              rows[m]["iteration_s_mean_per_round"])
                          for m in METHODS)
    lines += ["", f"No checkpoint: {none['iteration_s_mean'] * 1e3:.1f} ms per iteration. "
              f"Mean iteration time per round (ms): {per_round}; a load average above the "
              "core count makes the iteration ratios unreliable (the stall and durable figures "
              "are per checkpoint and suffer less). "
              f"AsymCheck modes of the timed saves: {modes}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=12, help="untimed iterations first")
    p.add_argument("--iterations", type=int, default=40, help="timed iterations")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of every method")
    p.add_argument("--quick", action="store_true", help="a small smoke run, results in a tmp dir")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.warmup, args.iterations, args.rounds = 3, 256, 12, 20, 1
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="asymcheck-bench-")) if args.quick
                           else RESULTS)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    work = Path(tempfile.mkdtemp(prefix="asymcheck-lightning-bench-"))
    try:
        run("none", argparse.Namespace(**{**vars(args), "iterations": 5}), work)  # warm caches
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for i in range(args.rounds):  # interleaved, so that a change of load hits every method
            for m in (METHODS if i % 2 == 0 else METHODS[::-1]):
                r = run(m, args, work)
                print(f"round {i}  {m:36s} iteration "
                      f"{statistics.fmean(r['iteration_s']) * 1e3:7.1f} ms", flush=True)
                rounds[m].append(r)
        runs = [summarize(m, rs) for m, rs in rounds.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "lightning": pl.__version__, "torch": torch.__version__,
              "machine": {"cores": os.cpu_count(), "load_average": load_before,
                          "load_average_after": os.getloadavg() if load_before else None},
              "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lightning.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report_section(out_dir / "REPORT.md", "## PyTorch Lightning", report(result))
    print(report(result))
    print(f"wrote {out_dir / 'lightning.json'} and the PyTorch Lightning section of "
          f"{out_dir / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
