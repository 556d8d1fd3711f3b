"""Find the newest committed checkpoint across tiers and read it back, verified.

Each tensor is read from the fastest tier (policy order) whose manifest is
valid and whose chunks pass their checksums; a missing or corrupt chunk falls
back to the next tier. With no good copy the error names the checkpoint, the
tiers tried and the chunk. Restore never silently returns other data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from tiers.base import Tier
from tiers.host import HostTier

from ._loop import gather_or_cancel
from .codec import ChecksumError, EncodedChunk, decode_into
from .errors import ChunkError, RestoreError
from .layout import manifest_key, step_dir
from .manifest import (
    ChunkMeta,
    Manifest,
    ManifestError,
    TensorMeta,
    checksum,
    committed_steps,
    read_manifest,
)
from .state import dtype_from_name, unflatten, unpack_skeleton

log = logging.getLogger(__name__)




def world_size_error(step: int, saved: int, current: int) -> RestoreError:
    return RestoreError(f"step {step} was saved with world size {saved}, this job has world "
                        f"size {current}: restore it with {saved} rank(s)")


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    state: Any
    manifest: Manifest
    sources: dict[str, int]  # tier name -> tensors (or parts of tensors) read from it
    read_bytes: int = 0  # tensor bytes read from the tiers


async def steps_by_tier(tiers: Sequence[Tier]) -> dict[int, list[Tier]]:
    """Every committed step and the tiers holding it (fastest first). Unreachable tiers are
    logged and skipped, so a remote outage never blocks a restore from a near tier."""
    listed = await asyncio.gather(*(committed_steps(t) for t in tiers), return_exceptions=True)
    found: dict[int, list[Tier]] = {}
    for tier, steps in zip(tiers, listed, strict=True):
        if isinstance(steps, BaseException):
            if not isinstance(steps, Exception):
                raise steps
            log.warning("tier %s could not be listed, skipping it: %s", tier.name, steps)
            continue
        for s in steps:
            found.setdefault(s, []).append(tier)
    return found


async def check_files(tier: Tier, man: Manifest) -> None:
    """Every file the manifest lists exists on ``tier`` with the size it claims."""
    for f in man.files:
        key = f"{step_dir(man.step)}/{f.key}"
        size = (await tier.stat(key)).size_bytes
        if size != f.size:
            raise ManifestError(f"{tier.name}:{key} holds {size} bytes, its manifest says "
                                f"{f.size}")


def empty_tensor(meta: TensorMeta) -> torch.Tensor:
    """A fresh CPU tensor of the manifest's dtype and shape."""
    return torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    if t.numel() == 0:
        return memoryview(bytearray(0))
    array = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array.data).cast("B")


BaseReader = Callable[[int, TensorMeta], Awaitable[memoryview]]
Locator = Callable[[ChunkMeta], tuple[str, int]]


def _direct(chunk: ChunkMeta) -> tuple[str, int]:
    return chunk.file, chunk.offset


async def read_chunk(tier: Tier, step: int, chunk: ChunkMeta, out: memoryview,
                     locate: Locator = _direct) -> None:
    """Read one raw chunk into ``out`` and verify its checksum."""
    file, offset = locate(chunk)
    key = f"{step_dir(step)}/{file}"
    if chunk.raw_len:
        await tier.readinto(key, out, offset)
    actual = await asyncio.to_thread(checksum, out)
    if actual != chunk.xxh64:
        raise ChunkError(f"checksum mismatch in {tier.name}:{key} at offset {offset} "
                         f"({chunk.raw_len} bytes)")


