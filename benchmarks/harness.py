"""Shared benchmark harness: models, checkpoint methods (AsymCheck and its peers), timing.

Every method trains the same model from the same seed, checkpoints at the same
frequency, and is timed in the same process run, so figures are comparable as
ratios. After each run the last checkpoint is restored into a fresh model and
compared byte for byte with a copy taken right after its step: a benchmark of
a broken save is worthless.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asymcheck
from tests._util import assert_same

Batch = Callable[[int], torch.Tensor]  # iteration -> loss


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Batch

    @property
    def state_bytes(self) -> int:
        n = sum(p.nbytes for p in self.model.parameters())
        return n * 3  # weights + AdamW exp_avg + exp_avg_sq


def gpt2_workload(layers: int = 6, width: int = 512, vocab: int = 8192, seq: int = 128,
                  batch: int = 8, seed: int = 0) -> Workload:
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=8, vocab_size=vocab,
                                  n_positions=seq, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss(i: int) -> torch.Tensor:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(i))
        return model(ids, labels=ids).loss
    return Workload("gpt2", model, opt, loss)


def train_state(w: Workload) -> dict[str, Any]:
    return {"model": w.model.state_dict(), "optim": w.optimizer.state_dict()}


class Method:
    """One way to checkpoint. ``checkpoint`` runs on the training thread after the step."""

    name = "none"

    def setup(self, w: Workload, workdir: Path) -> None:
        self.w, self.workdir = w, workdir

    def checkpoint(self, step: int) -> float:
        """Do the save; return the seconds of training-thread stall it caused so far."""
        return 0.0

    def stall_after_step(self) -> float:
        """Stall the method added inside the next optimizer step (asym gate)."""
        return 0.0

    def finish(self) -> dict[str, Any]:
        return {}

    def restore_into(self, w: Workload, step: int) -> None:
        raise NotImplementedError


class NoCheckpoint(Method):
    name = "no checkpoint"


class TorchSave(Method):
    name = "torch.save+fsync"

    def checkpoint(self, step: int) -> float:
        t0 = time.perf_counter()
        path = self.workdir / f"step-{step}.pt"
        with open(path, "wb") as f:
            torch.save(train_state(self.w), f)
            f.flush()
            os.fsync(f.fileno())
        self.last = path
        return time.perf_counter() - t0

    def restore_into(self, w: Workload, step: int) -> None:
        state = torch.load(self.last, weights_only=True)
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optim"])


class DcpAsync(Method):
    """torch.distributed.checkpoint.async_save, one save in flight (the documented pattern)."""

    name = "DCP async_save"

    def setup(self, w: Workload, workdir: Path) -> None:
        super().setup(w, workdir)
        import torch.distributed.checkpoint as dcp
        self.dcp = dcp
        self.future: Any = None

    def _state(self, w: Workload) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(w.model, w.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def checkpoint(self, step: int) -> float:
        t0 = time.perf_counter()
        if self.future is not None:
            self.future.result()
        self.future = self.dcp.async_save(self._state(self.w), no_dist=True,
                                          checkpoint_id=str(self.workdir / f"step-{step}"))
        self.last = self.workdir / f"step-{step}"
        return time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.future is not None:
            self.future.result()
        return {"drain_s": time.perf_counter() - t0}

    def restore_into(self, w: Workload, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state(w)
        self.dcp.load(state, checkpoint_id=str(self.last), no_dist=True)
        set_state_dict(w.model, w.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class AsymCheckMethod(Method):
    def __init__(self, name: str, mode: str, policy_extra: str = "",
                 host_capacity_states: int = 4, warmup_iterations: int = 5) -> None:
        self.name, self.mode, self.policy_extra = name, mode, policy_extra
        self.host_capacity_states = host_capacity_states
        self.warmup_iterations = warmup_iterations
        self.handles: list[asymcheck.SaveHandle] = []

    def _policy(self, w: Workload) -> Path:
        path = self.workdir / "tiers.toml"
        cap = max(self.host_capacity_states * w.state_bytes, 64 << 20)
        path.write_text(f"""
