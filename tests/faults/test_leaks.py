"""Leaks: 300 consecutive saves of a ~50 MB state keep every resource bounded.

Guards: retention on both tiers (old steps deleted, their blocks reused through the free
pool), unmapping of deleted host blocks, release of file descriptors by every write and read
path, and a fixed set of threads (no thread or executor per save). Shared-memory files and
bytes, open descriptors, threads and RSS are measured after 50 saves (warm) and after 300;
they must not grow with the number of saves.

Policy: host keep=2 on every save, and a local tier keep=2 that takes every 10th checkpoint
(``every = 10``): writing 15 GB to disk would dominate the run; 30 flushes of 50 MB still
exercise the flush, commit and retention paths of the local tier many times. Naive mode.
"""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import asymcheck
from tests.faults._helpers import committed_steps, file_dir, host_dir, wait_until

SAVES = 300
WARM = 50


class BigMLP(torch.nn.Module):
    """4 x Linear(1024, 1024): 16.8 MB of parameters, 50 MB with AdamW's two moments."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


@dataclass(frozen=True)
class Usage:
    shm_files: int
    shm_bytes: int
    fds: int
    threads: int
    py_threads: int
    rss_bytes: int

    def __str__(self) -> str:
        return (f"shm {self.shm_files} files / {self.shm_bytes >> 20} MiB, {self.fds} fds, "
                f"{self.threads} threads ({self.py_threads} Python), "
                f"RSS {self.rss_bytes >> 20} MiB")


def usage(shm_root: Path) -> Usage:
    gc.collect()
    files = [p for p in shm_root.rglob("*") if p.is_file()]
    with open("/proc/self/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return Usage(shm_files=len(files), shm_bytes=sum(p.stat().st_size for p in files),
                 fds=len(os.listdir("/proc/self/fd")), threads=len(os.listdir("/proc/self/task")),
                 py_threads=threading.active_count(), rss_bytes=rss_kb << 10)


@pytest.mark.slow
def test_300_saves_of_50_mb_leak_no_shared_memory_fds_threads_or_memory(
        tmp_path: Path, shm_root: Path) -> None:
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://leaks", keep=2),
        asymcheck.TierPolicy(name="local", url=f"file://{tmp_path}/local", keep=2, every=10),
    ), compression=asymcheck.CompressionPolicy(mode="off"))  # a delta base would be a third
    # host copy by design, wherever the cost model finds that deltas could pay
    torch.manual_seed(0)
    model = BigMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    state_bytes = sum(p.nbytes for p in model.parameters()) * 3
    assert 45e6 < state_bytes < 60e6
    before = usage(shm_root)
    at: dict[int, Usage] = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt:
        for step in range(1, SAVES + 1):
            with torch.no_grad():
                model.layers[0].bias.add_(1.0)  # every checkpoint differs
            ckpt.save_sync(step).wait_all_sync(120)
            if step in (WARM, SAVES):
                host = host_dir(shm_root, policy)
                wait_until(lambda h=host: len(committed_steps(h)) == 2
                           and len(list(h.glob("step-*"))) == 2,
                           "host retention keeps two checkpoints")
                at[step] = usage(shm_root)
    wait_until(lambda: threading.active_count() <= before.py_threads,
               "the checkpointer's threads end after close()", timeout_s=10)
    after_close = usage(shm_root)
    warm, end = at[WARM], at[SAVES]
    report = f"before: {before}\nafter {WARM}: {warm}\nafter {SAVES}: {end}\n" \
             f"after close: {after_close}"
    assert end.shm_files <= warm.shm_files + 1, report  # +1: a spare block in flight
    assert end.shm_bytes <= warm.shm_bytes + (64 << 10), report  # manifests grow a little
    assert end.shm_bytes <= 5 * state_bytes, report  # 2 kept, a spare, pool: a few states
    assert end.fds <= warm.fds, report
    assert end.threads <= warm.threads and end.py_threads <= warm.py_threads, report
    assert end.rss_bytes - warm.rss_bytes < state_bytes // 2, report
    assert after_close.fds <= before.fds, report
    assert committed_steps(host_dir(shm_root, policy)) == [SAVES - 1, SAVES]
    flushed = [s for s in range(1, SAVES + 1) if (s - 1) % 10 == 0]  # every 10th save
    assert committed_steps(file_dir(policy)) == flushed[-2:]
