"""Sharded training state (FSDP2 at 2 ranks, CPU/gloo): AsymCheck beside DCP ``async_save``.

One command starts 2 gloo ranks on loopback. Each rank builds the same GPT-2
(``transformers.GPT2LMHeadModel``), applies ``fully_shard`` to every transformer block and
to the root on ``init_device_mesh("cpu", (2,))``, and trains it with AdamW on seeded random
tokens. Rows, one after the other in the same rank processes, same model, seed and
iterations, a checkpoint after the optimizer step every ``--every`` iterations:

- *no checkpoint*;
- *AsymCheck*: ``Checkpointer(model, opt, policy=default_policy(dir))`` (asym mode; host
  shared memory + local disk), ``save_sync(step)``; ``wait_idle_sync()`` at the end;
- *DCP-best thread* / *DCP-best process*: ``dcp.async_save`` of
  ``{"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}`` with a
  ``DefaultStager`` (shared memory, async staging), ``FileSystemWriter(single_file_per_rank,
  sync_files, thread_count=2)``, the staging awaited in an optimizer step pre-hook, on the
  thread or the process checkpointer;
- *DCP async_save*: the same call with DCP's defaults (staging inside the call).

Every DCP row keeps one save in flight (a save first waits for the previous one) and runs its
collectives on a gloo group of its own, apart from the group FSDP trains on.

The rows run ``--rounds`` times, interleaved, the order reversed every other round; saves in
flight are awaited at the end of the warm-up, so a checkpointer's start-up is not timed.

Per row: mean iteration time over the timed iterations (both ranks, every round; FSDP's
collectives keep the ranks in step) and its overhead versus *no checkpoint*; the same for the
shortest checkpoint period (``every`` consecutive timed iterations, each holding one save and
the next step's gate: the period least disturbed by load from elsewhere); stall per save
(training-thread seconds in the save call plus the waits in the next step's pre-hook, mean
over ranks and saves); time to durable (from the save call until the checkpoint is committed
on local disk: AsymCheck's ``handle.durable("local")``, DCP's upload future); CPU seconds per
GB checkpointed, over both ranks' bytes: every thread of each rank process and of its child
processes net of *no checkpoint*'s, and the background part alone (threads and processes the
no-checkpoint row does not have); restore times: at the same world size into a fresh FSDP2
model (the slowest rank; AsymCheck from shared memory and from disk; DCP ``dcp.load`` from
disk), and resharded 2 -> 1 (a single plain process without a process group restores the
2-rank checkpoint into a plain model: AsymCheck ``restore_sync()``, DCP
``dcp.load(no_dist=True)`` of full tensors, both from disk). Disk restores drop the files'
page cache first. Every restore is compared bit for bit with the state the last save was
taken from (local shards at 2 ranks, full tensors at 1). Ratios are to the better DCP-best
row (lower mean iteration time); none is given to an overhead at or below zero (noise).

    python benchmarks/sharded.py --out benchmarks/results/sharded.json   # 5-10 min on 2 cores
    python benchmarks/sharded.py --quick                                  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpumeter
from harness import interleaved

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
ROWS = ("none", "asymcheck", "dcp-best-thread", "dcp-best-process", "dcp-default")
NAMES = {"none": "no checkpoint", "asymcheck": "AsymCheck", "dcp-best-thread": "DCP-best thread",
         "dcp-best-process": "DCP-best process", "dcp-default": "DCP async_save"}
DCP_BEST = ("dcp-best-thread", "dcp-best-process")


# --------------------------------------------------------------------------- process CPU

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def tree_cpu_s() -> float:
    """CPU seconds of this process (every thread), of its live descendants (a checkpointer's
    helper process) and of the children it has reaped."""
    total = 0.0
    todo, seen = [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _proc_stat(pid)
        if fields is None:
            continue
        # after the name: utime(11) stime(12) cutime(13) cstime(14)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) * _TICK_S
        todo.extend(_children(pid))
    return total


# --------------------------------------------------------------------------- model

def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg["seed"])
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=cfg["layers"], n_embd=cfg["width"], n_head=max(1, cfg["width"] // 64),
        vocab_size=cfg["vocab"], n_positions=cfg["seq"], bos_token_id=0, eos_token_id=0))


def build_sharded(cfg: dict[str, Any], mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard
    model = build_model(cfg)
    gpt2: Any = model
    for block in gpt2.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def build_plain(cfg: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(cfg)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def loss(model: torch.nn.Module, cfg: dict[str, Any], step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    ids = torch.randint(4, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    out: Any = model(ids, labels=ids)
    return out.loss


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's tensors of the training state (the local chunk of each DTensor), copied."""
    out = {f"model/{k}": _local(v).detach().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{pid}/{k}"] = _local(v).detach().clone()
    return out


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: _local(obj)}
    if isinstance(obj, dict):
        out: dict[str, torch.Tensor] = {}
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
        return out
    return {}


