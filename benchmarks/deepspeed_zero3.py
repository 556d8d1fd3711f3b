"""DeepSpeed ZeRO-3 at 2 ranks (CPU/gloo): AsymCheck's checkpoint engine beside DeepSpeed's own.

One command starts 2 gloo ranks on loopback (``DS_ACCELERATOR=cpu``, 1 torch thread each).
Each rank builds a small GPT-2 (``transformers.GPT2LMHeadModel``) or BERT
(``transformers.BertForMaskedLM``), hands it with ``torch.optim.AdamW`` to
``deepspeed.initialize`` under ZeRO stage 3, and trains it on seeded random tokens (dropout
off). Rows, one after the other in the same rank processes, same model, seed and
iterations, ``engine.save_checkpoint(dir)`` after the optimizer step every ``--every``
iterations:

- *no checkpoint*;
- *AsymCheck*: ``install(engine, policy=default_policy(dir))`` from
  ``asymcheck.integrations.deepspeed`` (host shared memory + local disk); ``wait()`` and
  ``close()`` at the end;
- *DeepSpeed torch*: DeepSpeed's default ``TorchCheckpointEngine`` (``torch.save`` of each
  file inside ``save_checkpoint``; the files are not fsynced);
- *DeepSpeed decoupled*: ``DecoupledCheckpointEngine`` (config ``"checkpoint": {"writer":
  {"type": "python", "decoupled": true}}``): ``save_checkpoint`` queues each file to a writer
  process per rank, the next ``engine.step()`` waits for the writes to finish (its commit)
  before the optimizer runs. The "fast" writer type needs DeepSpeed's async I/O extension
  (a compiled op), so the plain Python writer is used; it does not fsync either.

For each model and each checkpoint period of ``--every``, the rows run ``--rounds`` times,
interleaved, the order reversed every other round. The last warm-up (untimed) iteration
saves, and that save is awaited before the timed iterations, so one-time start-up is not
timed; then a save follows every ``every``-th iteration.

Per row: mean iteration time over the timed iterations (both ranks, every round; ZeRO-3's
collectives keep the ranks in step) and its overhead versus *no checkpoint*; stall per save
(training-thread seconds inside ``save_checkpoint``, plus the wait in the next step: AsymCheck's
``handle.stall_s`` beyond the time of its own commit call inside ``save_checkpoint``, the
decoupled engine's commit in ``engine.step()``); time to durable (from the save call until
AsymCheck's ``handle.durable("local")`` completes, i.e. committed and fsynced on local disk;
for DeepSpeed torch the end of ``save_checkpoint``; for decoupled the end of the commit, both
with the files in the page cache only); bytes per save (DeepSpeed rows: the size of the files
written for one tag, both ranks; AsymCheck: the tensor bytes DeepSpeed hands to its engine,
both ranks); CPU seconds per GB checkpointed (every thread of both rank processes and their
child processes, over the timed iterations and the final drain, net of *no checkpoint*'s;
and the background part alone: threads and processes the no-checkpoint row does not have,
e.g. the decoupled writer process); restore at the same world size (slowest rank): a fresh
engine, then ``engine.load_checkpoint(dir)`` (AsymCheck: ``install`` then the load, from
shared memory and from disk with the shared memory removed; DeepSpeed rows: from disk, the
decoupled checkpoint read by a default engine, as the decoupled engine's ``load`` is the same
``torch.load``). Disk restores drop the files' page cache first. Every restore is compared bit
for bit with the state at the last save: each rank's parameter partitions, fp32 master
partitions and AdamW state. Ratios are to the better DeepSpeed row (lower mean iteration
time); none is given to an overhead at or below zero (noise).

    python benchmarks/deepspeed_zero3.py --out benchmarks/results/deepspeed_zero3.json
    python benchmarks/deepspeed_zero3.py --quick                 # a smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpumeter
from harness import interleaved, tensor_bytes, write_report_section
from sharded import (
    add_background_cpu,
    differences,
    drop_page_cache,
    drop_row,
    prepare_restore,
    run_ranks,
    tree_cpu_s,
)

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
ROWS = ("none", "asymcheck", "ds-torch", "ds-decoupled")
ASYM_WARMUP = 3
NAMES = {"none": "no checkpoint", "asymcheck": "AsymCheck", "ds-torch": "DeepSpeed torch",
         "ds-decoupled": "DeepSpeed decoupled"}
DS_ROWS = ("ds-torch", "ds-decoupled")
MODELS = ("gpt2", "bert")
HEADING = "## DeepSpeed ZeRO-3 at 2 ranks"
RATIO_NAMES = {"overhead": "overhead", "stall_s_mean": "stall", "durable_s_mean": "time to durable",
               "cpu_s_per_gb": "CPU-s/GB", "cpu_s_per_gb_background": "background CPU-s/GB",
               "restore_host": "restore from shared memory", "restore_local": "restore from disk"}


# --------------------------------------------------------------------------- model

def build_model(name: str, cfg: dict[str, Any]) -> torch.nn.Module:
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg["seed"])
    heads = max(1, cfg["width"] // 64)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=cfg["layers"], n_embd=cfg["width"], n_head=heads, vocab_size=cfg["vocab"],
            n_positions=cfg["seq"], bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["width"], num_hidden_layers=cfg["layers"],
        num_attention_heads=heads, intermediate_size=4 * cfg["width"],
        max_position_embeddings=cfg["seq"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def ds_config(row: str, cfg: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9}
    if row == "ds-decoupled":
        config["checkpoint"] = {"writer": {"type": "python", "decoupled": True}}
    return config


def build_engine(row: str, name: str, cfg: dict[str, Any]) -> Any:
    import deepspeed
    model = build_model(name, cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(row, cfg))
    return engine


def train_step(engine: Any, cfg: dict[str, Any], step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    ids = torch.randint(4, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    out: Any = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()


def zero_state(engine: Any) -> dict[str, torch.Tensor]:
    """What ZeRO-3 holds on this rank, copied: parameter partitions, fp32 master partitions and
    the AdamW state of each of them."""
    zero = engine.optimizer
    out = {f"param/{i}": p.ds_tensor.detach().clone()
           for i, p in enumerate(engine.module.parameters())}
    for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
        out[f"fp32/{i}"] = flat.detach().clone()
        for k, v in zero.optimizer.state[flat].items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{i}/{k}"] = v.detach().clone()
    return out


# --------------------------------------------------------------------------- methods

class Method:
    """One way to checkpoint; ``save`` runs on the training thread after ``engine.step()``."""

    def setup(self, engine: Any, rowdir: Path) -> None:
        self.engine, self.rowdir, self.ckdir = engine, rowdir, rowdir / "ds"
        self.saved_at: dict[int, float] = {}
        self.durable_at: dict[int, float] = {}
        self.call_s: dict[int, float] = {}  # training-thread seconds in save_checkpoint
        self.gate_s: dict[int, float] = {}  # waits for a save in the next step
        self.saved_bytes = 0  # tensor bytes handed to the checkpoint engine in the last save
        self.last: int | None = None
        self.last_tag = ""
        ce = engine.checkpoint_engine
        original_save = ce.save

        def save(state_dict: Any, path: str) -> Any:
            self.saved_bytes += tensor_bytes(state_dict)
            return original_save(state_dict, path)
        ce.save = save

    def save(self, step: int) -> None:
        self.saved_bytes = 0
        self.last, self.last_tag = step, f"global_step{self.engine.global_steps}"
        t0 = self.saved_at[step] = time.perf_counter()
        self.engine.save_checkpoint(str(self.ckdir))
        self.call_s[step] = time.perf_counter() - t0
        self.after_save(step)

    def after_save(self, step: int) -> None:
        self.durable_at[step] = self.saved_at[step] + self.call_s[step]

    def stall_s(self, step: int) -> float:
        return self.call_s[step] + self.gate_s.get(step, 0.0)

    def quiesce(self) -> None:
        """At the end of the warm-up: wait for the saves in flight."""

    def finish(self) -> None:
        """After the last iteration: wait for every save."""

    def bytes_per_save(self) -> int:
        """This rank's bytes of one save."""
        tag = self.ckdir / self.last_tag
        rank = dist.get_rank()
        return sum(p.stat().st_size for p in tag.iterdir()
                   if p.is_file() and f"rank_{rank}_" in p.name)

    def restore_tiers(self) -> list[str]:
        return ["local"]

    def prepare(self, tier: str, rank: int) -> None:
        drop_page_cache(self.ckdir)

    def restore(self, engine: Any, tier: str) -> Any:
        return engine.load_checkpoint(str(self.ckdir))

    def close(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {}


class AsymCheckMethod(Method):
    def setup(self, engine: Any, rowdir: Path) -> None:
        import asymcheck
        from asymcheck.integrations.deepspeed import install
        self.asymdir = rowdir / "asymcheck"
        # the idle windows are profiled over the untimed warm-up iterations (--warmup >= 3),
        # so the timed saves copy the ZeRO-3 partitions in the next iteration's windows
        self.ck = install(engine, policy=asymcheck.default_policy(self.asymdir),
                          warmup_iterations=ASYM_WARMUP)
        super().setup(engine, rowdir)
        self.commit_s: dict[int, float] = {}
        self.handles: dict[int, Any] = {}
        original_commit = self.ck.commit

        def commit(info: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original_commit(info)
            finally:
                if self.last is not None:
                    self.commit_s[self.last] = time.perf_counter() - t0
        self.ck.commit = commit

    def after_save(self, step: int) -> None:
        h = self.ck.handles[-1]
        self.handles[step] = h
        c = h.durable("local")
        fut = getattr(c, "_fut", None)

        def done(_f: Any = None, step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        if fut is not None:
            fut.add_done_callback(done)
        else:  # poll without waiting (a wait would finish deferred copies early)
            def poll() -> None:
                while not c.done():
                    time.sleep(0.002)
                done()
            threading.Thread(target=poll, daemon=True).start()

    def stall_s(self, step: int) -> float:
        # handle.stall_s holds the save's own staging plus any wait of the next step for it;
        # the part beyond the commit call inside save_checkpoint is that wait
        h = self.handles[step]
        self.gate_s[step] = max(0.0, float(h.stall_s) - self.commit_s.get(step, 0.0))
        return super().stall_s(step)

    def quiesce(self) -> None:
        self.ck.wait()

    def finish(self) -> None:
        self.ck.wait()
        self.ck.close()

    def bytes_per_save(self) -> int:
        return self.saved_bytes

    def restore_tiers(self) -> list[str]:
        return ["host", "local"]

    def prepare(self, tier: str, rank: int) -> None:
        prepare_restore(self.asymdir, tier, rank)

    def restore(self, engine: Any, tier: str) -> Any:
        import asymcheck
        from asymcheck.integrations.deepspeed import install
        ck = install(engine, policy=asymcheck.default_policy(self.asymdir))
        try:
            return engine.load_checkpoint(str(self.ckdir))
        finally:
            ck.close()

    def info(self) -> dict[str, Any]:
        hs = [self.handles[s] for s in sorted(self.handles)]
        return {"modes": [str(h.metrics.get("mode")) for h in hs],
                "handle_stall_s": [float(h.stall_s) for h in hs],
                "gate_stall_s": [h.metrics.get("gate_stall_s") for h in hs],
                "local_stored_bytes": hs[-1].metrics.get("local.stored_bytes") if hs else None}


class DecoupledMethod(Method):
    def setup(self, engine: Any, rowdir: Path) -> None:
        super().setup(engine, rowdir)
        if not engine.checkpoint_engine.is_decoupled():
            raise RuntimeError(f"the engine runs {engine.checkpoint_engine.name}, "
                               "not the decoupled one")
        original = engine._commit_decoupled_checkpoint

        def commit() -> None:
            pending = engine.checkpoint_engine.get_commit_info() is not None
            t0 = time.perf_counter()
            original()
            t1 = time.perf_counter()
            if pending and self.last is not None:
                self.gate_s[self.last] = t1 - t0
                self.durable_at[self.last] = t1
        engine._commit_decoupled_checkpoint = commit  # what engine.step() calls first

    def after_save(self, step: int) -> None:
        pass

    def quiesce(self) -> None:
        self.engine._commit_decoupled_checkpoint()

    def finish(self) -> None:
        last, gated = self.last, self.last in self.gate_s
        self.engine._commit_decoupled_checkpoint()
        if not gated:  # waited for in the drain, not by a training step
            self.gate_s.pop(last, None)  # type: ignore[arg-type]

    def close(self) -> None:
        self.engine.checkpoint_engine.cleanup()  # ends the writer process


def make_method(row: str) -> Method:
    return {"asymcheck": AsymCheckMethod, "ds-decoupled": DecoupledMethod}.get(row, Method)()


# --------------------------------------------------------------------------- one rank

def run_row(row: str, name: str, every: int, cfg: dict[str, Any], rank: int, rowdir: Path,
            final: bool) -> dict[str, Any]:
    """Train and checkpoint one row on this rank; in the ``final`` round also restore the last
    checkpoint into a fresh engine. The figures of this rank."""
    rowdir.mkdir(parents=True, exist_ok=True)
    engine = build_engine(row, name, cfg)
    method = make_method(row)
    try:
        method.setup(engine, rowdir)
        # the last warm-up iteration saves (one-time start-up, awaited before the timed
        # iterations); then a save every ``every`` iterations
        warmup = max(1, cfg["warmup"])
        total = warmup + cfg["iterations"]
        saves = [s for s in range(warmup - 1, total)
                 if (s - warmup + 1) % every == 0] if row != "none" else []
        last_save = saves[-1] if saves and final else -1
        iteration_s: list[float] = []
        timed_saves: list[int] = []
        expected: dict[str, torch.Tensor] = {}
        dist.barrier()
        cpu0, threads0 = tree_cpu_s(), cpumeter.read()
        for step in range(total):
            if step == warmup:
                method.quiesce()
                dist.barrier()
                cpu0, threads0 = tree_cpu_s(), cpumeter.read()
            t0 = time.perf_counter()
            train_step(engine, cfg, step, rank)
            if step in saves:
                if step == last_save:  # what the restores must give back; not timed
                    t_copy = time.perf_counter()
                    expected = zero_state(engine)
                    t0 += time.perf_counter() - t_copy
                method.save(step)
                if step >= warmup:
                    timed_saves.append(step)
            if step >= warmup:
                iteration_s.append(time.perf_counter() - t0)
        threads_trained = cpumeter.read()
        t_drain = time.perf_counter()
        method.finish()
        drain_s = time.perf_counter() - t_drain
        cpu_s = tree_cpu_s() - cpu0
        threads = cpumeter.between(threads0, cpumeter.read()).to_dict()
        out: dict[str, Any] = {
            "rank": rank, "every": every, "warmup": warmup, "iteration_s": iteration_s,
            "drain_s": drain_s, "cpu_s": cpu_s, "cpu_threads": threads,
            "cpu_threads_training": cpumeter.between(threads0, threads_trained).to_dict(),
            "stall_s": [method.stall_s(s) for s in timed_saves],
            "save_call_s": [method.call_s[s] for s in timed_saves],
            "gate_s": [method.gate_s.get(s, 0.0) for s in timed_saves],
            "durable_s": [method.durable_at[s] - method.saved_at[s] for s in timed_saves
                          if s in method.durable_at],
            "timed_saves": timed_saves,
            "bytes_per_save": method.bytes_per_save() if saves else 0,
            "tensor_bytes_per_save": method.saved_bytes,
            "restore_s": {}, "verified": {}, **method.info()}
        method.close()
    finally:
        engine.destroy()
    del engine
    for tier in method.restore_tiers() if final and row != "none" else []:
        fresh = build_engine("none", name, cfg)  # the default engine reads DeepSpeed's files
        try:
            dist.barrier()
            method.prepare(tier, rank)
            dist.barrier()
            t0 = time.perf_counter()
            path, _client = method.restore(fresh, tier)
            out["restore_s"][tier] = time.perf_counter() - t0
            if path is None:
                raise RuntimeError(f"{NAMES[row]}: load_checkpoint found no checkpoint")
            bad = differences(expected, zero_state(fresh))
            out["verified"][tier] = not bad
            if bad:
                out.setdefault("mismatch", {})[tier] = bad[:5]
        finally:
            fresh.destroy()
        del fresh
    drop_row(rowdir, rowdir / "asymcheck", rank, final)
    return out


def rank_main(rank: int, cfg: dict[str, Any], port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    import logging

    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(cfg["threads"])
    # the shared-memory all-reduce kernel would be compiled at start-up (minutes); gloo does
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo",
                               timeout=datetime.timedelta(seconds=cfg["collective_s"]))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    rows, rounds = cfg["rows"], cfg["rounds"]
    try:
        for name in cfg["models"]:
            for every in cfg["every"]:
                group = f"{name}/every{every}"
                res = results[group] = {row: [] for row in rows}
                # interleaved, the order reversed every other round, so that load from
                # elsewhere and drift over the run fall on every row alike
                for k, row in interleaved(rows, rounds):
                    if any("error" in r for r in res[row]):
                        continue
                    t0 = time.perf_counter()
                    final = k == rounds - 1
                    rowdir = Path(work) / f"{name}-{every}" / (
                        row if final else f"{row}-round{k}")
                    try:
                        got = run_row(row, name, every, cfg, rank, rowdir, final)
                    except Exception as e:  # reported; the other rows still run
                        got = {"rank": rank, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()}
                        print(f"rank {rank}: {group} {NAMES[row]} failed: "
                              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                        dist.barrier()
                    got["wall_s"] = time.perf_counter() - t0
                    res[row].append(got)
                    if rank == 0:
                        print(f"  {group:12s} round {k + 1}/{rounds} {NAMES[row]:19s} "
                              f"{got['wall_s']:6.1f} s"
                              f"{'  (failed)' if 'error' in got else ''}", flush=True)
    finally:
        Path(work, f"rank-{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# --------------------------------------------------------------------------- summary

def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize(row: str, per_rank: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One row's figures over both ranks and every round (``per_rank[rank][round]``)."""
    out: dict[str, Any] = {"row": row, "method": NAMES[row]}
    errors = [r for rounds in per_rank for r in rounds if "error" in r]
    if errors or not per_rank[0]:
        out["error"] = errors[0]["error"] if errors else "did not run"
        out["traceback"] = errors[0].get("traceback") if errors else None
        return out
    runs = [r for rounds in per_rank for r in rounds]
    finals = [rounds[-1] for rounds in per_rank]
    iters = [t for r in runs for t in r["iteration_s"]]
    stalls = [s for r in runs for s in r["stall_s"]]
    durable = [d for r in runs for d in r["durable_s"]]
    out.update({
        "rounds": len(per_rank[0]), "warmup": per_rank[0][0]["warmup"],
        "iteration_s_mean": statistics.fmean(iters),
        "iteration_s_median": statistics.median(iters),
        "iteration_s_mean_by_round": [statistics.fmean(
            [t for rounds in per_rank for t in rounds[k]["iteration_s"]])
            for k in range(len(per_rank[0]))],
        "timed_iterations": sum(len(r["iteration_s"]) for r in per_rank[0]),
        "timed_saves": sum(len(r["timed_saves"]) for r in per_rank[0]),
        "stall_s_mean": _mean(stalls), "stall_s_max": max(stalls, default=None),
        "save_call_s_mean": _mean([s for r in runs for s in r["save_call_s"]]),
        "gate_s_mean": _mean([s for r in runs for s in r["gate_s"]]),
        "durable_s_mean": _mean(durable), "durable_s_max": max(durable, default=None),
        "drain_s": max(r["drain_s"] for r in runs),
        "cpu_s": sum(r["cpu_s"] for r in runs),
        "background_cpu_s": sum(r.get("background_cpu_s", 0.0) for r in runs),
        "bytes_per_save": sum(r["bytes_per_save"] for r in finals),  # both ranks
        "tensor_bytes_per_save": sum(r["tensor_bytes_per_save"] for r in finals),
        "restore_s": {t: max(r["restore_s"][t] for r in finals)
                      for t in finals[0]["restore_s"]},
        "verified": {t: all(r["verified"].get(t, False) for r in finals)
                     for t in finals[0]["verified"]},
        "cpu_threads_rank0": finals[0]["cpu_threads"],
        "wall_s": sum(r.get("wall_s", 0.0) for r in per_rank[0])})
    if "modes" in finals[0]:
        out["modes"] = [m for r in per_rank[0] for m in r["modes"]]
        out["handle_stall_s_mean"] = _mean([s for r in runs for s in r["handle_stall_s"]])
        out["local_stored_bytes"] = sum(r.get("local_stored_bytes") or 0 for r in finals)
    mism = {f"rank{r['rank']}": r["mismatch"] for r in finals if r.get("mismatch")}
    if mism:
        out["mismatch"] = mism
    return out


def derive(summary: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Overheads, CPU per GB and ratios to the better DeepSpeed row; that row's summary."""
    base = summary.get("none", {})
    if "error" in base or not base:
        return None
    for s in summary.values():
        if "error" in s or s["row"] == "none":
            continue
        gb = s["timed_saves"] * s["bytes_per_save"] / 1e9
        s["overhead"] = s["iteration_s_mean"] / base["iteration_s_mean"] - 1
        extra = s["cpu_s"] - base["cpu_s"] * s["timed_iterations"] / base["timed_iterations"]
        s["cpu_s_per_gb"] = extra / gb if gb else None
        s["cpu_s_per_gb_background"] = s["background_cpu_s"] / gb if gb else None
    ds = [summary[r] for r in DS_ROWS if r in summary and "error" not in summary[r]]
    ref = min(ds, key=lambda s: s["iteration_s_mean"]) if ds else None
    if ref is None:
        return None
    for s in summary.values():
        if "error" in s or s["row"] == "none":
            continue
        ratios: dict[str, float | None] = {}
        for k in ("overhead", "stall_s_mean", "durable_s_mean", "cpu_s_per_gb",
                  "cpu_s_per_gb_background"):
            a, b = s.get(k), ref.get(k)
            # an overhead (or a net CPU figure) at or below zero is noise: no ratio to or of it
            ok = a is not None and b is not None and b > 0 and (a > 0 or k == "stall_s_mean")
            ratios[k] = a / b if ok else None
        for tier, v in s["restore_s"].items():
            b = ref["restore_s"].get("local")
            ratios[f"restore_{tier}"] = v / b if b else None
        s["ratio_to_ds_best"] = ratios
    return ref


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| method | iteration, mean | overhead | stall per save (max) | time to durable "
             "(max) | MB per save | CPU-s/GB, net | CPU-s/GB, background | restore host / "
             "disk | bit-exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        if "error" in s:
            lines.append(f"| {s['method']} | failed: {s['error'][:160]} "
                         "| | | | | | | | |")
            continue
        rst = s.get("restore_s", {})
        exact = "-" if s["row"] == "none" else (
            "yes" if s["verified"] and all(s["verified"].values()) else "NO")
        stall = "-" if s["stall_s_mean"] is None else (
            f"{s['stall_s_mean'] * 1e3:.1f} ms ({s['stall_s_max'] * 1e3:.0f} ms)")
        restore = "-" if not rst else (
            f"{_f(rst.get('host'), '.3f')} / {_f(rst.get('local'), '.3f')} s")
        durable = "-" if s["durable_s_mean"] is None else (
            f"{s['durable_s_mean']:.3f} s ({s['durable_s_max']:.3f} s)")
        lines.append(
            f"| {s['method']} | {s['iteration_s_mean'] * 1e3:.0f} ms | "
            f"{_f(s.get('overhead'), '+.1%')} | {stall} | {durable} | "
            f"{_f(s['bytes_per_save'] or None, '.1f', 1e-6)} | "
            f"{_f(s.get('cpu_s_per_gb'), '.2f')} | "
            f"{_f(s.get('cpu_s_per_gb_background'), '.2f')} | "
            f"{restore} | {exact} |")
    return lines


def report_section(result: dict[str, Any], command: str) -> str:
    cfg = result["config"]
    lines = [HEADING, "",
             f"`{command}` ({result['seconds'] / 60:.1f} minutes; load average "
             f"{result['load_average_start'][0]:.1f} at the start, "
             f"{result['load_average_end'][0]:.1f} at the end, {result['cpus']} cores; raw "
             "figures in `deepspeed_zero3.json`). DeepSpeed "
             f"{result['deepspeed']}, ZeRO stage 3 over {WORLD} gloo ranks on loopback "
             f"(`DS_ACCELERATOR=cpu`, {cfg['threads']} torch thread each), "
             "`torch.optim.AdamW`, batch "
             f"{cfg['batch']} x {cfg['seq']} random tokens per rank; models "
             f"{cfg['layers']} layers x {cfg['width']}, vocabulary {cfg['vocab']}: "
             + ", ".join(f"{m} {result['parameters'][m] / 1e6:.1f} M parameters"
                         for m in cfg["models"])
             + f". Per model and checkpoint period: {cfg['warmup']} warm-up iterations (the "
             f"last one saves; awaited before timing), then {cfg['iterations']} timed "
             f"iterations with a save after every `every`-th; every row run {cfg['rounds']} "
             f"time{'s' if cfg['rounds'] > 1 else ''}, interleaved (order reversed every "
             "other round). *AsymCheck*: `install(engine, "
             "policy=default_policy(dir))`, then `engine.save_checkpoint(dir)`; *DeepSpeed "
             "torch*: the default `TorchCheckpointEngine` (synchronous `torch.save`, no "
             "fsync); *DeepSpeed decoupled*: `DecoupledCheckpointEngine` with the Python writer "
             "(a writer process per rank; the next `engine.step()` waits for its writes; no "
             "fsync).",
             "",
             "Stall: training-thread time in `save_checkpoint` plus the wait for the save in "
             "the next step (mean over both ranks and the timed saves). Durable: save call to "
             "AsymCheck's `handle.durable(\"local\")` (committed, fsynced); DeepSpeed torch: "
             "end of `save_checkpoint`; decoupled: end of its commit in the next step (both "
             "in the page cache only). MB per save: DeepSpeed's files for one tag / the "
             "tensor bytes handed to AsymCheck, both ranks. CPU-s/GB: CPU seconds of every "
             "thread of both rank processes and their children over the timed iterations and "
             "the drain, net of the no-checkpoint row's; background: the threads and "
             "processes the no-checkpoint row does not have. Restore: a fresh engine then "
             "`engine.load_checkpoint(dir)`, slowest rank (AsymCheck from shared memory, then "
             "from disk with the shared memory removed; DeepSpeed from disk); page cache "
             "dropped before each disk restore; bit-exact: parameter partitions, fp32 master "
             "partitions and AdamW state against the state at the last save.", ""]
    for group, g in result["groups"].items():
        lines += [f"### {group.replace('/every', ', a checkpoint every ')} "
                  f"iteration{'s' if not group.endswith('every1') else ''}", ""]
        lines += table({s["row"]: s for s in g["rows"]})
        ref = g.get("ds_reference")
        a = next((s for s in g["rows"] if s["row"] == "asymcheck" and "error" not in s), None)
        if ref and a and a.get("ratio_to_ds_best"):
            r = a["ratio_to_ds_best"]
            lines += ["", f"AsymCheck against {ref} (the better DeepSpeed row by mean "
                      "iteration time): " + ", ".join(
                          f"{RATIO_NAMES.get(k, k)} {'-' if v is None else f'{v:.2f}'}"
                          for k, v in r.items())
                      + ". AsymCheck modes: " + ", ".join(sorted(set(a.get("modes", []))))
                      + (f"; of its stall, {a['handle_stall_s_mean'] * 1e3:.1f} ms are "
                         "AsymCheck's own (its commit inside `save_checkpoint` and the wait "
                         "in the next step), the rest DeepSpeed's `save_checkpoint` around it"
                         if a.get("handle_stall_s_mean") is not None else "")
                      + "."]
        lines.append("")
    notes = [f"- {NAMES[row]}: {err}" for row, err in result.get("failures", {}).items()]
    if notes:
        lines += ["Rows that did not run:", "", *notes, ""]
    swings = []
    for group, g in result["groups"].items():
        none = next((s for s in g["rows"] if s["row"] == "none" and "error" not in s), None)
        if none and len(none["iteration_s_mean_by_round"]) > 1:
            by_round = none["iteration_s_mean_by_round"]
            swings.append((max(by_round) / min(by_round) - 1, group, by_round))
    if swings:
        worst, group, by_round = max(swings)
        lines += [f"**Noise.** The {result['cpus']} cores run both ranks and every writer. The "
                  "no-checkpoint row's mean iteration time moved between rounds by up to "
                  f"{worst:.0%} ({group}: " + " / ".join(f"{v * 1e3:.0f}" for v in by_round)
                  + " ms), so the overhead columns and the net CPU-s/GB (a difference of "
                  "totals, which can come out negative) do not separate the rows here; no "
                  "ratio is given to or of a figure at or below zero. The per-save figures "
                  "(stall, time to durable, bytes, restore) are less exposed. Per-round means "
                  "are in the JSON (`iteration_s_mean_by_round`).", ""]
    return "\n".join(lines)


def print_table(group: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{group}")
    print(f"{'method':20s} {'iter ms':>8s} {'overhead':>9s} {'stall ms':>9s} {'durable s':>10s} "
          f"{'MB/save':>8s} {'CPU-s/GB':>9s} {'bg CPU/GB':>9s} {'rst host':>9s} "
          f"{'rst disk':>9s} exact")
    for s in summary.values():
        if "error" in s:
            print(f"{s['method']:20s} failed: {s['error'][:100]}")
            continue
        rst = s.get("restore_s", {})
        exact = "-" if s["row"] == "none" else (
            "yes" if s["verified"] and all(s["verified"].values()) else "NO")
        print(f"{s['method']:20s} {s['iteration_s_mean'] * 1e3:8.1f} "
              f"{_f(s.get('overhead'), '+8.1%'):>9s} {_f(s['stall_s_mean'], '9.1f', 1e3):>9s} "
              f"{_f(s['durable_s_mean'], '10.3f')} {_f(s['bytes_per_save'] or None, '8.1f', 1e-6)} "
              f"{_f(s.get('cpu_s_per_gb'), '9.2f')} "
              f"{_f(s.get('cpu_s_per_gb_background'), '9.2f')} "
              f"{_f(rst.get('host'), '9.3f')} {_f(rst.get('local'), '9.3f')} {exact}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny models, few iterations, results to a tmp dir")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated, from {', '.join(ROWS)} (none always runs)")
    p.add_argument("--models", default=",".join(MODELS), help="gpt2, bert or both")
    p.add_argument("--every", type=int, nargs="+", default=[1, 10],
                   help="checkpoint periods in iterations")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per iteration")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed iterations (the last one saves)")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per row, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=int, default=1500, help="limit for the whole rank run")
    p.add_argument("--collective-s", type=int, default=180,
                   help="gloo timeout: a rank whose peer failed gives up after it")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    p.add_argument("--report-only", action="store_true",
                   help="recompute the ratios and the REPORT.md section from the --out JSON")
    p.add_argument("--out", default=None,
                   help=f"JSON file (default {RESULTS / 'deepspeed_zero3.json'}; with --quick "
                        "a tmp dir); REPORT.md is written next to it")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.vocab, args.seq = 2, 128, 1024, 64
        args.every, args.warmup, args.iterations, args.rounds = [1, 4], ASYM_WARMUP, 8, 1
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="asymcheck-ds-bench-")) / "deepspeed_zero3.json"
        if args.quick else RESULTS / "deepspeed_zero3.json")
    if args.report_only:
        result = json.loads(out.read_text())
        result.setdefault("command", f"python benchmarks/deepspeed_zero3.py --out {out}")
        for g in result["groups"].values():
            summary = {s["row"]: s for s in g["rows"]}
            ref = derive(summary)
            g["ds_reference"] = ref["method"] if ref else None
        out.write_text(json.dumps(result, indent=2) + "\n")
        write_report_section(out.parent / "REPORT.md", HEADING,
                             report_section(result, result.get("command", "")))
        print(f"rewrote the ratios in {out} and the {HEADING[3:]!r} section of "
              f"{out.parent / 'REPORT.md'}")
        return 0
    if args.warmup < ASYM_WARMUP:
        p.error(f"--warmup must be >= {ASYM_WARMUP} (AsymCheck profiles the warm-up)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(rows) - set(ROWS) or set(models) - set(MODELS):
        p.error(f"rows from {', '.join(ROWS)}; models from {', '.join(MODELS)}")
    rows = ["none", *[r for r in ROWS if r in rows and r != "none"]]
    cfg = {"models": models, "layers": args.layers, "width": args.width, "vocab": args.vocab,
           "seq": args.seq, "batch": args.batch, "every": args.every, "warmup": args.warmup,
           "iterations": args.iterations, "rounds": args.rounds, "threads": args.threads,
           "seed": args.seed, "collective_s": args.collective_s, "rows": rows}
    work = Path(tempfile.mkdtemp(prefix="asymcheck-ds-zero3-", dir=args.workdir))
    shm = Path("/dev/shm") / f"asymcheck-ds-bench-{uuid.uuid4().hex[:10]}"
    shm.mkdir()
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", ASYMCHECK_SHM_ROOT=str(shm),
                      CROSS_RANK="0", CROSS_SIZE="1")  # one machine, for DeepSpeed's writer
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    params = {m: sum(q.numel() for q in build_model(m, cfg).parameters()) for m in models}
    print(f"{', '.join(f'{m} {n / 1e6:.1f} M' for m, n in params.items())} parameters "
          f"({args.layers}x{args.width}, vocab {args.vocab}); ZeRO-3 over {WORLD} gloo ranks, "
          f"batch {args.batch}x{args.seq} per rank; checkpoint every {args.every}; "
          f"{args.warmup} warm-up + {args.iterations} timed iterations, "
          f"{args.rounds} rounds; load average {load_start}", flush=True)
    try:
        per_rank = run_ranks(rank_main, cfg, work, args.timeout_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    import deepspeed
    groups: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for group in per_rank[0]:
        runs = [pr[group] for pr in per_rank]
        add_background_cpu(runs)
        summary = {row: summarize(row, [r[row] for r in runs]) for row in rows}
        ref = derive(summary)
        print_table(group, summary)
        for s in summary.values():
            if "error" in s:
                failures.setdefault(s["row"], s["error"])
        groups[group] = {"ds_reference": ref["method"] if ref else None,
                         "rows": list(summary.values())}
    seconds = time.perf_counter() - t_start
    command = "python benchmarks/deepspeed_zero3.py" + (
        "" if argv is None and len(sys.argv) < 2 else " " + " ".join(
            sys.argv[1:] if argv is None else argv))
    result = {"command": command, "config": {k: v for k, v in cfg.items() if k != "collective_s"},
              "world_size": WORLD, "parameters": params, "torch": torch.__version__,
              "deepspeed": deepspeed.__version__, "cpus": os.cpu_count(),
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "seconds": seconds, "failures": failures, "groups": groups}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_report_section(out.parent / "REPORT.md", HEADING, report_section(result, command))
    print(f"\n{seconds:.0f} s; wrote {out} and the {HEADING[3:]!r} section of "
          f"{out.parent / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
