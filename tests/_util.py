"""Helpers for tests: a tiny model, its training, byte-exact state comparison, one-tier reads."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch

from asymcheck.restore import LoadedCheckpoint, load_checkpoint
from tiers.registry import open_tier


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                        torch.nn.Dropout(0.1), torch.nn.Linear(width, width))
        self.norm = torch.nn.BatchNorm1d(width)
        self.head = torch.nn.Linear(width, 4).to(torch.bfloat16)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter += 1
        return self.head(self.norm(self.body(x)).to(torch.bfloat16)).float()


def make_training(seed: int = 0, width: int = 32) -> tuple[TinyNet, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyNet(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train_steps(model: TinyNet, opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    width = model.body[0].in_features
    for _ in range(n):
        loss = model(torch.randn(8, width)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """A model's state as checkpoints hold it: keyed by parameter name, wrappers' prefixes
    (DistributedDataParallel's ``module.``) removed."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def opt_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state as checkpoints hold it: keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt)


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "opt": opt_state(model, opt),
                          "sched": sched.state_dict()})


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal tensor for tensor, byte for byte; other values by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} " \
            f"!= {b.dtype}{tuple(b.shape)}"
        ab = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        bb = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(ab, bb), f"{path}: tensor bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def load_from(url: str, step: int | None = None, name: str = "only") -> LoadedCheckpoint | None:
    """Read a checkpoint from one tier alone (no fallback to another tier)."""
    out: list[LoadedCheckpoint | None] = []

    async def run() -> None:  # returns nothing: asyncio.run may repr its result (slow)
        tier = open_tier(url, name=name)
        try:
            out.append(await load_checkpoint([tier], step))
        finally:
            await tier.close()

    asyncio.run(run())
    return out[0]


def record_page_locks(monkeypatch: Any) -> tuple[list[int], list[int]]:
    """Replace ``pin_memory`` (cudaHostRegister) with a recorder, for machines without a
    device: the addresses locked, and those unlocked again (in order)."""
    import asymcheck.hoststage
    from tiers.local import buffer_address

    locked: list[int] = []
    unlocked: list[int] = []

    def pin(view: memoryview) -> Any:
        address = buffer_address(view)
        locked.append(address)
        return lambda: unlocked.append(address)

    monkeypatch.setattr(asymcheck.hoststage, "pin_memory", pin)
    return locked, unlocked


def pooled_inodes(host: Any) -> set[int]:
    """The tmpfs inodes of the blocks in a host tier's free pool."""
    import os

    pool = host.directory / ".free"
    return {(pool / n).stat().st_ino for n in os.listdir(pool)}


def with_host_keep(policy: Any, keep: int) -> Any:
    """``policy`` with its host (first) tier's ``keep`` replaced."""
    import dataclasses

    host, *rest = policy.tiers
    return dataclasses.replace(policy, tiers=(dataclasses.replace(host, keep=keep), *rest))


@contextlib.contextmanager
def host_peak(ckpt: Any) -> Iterator[list[int]]:
    """``[peak]``: the most bytes ``ckpt``'s host tier held (blocks, manifests, pool) in the
    body, sampled every millisecond."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            if ckpt._commit.tiers:
                peak[0] = max(peak[0], ckpt._commit.host.used_bytes)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