def differences(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ (dtype, shape or any bit), and keys present on one side."""
    bad = sorted(set(expected) ^ set(got))
    for k in sorted(set(expected) & set(got)):
        a, b = expected[k], got[k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            bad.append(k)
    return bad


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, *,
               collective: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state as ``get_state_dict`` names it: FQN-keyed model and optimizer
    tensors. Under FSDP a collective (every rank calls it; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if collective else None
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    return {k: v.detach().clone() for k, v in
            flat_tensors({"model": msd, "optim": osd.get("state", {})}).items()}


def drop_page_cache(path: Path) -> None:
    """Evict the (fsynced) pages of every file under ``path``, so a restore reads the disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def shm_dirs(ckpt_dir: Path) -> list[Path]:
    """The shared-memory directories of ``default_policy(ckpt_dir)`` (every rank's)."""
    import asymcheck
    name = asymcheck.default_policy(ckpt_dir).tiers[0].url.removeprefix("shm://")
    root = Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm"))
    return sorted(root.glob(f"{name}*"))


# --------------------------------------------------------------------------- methods

class Method:
    """One way to checkpoint; ``save`` runs on the training thread after the optimizer step."""

    def setup(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rowdir: Path,
              pg: Any) -> None:
        self.model, self.opt, self.rowdir, self.pg = model, opt, rowdir, pg
        self.saved_at: dict[int, float] = {}
        self.durable_at: dict[int, float] = {}
        self.gate = 0.0

    def save(self, step: int) -> None:
        pass

    def take_gate_s(self) -> float:
        """Seconds the training thread waited in the last optimizer step's pre-hook."""
        gate, self.gate = self.gate, 0.0
        return gate

    def finish(self) -> None:
        pass

    def quiesce(self) -> None:
        """At the end of the warm-up: wait for the saves in flight, so that the timed window
        starts with none (a checkpointer's one-time start-up stays out of it)."""

    def restore_tiers(self) -> list[str]:
        return []

    def prepare(self, tier: str, rank: int) -> None:
        """Before a same-world-size restore from ``tier`` (every rank, between barriers)."""

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, tier: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class AsymCheckMethod(Method):
    def setup(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rowdir: Path,
              pg: Any) -> None:
        import asymcheck
        super().setup(model, opt, rowdir, pg)
        self.dir = rowdir / "checkpoints"
        self.ck = asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(self.dir))
        self.handles: list[Any] = []
        self.gated = 0  # handles whose step-gate wait has been counted
        self.modes: list[str] = []

    def save(self, step: int) -> None:
        self.saved_at[step] = time.perf_counter()
        h = self.ck.save_sync(step)
        self.handles.append(h)
        fut = getattr(h.durable("local"), "_fut", None)

        def done(step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        if fut is not None:
            fut.add_done_callback(lambda _f: done())
        else:  # poll without waiting (a wait would finish deferred copies early)
            c = h.durable("local")

            def poll() -> None:
                while not c.done():
                    time.sleep(0.002)
                done()
            threading.Thread(target=poll, daemon=True).start()

    def take_gate_s(self) -> float:
        """The wait at the step gate of the last save (its copies not yet done), once."""
        if len(self.handles) <= self.gated:
            return 0.0
        self.gated = len(self.handles)
        return float(self.handles[-1].metrics.get("gate_stall_s", 0.0))

    def quiesce(self) -> None:
        self.ck.wait_idle_sync()

    def finish(self) -> None:
        self.ck.wait_idle_sync()
        self.modes = [str(h.metrics.get("mode")) for h in self.handles]
        self.ck.close_sync()

    def restore_tiers(self) -> list[str]:
        return ["host", "local"]

    def prepare(self, tier: str, rank: int) -> None:
        prepare_restore(self.dir, tier, rank)

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, tier: str) -> None:
        import asymcheck
        ck = asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(self.dir))
        try:
            step = ck.restore_sync()
        finally:
            ck.close_sync()
        if step != max(self.saved_at):
            raise AssertionError(f"AsymCheck restored step {step}, expected {max(self.saved_at)}")