[[tier]]
name = "host"
url = "shm://asymcheck-bench-{uuid.uuid4().hex[:8]}"
capacity = {cap}
keep = 1
[[tier]]
name = "local"
url = "file://{self.workdir / 'local'}"
keep = 2
{self.policy_extra}
""")
        return path

    def setup(self, w: Workload, workdir: Path) -> None:
        super().setup(w, workdir)
        self.policy = self._policy(w)
        self.ckpt = asymcheck.Checkpointer(w.model, w.optimizer, policy=self.policy,
                                           mode=self.mode,
                                           warmup_iterations=self.warmup_iterations)
        self.handles = []

    def checkpoint(self, step: int) -> float:
        h = self.ckpt.save_sync(step)
        self.handles.append(h)
        return h.metrics["save_stall_s"]

    def stall_after_step(self) -> float:
        if not self.handles:
            return 0.0
        return float(self.handles[-1].metrics.get("gate_stall_s", 0.0))

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        for h in self.handles:
            h.wait_all_sync(600)
        drain = time.perf_counter() - t0
        self.ckpt.close_sync()
        modes = [h.metrics["mode"] for h in self.handles]
        return {"drain_s": drain, "modes": {m: modes.count(m) for m in set(modes)},
                "residual_bytes_median": statistics.median(
                    [h.metrics.get("residual_bytes", h.metrics["state_bytes"])
                     for h in self.handles])}

    def restore_into(self, w: Workload, step: int) -> None:
        with asymcheck.Checkpointer(w.model, w.optimizer, policy=self.policy,
                                    mode="naive") as ckpt:
            got = ckpt.restore_sync()
        if got != step:
            raise AssertionError(f"{self.name}: restored step {got}, expected {step}")
        shutil.rmtree(Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm")) /
                      self._host_name(), ignore_errors=True)

    def _host_name(self) -> str:
        return asymcheck.load_policy(self.policy).staging.url.removeprefix("shm://")


@dataclass
class RunResult:
    method: str
    iteration_s: list[float]
    stall_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)
    verified: bool = False

    def summary(self) -> dict[str, Any]:
        stalls = sorted(self.stall_s) or [0.0]
        return {"method": self.method,
                "iteration_s_median": statistics.median(self.iteration_s),
                "iteration_s_mean": statistics.fmean(self.iteration_s),
                "stall_s_median": statistics.median(stalls),
                "stall_s_p90": stalls[min(len(stalls) - 1, round(0.9 * (len(stalls) - 1)))],
                "checkpoints": len(self.stall_s), "verified_bit_exact": self.verified,
                **self.extra}


def run(method: Method, make: Callable[[], Workload], *, warmup: int, iterations: int,
        every: int, workdir: Path) -> RunResult:
    """Train ``warmup`` + ``iterations`` steps, checkpointing every ``every``; time the last
    ``iterations``; then verify the last checkpoint restores bit-exactly."""
    w = make()
    workdir.mkdir(parents=True, exist_ok=True)
    method.setup(w, workdir)
    iteration_s, stall_s = [], []
    last_step, expected = -1, None
    total = warmup + iterations
    gate_owner = -1  # index in stall_s of the save whose copies the next step may wait for
    for step in range(total):
        t0 = time.perf_counter()
        w.loss(step).backward()
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
        if gate_owner >= 0:
            stall_s[gate_owner] += method.stall_after_step()
            gate_owner = -1
        is_last = step == total - 1
        if step % every == 0 or is_last:
            if is_last and not isinstance(method, NoCheckpoint):
                t_copy = time.perf_counter()
                expected = copy.deepcopy(train_state(w))
                t0 += time.perf_counter() - t_copy  # the reference copy is not the method's
            stall = method.checkpoint(step)
            last_step = step
            if step >= warmup:
                stall_s.append(stall)
                gate_owner = len(stall_s) - 1
        if step >= warmup:
            iteration_s.append(time.perf_counter() - t0)
    extra = method.finish()
    verified = False
    if expected is not None:
        fresh = make()
        method.restore_into(fresh, last_step)
        assert_same(expected, train_state(fresh), method.name)
        verified = True
    del w
    gc.collect()
    shutil.rmtree(workdir, ignore_errors=True)
    return RunResult(method.name, iteration_s, stall_s, extra, verified)


def machine_info(probe_dir: Path) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "disk_write_gbps": disk_write_gbps(probe_dir),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def disk_write_gbps(directory: Path, nbytes: int = 256 << 20, block: int = 8 << 20) -> float:
    """Sequential write + fsync bandwidth of the disk under ``directory`` (GB/s)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".probe-{uuid.uuid4().hex}"
    buf = os.urandom(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(nbytes // block):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return nbytes / (time.perf_counter() - t0) / 1e9
