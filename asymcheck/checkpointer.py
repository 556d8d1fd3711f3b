"""The public API: ``Checkpointer`` saves and restores training state through the tiers.

Flow of one ``save(step)``:
  training thread: capture non-tensor state, plan the layout, copy tensors into a
  shared-memory block (the stall) -> loop thread: checksum, commit on the host tier
  (``handle.staged``), queue a flush per downstream tier (``handle.durable(name)``),
  apply retention. The pipeline runs on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tiers.base import Tier
from tiers.host import HostBlock, HostTier
from tiers.registry import open_tier

from . import dist as _dist
from ._loop import LoopThread
from .dist import DistContext
from .errors import CheckpointError, TierSkipped
from .handle import SaveHandle
from .layout import manifest_key, step_dir
from .manifest import ChunkMeta, FileMeta, Manifest, TensorMeta
from .partition import BackwardPolicy, ForwardPolicy, PartitionPlan, make_plan
from .policy import Policy, default_policy, load_policy
from .profile import Profiler, WindowTracker
from .restore import LoadedCheckpoint, committed_steps, load_checkpoint, read_manifest
from .retention import delete_step
from .schedule import FlushJob, FlushScheduler
from .snapshot import (
    DEFAULT_CHUNK_BYTES,
    AsymSnapshot,
    Copier,
    CudaCopier,
    Layout,
    block_tensor,
    copy_into,
    copy_slot,
    pin_memory,
)
from .state import apply_rng, capture_rng, flatten, pack_skeleton

log = logging.getLogger(__name__)



class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class _Prepared:
    step: int
    save_id: str
    tensors: tuple[torch.Tensor, ...]
    layout: Layout
    objects: bytes
    handle: SaveHandle
    started_s: float

    @property
    def data_name(self) -> str:
        return f"data-{self.save_id}.bin"

    @property
    def data_key(self) -> str:
        return f"{step_dir(self.step)}/{self.data_name}"


@dataclass
class _Pending:
    snapshot: AsymSnapshot
    prep: _Prepared


def _as_list(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    return [optimizer]


def _shm_default_capacity(host: HostTier) -> int:
    """Half of the shared-memory filesystem: a bound that never starves the machine."""
    d = host.directory
    while not d.exists():
        d = d.parent
    st = os.statvfs(d)
    return st.f_blocks * st.f_frsize // 2


class Checkpointer:
    """Checkpoint ``model``, ``optimizer`` (one, a list, or None) and ``extras``.

    ``policy`` is a path to a TOML policy file, a ``Policy``, or None for the
    embedded default (host shared memory + ``./checkpoints``).

    When torch.distributed runs with more than one rank, every rank saves its own shard and a
    checkpoint commits on a tier once every rank's shard is durable there (see ``dist``);
    construct the Checkpointer on every rank at the same point, and save the same steps.
    ``replicated`` names state that is identical on every rank (``"model"`` under
    DistributedDataParallel, ``"optimizers"``, or an extra's name): rank 0 alone writes it
    and every rank restores it from rank 0's shard.
    """

    def __init__(self, model: torch.nn.Module | None, optimizer: Any = None, *,
                 policy: str | os.PathLike[str] | Policy | None = None,
                 extras: Mapping[str, Stateful] | None = None, mode: str = "asym",
                 warmup_iterations: int = 10, min_partition_bytes: int = 256 << 10,
                 max_partition_bytes: int | None = None,
                 forward_policy: ForwardPolicy = ForwardPolicy(),
                 backward_policy: BackwardPolicy = BackwardPolicy(),
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, job: str | None = None,
                 replicated: Iterable[str] = (), dist_timeout_s: float = 1800.0) -> None:
        self.model = model
        self.optimizers = _as_list(optimizer)
        self.extras = dict(extras or {})
        for name, obj in [("model", model), *[(f"optimizer[{i}]", o)
                                               for i, o in enumerate(self.optimizers)],
                          *self.extras.items()]:
            if obj is not None and not (hasattr(obj, "state_dict")
                                        and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{name} ({type(obj).__name__}) has no "
                                "state_dict()/load_state_dict()")
        if isinstance(policy, Policy):
            self.policy = policy
        elif policy is None:
            self.policy = default_policy()
        else:
            self.policy = load_policy(policy)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        if mode not in ("asym", "naive"):
            raise ValueError(f"mode must be 'asym' or 'naive', got {mode!r}")
        self.mode = mode
        self._plan_options: dict[str, Any] = {
            "forward": forward_policy, "backward": backward_policy,
            "min_partition_bytes": min_partition_bytes,
            "max_partition_bytes": max_partition_bytes}
        self._plans: dict[tuple[Any, ...], PartitionPlan] = {}
        self._pending: _Pending | None = None
        self._pending_lock = threading.Lock()
        self._finish_lock = threading.RLock()
        self._tracker: WindowTracker | None = None
        self.profiler: Profiler | None = None
        self._copier: Copier | None = None
        if mode == "asym" and model is not None:
            self._tracker = WindowTracker(model, self.optimizers)
            self.profiler = Profiler(self._tracker, warmup_iterations)
            self._tracker.add_listeners(self._on_window, self._on_step)
        self.chunk_bytes = chunk_bytes
        self.job = job or f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        self._loop = LoopThread(f"asymcheck-{self.job}")
        self._tiers: dict[str, Tier] = {}
        self._scheduler: FlushScheduler | None = None
        self._open_task: asyncio.Future[None] | None = None
        self._save_index = 0
        self._errors: list[BaseException] = []
        self._closed = False
        self._pins: Counter[int] = Counter()
        self._pins_changed: asyncio.Event | None = None
        self._commits: set[concurrent.futures.Future[None]] = set()
        # delta bases each committed checkpoint needs, per (tier, step): retention keeps them
        self._base_steps: dict[tuple[str, int], list[int]] = {}
        # one retention pass per tier at a time (two would race to delete the same step)
        self._retain_locks: dict[str, asyncio.Lock] = {}
        # a host block reserved ahead of the next save, so save() need not wait for the loop
        self._spare_lock = threading.Lock()
        self._spare_block: HostBlock | None = None
        self._spare_wanted: int | None = None
        self._spare_tasks: set[asyncio.Task[None]] = set()
        # CUDA state: host blocks are page-locked so device copies run asynchronously;
        # unregister functions by block, called before the block's memory is released
        self._device_state = False
        self._host_pins: dict[HostBlock, Callable[[], None]] = {}
        self.replicated = tuple(replicated)
        for name in self.replicated:
            if name not in _dist.REPLICABLE and name not in self.extras:
                raise ValueError(f"replicated: {name!r} is neither "
                                 f"{' nor '.join(map(repr, _dist.REPLICABLE))} nor an extra")
        self._dist: DistContext | None = None
        if _dist.active():
            self._dist = DistContext(self.policy, replicated=self.replicated,
                                     timeout_s=dist_timeout_s, loop=self._loop, job=self.job,
                                     on_global=self._global_commit, on_error=self._errors.append)

    # ------------------------------------------------------------------ tiers
    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.policy.tiers)

    @property
    def host(self) -> HostTier:
        tier = self._tiers[self.policy.staging.name]
        assert isinstance(tier, HostTier)
        return tier

    async def _ensure_open(self) -> None:
        if self._open_task is None:
            self._open_task = asyncio.ensure_future(self._open())
        await asyncio.shield(self._open_task)

    async def _open(self) -> None:
        self._pins_changed = asyncio.Event()
        if self._dist is not None:  # this rank's shard on each tier
            self._tiers.update(self._dist.open_tiers())
        else:
            for tp in self.policy.tiers:
                self._tiers[tp.name] = open_tier(tp.url, name=tp.name,
                                                 capacity_bytes=tp.capacity_bytes, **tp.options)
        host = self._tiers[self.policy.staging.name]
        if not isinstance(host, HostTier):
            raise TypeError(f"{self.policy.source}: the staging tier must be a HostTier")
        if host.capacity_bytes is None:  # shared by the ranks of this host
            host.capacity_bytes = _shm_default_capacity(host) // (
                self._dist.local_ranks if self._dist is not None else 1)
        self._scheduler = FlushScheduler(self._tiers, self.policy, on_done=self._flush_done,
                                         pin=self._pin, unpin=self._unpin)
        for tier in self._tiers.values():
            await self._drop_uncommitted(tier)

    async def _drop_uncommitted(self, tier: Tier) -> None:
        """Remove step directories left without a manifest by a crashed save (invisible anyway).
        With several ranks, ``tier`` is this rank's view: only its own shards go."""
        try:
            keys = await tier.list("step-")
        except Exception as e:
            log.warning("tier %s is unreachable at start-up: %s", tier.name, e)
            return
        dirs = {k.split("/", 1)[0] for k in keys}
        committed = {k.split("/", 1)[0] for k in keys if k.endswith("/manifest.msgpack")}
        for d in sorted(dirs - committed):
            log.info("removing uncommitted %s from tier %s", d, tier.name)
            await tier.delete_prefix(d + "/")
        remove_stale = getattr(tier, "remove_stale_tmp", None)
        if remove_stale is not None:  # HDFS: tmp files of writes cut off by a crash
            try:
                await remove_stale()  # only those older than an hour: never a live write
            except Exception as e:
                log.warning("tier %s: stale tmp files not removed: %s", tier.name, e)

    # ------------------------------------------------------------------- save
    def _capture(self) -> dict[str, Any]:
        skip = set(self.replicated) if self._dist is not None and self._dist.rank else set()
        return {  # replicated state: rank 0 writes it, the other ranks restore it from there
            "model": None if "model" in skip else
            self.model.state_dict() if self.model is not None else {},
            "optimizers": None if "optimizers" in skip else
            [o.state_dict() for o in self.optimizers],
            "extras": {name: None if name in skip else obj.state_dict()
                       for name, obj in self.extras.items()},
            "rng": capture_rng(),
        }

    def _shard_fields(self) -> dict[str, Any]:
        """Manifest fields of this rank's shard (none without torch.distributed)."""
        if self._dist is None:
            return {}
        return {"world_size": self._dist.world_size}

    def _shard_info(self) -> dict[str, Any]:
        if self._dist is None:
            return {}
        return {"rank": self._dist.rank, "replicated": list(self.replicated)}

    def _prepare(self, step: int) -> _Prepared:
        if self._closed:
            raise RuntimeError("save() on a closed Checkpointer")
        started = time.perf_counter()
        step_dir(step)  # validates
        state = self._capture()
        state["step"] = step
        flat = flatten(state)
        self._device_state = any(t.is_cuda for t in flat.tensors)
        layout = Layout.plan(flat.paths, flat.tensors, self.chunk_bytes)
        index = self._save_index
        self._save_index += 1
        tiers = tuple(t.name for i, t in enumerate(self.policy.tiers)
                      if i == 0 or index % t.every == 0)
        handle = SaveHandle.create(step, tiers, kick=self._finish_pending)
        if self._dist is not None:
            self._dist.track(handle)
        return _Prepared(step, secrets.token_hex(4), flat.tensors, layout,
                         pack_skeleton(flat.skeleton), handle, started)

    def _deferrable(self, tensors: tuple[torch.Tensor, ...]) -> list[int]:
        """Indices of tensors that only ``optimizer.step()`` changes (parameters and optimizer
        state): those may be copied during the next forward and backward passes. Buffers,
        RNG and extras change elsewhere and are copied at save time."""
        owned: set[tuple[int, int]] = set()
        if self.model is not None:
            owned.update((p.data_ptr(), p.nbytes) for p in self.model.parameters())
        for opt in self.optimizers:
            for st in opt.state.values():
                owned.update((v.data_ptr(), v.nbytes) for v in st.values()
                             if isinstance(v, torch.Tensor))
        return [i for i, t in enumerate(tensors)
                if t.nbytes and t.is_contiguous() and (t.data_ptr(), t.nbytes) in owned]

    def _plan(self, sizes: tuple[int, ...]) -> PartitionPlan | None:
        profile = self.profiler.profile if self.profiler is not None else None
        if profile is None or not sizes:
            return None
        key = (profile.signature, profile.iterations, id(profile), sizes)
        plan = self._plans.get(key)
        if plan is None:
            self._plans.clear()
            plan = self._plans[key] = make_plan(profile, sizes, **self._plan_options)
            log.info("%s", plan)
        return plan

    def _stage(self, prep: _Prepared, block: HostBlock) -> SaveHandle:
        handle = prep.handle
        try:
            if self._device_state:
                pinned = block in self._host_pins
                if not pinned:  # no spare block was pinned ahead of this save
                    t0 = time.perf_counter()
                    pinned = self._pin_host_block(block)
                    handle.metrics["host_pin_s"] = time.perf_counter() - t0
                handle.metrics["host_pinned"] = pinned
            target = block_tensor(block.view)
            deferred = self._deferrable(prep.tensors) if self.mode == "asym" else []
            plan = self._plan(tuple(prep.tensors[i].nbytes for i in deferred))
            if plan is None:
                copy_into(prep.tensors, prep.layout, target)
            else:
                later = set(deferred)
                for i, (t, slot) in enumerate(zip(prep.tensors, prep.layout.slots, strict=True)):
                    if i not in later:
                        copy_slot(t, slot, target)
                snapshot = AsymSnapshot(
                    plan, [prep.tensors[i] for i in deferred],
                    [target[prep.layout.slots[i].offset:][:prep.layout.slots[i].nbytes]
                     for i in deferred],
                    self._copier_for(prep.tensors[deferred[0]].device),
                    on_done=lambda: self._submit_commit(prep, block))
                handle.metrics["plan"] = plan.summary()
                with self._pending_lock:
                    self._pending = _Pending(snapshot, prep)
        except BaseException:
            self._loop.submit(block.abort())
            raise
        handle.stall_s = time.perf_counter() - prep.started_s
        handle.metrics.update(mode="naive" if plan is None else "asym", save_stall_s=handle.stall_s,
                              stall_s=handle.stall_s, state_bytes=prep.layout.total_bytes,
                              tensors=len(prep.tensors))
        if plan is None:
            self._submit_commit(prep, block)
        return handle

    def _copier_for(self, device: torch.device) -> Copier:
        if self._copier is None:
            self._copier = CudaCopier(device) if device.type == "cuda" else Copier()
        if isinstance(self._copier, CudaCopier):
            self._copier.start()
        return self._copier

    def _submit_commit(self, prep: _Prepared, block: HostBlock) -> None:
        fut = self._loop.submit(self._commit_staged(prep, block))
        self._commits.add(fut)
        fut.add_done_callback(self._commits.discard)

    # ------------------------------------------------- asymmetric snapshot hooks
    def _on_window(self, k: int) -> None:
        pending = self._pending
        if pending is not None:
            pending.snapshot.on_window(k)

    def _on_step(self) -> None:
        self._finish_pending()

    def _finish_pending(self) -> None:
        """The step gate: complete the pending snapshot; the wait is added to its stall.

        Held under a lock for the whole copy, so an optimizer step never passes while another
        thread (one waiting on ``handle.staged``) is still finishing the snapshot."""
        with self._finish_lock:
            self._finish_pending_locked()

    def _finish_pending_locked(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        pending.snapshot.finish()
        gate_s = time.perf_counter() - t0
        handle = pending.prep.handle
        handle.stall_s += gate_s
        handle.metrics.update(gate_stall_s=gate_s, stall_s=handle.stall_s,
                              residual_bytes=pending.snapshot.residual_bytes,
                              overlapped_bytes=pending.snapshot.launched_bytes)

    def finish_snapshot(self) -> None:
        """Complete a pending asymmetric snapshot now. Call this before changing parameters or
        optimizer state other than through ``optimizer.step()``."""
        self._finish_pending()

    async def save(self, step: int) -> SaveHandle:
        """Capture the state of ``step``. Naive mode returns once the state is copied; asym
        mode returns after copying buffers and extras, and copies parameters and optimizer
        state during the next forward/backward passes (the next optimizer step waits for it)."""
        self._finish_pending()
        prep = self._prepare(step)
        try:
            waiting = self._full_queues(prep)
            if waiting:
                t0 = time.perf_counter()
                await self._loop.run(self._await_room(waiting))
                prep.handle.metrics["backpressure_s"] = time.perf_counter() - t0
            if self._too_big_for_host(prep):
                return await asyncio.to_thread(self._save_streaming, prep)
            block = self._take_spare(prep)
            if block is None:
                block = await self._loop.run(self._reserve(prep))
            return self._stage(prep, block)
        except BaseException as e:
            self._abandon(prep, e)
            raise

    def save_sync(self, step: int) -> SaveHandle:
        """``save`` for plain (non-async) training loops."""
        self._finish_pending()
        prep = self._prepare(step)
        try:
            waiting = self._full_queues(prep)
            if waiting:
                t0 = time.perf_counter()
                self._loop.call(self._await_room(waiting))
                prep.handle.metrics["backpressure_s"] = time.perf_counter() - t0
            if self._too_big_for_host(prep):
                return self._save_streaming(prep)
            block = self._take_spare(prep)
            if block is None:
                block = self._loop.call(self._reserve(prep))
            return self._stage(prep, block)
        except BaseException as e:
            self._abandon(prep, e)
            raise

    def _abandon(self, prep: _Prepared, error: BaseException) -> None:
        """A save failed on the training thread: the other ranks learn it at the commit."""
        if self._dist is not None:
            self._dist.abandon(prep.handle, error)

    def _full_queues(self, prep: _Prepared) -> list[str]:
        """Scheduled tiers with ``on_full = wait`` whose backlog (queued, in flight, and saves
        not yet handed over) has reached the queue depth: this save waits for them
        (backpressure), and the wait is part of its stall."""
        sched = self._scheduler
        if sched is None:
            return []
        handing_over = len(self._commits)
        return [t for t in prep.handle.tiers[1:] if self.policy.tier(t).on_full == "wait"
                and sched.backlog(t) + handing_over > sched.depth]

    async def _await_room(self, tiers: list[str]) -> None:
        assert self._scheduler is not None
        if self._commits:  # earlier saves first reach their queues (each may wait there)
            await asyncio.gather(*map(asyncio.wrap_future, list(self._commits)),
                                 return_exceptions=True)
        for name in tiers:
            await self._scheduler.wait_room(name)

    # ------------------------------------------------- states larger than the host budget
    def _too_big_for_host(self, prep: _Prepared) -> bool:
        """A checkpoint is staged whole only if two fit the host budget (the newest committed
        one stays while the next is copied); larger states stream through in pieces."""
        if self._open_task is None or not self._open_task.done():
            self._loop.call(self._ensure_open())
        cap = self.host.capacity_bytes
        return cap is not None and 2 * prep.layout.total_bytes > cap

    def _save_streaming(self, prep: _Prepared) -> SaveHandle:
        """Copy the state in pieces of a quarter of the host budget; each piece is written to
        every scheduled downstream tier and then freed, so host memory never exceeds the
        budget. The training thread waits while the budget is full: that wait is the stall."""
        host = self.host
        assert host.capacity_bytes is not None
        downstream = tuple(t for t in prep.handle.tiers if t != host.name)
        if not downstream:
            raise CheckpointError(
                f"step {prep.step}: {prep.layout.total_bytes} bytes of state exceed the host "
                f"budget of {host.capacity_bytes} bytes and no other tier takes this save")
        old, handle = prep.handle, SaveHandle.create(prep.step, downstream)
        prep.handle = handle
        if self._dist is not None:
            self._dist.rekey(old, handle, TierSkipped(
                f"step {prep.step} streamed past tier {host.name!r}: larger than its budget"))
        piece_bytes = max(host.capacity_bytes // 4, 64 << 10)
        sd = step_dir(prep.step)
        pieces: list[concurrent.futures.Future[list[tuple[int, ChunkMeta]]]] = []
        failed: dict[str, BaseException] = {}
        for i, segments in enumerate(prep.layout.pieces(piece_bytes)):
            name = f"data-{prep.save_id}-{i:05d}.bin"
            size = sum(n for _, _, n in segments)
            block = self._loop.call(host.reserve(f"{sd}/{name}", size))
            target = block_tensor(block.view)
            pos = 0
            for slot_index, start, n in segments:
                src = prep.tensors[slot_index].detach().contiguous().reshape(-1)
                target[pos:pos + n].copy_(src.view(torch.uint8)[start:start + n])
                pos += n
            pieces.append(self._loop.submit(
                self._stream_piece(prep, block, name, segments, downstream, failed)))
        handle.stall_s = time.perf_counter() - prep.started_s
        handle.metrics.update(mode="streaming", save_stall_s=handle.stall_s,
                              stall_s=handle.stall_s, state_bytes=prep.layout.total_bytes,
                              tensors=len(prep.tensors), pieces=len(pieces),
                              piece_bytes=piece_bytes)
        handle.staged.set_done()
        fut = self._loop.submit(self._stream_commit(prep, pieces, downstream, failed))
        self._commits.add(fut)
        fut.add_done_callback(self._commits.discard)
        return handle

    async def _stream_piece(self, prep: _Prepared, block: HostBlock, name: str,
                            segments: list[tuple[int, int, int]], downstream: tuple[str, ...],
                            failed: dict[str, BaseException]) -> list[tuple[int, ChunkMeta]]:
        """Checksum one piece, write it to every downstream tier, then free its host memory."""
        try:
            chunks = await asyncio.to_thread(prep.layout.piece_chunks, block.view, name,
                                             segments)
            key = f"{step_dir(prep.step)}/{name}"
            for tier_name in downstream:
                if tier_name in failed:
                    continue
                try:
                    await self._tiers[tier_name].put(key, block.view)
                except Exception as e:
                    failed.setdefault(tier_name, e)
            return chunks
        finally:
            await block.abort()

    async def _stream_commit(self, prep: _Prepared,
                             pieces: list[concurrent.futures.Future[list[tuple[int, ChunkMeta]]]],
                             downstream: tuple[str, ...],
                             failed: dict[str, BaseException]) -> None:
        handle = prep.handle
        try:
            results = [await asyncio.wrap_future(p) for p in pieces]
        except BaseException as e:
            self._fail(handle, [t for t in downstream if t not in failed], e)
            for t, err in failed.items():
                self._not_durable(handle, t, err)
            raise
        by_slot: dict[int, list[ChunkMeta]] = {}
        files = []
        for i, chunks in enumerate(results):
            name = f"data-{prep.save_id}-{i:05d}.bin"
            files.append(FileMeta(name, sum(c.stored_len for _, c in chunks)))
            for slot_index, chunk in chunks:
                by_slot.setdefault(slot_index, []).append(chunk)
        tensors = tuple(
            TensorMeta(s.path, s.dtype, s.shape, s.nbytes,
                       tuple(sorted(by_slot.get(i, []), key=lambda c: c.raw_offset)))
            for i, s in enumerate(prep.layout.slots))
        manifest = Manifest(step=prep.step, created_s=time.time(), job=self.job,
                            objects=prep.objects, tensors=tensors, files=tuple(files),
                            **self._shard_fields(),
                            info={"save_id": prep.save_id, "stall_s": handle.stall_s,
                                  "streamed": True, **self._shard_info()})
        data = manifest.to_bytes()
        for tier_name in downstream:
            if tier_name in failed:
                self._fail(handle, (tier_name,), failed[tier_name])
                continue
            try:
                await self._tiers[tier_name].put(manifest_key(prep.step), data)
            except Exception as e:
                self._fail(handle, (tier_name,), e)
                continue
            self._durable(handle, tier_name)
            await self._retain(self._tiers[tier_name])


    def _take_spare(self, prep: _Prepared) -> HostBlock | None:
        with self._spare_lock:
            block, self._spare_block = self._spare_block, None
            self._spare_wanted = None  # a reservation still in flight is given back
        if block is not None and block.nbytes != prep.layout.total_bytes:
            self._loop.submit(block.abort())
            return None
        return block

    def _want_spare(self, nbytes: int) -> None:
        with self._spare_lock:
            if self._closed or self._spare_block is not None or self._spare_wanted is not None:
                return
            self._spare_wanted = nbytes
        task = asyncio.ensure_future(self._reserve_spare(nbytes))
        self._spare_tasks.add(task)
        task.add_done_callback(self._spare_tasks.discard)

    async def _reserve_spare(self, nbytes: int) -> None:
        try:
            block = await self.host.reserve(f"staging/spare-{secrets.token_hex(4)}.bin", nbytes)
            if self._device_state:  # page-locked here, off the training thread
                await asyncio.to_thread(self._pin_host_block, block)
        except Exception as e:
            log.debug("no spare host block reserved: %s", e)
            with self._spare_lock:
                self._spare_wanted = None
            return
        with self._spare_lock:
            keep = self._spare_wanted == nbytes and self._spare_block is None
            if keep:
                self._spare_block, self._spare_wanted = block, None
        if not keep:
            await block.abort()

    def _pin_host_block(self, block: HostBlock) -> bool:
        """Page-lock ``block`` for device-to-host copies until it is committed or aborted."""
        unregister = pin_memory(block.view)
        if unregister is None:
            return False
        self._host_pins[block] = unregister

        def unpin() -> None:
            self._host_pins.pop(block, None)
            unregister()
        block.on_close(unpin)
        return True

    async def _reserve(self, prep: _Prepared) -> HostBlock:
        """A host block for the new checkpoint; under memory pressure, evict old host copies."""
        await self._ensure_open()
        task = asyncio.ensure_future(self.host.reserve(prep.data_key, prep.layout.total_bytes))
        assert self._pins_changed is not None
        while True:
            await asyncio.wait({task}, timeout=0.01)
            if task.done():
                return task.result()
            cap = self.host.capacity_bytes
            if cap is None or self.host.committed_bytes + self.host.reserved_bytes + \
                    prep.layout.total_bytes <= cap:
                continue  # not blocked by the budget, only slow
            with self._spare_lock:  # a block reserved ahead must not starve this one
                spare, self._spare_block, self._spare_wanted = self._spare_block, None, None
            if spare is not None:
                await spare.abort()
                continue
            if await self._evict_one():
                continue
            self._pins_changed.clear()
            waiter = asyncio.ensure_future(self._pins_changed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _evict_one(self) -> bool:
        """Drop the oldest host checkpoint that no flush needs, never the newest one."""
        async with self._retain_lock(self.host):
            steps = await committed_steps(self.host)
            for s in steps[:-1]:
                if not self._pins[s]:
                    log.info("host budget full: evicting step %d from %s", s, self.host.name)
                    await delete_step(self.host, s)
                    return True
        return False

    async def _commit_staged(self, prep: _Prepared, block: HostBlock) -> None:
        # Pinned from before its manifest is visible until its flushes hold their own pins:
        # commits overlap, and a newer step's retention must not delete this one meanwhile.
        self._pin(prep.step)
        try:
            committed = await self._commit_staged_pinned(prep, block)
        finally:
            last = self._drop_pin(prep.step)
        if committed or last:  # older host copies may go now (this one too, once unpinned)
            await self._retain(self.host)
        if committed:
            self._want_spare(prep.layout.total_bytes)  # after retention: a freed block is reused

    async def _commit_staged_pinned(self, prep: _Prepared, block: HostBlock) -> bool:
        """Commit the staged block and its manifest, then queue the flushes; False when the
        commit failed (reported on the handle)."""
        handle, host = prep.handle, self.host
        try:
            unpin = self._host_pins.pop(block, None)
            if unpin is not None:  # every byte is in: unlock the pages off the event loop
                await asyncio.to_thread(unpin)
            metas = await asyncio.to_thread(prep.layout.tensor_metas, block.view, prep.data_name)
            await block.commit(prep.data_key)
            manifest = Manifest(step=prep.step, created_s=time.time(), job=self.job,
                                objects=prep.objects, tensors=metas,
                                files=(FileMeta(prep.data_name, prep.layout.total_bytes),),
                                **self._shard_fields(),
                                info={"save_id": prep.save_id, "stall_s": handle.stall_s,
                                      "mode": handle.metrics.get("mode"),
                                      **({"plan": handle.metrics["plan"]}
                                         if "plan" in handle.metrics else {}),
                                      **self._shard_info()})
            await host.put(manifest_key(prep.step), manifest.to_bytes())
        except BaseException as e:
            await block.abort()
            self._fail(handle, handle.tiers, e)
            if not isinstance(e, Exception):
                raise
            return False
        handle.staged.set_done()
        self._durable(handle, host.name)
        assert self._scheduler is not None
        for name in handle.tiers[1:]:
            if self.policy.tier(name).on_full == "skip" and self._scheduler.full(name):
                log.warning("tier %s is behind: step %d is not persisted there (on_full = skip)",
                            name, prep.step)
                handle.metrics.setdefault("skipped", []).append(name)
                self._not_durable(handle, name, TierSkipped(
                    f"step {prep.step} skipped on tier {name!r}: its queue was full"))
                continue
            self._pin(prep.step)
            await self._scheduler.submit(name, FlushJob(manifest, handle))
        return True

    async def _flush_done(self, job: FlushJob, tier: str, error: BaseException | None) -> None:
        if error is None:
            comp = job.handle.metrics.get(f"{tier}.compression", {})
            self._base_steps[(tier, job.manifest.step)] = list(comp.get("base_steps", []))
            self._durable(job.handle, tier)
            await self._retain(self._tiers[tier])
        else:
            self._fail(job.handle, (tier,), error)
        await self._unpin(job.manifest.step)

    def _pin(self, step: int) -> None:
        """Keep the host copy of ``step``: a flush or a delta base still reads it."""
        self._pins[step] += 1

    async def _unpin(self, step: int) -> None:
        if self._drop_pin(step):
            await self._retain(self.host)

    def _drop_pin(self, step: int) -> bool:
        """Release one pin of ``step``; True when it was the last."""
        self._pins[step] -= 1
        if self._pins[step] > 0:
            return False
        del self._pins[step]
        assert self._pins_changed is not None
        self._pins_changed.set()
        return True

    def _fail(self, handle: SaveHandle, tiers: Iterable[str], error: BaseException) -> None:
        log.error("checkpoint step %d failed on %s: %s", handle.step, ", ".join(tiers), error)
        self._errors.append(error)
        if not handle.staged.done():
            handle.staged.set_failed(error)
        for t in tiers:
            self._not_durable(handle, t, error)

    def _durable(self, handle: SaveHandle, tier: str) -> None:
        """This process's copy is durable on ``tier``; with several ranks, the checkpoint is
        durable there once every rank's shard is (the commit sets ``handle.durable``)."""
        if self._dist is None:
            handle.durable(tier).set_done()
        else:
            self._dist.resolve(handle, tier, None)

    def _not_durable(self, handle: SaveHandle, tier: str, error: BaseException) -> None:
        if self._dist is None:
            handle.durable(tier).set_failed(error)
        else:
            self._dist.resolve(handle, tier, error)

    async def _global_commit(self, tier: str) -> None:
        await self._retain(self._tiers[tier])

    async def _retain(self, tier: Tier) -> None:
        """Keep the newest ``keep`` checkpoints, the delta bases they need, and pinned host
        copies; delete older ones (only ever after a newer one committed on this tier)."""
        async with self._retain_lock(tier):
            await self._retain_locked(tier)

    def _retain_lock(self, tier: Tier) -> asyncio.Lock:
        """Held while deleting from ``tier``: two passes would race to delete one step."""
        return self._retain_locks.setdefault(tier.name, asyncio.Lock())

    async def _retain_locked(self, tier: Tier) -> None:
        keep = self.policy.tier(tier.name).keep
        is_host = tier is self._tiers[self.policy.staging.name]
        if self._dist is not None:
            try:
                await self._dist.retain(tier, keep, is_host=is_host,
                                        pinned=lambda s: self._pins[s] > 0,
                                        bases=not is_host and self.policy.compression.mode != "off")
            except Exception as e:
                log.warning("retention on tier %s failed (will retry after the next save): %s",
                            tier.name, e)
            return
        try:
            steps = await committed_steps(tier)
            if len(steps) <= keep:
                return
            needed: set[int] = set()
            if not is_host and self.policy.compression.mode != "off":
                for s in steps[-keep:]:
                    bases = self._base_steps.get((tier.name, s))
                    if bases is None:  # written before this process: ask its manifest
                        man = await read_manifest(tier, s)
                        bases = self._base_steps[(tier.name, s)] = list(
                            man.info.get("compression", {}).get("base_steps", []))
                    needed.update(bases)
            for s in reversed(steps[:-keep]):  # newest first: a delta goes before its base
                if s in needed or (is_host and self._pins[s]):
                    continue
                await delete_step(tier, s)
                self._base_steps.pop((tier.name, s), None)
        except Exception as e:
            log.warning("retention on tier %s failed (will retry after the next save): %s",
                        tier.name, e)

    # ---------------------------------------------------------------- restore
    async def _load(self, step: int | None) -> LoadedCheckpoint | None:
        await self._ensure_open()
        return await load_checkpoint([self._tiers[t.name] for t in self.policy.tiers], step)

    def _apply(self, loaded: LoadedCheckpoint) -> int:
        state = loaded.state
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        saved_opts = state["optimizers"]
        if len(saved_opts) != len(self.optimizers):
            raise ValueError(f"checkpoint step {loaded.step} holds {len(saved_opts)} optimizer "
                             f"states, this Checkpointer has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, saved_opts, strict=True):
            opt.load_state_dict(sd)
        missing = set(self.extras) - set(state["extras"])
        if missing:
            raise ValueError(f"checkpoint step {loaded.step} has no state for extras "
                             f"{sorted(missing)}")
        for name, obj in self.extras.items():
            obj.load_state_dict(state["extras"][name])
        apply_rng(state["rng"])
        log.info("restored step %d (tensors read per tier: %s)", loaded.step, loaded.sources)
        step: int = state["step"]
        return step

    def _load_ranks(self, step: int | None) -> LoadedCheckpoint | None:
        """With several ranks: every rank's shard of one step all ranks can read (collective)."""
        assert self._dist is not None
        self._loop.call(self._ensure_open())
        return self._dist.restore(step, self._loop.call)

    async def restore(self, step: int | None = None) -> int | None:
        """Load the newest committed checkpoint (or ``step``); None when nothing is committed.
        With several ranks every rank calls it, and all restore the same step."""
        self._finish_pending()
        if self._dist is not None:
            loaded = await asyncio.to_thread(self._load_ranks, step)
        else:
            loaded = await self._loop.run(self._load(step))
        return None if loaded is None else self._apply(loaded)

    def restore_sync(self, step: int | None = None) -> int | None:
        self._finish_pending()
        loaded = self._load_ranks(step) if self._dist is not None else \
            self._loop.call(self._load(step))
        return None if loaded is None else self._apply(loaded)

    async def load(self, step: int | None = None) -> LoadedCheckpoint | None:
        """Read a checkpoint without applying it (inspection, export); with several ranks,
        this rank's shard (replicated state included), and every rank calls it."""
        if self._dist is not None:
            return await asyncio.to_thread(self._load_ranks, step)
        return await self._loop.run(self._load(step))

    def load_sync(self, step: int | None = None) -> LoadedCheckpoint | None:
        if self._dist is not None:
            return self._load_ranks(step)
        return self._loop.call(self._load(step))

    # ------------------------------------------------------------------ idle
    async def wait_idle(self) -> None:
        """Wait until every save so far is staged and flushed to each of its tiers (or failed
        there), and the retention that follows each commit is done. Saves may go on
        afterwards; failures stay on the handles."""
        self._finish_pending()
        await self._loop.run(self._settle())

    def wait_idle_sync(self) -> None:
        """``wait_idle`` for plain (non-async) training loops."""
        self._finish_pending()
        self._loop.call(self._settle())

    async def _settle(self) -> None:
        if self._open_task is None:
            return
        await self._ensure_open()
        while self._commits or (self._scheduler and self._scheduler.pending):
            if self._commits:
                await asyncio.gather(*map(asyncio.wrap_future, list(self._commits)),
                                     return_exceptions=True)
            if self._scheduler:
                await self._scheduler.join()

    # ------------------------------------------------------------------ close
    async def _drain(self) -> None:
        if self._open_task is None:
            if self._dist is not None:
                await self._dist.stop()
                await self._dist.close()
            return
        await self._settle()
        if self._dist is not None:  # the last global commits (every rank drains alike)
            await self._dist.stop()
        for task in list(self._spare_tasks):
            task.cancel()
        await asyncio.gather(*self._spare_tasks, return_exceptions=True)
        with self._spare_lock:
            spare, self._spare_block, self._spare_wanted = self._spare_block, None, None
        if spare is not None:
            await spare.abort()
        if self._scheduler:
            await self._scheduler.close()
        for tier in self._tiers.values():
            await tier.close()
        if self._dist is not None:
            await self._dist.close()

    def _finish(self) -> None:
        self._loop.stop()
        if self._tracker is not None:
            self._tracker.remove()
        if self._copier is not None:
            self._copier.close()
        if self._errors:
            errors, self._errors = self._errors, []
            raise CheckpointError(f"{len(errors)} checkpoint operation(s) failed in the "
                                  f"background; first: {errors[0]!r}") from errors[0]

    async def close(self) -> None:
        """Finish every queued flush, release tiers; raise a background error exactly once."""
        if self._closed:
            return
        self._finish_pending()
        self._closed = True
        try:
            await self._loop.run(self._drain())
        finally:
            self._finish()

    def close_sync(self) -> None:
        if self._closed:
            return
        self._finish_pending()
        self._closed = True
        try:
            self._loop.call(self._drain())
        finally:
            self._finish()

    async def __aenter__(self) -> Checkpointer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()

    def local_path(self) -> Path | None:
        """The directory of the first file:// tier, if any (for examples and tools)."""
        for tp in self.policy.tiers:
            if tp.scheme == "file":
                return Path(tp.url[len("file://"):])
        return None

