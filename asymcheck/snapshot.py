"""Copy training state into staging buffers.

``Layout`` places each tensor at an aligned offset of one host block and
splits it into checksummed chunks; ``copy_into`` performs the copies. The
naive mode copies everything at save time; the asymmetric mode (see
``partition``) spreads the same copies over the next iteration's windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .manifest import ChunkMeta, TensorMeta, checksum
from .state import dtype_name

ALIGN_BYTES = 64
DEFAULT_CHUNK_BYTES = 8 << 20


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
            slots.append(Slot(path, dtype_name(t.dtype), tuple(t.shape), offset, n))
            offset += -(-n // ALIGN_BYTES) * ALIGN_BYTES
        return cls(tuple(slots), offset, chunk_bytes)

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((s.path, s.dtype, s.shape) for s in self.slots)

    def tensor_metas(self, view: memoryview, file: str) -> tuple[TensorMeta, ...]:
        """Chunk table of the block in ``view`` (checksums computed here: call off-thread)."""
        metas = []
        for s in self.slots:
            chunks = []
            for r in range(0, max(s.nbytes, 1), self.chunk_bytes):
                n = min(self.chunk_bytes, s.nbytes - r)
                data = view[s.offset + r:s.offset + r + n]
                chunks.append(ChunkMeta(file=file, offset=s.offset + r, stored_len=n,
                                        raw_offset=r, raw_len=n, xxh64=checksum(data)))
            metas.append(TensorMeta(s.path, s.dtype, s.shape, s.nbytes, tuple(chunks)))
        return tuple(metas)


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
