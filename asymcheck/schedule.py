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
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tiers.base import Tier
from tiers.host import HostTier

from .batching import BatchWriter, remove_written
from .codec import encode, estimate_ratio
from .costmodel import CostModel, LinearFit
from .errors import CheckpointError
from .handle import SaveHandle
from .layout import manifest_key, step_dir
from .manifest import ChunkMeta, FileMeta, Manifest, TensorMeta
from .policy import Policy, TierPolicy
from .state import dtype_from_name
from .stream import Piece, StreamJob

log = logging.getLogger(__name__)

DoneCallback = Callable[["Job", str, "BaseException | None"], Awaitable[None]]
DELTA_CODEC = "delta_sub"  # integer delta + zigzag + byte-shuffle + zstd (lossless)
FULL_CODEC = "shuffle"  # byte-shuffle + zstd



@dataclass(frozen=True)
class FlushJob:
    """A checkpoint committed on the host tier, to be written to a downstream tier."""

    manifest: Manifest  # the host copy's manifest: raw tensors in host data files
    handle: SaveHandle

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes


#: the kinds of job a tier's queue takes: a staged checkpoint, or a streamed one
Job = FlushJob | StreamJob


@dataclass
class _Written:
    """What a flush stored: per-tensor layouts, the codec decisions and the byte counts."""

    tensors: list[TensorMeta] = field(default_factory=list)
    decisions: list[list[Any]] = field(default_factory=list)
    raw_bytes: int = 0
    stored_bytes: int = 0

    def add(self, meta: TensorMeta, codec: str, est: float | None, decided: bool,
            chunks: list[ChunkMeta]) -> None:
        stored = sum(c.stored_len for c in chunks)
        self.raw_bytes += meta.nbytes
        self.stored_bytes += stored
        if decided:
            self.decisions.append([meta.path, codec, None if est is None else round(est, 4),
                                   round(meta.nbytes / max(stored, 1), 4)])


@dataclass
class _TierState:
    policy: TierPolicy
    base: Manifest | None = None  # the last full checkpoint written here (kept in host memory)
    since_full: int = 0
    ratios: dict[tuple[str, str], float] = field(default_factory=dict)
    base_refused: bool = False  # a base did not fit the host budget (logged once)


def tensor_span(meta: TensorMeta) -> tuple[str, int]:
    """(file, offset) of a tensor stored raw and contiguous (the host layout)."""
    first = meta.chunks[0]
    return first.file, first.offset


