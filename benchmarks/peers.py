"""Peers at their best configuration, beside AsymCheck in the same process run.

``DcpBest``: ``torch.distributed.checkpoint.async_save`` configured as its authors recommend
for overlapping checkpoints with training: a ``DefaultStager`` with shared-memory, async
staging (pinned memory and non-blocking copies on CUDA), ``FileSystemWriter`` with one file
per rank, synced files and two writer threads, and the staging awaited in an optimizer step
pre-hook (as torchtitan does), so the stall is what the next step waits for. The thread
checkpointer writes in a thread of this process; the process checkpointer in a helper
process, which needs a process group: a one-rank gloo group on loopback is made for it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch.distributed as dist
from harness import DcpAsync, Workload, tree_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DcpBest(DcpAsync):
    """DCP ``async_save`` with ``DefaultStager``; ``kind`` is ``"thread"`` or ``"process"``."""

    run_state = (*DcpAsync.run_state, "staging", "stager", "hook")

    def __init__(self, kind: str) -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"kind must be 'thread' or 'process', got {kind!r}")
        self.kind = kind
        self.name = f"DCP-best {kind}"
        self.child_processes = kind == "process"

    def setup(self, w: Workload, workdir: Any) -> None:
        super().setup(w, workdir)
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.stager = self._new_stager()
        self.checkpointer_type = (AsyncCheckpointerType.PROCESS if self.kind == "process"
                                  else AsyncCheckpointerType.THREAD)
        self.own_group = False
        if self.kind == "process" and not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
            self.own_group = True
        self.staging: Any = None
        self.gate_s = 0.0
        self.hook = w.optimizer.register_step_pre_hook(self._await_staging)

    def _new_stager(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.w.device.startswith("cuda")
        return DefaultStager(StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=True,
            use_non_blocking_copy=cuda))

    def _stager_spent(self) -> bool:
        """Some torch releases (2.11 among them) close the stager's copier after every staging:
        that empties its storage cache and its copy table, and its next staging fails
        (``KeyError: <class 'type'>``). There a new stager per save is the best the release
        offers, since its cache is gone either way; where the copier stays open (later
        releases), one stager serves every save and reuses its staged storages."""
        copier = getattr(self.stager, "_state_dict_stager", None)
        return copier is not None and not getattr(copier, "_deepcopy_dispatch", True)

    def _await_staging(self, *_: Any) -> None:
        """The step gate: the next optimizer step waits until the state is staged."""
        if self.staging is not None:
            t0 = time.perf_counter()
            self.staging.result()
            self.gate_s += time.perf_counter() - t0
            self.staging = None

    def checkpoint(self, step: int) -> float:
        from torch.distributed.checkpoint import FileSystemWriter

        t0 = time.perf_counter()
        self.saved_at[step] = t0
        if self.future is not None:  # one save in flight
            self.future.result()
        if self._stager_spent():
            self.stager.close()
            self.stager = self._new_stager()
        path = self.workdir / f"step-{step}"
        writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True,
                                  thread_count=2)
        got = self.dcp.async_save(self._state(self.w), storage_writer=writer,
                                  async_checkpointer_type=self.checkpointer_type,
                                  async_stager=self.stager, no_dist=self.kind == "thread")
        self.staging = got.staging_completion
        self.future = got.upload_completion

        def done(_f: Any, step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        self.future.add_done_callback(done)
        self.last = path
        return time.perf_counter() - t0

    def stall_after_step(self) -> float:
        gate, self.gate_s = self.gate_s, 0.0
        return gate

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._await_staging()
        if self.future is not None:
            self.future.result()
        drain = time.perf_counter() - t0
        self.hook.remove()
        self.stager.close()
        for step in self.saved_at:
            self.stored[step] = tree_bytes(self.workdir / f"step-{step}")
        return {"drain_s": drain}

    def cleanup(self) -> None:
        if getattr(self, "own_group", False) and dist.is_initialized():
            dist.destroy_process_group()
            self.own_group = False


def best_peers() -> list[DcpBest]:
    return [DcpBest("thread"), DcpBest("process")]