class DcpMethod(Method):
    """``dcp.async_save``, one save in flight; ``kind`` "default", "thread" or "process"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def setup(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rowdir: Path,
              pg: Any) -> None:
        super().setup(model, opt, rowdir, pg)
        import torch.distributed.checkpoint as dcp
        self.dcp = dcp
        self.future: Future[Any] | None = None
        self.staging: Future[Any] | None = None
        self.stager: Any = None
        self.hook: Any = None
        if self.kind != "default":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            self.stager = DefaultStager(StagingOptions(
                use_pinned_memory=False, use_shared_memory=True, use_async_staging=True,
                use_non_blocking_copy=False))
            self.hook = opt.register_step_pre_hook(self._await_staging)
        self.last: Path | None = None

    def _await_staging(self, *_: Any) -> None:
        """The step gate: the next optimizer step waits until the state is staged."""
        if self.staging is not None:
            t0 = time.perf_counter()
            self.staging.result()
            self.gate += time.perf_counter() - t0
            self.staging = None

    def _state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        return {"model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt)}

    def save(self, step: int) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        self.saved_at[step] = time.perf_counter()
        if self.future is not None:
            self.future.result()
        path = self.rowdir / f"step-{step}"
        if self.kind == "default":
            got: Any = self.dcp.async_save(self._state(self.model, self.opt),
                                           checkpoint_id=str(path), process_group=self.pg)
            self.future = getattr(got, "upload_completion", got)
        else:
            writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True,
                                      thread_count=2)
            got = self.dcp.async_save(
                self._state(self.model, self.opt), storage_writer=writer,
                async_checkpointer_type=(AsyncCheckpointerType.PROCESS if self.kind == "process"
                                         else AsyncCheckpointerType.THREAD),
                async_stager=self.stager, process_group=self.pg)
            self.staging = got.staging_completion
            self.future = got.upload_completion
        assert self.future is not None

        def done(_f: Any, step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        self.future.add_done_callback(done)
        self.last = path

    def quiesce(self) -> None:
        self._await_staging()
        self.gate = 0.0
        if self.future is not None:
            self.future.result()

    def finish(self) -> None:
        self._await_staging()
        if self.future is not None:
            self.future.result()
        if self.hook is not None:
            self.hook.remove()
        if self.stager is not None:
            self.stager.close()

    def restore_tiers(self) -> list[str]:
        return ["local"]

    def prepare(self, tier: str, rank: int) -> None:
        assert self.last is not None
        drop_page_cache(self.last)

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, tier: str) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        state = self._state(model, opt)
        self.dcp.load(state, checkpoint_id=str(self.last), process_group=self.pg)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])


def make_method(row: str) -> Method:
    if row == "none":
        return Method()
    if row == "asymcheck":
        return AsymCheckMethod()
    return DcpMethod({"dcp-best-thread": "thread", "dcp-best-process": "process",
                      "dcp-default": "default"}[row])


# --------------------------------------------------------------------------- one rank

def run_row(row: str, cfg: dict[str, Any], rank: int, mesh: Any, pg: Any, rowdir: Path,
            final: bool) -> dict[str, Any]:
    """Train and checkpoint one row on this rank, and in its ``final`` round restore the last
    checkpoint; the figures of this rank."""
    rowdir.mkdir(parents=True, exist_ok=True)
    model, opt = build_sharded(cfg, mesh)
    method = make_method(row)
    method.setup(model, opt, rowdir, pg)
    warmup, every = cfg["warmup"], cfg["every"]
    total = warmup + cfg["iterations"]
    saves = [s for s in range(total) if (s + 1) % every == 0]
    last_save = saves[-1] if row != "none" and final else -1
    iteration_s: list[float] = []
    stall_s: dict[int, float] = {}
    timed_saves: list[int] = []
    expected: dict[str, torch.Tensor] = {}
    dist.barrier()
    cpu0, threads0 = tree_cpu_s(), cpumeter.read()
    pending_gate: int | None = None
    for step in range(total):
        if step == warmup:
            method.quiesce()
            dist.barrier()
            cpu0, threads0 = tree_cpu_s(), cpumeter.read()
        t0 = time.perf_counter()
        loss(model, cfg, step, rank).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pending_gate is not None:
            stall_s[pending_gate] += method.take_gate_s()
            pending_gate = None
        if row != "none" and step in saves:
            if step == last_save:  # what the restores must give back; not the method's time
                t_copy = time.perf_counter()
                expected = local_state(model, opt)
                full = full_state(model, opt, collective=True)
                if rank == 0:
                    torch.save(full, rowdir / "expected-full.pt")
                del full
                t0 += time.perf_counter() - t_copy
            t_save = time.perf_counter()
            method.save(step)
            stall_s[step] = time.perf_counter() - t_save
            pending_gate = step
            if step >= warmup:
                timed_saves.append(step)
        if step >= warmup:
            iteration_s.append(time.perf_counter() - t0)
    threads_trained = cpumeter.read()  # a checkpointer's threads, before finish() ends them
    t_drain = time.perf_counter()
    method.finish()
    drain_s = time.perf_counter() - t_drain
    cpu_s = tree_cpu_s() - cpu0
    threads = cpumeter.between(threads0, cpumeter.read()).to_dict()
    state_bytes = sum(t.nbytes for t in local_state(model, opt).values())
    out: dict[str, Any] = {
        "rank": rank, "every": every, "iteration_s": iteration_s, "drain_s": drain_s,
        "cpu_s": cpu_s,
        "cpu_threads": threads, "state_bytes": state_bytes,
        "cpu_threads_training": cpumeter.between(threads0, threads_trained).to_dict(),
        "stall_s": [stall_s[s] for s in timed_saves],
        "durable_s": [method.durable_at[s] - method.saved_at[s] for s in timed_saves
                      if s in method.durable_at],
        "timed_saves": timed_saves, "restore_s": {}, "verified": {}}
    if isinstance(method, AsymCheckMethod):
        out["modes"] = method.modes
    del model, opt
    for tier in method.restore_tiers() if final else []:
        fresh, fopt = build_sharded(cfg, mesh)
        dist.barrier()
        method.prepare(tier, rank)
        dist.barrier()
        t0 = time.perf_counter()
        method.restore(fresh, fopt, tier)
        out["restore_s"][tier] = time.perf_counter() - t0
        bad = differences(expected, local_state(fresh, fopt))
        out["verified"][tier] = not bad
        if bad:
            out.setdefault("mismatch", {})[tier] = bad[:5]
        del fresh, fopt
    method.close()
    drop_row(rowdir, rowdir / "checkpoints", rank, final)
    return out


def prepare_restore(ckpt_dir: Path, tier: str, rank: int) -> None:
    """Before a restore from ``tier`` of ``default_policy(ckpt_dir)``: for the local tier, rank 0
    removes the shared-memory copies and every rank drops the files' page cache."""
    if tier == "local":
        if rank == 0:
            for d in shm_dirs(ckpt_dir):
                shutil.rmtree(d, ignore_errors=True)
        drop_page_cache(ckpt_dir)