async def read_tensor(tier: Tier, step: int, meta: TensorMeta, out: torch.Tensor | memoryview,
                      *, base: BaseReader | None = None,
                      executor: concurrent.futures.Executor | None = None,
                      locate: Locator = _direct, span: tuple[int, int] | None = None) -> None:
    """Fill ``out`` with one tensor of a checkpoint on ``tier``, verified chunk by chunk; with
    ``span`` (a chunk-aligned byte range, see ``chunk_span``) only those bytes of it.

    Coded chunks are fetched with ranged reads and decoded in parallel on ``executor``;
    delta chunks ask ``base`` for the same tensor of their base checkpoint.
    """
    view = out if isinstance(out, memoryview) else tensor_bytes(out)
    lo, hi = span if span is not None else (0, meta.nbytes)
    chunks = [c for c in meta.chunks if c.raw_offset < hi and c.raw_offset + c.raw_len > lo] \
        if span is not None else list(meta.chunks)
    coded = [c for c in chunks if c.codec != "raw"]
    if not coded:
        for chunk in chunks:
            start = chunk.raw_offset - lo
            await read_chunk(tier, step, chunk, view[start:start + chunk.raw_len], locate)
        return
    if len(coded) != len(chunks):
        raise ChunkError(f"{meta.path}: raw and coded chunks mixed in one tensor")
    sd = step_dir(step)
    where = [locate(c) for c in coded]
    stored = await gather_or_cancel(tier.get(f"{sd}/{file}", offset, c.stored_len)
                                    for c, (file, offset) in zip(coded, where, strict=True))
    encoded = [EncodedChunk(c.codec, c.raw_offset - lo, c.raw_len, data, c.xxh64, c.elem_size,
                            c.stored_xxh64 if c.stored_xxh64 is not None else c.xxh64)
               for c, data in zip(coded, stored, strict=True)]
    base_bytes = None
    base_steps = {c.base_step for c in coded if c.base_step is not None}
    if base_steps:
        if len(base_steps) != 1 or base is None:
            raise ChunkError(f"{meta.path}: delta chunks need one base checkpoint, "
                             f"got {sorted(base_steps)}")
        base_bytes = (await base(base_steps.pop(), meta))[lo:hi]
    try:
        await asyncio.to_thread(decode_into, encoded, view, base=base_bytes, executor=executor)
    except ChecksumError as e:
        raise ChunkError(f"{tier.name}:{sd}/{coded[0].file}: {meta.path}: {e}") from None


def chunk_span(meta: TensorMeta, start: int, stop: int) -> tuple[int, int]:
    """The smallest run of whole chunks of ``meta`` that holds bytes [start, stop)."""
    inside = [c for c in meta.chunks if c.raw_offset < stop and c.raw_offset + c.raw_len > start]
    if not inside:
        return start, start
    return inside[0].raw_offset, inside[-1].raw_offset + inside[-1].raw_len


#: threads that copy and verify raw tensors out of shared memory in bulk
_BULK_THREADS = 2


async def _read_raw_in_bulk(tier: HostTier, step: int, man: Manifest,
                            tensors: Sequence[torch.Tensor], wanted: Sequence[int]) -> set[int]:
    """Copy and verify every raw tensor of ``wanted`` from shared memory in a few thread calls
    (a call per tensor and chunk costs more than the copy). Returns the indices filled and
    verified; the others (coded, or failing a check) go through the per-tensor path, which
    falls back to other tiers."""
    jobs: list[tuple[int, list[tuple[ChunkMeta, str, int]]]] = []
    for i in wanted:
        meta = man.tensors[i]
        if meta.nbytes and meta.chunks and all(c.codec == "raw" for c in meta.chunks):
            try:
                jobs.append((i, [(c, *man.locate(c)) for c in meta.chunks]))
            except ManifestError:
                continue
    if not jobs:
        return set()
    sd = step_dir(step)
    views: dict[str, memoryview] = {}
    try:
        for _, chunks in jobs:
            for _, file, _ in chunks:
                if file not in views:
                    views[file] = await tier.view(f"{sd}/{file}")
    except Exception as e:
        _release(views.values())
        log.debug("step %d: bulk read from %s not possible: %s", step, tier.name, e)
        return set()

    def copy_and_verify(part: list[tuple[int, list[tuple[ChunkMeta, str, int]]]]) -> list[int]:
        ok = []
        for i, chunks in part:
            out = np.frombuffer(tensor_bytes(tensors[i]), np.uint8)
            good = True
            for c, file, offset in chunks:
                src = views[file]
                if c.raw_offset + c.raw_len > out.size or offset + c.raw_len > src.nbytes:
                    good = False
                    break
                dst = out[c.raw_offset:c.raw_offset + c.raw_len]
                np.copyto(dst, np.frombuffer(src, np.uint8, c.raw_len, offset))
                if checksum(dst) != c.xxh64:
                    good = False
                    break
            if good:
                ok.append(i)
        return ok

    shares: list[list[tuple[int, list[tuple[ChunkMeta, str, int]]]]] = [
        [] for _ in range(_BULK_THREADS)]
    loads = [0] * _BULK_THREADS
    for job in sorted(jobs, key=lambda j: -man.tensors[j[0]].nbytes):  # largest first
        k = loads.index(min(loads))
        shares[k].append(job)
        loads[k] += man.tensors[job[0]].nbytes
    try:
        results = await gather_or_cancel(asyncio.to_thread(copy_and_verify, part)
                                         for part in shares if part)
    finally:
        _release(views.values())
    done = {i for part in results for i in part}
    if len(done) < len(jobs):
        log.warning("step %d: %d tensor(s) failed verification on %s; trying them one by one",
                    step, len(jobs) - len(done), tier.name)
    return done