class FlushScheduler:
    def __init__(self, tiers: Mapping[str, Tier], policy: Policy, on_done: DoneCallback,
                 pin_base: Callable[[int], None], unpin_base: Callable[[int], Awaitable[None]],
                 base_fits: Callable[[int, int, int | None], bool] = lambda *_: True,
                 cost: CostModel | None = None, queue_depth: int = 2) -> None:
        self._tiers = tiers
        self._policy = policy
        # the staging tier maps its blocks (an in-memory tier, checked when the tiers open)
        self._host = cast(HostTier, tiers[policy.staging.name])
        self._on_done = on_done
        self._pin_base, self._unpin_base = pin_base, unpin_base  # delta bases in host memory
        self._base_fits = base_fits  # whether the host budget holds one more base
        self.cost = cost or CostModel(min_compress_bytes=policy.compression.min_bytes)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="asymcheck-zstd")
        self._state = {tp.name: _TierState(tp) for tp in policy.tiers[1:]}
        for tp in policy.tiers[1:]:
            self.cost.tier(tp.name, tp.scheme)
        self._depth = queue_depth
        self._queues: dict[str, asyncio.Queue[Job | None]] = {
            tp.name: asyncio.Queue(queue_depth) for tp in policy.tiers[1:]}
        self._busy: dict[str, bool] = dict.fromkeys(self._queues, False)
        self._room = {name: asyncio.Event() for name in self._queues}  # set when a job is taken
        self._workers = [asyncio.ensure_future(self._work(name)) for name in self._queues]
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Flushes queued or running, and cleanups of failed ones still running."""
        return (sum(q.qsize() for q in self._queues.values()) + sum(self._busy.values())
                + len(self._cleanups))

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

    async def submit(self, tier: str, job: Job) -> None:
        """Queue ``job`` for ``tier``; waits while that tier's queue is full (backpressure)."""
        await self._queues[tier].put(job)

    async def join(self) -> None:
        """Wait for every queued flush, and the cleanup of every failed one."""
        for q in self._queues.values():
            await q.join()
        await asyncio.gather(*self._cleanups, return_exceptions=True)

    def _remove_later(self, tier: Tier, step: int, files: Sequence[FileMeta]) -> None:
        """Remove a failed flush's files in the background: the failure is reported at once
        (a tier that stopped answering would delay it by another timeout)."""
        task = asyncio.ensure_future(remove_written(tier, step, list(files)))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        for q in self._queues.values():
            await q.put(None)
        await asyncio.gather(*self._workers)
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        for st in self._state.values():
            if st.base is not None:
                await self._unpin_base(st.base.step)
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

    def _target_bytes(self, st: _TierState, job: Job) -> int | None:
        batch = st.policy.batch_bytes
        if batch == "off":
            return None
        if isinstance(batch, int):
            return batch
        target = self.cost.batch_bytes(st.policy.name, job.nbytes, self._host.capacity_bytes)
        return min(target, job.piece_bytes) if isinstance(job, StreamJob) else target

    async def _flush(self, tier: Tier, st: _TierState, job: Job) -> None:
        """Write ``job``'s checkpoint to ``tier``: data in batch files, then its manifest."""
        man = job.manifest
        fit = self.cost.tier(tier.name)
        target = self._target_bytes(st, job)
        writer = BatchWriter(tier, man.step, str(man.info.get("save_id", "x")), target, fit.add)
        out = _Written()
        base = self._base_for(st, man) if isinstance(job, FlushJob) else None
        try:
            if isinstance(job, FlushJob):
                files = await self._write_staged(tier.name, st, man, base, writer, out)
            else:
                files = await self._write_stream(tier.name, st, job, writer, out)
        except BaseException as exc:
            await writer.cancel()
            if isinstance(job, StreamJob):
                await job.discard(tier.name)
            if isinstance(exc, Exception):
                self._remove_later(tier, man.step, writer.files)
            raise
        # the bases this checkpoint needs: those of its delta-coded chunks; and the base the
        # next deltas on this tier are coded against, which this checkpoint may not name (its
        # tensors may all have gone raw): retention keeps both while it keeps this checkpoint
        used = sorted({c.base_step for t in out.tensors for c in t.chunks
                       if c.base_step is not None})
        full = base is None
        next_base = self._next_base(tier.name, st, man, full=full) \
            if isinstance(job, FlushJob) else st.base
        compression = {"mode": self._policy.compression.mode, "full": full,
                       "base_steps": used,
                       "next_base": None if next_base is None else next_base.step,
                       "raw_bytes": out.raw_bytes, "stored_bytes": out.stored_bytes,
                       "decisions": out.decisions}
        committed = man.with_layout(tuple(out.tensors), tuple(files), tuple(writer.segments),
                                    compression=compression, batch_bytes=target, tier=tier.name)
        await self._commit(tier, committed, fit)
        metrics = job.handle.metrics
        metrics[f"{tier.name}.stored_bytes"] = out.stored_bytes
        metrics[f"{tier.name}.batch_bytes"] = target
        metrics[f"{tier.name}.fit"] = fit.to_dict()
        metrics[f"{tier.name}.compression"] = compression
        if isinstance(job, FlushJob):
            await self._advance_base(st, next_base, full=full)
        log.debug("step %d durable on %s (%d -> %d bytes)", man.step, tier.name,
                  out.raw_bytes, out.stored_bytes)

    async def _commit(self, tier: Tier, man: Manifest, fit: LinearFit) -> None:
        """Write the manifest last; then remove files an earlier save of the step left."""
        sd = step_dir(man.step)
        data = man.to_bytes()
        t0 = time.perf_counter()
        try:
            await tier.put(manifest_key(man.step), data)
        except Exception:
            self._remove_later(tier, man.step, man.files)
            raise
        fit.add(len(data), time.perf_counter() - t0)
        wanted = {f"{sd}/{f.key}" for f in man.files} | {manifest_key(man.step)}
        for key in await tier.list(sd + "/"):
            if key not in wanted:
                await tier.delete(key)

    async def _write_staged(self, tier: str, st: _TierState, man: Manifest,
                            base: Manifest | None, writer: BatchWriter, out: _Written
                            ) -> list[FileMeta]:
        """Every tensor of a checkpoint committed on the host tier, coded as decided."""
        host, sd = self._host, step_dir(man.step)
        views = {f.key: await host.view(f"{sd}/{f.key}") for f in man.files}
        base_views = ({f.key: await host.view(f"{step_dir(base.step)}/{f.key}")
                       for f in base.files} if base is not None else {})
        try:
            for i, meta in enumerate(man.tensors):
                file, off = tensor_span(meta)
                raw = views[file][off:off + meta.nbytes]
                base_raw = None
                if base is not None:
                    bfile, boff = tensor_span(base.tensors[i])
                    base_raw = base_views[bfile][boff:boff + meta.nbytes]
                codec, est, decided = await self._choose(tier, st, meta, raw, base_raw)
                chunks = await self._store(writer, st, meta, raw, views, codec, base, base_raw)
                await writer.end_tensor()
                out.add(meta, codec, est, decided, chunks)
                out.tensors.append(meta if codec == "raw" else meta._replace(chunks=tuple(chunks)))
            return await writer.finish()
        finally:
            for v in (*views.values(), *base_views.values()):
                v.release()

    async def _write_stream(self, tier: str, st: _TierState, job: StreamJob,
                            writer: BatchWriter, out: _Written) -> list[FileMeta]:
        """A streamed checkpoint, piece by piece: each segment of a tensor is coded as decided
        (never as a delta: no base is in host memory), and a piece is written before the next
        is taken, so it can be freed."""
        by_slot: dict[int, list[ChunkMeta]] = {}
        choices: dict[int, tuple[str, float | None, bool]] = {}
        while (piece := await job.next_piece(tier)) is not None:
            try:
                await self._write_piece(tier, st, job, piece, writer, out, by_slot, choices)
            finally:
                await piece.release()
        if job.error is not None:
            raise CheckpointError(f"step {job.manifest.step}: the state could not be copied "
                                  f"({job.error!r})")
        out.tensors.extend(
            TensorMeta(s.path, s.dtype, s.shape, s.nbytes,
                       tuple(sorted(by_slot.get(i, []), key=lambda c: c.raw_offset)))
            for i, s in enumerate(job.layout.slots))
        return await writer.finish()

    async def _write_piece(self, tier: str, st: _TierState, job: StreamJob, piece: Piece,
                           writer: BatchWriter, out: _Written,
                           by_slot: dict[int, list[ChunkMeta]],
                           choices: dict[int, tuple[str, float | None, bool]]) -> None:
        """Write one piece (its views of the block end with this call, so that the block's
        mapping can go to the pool once every tier wrote the piece)."""
        pos = 0
        view = piece.block.view
        for (index, start, n), chunk in zip(piece.segments, piece.chunks, strict=True):
            slot = job.layout.slots[index]
            meta = TensorMeta(slot.path, slot.dtype, slot.shape, n, (chunk,))
            raw = view[pos:pos + n]
            if index not in choices:  # one codec per tensor, chosen on its first piece
                choices[index] = await self._choose(
                    tier, st, meta._replace(nbytes=slot.nbytes), raw, None)
            codec, est, decided = choices[index]
            chunks = await self._store(writer, st, meta, raw, {piece.name: view}, codec,
                                       None, None, raw_offset=start)
            await writer.end_tensor()
            out.add(meta, codec, est, decided, chunks)
            by_slot.setdefault(index, []).extend(chunks)
            pos += n
        await writer.drain()

    async def _store(self, writer: BatchWriter, st: _TierState, meta: TensorMeta,
                     raw: memoryview, views: Mapping[str, memoryview], codec: str,
                     base: Manifest | None, base_raw: memoryview | None,
                     raw_offset: int = 0) -> list[ChunkMeta]:
        """Store ``raw`` (``meta``'s bytes from ``raw_offset`` on) with ``codec``."""
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
                                 raw_offset=raw_offset + ec.raw_offset, raw_len=ec.raw_len,
                                 xxh64=ec.xxh64,
                                 codec=codec, elem_size=ec.elem_size,
                                 base_step=base.step if codec == DELTA_CODEC and base else None,
                                 stored_xxh64=ec.stored_xxh64))
        return out

    def _next_base(self, tier: str, st: _TierState, man: Manifest, *,
                   full: bool) -> Manifest | None:
        """The checkpoint the next deltas on ``tier`` are coded against once ``man`` is stored
        there: ``man`` itself when it is full and deltas against it could pay (no host copy
        is held for deltas that could not: the next checkpoint is full again), else the
        current base."""
        if self._policy.compression.mode == "off" or not full:
            return st.base
        if not self._deltas_could_pay(tier, man):
            return None
        block = sum(f.size for f in man.files)  # the host copy's block
        if self._base_fits(man.step, block, None if st.base is None else st.base.step):
            return man
        if not st.base_refused:
            st.base_refused = True
            log.info("tier %s: no delta base held in host memory (it does not fit the host "
                     "budget beside the kept checkpoints): its checkpoints are coded full", tier)
        return None

    async def _advance_base(self, st: _TierState, next_base: Manifest | None, *,
                            full: bool) -> None:
        if self._policy.compression.mode == "off":
            return
        if not full:
            st.since_full += 1
            return
        old, st.since_full = st.base, 0
        st.ratios.clear()  # a new base: sample the ratios afresh
        if next_base is not None:
            self._pin_base(next_base.step)  # the next checkpoints' deltas read this host copy
        st.base = next_base
        if old is not None:
            await self._unpin_base(old.step)

    def _deltas_could_pay(self, tier: str, man: Manifest) -> bool:
        """Whether a delta against ``man`` could shorten the write of some tensor on ``tier``.
        A delta codes more than a full compression does (a difference, then the same
        shuffle + zstd), so it is no faster: where the tier writes faster than the full codec
        compresses, no delta can pay, and holding ``man`` in host memory as a base would cost
        a copy of the state for nothing. The tier is taken at its fastest recent write: a base
        is held until the next full checkpoint. Until a codec's speed is measured, it could."""
        sizes = [t.nbytes for t in man.tensors if t.nbytes >= self.cost.min_compress_bytes]
        if not sizes:  # every tensor is stored raw whatever the mode
            return False
        if self._policy.compression.mode == "always":
            return True
        codec = DELTA_CODEC if self.cost.codec_known(DELTA_CODEC) else FULL_CODEC
        if not self.cost.codec_known(codec):
            return True
        return any(self.cost.compression_could_pay(tier, codec, n, at_best=True) for n in sizes)


#: bytes of a tensor compressed to estimate its ratio
_SAMPLE_BYTES = 256 << 10


def _elem_size(meta: TensorMeta) -> int:
    return dtype_from_name(meta.dtype).itemsize
