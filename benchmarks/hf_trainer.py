"""Checkpointing inside the Hugging Face Trainer: no checkpoint, Trainer's own saving, AsymCheck.

One process runs the same GPT-2 (AdamW) through ``transformers.Trainer`` three times, from
the same seed on the same random tokens, checkpointing every ``--every`` optimizer steps:

- *none*: ``save_strategy="no"``;
- *trainer*: Trainer's own ``save_steps`` (safetensors model + optimizer, scheduler, RNG and
  ``trainer_state.json`` in a ``checkpoint-N`` folder, written on the training thread);
- *asymcheck*: ``asymcheck_trainer(Trainer)`` with ``AsymCheckCallback`` (asym mode, host
  shared memory + local disk).

Reported, as ratios to the Trainer's own saving: stall (seconds the training loop waits per
checkpoint: Trainer's ``_save_checkpoint``; AsymCheck's save call plus the wait at the next
optimizer step), overhead (the shortest checkpoint period, ``every`` iterations ending with a
save, vs. *none*'s: the shortest is the one least disturbed by other load on a shared machine;
the methods run interleaved, ``--rounds`` times each; medians are in the JSON) and time to durable
(from the save call until the checkpoint is on local disk; the Trainer's is its save, which
returns once written). Writes ``benchmarks/results/hf_trainer.json``.

    python benchmarks/hf_trainer.py            # a few minutes on 2 cores
    python benchmarks/hf_trainer.py --quick    # a smoke run
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
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import itertools

from hf_common import RandomTokens

import asymcheck
from asymcheck.integrations.transformers import AsymCheckCallback, asymcheck_trainer

RESULTS = Path(__file__).resolve().parent / "results"


class StepClock(TrainerCallback):
    """The time of every optimizer step's end (the first callback: before any save)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends.append(time.perf_counter())


