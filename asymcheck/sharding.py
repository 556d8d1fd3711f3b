"""Sharded tensors (DTensor: FSDP2, HSDP, tensor parallel): what a rank stores of one, and how
saved pieces are placed into another sharding.

A DTensor is saved as its local tensor plus a ``ShardRef`` in the skeleton: the global shape and
the global offsets and sizes of the local chunk, as DTensor reports them itself
(``__create_chunk_list__``, the protocol torch's distributed checkpoint uses). A chunk replicated
over a mesh dimension (``Replicate``) is written by the ranks at coordinate 0 of that dimension
only; the others record where it is without writing it.

On restore every tensor is rebuilt in the target's own placement from the saved chunks that
overlap the target's local chunk: each overlap is a box, read as the byte range of the saved
chunk that covers it and copied into place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch.distributed.tensor import DTensor

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass(frozen=True)
class ShardRef:
    """A sharded tensor in a skeleton: ``index`` is the stored local chunk (-1: another rank
    stores this chunk), at ``offsets`` with ``sizes`` in a tensor of ``global_shape``."""

    index: int
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def box(self) -> Box:
        return self.offsets, self.sizes


#: tensor types that are never sharded: known without ``isinstance(t, DTensor)``, which
#: costs microseconds a tensor (tensor subclasses check instances in Python)
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def is_sharded(t: object) -> TypeGuard[DTensor]:
    return type(t) not in _PLAIN_TENSORS and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor a rank holds of ``t`` (``t`` itself unless it is a DTensor)."""
    return t._local_tensor if is_sharded(t) else t


def local_box(t: torch.Tensor) -> Box:
    """Where the local chunk of ``t`` lies in its global tensor (the whole of a plain one)."""
    if isinstance(t, DTensor):
        (chunk,) = t.__create_chunk_list__()
        return tuple(chunk.offsets), tuple(chunk.sizes)
    return (0,) * t.dim(), tuple(t.shape)


def writes_chunk(t: torch.Tensor) -> bool:
    """Whether this rank stores its chunk of ``t``: replicas at coordinate 0 of every
    ``Replicate`` mesh dimension do, so a replicated chunk is written once."""
    if not isinstance(t, DTensor):
        return True
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # not in the mesh: holds nothing
        return False
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=True)
               if p.is_replicate())


def overlap(a: Box, b: Box) -> Box | None:
    """The box both ``a`` and ``b`` cover, or None."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1], strict=True))
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return None
    return lo, tuple(h - lo_ for lo_, h in zip(lo, hi, strict=True))


def _strides(sizes: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(sizes):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def byte_span(chunk: Box, part: Box, itemsize: int) -> tuple[int, int]:
    """The bytes [start, stop) of a row-major ``chunk`` that hold every element of ``part``."""
    if not chunk[1]:  # a 0-d tensor
        return 0, itemsize
    strides = _strides(chunk[1])
    first = sum((o - c) * s for o, c, s in zip(part[0], chunk[0], strides, strict=True))
    last = sum((o + n - 1 - c) * s
               for o, n, c, s in zip(part[0], part[1], chunk[0], strides, strict=True))
    return first * itemsize, (last + 1) * itemsize


def place(dst: torch.Tensor, dst_box: Box, span: torch.Tensor, chunk: Box, part: Box) -> None:
    """Copy ``part`` into ``dst`` (holding ``dst_box``) from ``span``: the elements of the
    row-major ``chunk`` from ``part``'s first element on, as ``byte_span`` reads them."""
    if not chunk[1]:
        dst.copy_(span.reshape(()))
        return
    src = span.as_strided(part[1], _strides(chunk[1]))
    view = dst
    for dim, (o, n, d) in enumerate(zip(part[0], part[1], dst_box[0], strict=True)):
        view = view.narrow(dim, o - d, n)
    view.copy_(src)


def box_numel(box: Box) -> int:
    return math.prod(box[1])


def rebuild(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` as a tensor placed like ``like`` (a DTensor with its mesh and placements, its
    local chunk on the device of ``like``'s)."""
    if isinstance(like, DTensor):
        local = local.to(like._local_tensor.device)
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return local
