"""Byte-level kernels of the codecs: flat byte views, zstd contexts, byte-shuffle with an
optional XOR base, and the zigzag-coded integer difference.

All of them work on whole buffers in numpy or zstandard, which release the GIL, so
:mod:`asymcheck.codec` runs them on a thread pool chunk by chunk. None of them checks
a codec name or a checksum: that is the codec's part.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Final

import numpy as np
import zstandard

__all__ = [
    "BytesLike",
    "as_array",
    "byte_view",
    "compressor",
    "decompress_into",
    "decompressor",
    "gather",
    "shuffle_into",
    "undo_zigzag_diff",
    "unshuffle_into",
    "zigzag_diff",
]

BytesLike = bytes | bytearray | memoryview | np.ndarray

_SIGNED: Final = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_UNSIGNED: Final = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# ---------------------------------------------------------------------------- buffers


def byte_view(data: BytesLike, what: str) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying."""
    if isinstance(data, memoryview):
        view = data
    elif isinstance(data, np.ndarray):
        view = data.data
    else:
        view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous buffer (make the tensor contiguous)")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def as_array(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


def gather(view: memoryview, starts: Sequence[int], piece: int) -> memoryview:
    """The ``piece`` bytes at each of ``starts``, back to back in one new buffer."""
    whole = as_array(view)
    return np.concatenate([whole[s : s + piece] for s in starts]).data


# ---------------------------------------------------------------------------- zstd contexts

_local = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level: zstd contexts are not thread-safe."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress_into(stored: bytes | memoryview, dest: memoryview) -> None:
    """Decompress one zstd frame into ``dest``, which it must fill exactly."""
    with decompressor().stream_reader(stored) as reader:
        filled = 0
        while filled < dest.nbytes:
            got = reader.readinto(dest[filled:])
            if got == 0:
                break
            filled += got
        extra = reader.read(1)
    if filled != dest.nbytes or extra:
        raise ValueError(f"frame decodes to a size other than the expected {dest.nbytes} bytes")


# ---------------------------------------------------------------------------- transforms


def shuffle_into(
    src: np.ndarray, base: np.ndarray | None, elem_size: int, out: np.ndarray
) -> None:
    """out = byte-shuffle(src XOR base); a tail shorter than one element stays in place.

    Copies one byte plane at a time: a row-wise gather is several times faster in numpy
    than a transposed copy or a strided write.
    """
    body = len(src) - len(src) % elem_size
    count = body // elem_size
    src_rows = src[:body].reshape(count, elem_size)
    planes = out[:body].reshape(elem_size, count)
    if base is None:
        for k in range(elem_size):
            planes[k] = src_rows[:, k]
        out[body:] = src[body:]
    else:
        base_rows = base[:body].reshape(count, elem_size)
        for k in range(elem_size):
            np.bitwise_xor(src_rows[:, k], base_rows[:, k], out=planes[k])
        np.bitwise_xor(src[body:], base[body:], out=out[body:])


def unshuffle_into(
    shuffled: np.ndarray, base: np.ndarray | None, elem_size: int, out: np.ndarray
) -> None:
    """Inverse of :func:`shuffle_into`."""
    body = len(shuffled) - len(shuffled) % elem_size
    count = body // elem_size
    planes = shuffled[:body].reshape(elem_size, count)
    out_rows = out[:body].reshape(count, elem_size)
    if base is None:
        for k in range(elem_size):
            out_rows[:, k] = planes[k]
        out[body:] = shuffled[body:]
    else:
        base_rows = base[:body].reshape(count, elem_size)
        for k in range(elem_size):
            np.bitwise_xor(planes[k], base_rows[:, k], out=out_rows[:, k])
        np.bitwise_xor(shuffled[body:], base[body:], out=out[body:])


def zigzag_diff(src: np.ndarray, base: np.ndarray, elem_size: int) -> np.ndarray:
    """zigzag(src - base) per element as bytes (wrapping); a short tail is XORed."""
    body = len(src) - len(src) % elem_size
    out = np.empty(len(src), dtype=np.uint8)
    itype = _SIGNED[elem_size]
    diff = out[:body].view(itype)
    np.subtract(src[:body].view(itype), base[:body].view(itype), out=diff)
    sign = np.right_shift(diff, 8 * elem_size - 1)  # arithmetic: 0 or -1
    np.left_shift(diff, 1, out=diff)
    np.bitwise_xor(diff, sign, out=diff)
    np.bitwise_xor(src[body:], base[body:], out=out[body:])
    return out


def undo_zigzag_diff(coded: np.ndarray, base: np.ndarray, elem_size: int) -> None:
    """Inverse of :func:`zigzag_diff`, in place."""
    body = len(coded) - len(coded) % elem_size
    utype = _UNSIGNED[elem_size]
    value = coded[:body].view(utype)
    negate = np.bitwise_and(value, 1)
    np.subtract(0, negate, out=negate)  # 0 or all ones
    np.right_shift(value, 1, out=value)
    np.bitwise_xor(value, negate, out=value)
    np.add(value, base[:body].view(utype), out=value)
    np.bitwise_xor(coded[body:], base[body:], out=coded[body:])