class DurableWatch:
    """Records when each AsymCheck save is durable on ``tier`` by polling ``done()`` (waiting
    on the handle would finish the deferred copy early)."""

    def __init__(self, tier: str) -> None:
        self.tier, self.times = tier, []
        self._pending: list[tuple[float, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, started: float, handle: Any) -> None:
        with self._lock:
            self._pending.append((started, handle.durable(self.tier)))

    def _run(self) -> None:
        while not self._stop.is_set() or self._pending:
            now = time.perf_counter()
            with self._lock:
                left = []
                for started, c in self._pending:
                    if c.done():
                        self.times.append(now - started)
                    else:
                        left.append((started, c))
                self._pending = left
            time.sleep(0.001)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


class TimedCallback(AsymCheckCallback):
    """AsymCheckCallback that records when each save was called."""

    watch: DurableWatch | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        started, n = time.perf_counter(), len(self.handles)
        super().on_step_end(args, state, control, **kw)
        if len(self.handles) > n and self.watch is not None:
            self.watch.add(started, self.handles[-1])


def train(method: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    transformers.set_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4,
                                       vocab_size=args.vocab, n_positions=args.seq_len,
                                       bos_token_id=0, eos_token_id=0))
    data = RandomTokens(args.steps * args.batch, args.seq_len, args.vocab, args.seed)
    out = work / method
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=3e-4, logging_strategy="no", report_to="none", seed=args.seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        save_strategy="steps" if method == "trainer" else "no", save_steps=args.every,
        save_total_limit=3)
    clock = StepClock()
    callbacks: list[Any] = [clock]
    stalls: list[float] = []
    durable: list[float] = []
    watch = None
    cls: Any = Trainer
    ckpt = None
    if method == "asymcheck":
        watch = DurableWatch("local")
        ckpt = TimedCallback(asymcheck.default_policy(out / "checkpoints"), every=args.every,
                             save_last=False, warmup_iterations=5)
        ckpt.watch = watch
        callbacks.append(ckpt)
        cls = asymcheck_trainer(Trainer)
    trainer = cls(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    if method == "trainer":
        save = trainer._save_checkpoint

        def timed_save(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return save(*a, **k)
            finally:
                stalls.append(time.perf_counter() - t0)
                durable.append(stalls[-1])

        trainer._save_checkpoint = timed_save  # type: ignore[method-assign]
    trainer.train()
    if ckpt is not None and watch is not None:
        watch.close()
        # the first save of the run is in the warm-up (copied at once); count the rest
        stalls = [h.stall_s for h in ckpt.handles if h.metrics.get("mode") == "asym"]
        durable = watch.times[1:]
    iters = [b - a for a, b in itertools.pairwise(clock.ends)]
    # checkpoint periods: ``every`` iterations ending with a save; the first is warm-up
    periods = [sum(iters[i:i + args.every]) for i in range(args.every, len(iters), args.every)]
    if method == "asymcheck":
        shm = asymcheck.default_policy(out / "checkpoints").staging.url.removeprefix("shm://")
        shutil.rmtree(Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm")) / shm,
                      ignore_errors=True)
    return {"periods": periods, "stalls": stalls, "durable": durable}


def summarize(method: str, runs: list[dict[str, Any]], every: int) -> dict[str, Any]:
    periods = [p for r in runs for p in r["periods"]]
    stalls = [s for r in runs for s in r["stalls"]]
    durable = [d for r in runs for d in r["durable"]]
    return {"method": method, "runs": len(runs), "periods": len(periods),
            "period_s_median": statistics.median(periods), "period_s_min": min(periods),
            "iteration_s": min(periods) / every,
            "checkpoints": len(stalls),
            "stall_s_median": statistics.median(stalls) if stalls else 0.0,
            "stall_s_max": max(stalls, default=0.0),
            "durable_s_median": statistics.median(durable) if durable else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="runs per method, interleaved")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    p.add_argument("--out", default=str(RESULTS / "hf_trainer.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.layers, args.width, args.vocab, args.seq_len = (
            12, 4, 2, 64, 1024, 32)
        args.rounds = 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="asymcheck-hf-bench-", dir=args.workdir))
    t0 = time.perf_counter()
    methods = ("none", "trainer", "asymcheck")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        train("none", args, work / "warm-up")  # first-run costs (allocator, lazy init) not timed
        for i in range(args.rounds):  # interleaved, so a burst of load elsewhere hits all
            for m in methods:
                runs[m].append(train(m, args, work / f"round-{i}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {m: summarize(m, runs[m], args.every) for m in methods}
    none_s = rows["none"]["period_s_min"]
    for r in rows.values():
        r["overhead"] = r["period_s_min"] / none_s - 1
    hf, ac = rows["trainer"], rows["asymcheck"]
    ratios = {"stall": ac["stall_s_median"] / hf["stall_s_median"],
              "overhead": (ac["overhead"] / hf["overhead"]) if hf["overhead"] > 0 else None,
              "iteration_time": ac["iteration_s"] / hf["iteration_s"],
              "durable": (ac["durable_s_median"] / hf["durable_s_median"]
                          if ac["durable_s_median"] and hf["durable_s_median"] else None)}
    state_mb = sum(t.numel() * t.element_size() for t in GPT2LMHeadModel(GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab,
        n_positions=args.seq_len)).state_dict().values()) / 1e6
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
              "model_mb": round(state_mb, 1), "torch": torch.__version__,
              "transformers": transformers.__version__, "cpus": os.cpu_count(),
              "load_avg": os.getloadavg(), "seconds": time.perf_counter() - t0,
              "methods": rows, "asymcheck_vs_trainer": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':10} {'it/s':>7} {'overhead':>9} {'stall ms':>9} {'durable s':>10}")
    for r in rows.values():
        d = r["durable_s_median"]
        print(f"{r['method']:10} {1 / r['iteration_s']:7.2f} {r['overhead']:+9.1%} "
              f"{r['stall_s_median'] * 1e3:9.1f} {'-' if d is None else f'{d:.3f}':>10}")
    print("asymcheck / trainer: " + ", ".join(
        f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in ratios.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