def _release(views: Iterable[memoryview]) -> None:
    for v in views:
        with contextlib.suppress(BufferError):  # an export outlived us: the GC releases it
            v.release()


def _same_tensors(a: Manifest, b: Manifest) -> bool:
    return a.objects == b.objects and [(t.path, t.dtype, t.shape) for t in a.tensors] == [
        (t.path, t.dtype, t.shape) for t in b.tensors]


async def read_base_tensor(holders: Sequence[Tier], step: int, meta: TensorMeta,
                            pool: concurrent.futures.Executor | None = None) -> memoryview:
    """The bytes of ``meta``'s tensor in the full checkpoint ``step``, from any tier."""
    problems = []
    for tier in holders:
        try:
            base_man = await read_manifest(tier, step)
            match = [t for t in base_man.tensors if t.path == meta.path]
            if not match or (match[0].dtype, match[0].shape) != (meta.dtype, meta.shape):
                raise ChunkError(f"base step {step} has no tensor {meta.path!r} of that shape")
            out = empty_tensor(match[0])
            await read_tensor(tier, step, match[0], out, executor=pool, locate=base_man.locate)
            return tensor_bytes(out)
        except Exception as e:
            problems.append(f"{tier.name} ({e})")
    raise ChunkError(f"delta base step {step} of {meta.path!r} has no good copy "
                     f"(tried {', '.join(problems) or 'no tier holds it'})")


def pick_step(found: Mapping[int, Sequence[Tier]], step: int | None) -> int | None:
    """``step``, or the newest of ``found`` (None when there is none); an error naming what is
    committed when ``step`` is not."""
    if step is None:
        return max(found) if found else None
    if step not in found:
        raise RestoreError(f"step {step} is not committed on any tier "
                           f"(committed: {sorted(found) or 'none'})")
    return step


async def verified_copies(tiers: Sequence[Tier], step: int,
                          digests: Mapping[str, int] | None = None) -> list[tuple[Tier, Manifest]]:
    """The tiers among ``tiers`` holding a readable manifest of ``step`` whose files are all
    there (with ``digests``: whose manifest bytes have the recorded xxh64), with the manifest.
    Raises RestoreError when there is none."""
    copies: list[tuple[Tier, Manifest]] = []
    problems: list[str] = []
    for tier in tiers:
        try:
            data = await tier.get(manifest_key(step))
            if digests is not None and checksum(data) != digests.get(tier.name):
                raise ManifestError("it is not the manifest the commit recorded")
            man = Manifest.from_bytes(data, source=f"{tier.name}:{manifest_key(step)}")
            if man.step != step:
                raise ManifestError(f"manifest is for step {man.step}")
            await check_files(tier, man)
        except Exception as e:
            problems.append(f"{tier.name}: {e}")
            log.warning("step %d: manifest on %s unusable: %s", step, tier.name, e)
            continue
        if copies and not _same_tensors(copies[0][1], man):
            problems.append(f"{tier.name}: manifest describes other tensors than "
                            f"{copies[0][0].name}'s copy")
            continue
        copies.append((tier, man))
    if not copies:
        raise RestoreError(f"step {step}: no tier holds a readable manifest "
                           f"(tried {', '.join(t.name for t in tiers) or 'none'}): "
                           f"{'; '.join(problems)}")
    return copies