def drop_row(rowdir: Path, ckpt_dir: Path, rank: int, final: bool) -> None:
    """Every rank done with a row: rank 0 removes its files and the shared memory of the
    default policy of ``ckpt_dir`` (the final row's are kept for the restores)."""
    dist.barrier()
    if not final and rank == 0:
        for d in shm_dirs(ckpt_dir):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(rowdir, ignore_errors=True)
    dist.barrier()


def rank_main(rank: int, cfg: dict[str, Any], port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(cfg["threads"])
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg["collective_s"]))
    mesh = init_device_mesh("cpu", (WORLD,))
    pg = dist.new_group(backend="gloo")  # checkpoint collectives, apart from FSDP's
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in cfg["rows"]}
    rounds = cfg["rounds"]
    try:
        # interleaved, the order reversed every other round, so that a burst of load from
        # elsewhere and any drift over the run fall on every row alike
        for k, row in interleaved(cfg["rows"], rounds):
            if any("error" in r for r in results[row]):
                continue
            t0 = time.perf_counter()
            final = k == rounds - 1
            rowdir = Path(work) / (row if final else f"{row}-round{k}")
            try:
                got = run_row(row, cfg, rank, mesh, pg, rowdir, final)
            except Exception as e:  # a row that fails is reported, the others still run
                got = {"rank": rank, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()}
                print(f"rank {rank}: {NAMES[row]} failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                dist.barrier()
            got["wall_s"] = time.perf_counter() - t0
            results[row].append(got)
            if rank == 0:
                print(f"  round {k + 1}/{rounds} {NAMES[row]:17s} {got['wall_s']:6.1f} s"
                      f"{'  (failed)' if 'error' in got else ''}", flush=True)
    finally:
        Path(work, f"rank-{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# --------------------------------------------------------------------------- 2 -> 1

def reshard_restore(row: str, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Restore a 2-rank checkpoint in this plain process (no process group) into a plain model;
    the seconds it took and whether every full tensor came back bit for bit."""
    rowdir = work / row
    expected = torch.load(rowdir / "expected-full.pt", weights_only=True)
    model, opt = build_plain(cfg)
    if row == "asymcheck":
        import asymcheck
        ckdir = rowdir / "checkpoints"
        for d in shm_dirs(ckdir):  # the ranks' shared memory is gone with them: read the disk
            shutil.rmtree(d, ignore_errors=True)
        drop_page_cache(ckdir)
        t0 = time.perf_counter()
        ck = asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(ckdir))
        try:
            step = ck.restore_sync()
        finally:
            ck.close_sync()
        seconds = time.perf_counter() - t0
        if step is None:
            raise AssertionError("AsymCheck found no checkpoint to restore")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        last = max((p for p in rowdir.glob("step-*")), key=lambda p: int(p.name[5:]))
        drop_page_cache(last)
        t0 = time.perf_counter()
        state: dict[str, Any] = {"model": get_model_state_dict(model),
                                 "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(last), no_dist=True)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        seconds = time.perf_counter() - t0
    bad = differences(expected, full_state(model, opt, collective=False))
    return {"restore_s": seconds, "verified": not bad, "mismatch": bad[:5]}


# --------------------------------------------------------------------------- summary

def run_ranks(main: Any, cfg: dict[str, Any], work: Path, timeout_s: float
              ) -> list[dict[str, Any]]:
    """Run ``main(rank, cfg, port, work)`` on WORLD spawned ranks (killed after ``timeout_s``);
    each rank's results, which it wrote to ``work/rank-<r>.json``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(main, args=(cfg, _free_port(), str(work)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"the ranks did not finish within {timeout_s} s")
    return [json.loads((work / f"rank-{r}.json").read_text()) for r in range(WORLD)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def add_background_cpu(per_rank: list[dict[str, list[dict[str, Any]]]]) -> None:
    """Each run's ``background_cpu_s``: the CPU seconds of the threads and processes that the
    no-checkpoint row does not have (a checkpointer's threads, ended threads, helper
    processes), i.e. the run's total less its training threads' (main, autograd, gloo).
    Less exposed to noise than a difference of totals; leaves out work a method does on
    the training thread itself (DCP's default staging, the state-dict calls)."""
    for runs in per_rank:
        training = {g for r in runs.get("none", []) for g in r.get("cpu_threads", {})
                    .get("cpu_s", {}) if g != cpumeter.ENDED}
        for row_runs in runs.values():
            for r in row_runs:
                if "cpu_threads" not in r:
                    continue
                own = sum(v for g, v in r["cpu_threads"]["cpu_s"].items() if g in training)
                r["background_cpu_s"] = max(0.0, r["cpu_s"] - own)


def summarize(row: str, per_rank: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One row's figures over both ranks and every round (``per_rank[rank][round]``)."""
    out: dict[str, Any] = {"row": row, "method": NAMES[row]}
    errors = [r["error"] for rounds in per_rank for r in rounds if "error" in r]
    if errors or not per_rank[0]:
        out["error"] = errors[0] if errors else "did not run"
        tb = [r.get("traceback") for rounds in per_rank for r in rounds if "error" in r]
        out["traceback"] = tb[0] if tb else None
        return out
    runs = [r for rounds in per_rank for r in rounds]
    finals = [rounds[-1] for rounds in per_rank]  # the restored round
    iters = [t for r in runs for t in r["iteration_s"]]
    every = per_rank[0][0]["every"]
    # checkpoint periods: ``every`` consecutive timed iterations, each with one save and the
    # next step's gate; the shortest is the one least disturbed by load from elsewhere
    periods = [sum(r["iteration_s"][i:i + every]) / every for r in runs
               for i in range(0, len(r["iteration_s"]) - every + 1, every)]
    stalls = [s for r in runs for s in r["stall_s"]]
    durable = [d for r in runs for d in r["durable_s"]]
    out.update({
        "rounds": len(per_rank[0]),
        "iteration_s_mean": statistics.fmean(iters),
        "iteration_s_median": statistics.median(iters),
        "period_iteration_s_min": min(periods), "periods": len(periods),
        "iteration_s_mean_by_round": [statistics.fmean(
            [t for rounds in per_rank for t in rounds[k]["iteration_s"]])
            for k in range(len(per_rank[0]))],
        "timed_iterations": sum(len(r["iteration_s"]) for r in per_rank[0]),
        "timed_saves": sum(len(r["timed_saves"]) for r in per_rank[0]),
        "stall_s_mean": _mean(stalls), "stall_s_median": (statistics.median(stalls)
                                                          if stalls else None),
        "stall_s_max": max(stalls, default=None),
        "durable_s_mean": _mean(durable), "durable_s_max": max(durable, default=None),
        "drain_s": max(r["drain_s"] for r in runs),
        "cpu_s": sum(r["cpu_s"] for r in runs),  # both ranks, every round
        "background_cpu_s": sum(r.get("background_cpu_s", 0.0) for r in runs),
        "state_bytes": sum(r["state_bytes"] for r in finals),  # both ranks, one checkpoint
        # the slowest rank decides when training can go on
        "restore_s": {t: max(r["restore_s"][t] for r in finals)
                      for t in finals[0]["restore_s"]},
        "verified": {t: all(r["verified"][t] for r in finals) for t in finals[0]["verified"]},
        # rank 0's threads in the final round: over the timed iterations, and with the drain
        "cpu_threads_rank0_training": finals[0]["cpu_threads_training"],
        "cpu_threads_rank0": finals[0]["cpu_threads"],
        "wall_s": sum(r.get("wall_s", 0.0) for r in per_rank[0])})
    if "modes" in finals[0]:
        out["modes"] = [m for r in per_rank[0] for m in r["modes"]]
    mism = {f"rank{r['rank']}": r["mismatch"] for r in finals if r.get("mismatch")}
    if mism:
        out["mismatch"] = mism
    return out


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated, from {', '.join(ROWS)} (none always runs first)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per iteration")
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=12, help="untimed iterations (one save)")
    p.add_argument("--iterations", type=int, default=30, help="timed iterations per round")
    p.add_argument("--rounds", type=int, default=2, help="runs per row, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=int, default=600, help="limit for the whole rank run")
    p.add_argument("--collective-s", type=int, default=120,
                   help="gloo timeout: a rank whose peer failed gives up after it")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    p.add_argument("--out", default=str(RESULTS / "sharded.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.vocab, args.seq = 2, 128, 1024, 64
        args.every, args.warmup, args.iterations, args.rounds = 4, 5, 8, 1
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    rows = ["none", *[r for r in ROWS if r in rows and r != "none"]]
    cfg = {"layers": args.layers, "width": args.width, "vocab": args.vocab, "seq": args.seq,
           "batch": args.batch, "every": args.every, "warmup": args.warmup,
           "iterations": args.iterations, "rounds": args.rounds, "threads": args.threads,
           "seed": args.seed,
           "timeout_s": args.timeout_s, "collective_s": args.collective_s, "rows": rows}
    work = Path(tempfile.mkdtemp(prefix="asymcheck-sharded-", dir=args.workdir))
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    params = sum(p.numel() for p in build_model(cfg).parameters())
    print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}, {params / 1e6:.1f} M parameters, "
          f"FSDP2 over {WORLD} gloo ranks ({args.threads} thread each), batch {args.batch}x"
          f"{args.seq} per rank; checkpoint every {args.every}; {args.warmup} warm-up + "
          f"{args.iterations} timed iterations, {args.rounds} rounds; load average "
          f"{load_start}", flush=True)
    try:
        per_rank = run_ranks(rank_main, cfg, work, args.timeout_s)
        add_background_cpu(per_rank)
        summary = {row: summarize(row, [pr[row] for pr in per_rank]) for row in rows}
        for row in rows:
            s = summary[row]
            if row == "none" or "error" in s:
                continue
            try:
                s["reshard"] = reshard_restore(row, cfg, work)
            except Exception as e:
                s["reshard"] = {"error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()}
                print(f"  {NAMES[row]}: 2 -> 1 restore failed: {type(e).__name__}: {e}",
                      flush=True)
    finally:
        for row in rows:
            for d in shm_dirs(work / row / "checkpoints"):
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    report(summary, cfg, params, load_start, time.perf_counter() - t_start, Path(args.out))
    return 0


def report(summary: dict[str, dict[str, Any]], cfg: dict[str, Any], params: int,
           load_start: tuple[float, float, float], seconds: float, out: Path) -> None:
    base = summary["none"]
    if "error" in base:
        raise SystemExit(f"no-checkpoint row failed: {base['error']}")
    base_it, base_cpu = base["iteration_s_mean"], base["cpu_s"]
    for s in summary.values():
        if "error" in s or s["row"] == "none":
            continue
        gb = s["timed_saves"] * s["state_bytes"] / 1e9
        s["cpu_s_per_gb_background"] = (s["background_cpu_s"] / gb) if gb else None
        s["overhead"] = s["iteration_s_mean"] / base_it - 1
        s["overhead_median"] = s["iteration_s_median"] / base["iteration_s_median"] - 1
        s["overhead_best_period"] = (s["period_iteration_s_min"]
                                     / base["period_iteration_s_min"] - 1)
        extra_cpu = s["cpu_s"] - base_cpu * s["timed_iterations"] / base["timed_iterations"]
        s["cpu_s_per_gb"] = extra_cpu / gb if gb else None
    dcp = [summary[r] for r in DCP_BEST if r in summary and "error" not in summary[r]]
    ref = min(dcp, key=lambda s: s["iteration_s_mean"]) if dcp else None
    keys = ("overhead", "overhead_best_period", "stall_s_mean", "durable_s_mean", "cpu_s_per_gb",
            "cpu_s_per_gb_background")
    for s in summary.values():
        if ref is None or "error" in s or s["row"] == "none":
            continue
        ratios: dict[str, float | None] = {}
        for k in keys:
            a, b = s.get(k), ref.get(k)
            # an overhead at or below zero is noise: no ratio to it
            ratios[k] = a / b if a is not None and b is not None and b > 0 else None
        for tier, v in s["restore_s"].items():
            b = ref["restore_s"].get("local")
            ratios[f"restore_{tier}"] = v / b if b else None
        rs, rr = s.get("reshard", {}), ref.get("reshard", {})
        if "restore_s" in rs and "restore_s" in rr:
            ratios["restore_2to1"] = rs["restore_s"] / rr["restore_s"]
        s["ratio_to_dcp_best"] = ratios
    header = (f"{'method':17s} {'iter ms':>8s} {'overhead':>9s} {'best per':>9s} "
              f"{'stall ms':>9s} "
              f"{'durable s':>10s} {'CPU-s/GB':>9s} {'bg CPU/GB':>9s} {'rst host':>9s} "
              f"{'rst disk':>9s} {'rst 2->1':>9s} exact")
    print("\n" + header)
    for s in summary.values():
        if "error" in s:
            print(f"{s['method']:17s} failed: {s['error'][:100]}")
            continue
        rst = s.get("restore_s", {})
        rs = s.get("reshard", {})
        exact = all(s["verified"].values()) and rs.get("verified", True)
        print(f"{s['method']:17s} {s['iteration_s_mean'] * 1e3:8.1f} "
              f"{_f(s.get('overhead'), '+8.1%'):>9s} "
              f"{_f(s.get('overhead_best_period'), '+8.1%'):>9s} "
              f"{_f(s.get('stall_s_mean'), '9.1f', 1e3)} "
              f"{_f(s.get('durable_s_mean'), '10.3f')} {_f(s.get('cpu_s_per_gb'), '9.2f')} "
              f"{_f(s.get('cpu_s_per_gb_background'), '9.2f')} "
              f"{_f(rst.get('host'), '9.3f')} {_f(rst.get('local'), '9.3f')} "
              f"{_f(rs.get('restore_s'), '9.3f')} "
              f"{'-' if s['row'] == 'none' else ('yes' if exact else 'NO')}")
    if ref is not None:
        print(f"\nratios to {ref['method']} (the better DCP-best row, lower mean iteration time)")
        for s in summary.values():
            r = s.get("ratio_to_dcp_best")
            if r:
                print(f"  {s['method']:17s} " + ", ".join(
                    f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in r.items()))
    result = {"config": {k: v for k, v in cfg.items() if k not in ("timeout_s", "collective_s")},
              "world_size": WORLD, "parameters": params, "torch": torch.__version__,
              "cpus": os.cpu_count(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "seconds": seconds,
              "dcp_reference": ref["method"] if ref else None, "rows": list(summary.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
