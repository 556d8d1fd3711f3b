"""Copy training state into staging buffers.

``Layout`` places each tensor at an aligned offset of one host block and
splits it into checksummed chunks; ``copy_into`` performs the copies. The
naive mode copies everything at save time; the asymmetric mode (see
``partition``) spreads the same copies over the next iteration's windows.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from tiers.local import DIRECT_ALIGN

from .manifest import ChunkMeta, TensorMeta, checksum, raw_chunk
from .partition import Partition, PartitionPlan
from .state import dtype_name

if TYPE_CHECKING:
    from .copier import Copier

ALIGN_BYTES = 64
#: tensors of at least PAGE_ALIGN_FROM bytes start on a page of the block, so a tier can write
#: them to disk straight from it (O_DIRECT)
PAGE_ALIGN_FROM = 64 << 10
DEFAULT_CHUNK_BYTES = 8 << 20
#: a copier thread hashes what it copied after every HOT_BYTES, while those bytes are in cache
HOT_BYTES = 256 << 10


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the staging block."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]
    total_bytes: int
    chunk_bytes: int

    @classmethod
    def plan(cls, paths: Sequence[str], tensors: Sequence[torch.Tensor],
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Layout:
        slots, offset = [], 0
        for path, t in zip(paths, tensors, strict=True):
            n = tensor_nbytes(t)
            if n >= PAGE_ALIGN_FROM:
                offset = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
            slots.append(Slot(path, dtype_name(t.dtype), tuple(t.shape), offset, n))
            offset += -(-n // ALIGN_BYTES) * ALIGN_BYTES
        return cls(tuple(slots), offset, chunk_bytes)

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((s.path, s.dtype, s.shape) for s in self.slots)

    @functools.cached_property
    def _chunks(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per slot, each chunk's (offset in the block, length, offset in the tensor)."""
        return tuple(tuple((s.offset + r, min(self.chunk_bytes, s.nbytes - r), r)
                           for r in range(0, max(s.nbytes, 1), self.chunk_bytes))
                     for s in self.slots)

    def tensor_metas(self, view: memoryview, file: str,
                     known: dict[tuple[int, int], int] | None = None) -> tuple[TensorMeta, ...]:
        """Chunk table of the block in ``view``. ``known`` holds checksums already computed
        (``ChunkDigests``), by (slot index, chunk offset in the tensor); the others are
        computed here: call off-thread. Built at every save, one entry per chunk, on a
        thread that shares the interpreter with training: the geometry is the layout's."""
        known = known or {}
        metas = []
        for i, (s, geometry) in enumerate(zip(self.slots, self._chunks, strict=True)):
            chunks = []
            for at, n, r in geometry:
                digest = known.get((i, r))
                if digest is None:
                    digest = checksum(view[at:at + n])
                chunks.append(raw_chunk(file, at, n, r, digest))
            metas.append(TensorMeta(s.path, s.dtype, s.shape, s.nbytes, tuple(chunks)))
        return tuple(metas)

    def pieces(self, piece_bytes: int) -> list[list[tuple[int, int, int]]]:
        """The state cut into pieces of at most ``piece_bytes`` (a tensor may span pieces, and
        every piece boundary inside a tensor is a chunk boundary): per piece, a list of
        (slot index, byte offset in the tensor, length)."""
        out: list[list[tuple[int, int, int]]] = [[]]
        room = piece_bytes
        for i, slot in enumerate(self.slots):
            start = 0
            while True:
                n = min(slot.nbytes - start, room, self.chunk_bytes)
                if n or slot.nbytes == 0:
                    out[-1].append((i, start, n))
                    room -= n
                start += n
                if start >= slot.nbytes:
                    break
                if room == 0:
                    out.append([])
                    room = piece_bytes
            if room == 0:
                out.append([])
                room = piece_bytes
        return [p for p in out if p]

    @staticmethod
    def piece_chunks(view: memoryview, file: str, segments: list[tuple[int, int, int]]
                     ) -> list[tuple[int, ChunkMeta]]:
        """Chunk metadata (with checksums) of one piece laid out back to back in ``view``."""
        out, pos = [], 0
        for slot_index, start, n in segments:
            out.append((slot_index, raw_chunk(file, pos, n, start, checksum(view[pos:pos + n]))))
            pos += n
        return out