class CopyReader:
    """Reads tensors of one checkpoint (or one rank's shard of it) from its verified copies,
    nearest first, falling back tier by tier; counts what it read where in ``sources``."""

    def __init__(self, step: int, copies: Sequence[tuple[Tier, Manifest]],
                 pool: concurrent.futures.Executor, sources: dict[str, int]) -> None:
        self.step = step
        self.copies = list(copies)
        self.manifest = self.copies[0][1]
        self.pool = pool
        self.sources = sources
        self.read_bytes = 0
        self._found: dict[int, list[Tier]] | None = None
        self._bases: dict[tuple[int, str], asyncio.Future[memoryview]] = {}

    async def _base(self, base_step: int, meta: TensorMeta) -> memoryview:
        if self._found is None:
            self._found = await steps_by_tier([t for t, _ in self.copies])
        found = self._found
        key = (base_step, meta.path)
        if key not in self._bases:
            self._bases[key] = asyncio.ensure_future(
                read_base_tensor(found.get(base_step, []), base_step, meta, self.pool))
        return await self._bases[key]

    async def read(self, index: int, out: torch.Tensor | memoryview,
                   byte_range: tuple[int, int] | None = None) -> None:
        """Tensor ``index`` into ``out``; with ``byte_range`` only the bytes [start, stop) of
        it (``out`` then holds exactly those)."""
        tried = []
        for tier, man in self.copies:
            meta = man.tensors[index]
            try:
                if byte_range is None:
                    await read_tensor(tier, self.step, meta, out, base=self._base,
                                      executor=self.pool, locate=man.locate)
                else:
                    start, stop = byte_range
                    lo, hi = chunk_span(meta, start, stop)
                    buf = memoryview(bytearray(hi - lo))
                    await read_tensor(tier, self.step, meta, buf, base=self._base,
                                      executor=self.pool, locate=man.locate, span=(lo, hi))
                    view = out if isinstance(out, memoryview) else tensor_bytes(out)
                    view[:] = buf[start - lo:stop - lo]
            except Exception as e:
                tried.append(f"{tier.name} ({e})")
                log.warning("step %d: %s unreadable on %s, trying the next tier: %s",
                            self.step, meta.path, tier.name, e)
                continue
            self.sources[tier.name] = self.sources.get(tier.name, 0) + 1
            self.read_bytes += meta.nbytes if byte_range is None else hi - lo
            return
        what = self.manifest.tensors[index].path
        if byte_range is not None:
            what += f" bytes [{byte_range[0]}, {byte_range[1]})"
        raise RestoreError(f"step {self.step}: no good copy of tensor {what!r}; "
                           f"tried {', '.join(tried)}")

    async def read_all(self, select: Callable[[str], bool] | None = None,
                       max_parallel: int = 8) -> list[torch.Tensor]:
        """Every tensor ``select`` accepts (the others: tensors on the meta device)."""
        reference = self.manifest
        wanted = [i for i, m in enumerate(reference.tensors) if select is None or select(m.path)]
        try:
            tensors = [empty_tensor(m) if select is None or select(m.path)
                       else torch.empty(m.shape, dtype=dtype_from_name(m.dtype), device="meta")
                       for m in reference.tensors]
        except (RuntimeError, MemoryError) as e:  # a manifest may claim more than memory holds
            raise RestoreError(f"step {self.step}: cannot allocate the {reference.nbytes} bytes "
                               f"of tensors its manifest lists: {e}") from None
        tier, man = self.copies[0]
        if tier.capabilities.in_memory:  # shared memory: raw tensors in bulk, off the loop
            done = await _read_raw_in_bulk(cast(HostTier, tier), self.step, man, tensors, wanted)
            if done:
                self.sources[tier.name] = self.sources.get(tier.name, 0) + len(done)
                self.read_bytes += sum(man.tensors[i].nbytes for i in done)
                wanted = [i for i in wanted if i not in done]
        sem = asyncio.Semaphore(max_parallel)

        async def fetch(i: int) -> None:
            async with sem:
                await self.read(i, tensors[i])

        await gather_or_cancel(fetch(i) for i in wanted)
        return tensors


def decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="asymcheck-decode")


async def load_checkpoint(tiers: Sequence[Tier], step: int | None = None, *,
                          max_parallel: int = 8, world_size: int = 1,
                          select: Callable[[str], bool] | None = None
                          ) -> LoadedCheckpoint | None:
    """Read the newest committed checkpoint (or ``step``) as it was stored by one process (or
    one rank: its own shard). None when nothing is committed.

    A checkpoint saved with another ``world_size`` is an error naming both sizes. With
    ``select``, only tensors whose path it accepts are read; the others are left as tensors
    on the meta device."""
    found = await steps_by_tier(tiers)
    step = pick_step(found, step)
    if step is None:
        return None
    copies = await verified_copies(found[step], step)
    reference = copies[0][1]
    if reference.world_size != world_size:
        raise world_size_error(step, reference.world_size, world_size)
    sources: dict[str, int] = {}
    pool = decode_pool()
    reader = CopyReader(step, copies, pool, sources)
    try:
        tensors = await reader.read_all(select, max_parallel)
    finally:
        pool.shutdown(wait=True)
    state = unflatten(unpack_skeleton(reference.objects), tensors)
    return LoadedCheckpoint(step=step, state=state, manifest=reference, sources=sources,
                            read_bytes=reader.read_bytes)
