"""Flush committed host checkpoints to the downstream tiers through async queues.

One bounded queue and one worker per tier, so a slow or failing tier never
holds back another. For each checkpoint and tier the worker

1. decides per tensor whether to store it raw, byte-shuffled + zstd, or as a
   delta against the tier's last full checkpoint (``costmodel``: only where
   compressing shortens the time to durable, or always / never per policy);
2. coalesces the stored chunks into batch files of the cost model's size B*
   (encoding the next batch while the previous one is written);
3. commits by writing the manifest after all of its data, then removes files
   of an earlier save of the same step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tiers.base import Tier
from tiers.host import HostTier

from .codec import encode, estimate_ratio
from .costmodel import CostModel
from .handle import SaveHandle
from .layout import manifest_key, step_dir
from .manifest import ChunkMeta, FileMeta, Manifest, Segment, TensorMeta
from .policy import Policy, TierPolicy
from .snapshot import ALIGN_BYTES
from .state import dtype_from_name

log = logging.getLogger(__name__)

DoneCallback = Callable[["FlushJob", str, "BaseException | None"], Awaitable[None]]
DELTA_CODEC = "delta_sub"  # integer delta + zigzag + byte-shuffle + zstd (lossless)
FULL_CODEC = "shuffle"  # byte-shuffle + zstd



@dataclass(frozen=True)
class FlushJob:
    manifest: Manifest  # the host copy's manifest: raw tensors in host data files
    handle: SaveHandle


@dataclass
class _TierState:
    policy: TierPolicy
    base: Manifest | None = None  # the last full checkpoint written here (kept in host memory)
    since_full: int = 0
    ratios: dict[tuple[str, str], float] = field(default_factory=dict)


def tensor_span(meta: TensorMeta) -> tuple[str, int]:
    """(file, offset) of a tensor stored raw and contiguous (the host layout)."""
    first = meta.chunks[0]
    return first.file, first.offset


class _BatchWriter:
    """Packs stored data into files of about ``target_bytes``, with up to
    ``tier.concurrent_puts`` writes in flight.

    Raw tensors that lie back to back in a host file are written as one slice of it
    (alignment padding included), so many small tensors cost one buffer, not one each.
    """

    def __init__(self, tier: Tier, directory: str, prefix: str, target_bytes: int | None,
                 on_write: Callable[[int, float], None]) -> None:
        self._tier, self._dir, self._prefix = tier, directory, prefix
        self._target = target_bytes
        self._on_write = on_write
        self._parts: list[Any] = []
        self._size = 0  # bytes in _parts, not counting the open region
        self._region: list[Any] | None = None  # [host file, host view, start, end]
        self._index = 0
        self._inflight: collections.deque[asyncio.Task[None]] = collections.deque()
        self.files: list[FileMeta] = []
        self.segments: list[Segment] = []

    @property
    def _name(self) -> str:
        return f"{self._prefix}-{self._index:05d}.bin"

    def _close_region(self) -> None:
        if self._region is not None:
            src, view, start, end = self._region
            self.segments.append(Segment(src, start, end, self._name, self._size))
            self._parts.append(view[start:end])
            self._size += end - start
            self._region = None

    @property
    def _pending(self) -> int:
        region = self._region
        return self._size + (region[3] - region[2] if region is not None else 0)

    async def add(self, data: Any) -> tuple[str, int]:
        """Append a stored buffer; returns (file, offset) where it will live."""
        self._close_region()
        where = (self._name, self._size)
        self._parts.append(data)
        self._size += memoryview(data).nbytes
        await self._maybe_emit()
        return where

    async def add_raw(self, src: str, view: memoryview, start: int, end: int) -> None:
        """Append bytes [start, end) of host file ``src`` (recorded as a segment); adjacent
        ranges share one slice and one segment."""
        region = self._region
        if region is not None and region[0] == src and 0 <= start - region[3] < ALIGN_BYTES:
            region[3] = end
        else:
            self._close_region()
            self._region = [src, view, start, end]
        await self._maybe_emit()

    async def _maybe_emit(self) -> None:
        if self._target is not None and self._pending >= self._target:
            await self._emit()

    async def end_tensor(self) -> None:
        if self._target is None and self._pending:  # unbatched: a file per tensor
            await self._emit()

    async def _emit(self) -> None:
        self._close_region()
        while len(self._inflight) >= max(1, self._tier.concurrent_puts):
            await self._inflight.popleft()
        name, parts, size = self._name, self._parts, self._size
        self.files.append(FileMeta(name, size))
        self._parts, self._size, self._index = [], 0, self._index + 1
        self._inflight.append(asyncio.ensure_future(self._write(name, parts, size)))

    async def _write(self, name: str, parts: list[Any], size: int) -> None:
        t0 = time.perf_counter()
        await self._tier.put(f"{self._dir}/{name}", parts)
        self._on_write(size, time.perf_counter() - t0)

    async def finish(self) -> list[FileMeta]:
        if self._pending or not self.files:
            await self._emit()
        while self._inflight:
            await self._inflight.popleft()
        return self.files

    async def cancel(self) -> None:
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._inflight.clear()


class FlushScheduler:
    def __init__(self, tiers: Mapping[str, Tier], policy: Policy, on_done: DoneCallback,
                 pin: Callable[[int], None], unpin: Callable[[int], Awaitable[None]],
                 cost: CostModel | None = None, queue_depth: int = 2) -> None:
        self._tiers = tiers
        self._policy = policy
        self._host = tiers[policy.staging.name]
        self._on_done = on_done
        self._pin, self._unpin = pin, unpin
        self.cost = cost or CostModel(min_compress_bytes=policy.compression.min_bytes)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="asymcheck-zstd")
        self._state = {tp.name: _TierState(tp) for tp in policy.tiers[1:]}
        for tp in policy.tiers[1:]:
            self.cost.tier(tp.name, tp.scheme)
        self._depth = queue_depth
        self._queues: dict[str, asyncio.Queue[FlushJob | None]] = {
            tp.name: asyncio.Queue(queue_depth) for tp in policy.tiers[1:]}
        self._busy: dict[str, bool] = dict.fromkeys(self._queues, False)
        self._room = {name: asyncio.Event() for name in self._queues}  # set when a job is taken
        self._workers = [asyncio.ensure_future(self._work(name)) for name in self._queues]

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues.values()) + sum(self._busy.values())

    @property
    def depth(self) -> int:
        return self._depth

    def backlog(self, tier: str) -> int:
        """Checkpoints queued for ``tier`` plus the one being flushed."""
        return self._queues[tier].qsize() + int(self._busy[tier])

    def full(self, tier: str) -> bool:
        return self._queues[tier].full()

    async def wait_room(self, tier: str) -> None:
        """Return once ``tier``'s queue has room."""
        while self._queues[tier].full():
            self._room[tier].clear()
            await self._room[tier].wait()

    async def submit(self, tier: str, job: FlushJob) -> None:
        """Queue ``job`` for ``tier``; waits while that tier's queue is full (backpressure)."""
        await self._queues[tier].put(job)

    async def join(self) -> None:
        for q in self._queues.values():
            await q.join()

    async def close(self) -> None:
        for q in self._queues.values():
            await q.put(None)
        await asyncio.gather(*self._workers)
        for st in self._state.values():
            if st.base is not None:
                await self._unpin(st.base.step)
                st.base = None
        self._pool.shutdown(wait=True)

    async def _work(self, name: str) -> None:
        tier, queue = self._tiers[name], self._queues[name]
        while True:
            job = await queue.get()
            self._room[name].set()
            if job is None:
                queue.task_done()
                return
            self._busy[name] = True
            error: BaseException | None = None
            try:
                await self._flush(tier, self._state[name], job)
            except Exception as e:
                error = e
            try:
                await self._on_done(job, name, error)
            except Exception:
                log.exception("flush completion of step %d on %s failed",
                              job.manifest.step, name)
            finally:
                self._busy[name] = False
                queue.task_done()

    # ------------------------------------------------------------------ flush
    def _base_for(self, st: _TierState, manifest: Manifest) -> Manifest | None:
        comp = self._policy.compression
        base = st.base
        if comp.mode == "off" or base is None or st.since_full + 1 >= comp.full_every:
            return None
        same = [(t.path, t.dtype, t.shape) for t in base.tensors] == [
            (t.path, t.dtype, t.shape) for t in manifest.tensors]
        return base if same else None

    async def _choose(self, tier: str, st: _TierState, meta: TensorMeta, raw: memoryview,
                      base_raw: memoryview | None) -> tuple[str, float | None, bool]:
        """The codec of one tensor on one tier, the ratio it was expected to reach (None: not
        estimated), and whether the cost model decided (large enough, mode not off)."""
        mode = self._policy.compression.mode
        if mode == "off" or meta.nbytes < self.cost.min_compress_bytes:
            return "raw", None, False
        codec = DELTA_CODEC if base_raw is not None else FULL_CODEC
        est = st.ratios.get((meta.path, codec))
        if (est is None and mode == "auto" and self.cost.codec_known(codec)
                and not self.cost.compression_could_pay(tier, codec, meta.nbytes)):
            return "raw", None, True  # the tier writes faster than the codec compresses
        if est is None:  # first sight since the last full checkpoint: a sample, ~1 ms
            t0 = time.perf_counter()
            est = await asyncio.to_thread(
                estimate_ratio, raw, codec=codec, elem_size=_elem_size(meta), base=base_raw,
                sample_bytes=_SAMPLE_BYTES, level=self._policy.compression.level)
            self.cost.seed_codec(codec, min(meta.nbytes, _SAMPLE_BYTES),
                                 time.perf_counter() - t0)
            st.ratios[(meta.path, codec)] = est  # achieved ratios replace it as they come
        if mode == "always" or self.cost.compression_pays(tier, codec, meta.nbytes, est):
            return codec, est, True
        return "raw", est, True

    def _target_bytes(self, st: _TierState, manifest: Manifest) -> int | None:
        batch = st.policy.batch_bytes
        if batch == "off":
            return None
        if isinstance(batch, int):
            return batch
        host = self._host
        budget = host.capacity_bytes if isinstance(host, HostTier) else None
        return self.cost.batch_bytes(st.policy.name, manifest.nbytes, budget)

    async def _flush(self, tier: Tier, st: _TierState, job: FlushJob) -> None:
        host = self._host
        assert isinstance(host, HostTier)
        man = job.manifest
        sd = step_dir(man.step)
        base = self._base_for(st, man)
        views = {f.key: await host.view(f"{sd}/{f.key}") for f in man.files}
        base_views = ({f.key: await host.view(f"{step_dir(base.step)}/{f.key}")
                       for f in base.files} if base is not None else {})
        fit = self.cost.tier(tier.name)
        target = self._target_bytes(st, man)
        writer = _BatchWriter(tier, sd, f"data-{man.info.get('save_id', 'x')}", target, fit.add)
        tensors, decisions = [], []
        raw_total = stored_total = 0
        try:
            for i, meta in enumerate(man.tensors):
                file, off = tensor_span(meta)
                raw = views[file][off:off + meta.nbytes]
                base_raw = None
                if base is not None:
                    bfile, boff = tensor_span(base.tensors[i])
                    base_raw = base_views[bfile][boff:boff + meta.nbytes]
                codec, est, decided = await self._choose(tier.name, st, meta, raw, base_raw)
                chunks = await self._store(writer, st, meta, raw, views, codec, base,
                                           base_raw)
                await writer.end_tensor()
                stored = sum(c.stored_len for c in chunks)
                raw_total += meta.nbytes
                stored_total += stored
                if decided:
                    decisions.append([meta.path, codec, None if est is None else round(est, 4),
                                      round(meta.nbytes / max(stored, 1), 4)])
                tensors.append(meta if codec == "raw" else replace(meta, chunks=tuple(chunks)))
            files = await writer.finish()
        except BaseException:
            await writer.cancel()
            raise
        finally:
            for v in (*views.values(), *base_views.values()):
                v.release()
        compression = {"mode": self._policy.compression.mode, "full": base is None,
                       "base_steps": [base.step] if base is not None else [],
                       "raw_bytes": raw_total, "stored_bytes": stored_total,
                       "decisions": decisions}
        committed = man.with_layout(tuple(tensors), tuple(files), tuple(writer.segments),
                                    compression=compression,
                                    batch_bytes=target, tier=tier.name)
        data = committed.to_bytes()
        t0 = time.perf_counter()
        await tier.put(manifest_key(man.step), data)
        fit.add(len(data), time.perf_counter() - t0)
        wanted = {f"{sd}/{f.key}" for f in files} | {manifest_key(man.step)}
        for key in await tier.list(sd + "/"):
            if key not in wanted:
                await tier.delete(key)
        job.handle.metrics[f"{tier.name}.stored_bytes"] = stored_total
        job.handle.metrics[f"{tier.name}.batch_bytes"] = target
        job.handle.metrics[f"{tier.name}.fit"] = fit.to_dict()
        job.handle.metrics[f"{tier.name}.compression"] = compression
        await self._advance_base(st, man, full=base is None)
        log.debug("step %d durable on %s (%d -> %d bytes)", man.step, tier.name, raw_total,
                  stored_total)

    async def _store(self, writer: _BatchWriter, st: _TierState, meta: TensorMeta,
                     raw: memoryview, views: Mapping[str, memoryview], codec: str,
                     base: Manifest | None, base_raw: memoryview | None) -> list[ChunkMeta]:
        if codec == "raw":  # the host bytes and chunk table as they are, via a segment
            file, start = tensor_span(meta)
            await writer.add_raw(file, views[file], start, start + meta.nbytes)
            return list(meta.chunks)
        level = self._policy.compression.level
        t0 = time.perf_counter()
        part = await asyncio.to_thread(encode, raw, codec=codec, elem_size=_elem_size(meta),
                                       base=base_raw if codec == DELTA_CODEC else None,
                                       level=level, executor=self._pool)
        self.cost.codec(codec).add(meta.nbytes, time.perf_counter() - t0)
        st.ratios[(meta.path, codec)] = part.ratio
        out = []
        for ec in part.chunks:
            file, off = await writer.add(ec.stored)
            out.append(ChunkMeta(file=file, offset=off, stored_len=ec.stored_len,
                                 raw_offset=ec.raw_offset, raw_len=ec.raw_len, xxh64=ec.xxh64,
                                 codec=codec, elem_size=ec.elem_size,
                                 base_step=base.step if codec == DELTA_CODEC and base else None,
                                 stored_xxh64=ec.stored_xxh64))
        return out

    async def _advance_base(self, st: _TierState, man: Manifest, *, full: bool) -> None:
        if self._policy.compression.mode == "off":
            return
        if not full:
            st.since_full += 1
            return
        self._pin(man.step)  # deltas of the next checkpoints read this copy from host memory
        old, st.base, st.since_full = st.base, man, 0
        st.ratios.clear()  # a new base: sample the ratios afresh
        if old is not None:
            await self._unpin(old.step)


#: bytes of a tensor compressed to estimate its ratio
_SAMPLE_BYTES = 256 << 10


def _elem_size(meta: TensorMeta) -> int:
    return dtype_from_name(meta.dtype).itemsize