class ChunkDigests:
    """Checksums of the deferred tensors' chunks, computed as the copier puts their bytes in
    the block, while those bytes are still in cache: the commit then checksums only the
    chunks not fed here (the residual, copied at the step gate, and what was copied at save
    time). Fed by one thread at a time (the copier's); ``result`` gives them once every copy
    is done.

    A chunk's hash streams over consecutive feeds; a chunk whose bytes arrive out of order,
    or only in part, is left to the commit. With a ``pool``, each chunk that arrives whole is
    hashed on its threads while the feeding thread goes on, so the chunks of many feeds (most
    tensors are one chunk each) are hashed at once.
    """

    def __init__(self, slots: Sequence[int], sizes: Sequence[int], chunk_bytes: int,
                 pool: concurrent.futures.Executor | None = None) -> None:
        self._slots = list(slots)  # the slot of each deferred tensor
        self._sizes = list(sizes)
        self._chunk = chunk_bytes
        self._pool = pool
        self._open: dict[tuple[int, int], tuple[xxhash.xxh64, int]] = {}
        #: (slot index, chunk offset in the tensor) -> xxh64 of the chunk
        self._digests: dict[tuple[int, int], int] = {}
        #: chunks hashed on the pool: (key in ``_digests``, nbytes, future digest)
        self._hashing: list[tuple[tuple[int, int], int, concurrent.futures.Future[int]]] = []
        self.nbytes = 0  # bytes whose checksum is in ``result()``

    def feed(self, item: int, start: int, data: np.ndarray) -> None:
        """Bytes [start, start + len(data)) of deferred tensor ``item``, as they are now in
        the block (``data`` is a flat uint8 view of them)."""
        view = data.data
        pos, end, size = start, start + view.nbytes, self._sizes[item]
        whole: list[tuple[int, memoryview]] = []  # chunks that arrived whole: (first, bytes)
        while pos < end:
            first = pos - pos % self._chunk
            last = min(first + self._chunk, size)
            stop = min(end, last)
            part = view[pos - start:stop - start]
            if pos == first and stop == last:
                whole.append((first, part))
            else:
                hasher, at = self._open.pop((item, first), (None, first))
                if pos == first:
                    hasher = xxhash.xxh64()
                if hasher is not None and at == pos:
                    hasher.update(part)
                    if stop == last:
                        self._done(item, first, hasher.intdigest(), last - first)
                    else:
                        self._open[(item, first)] = (hasher, stop)
            pos = stop
        for first, part in whole:
            if self._pool is None:
                self._done(item, first, xxhash.xxh64_intdigest(part), part.nbytes)
            else:
                self._hashing.append(((self._slots[item], first), part.nbytes,
                                      self._pool.submit(xxhash.xxh64_intdigest, part)))

    def feeder(self, item: int, start: int) -> Callable[[int, np.ndarray], None]:
        """``feed`` for the bytes of ``item`` from ``start`` on: takes (offset, data)."""
        return lambda offset, data: self.feed(item, start + offset, data)

    def _done(self, item: int, first: int, digest: int, nbytes: int) -> None:
        self._digests[(self._slots[item], first)] = digest
        self.nbytes += nbytes

    def result(self) -> dict[tuple[int, int], int]:
        """(slot index, chunk offset in the tensor) -> xxh64 of every chunk fed whole or
        streamed in order; waits for those still hashed on the pool (call off the loop)."""
        hashing, self._hashing = self._hashing, []
        for key, nbytes, digest in hashing:
            self._digests[key] = digest.result()
            self.nbytes += nbytes
        return self._digests


def block_tensor(view: memoryview) -> torch.Tensor:
    """A uint8 tensor over a writable block (no copy)."""
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def copy_slot(src: torch.Tensor, slot: Slot, block: torch.Tensor) -> None:
    """Copy one tensor (any strides, any device) into its slot of the block."""
    if slot.nbytes == 0:
        return
    dst = block[slot.offset:slot.offset + slot.nbytes].view(src.dtype).view(src.shape)
    dst.copy_(src.detach())


def copy_into(tensors: Sequence[torch.Tensor], layout: Layout, block: torch.Tensor) -> None:
    for t, slot in zip(tensors, layout.slots, strict=True):
        copy_slot(t, slot, block)


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor on its device (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8)


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat uint8 numpy array (no copy). Through
    numpy where it can: a fraction of the cost of torch's reshape and view per tensor."""
    try:
        a = t.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, float8), autograd
        return flat_bytes(t).numpy()
    return a.reshape(-1).view(np.uint8)


class AsymSnapshot:
    """Executes a PartitionPlan for one save: partitions are launched as windows open.

    CPU: a copier thread copies launched partitions while training computes.
    CUDA: partitions are copied on a side stream into pinned host memory; the
    step waits on the stream's event instead of blocking the CPU.
    ``finish()`` (the optimizer-step gate) copies whatever was not launched yet
    and waits for the rest; ``on_done`` fires exactly once, when every byte is in.
    """

    def __init__(self, plan: PartitionPlan, sources: Sequence[torch.Tensor],
                 offsets: Sequence[int], block: np.ndarray, copier: Copier,
                 on_done: Callable[[], None], digests: ChunkDigests | None = None) -> None:
        self.plan = plan
        self._src = list(sources)
        self._at = list(offsets)  # where each source's bytes go in ``block`` (flat uint8)
        self._block = block
        self._copier = copier
        self._on_done = on_done
        self._digests = digests  # fed by the copier with what it copies in the windows
        self._lock = threading.Lock()
        self._next = 0
        self._outstanding = 0
        self._finished = False
        self.residual_bytes = 0
        self.launched_bytes = 0

    def _copy(self, partition: Partition, hash_too: bool = True) -> None:
        digests = self._digests if hash_too else None
        block = self._block
        for piece in partition.pieces:
            at = self._at[piece.item]
            self._copier.copy(block[at + piece.start:at + piece.stop], self._src[piece.item],
                              piece.start, piece.stop,
                              None if digests is None else digests.feeder(piece.item, piece.start))

    def on_window(self, k: int) -> None:
        with self._lock:
            if self._finished:
                return
            while self._next <= k and self._next < len(self.plan.partitions):
                part = self.plan.partitions[self._next]
                self._next += 1
                if part.nbytes:
                    self._outstanding += 1
                    self.launched_bytes += part.nbytes
                    self._copier.launch(functools.partial(self._copy, part),
                                        self._launched_done)

    def _launched_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            done = (not self._finished and self._outstanding == 0
                    and self._next == len(self.plan.partitions))
            if done:
                self._finished = True
        if done:
            self._on_done()

    def finish(self) -> None:
        """Copy what is left on the calling thread, wait for launched copies; idempotent."""
        with self._lock:
            if self._finished:
                return
            rest = self.plan.partitions[self._next:]
            self._next = len(self.plan.partitions)
            self._finished = True
        for part in rest:  # on the training thread: copied, not hashed (the commit does)
            self.residual_bytes += part.nbytes
            self._copy(part, hash_too=False)
        self._copier.complete(self._on_done)
