"""Lossless codecs for checkpoint partitions: pure functions over byte buffers.

A partition is split into chunks that are coded independently, so a thread pool can
compress and decompress them in parallel (zstd, xxhash and the numpy transforms all
release the GIL) and a reader can verify each chunk on its own.

Codecs:

* ``raw``: the bytes as they are; the stored buffer is a view of the input, no copy.
* ``zstd``: plain zstd.
* ``shuffle``: byte-shuffle (byte k of every element grouped together), then zstd.
  Floats of one tensor share sign and exponent bytes, so grouping them gives zstd
  long, low-entropy runs that interleaved bytes hide.
* ``delta``: XOR with the same partition of a base checkpoint, then byte-shuffle, then
  zstd. Weights one optimizer step apart share their high bytes, which XOR turns
  into zeros.
* ``delta_sub``: like ``delta``, but the element bit patterns are subtracted as
  integers (wrapping) and zigzag-coded instead of XORed. A small change whose
  addition carries across a byte (0x..ff -> 0x..00) leaves one low bit set rather
  than a run of ones, so the upper byte planes hold more zeros (about 6% smaller
  than ``delta`` on AdamW states one step apart).

Every chunk carries the xxh64 of its stored bytes and of its decoded bytes, and
:func:`decode_into` checks both: any change to the stored bytes is caught before they
are decoded (zstd frames have bits a decoder ignores, so decoding alone would not
catch every flip), and a decode bug or a wrong delta base is caught after.

The byte-level kernels (shuffle, zigzag difference, zstd contexts) live in
:mod:`asymcheck.transforms`; this module chunks, checks and dispatches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args

import numpy as np
import xxhash
import zstandard

from . import transforms as tf
from .errors import ChecksumError
from .transforms import BytesLike, byte_view

__all__ = [
    "CODECS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LEVEL",
    "META_VERSION",
    "ChecksumError",
    "Codec",
    "EncodedChunk",
    "EncodedPartition",
    "decode_into",
    "encode",
    "estimate_ratio",
    "measure_codec_throughput",
]

Codec = Literal["raw", "zstd", "shuffle", "delta", "delta_sub"]
CODECS: Final[tuple[str, ...]] = get_args(Codec)

DEFAULT_CHUNK_BYTES: Final = 4 << 20
# On shuffled fp32 byte planes zstd level 1 compresses as well as levels 2-6 and about
# 1.5x faster: the planes are literal-heavy and deeper match search finds nothing more
# (benchmarks/codec_ratio.py). Chunks under 1 MiB lose about 1.5% of the ratio.
DEFAULT_LEVEL: Final = 1
META_VERSION: Final = 1
_ELEM_SIZES: Final = (1, 2, 4, 8)
_SAMPLE_PIECE_BYTES: Final = 16 << 10
_DELTA_CODECS: Final = ("delta", "delta_sub")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """One independently decodable piece of a partition.

    ``xxh64`` hashes the decoded (original) bytes, ``stored_xxh64`` the stored ones
    (the same value for ``raw``).
    """

    codec: str
    raw_offset: int
    raw_len: int
    stored: bytes | memoryview
    xxh64: int
    elem_size: int
    stored_xxh64: int

    @property
    def stored_len(self) -> int:
        return len(self.stored) if isinstance(self.stored, bytes) else self.stored.nbytes

    def meta(self) -> dict[str, Any]:
        """Everything but the stored bytes, as msgpack-friendly scalars."""
        return {
            "v": META_VERSION,
            "codec": self.codec,
            "elem_size": self.elem_size,
            "raw_offset": self.raw_offset,
            "raw_len": self.raw_len,
            "stored_len": self.stored_len,
            "xxh64": self.xxh64,
            "stored_xxh64": self.stored_xxh64,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], stored: BytesLike) -> EncodedChunk:
        """Rebuild a chunk from :meth:`meta` and its stored bytes; rejects mismatches."""
        version = meta.get("v")
        if version != META_VERSION:
            raise ValueError(f"chunk metadata version {version!r} is not {META_VERSION}")
        try:
            codec = str(meta["codec"])
            elem_size = int(meta["elem_size"])
            raw_offset = int(meta["raw_offset"])
            raw_len = int(meta["raw_len"])
            stored_len = int(meta["stored_len"])
            digest = int(meta["xxh64"])
            stored_digest = int(meta["stored_xxh64"])
        except KeyError as exc:
            raise ValueError(f"chunk metadata lacks the key {exc.args[0]!r}") from None
        _check_codec(codec)
        _check_elem_size(elem_size)
        if raw_offset < 0 or raw_len < 0:
            raise ValueError(f"chunk metadata has a negative offset or length: {dict(meta)}")
        view = byte_view(stored, "stored")
        if view.nbytes != stored_len:
            raise ChecksumError(
                f"chunk at raw offset {raw_offset}: stored {view.nbytes} bytes, "
                f"metadata says {stored_len}"
            )
        stored_buf: bytes | memoryview = stored if isinstance(stored, bytes) else view
        return cls(codec, raw_offset, raw_len, stored_buf, digest, elem_size, stored_digest)


@dataclass(frozen=True, slots=True)
class EncodedPartition:
    """A coded partition: its chunks in raw-offset order, covering ``raw_len`` bytes."""

    codec: str
    elem_size: int
    raw_len: int
    chunks: tuple[EncodedChunk, ...]

    @property
    def stored_len(self) -> int:
        return sum(c.stored_len for c in self.chunks)

    @property
    def ratio(self) -> float:
        """raw bytes / stored bytes (1.0 for an empty partition)."""
        stored = self.stored_len
        return self.raw_len / stored if stored else 1.0


# ---------------------------------------------------------------------------- validation


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def _check_elem_size(elem_size: int) -> None:
    if elem_size not in _ELEM_SIZES:
        raise ValueError(f"elem_size must be one of {_ELEM_SIZES}, got {elem_size!r}")



def _base_view(base: BytesLike | None, raw_len: int, what: str) -> memoryview:
    if base is None:
        raise ValueError(f"{what}: the delta codec needs a base buffer, got None")
    view = byte_view(base, "base")
    if view.nbytes != raw_len:
        raise ValueError(
            f"{what}: delta base has {view.nbytes} bytes but the partition has {raw_len}"
        )
    return view



# ---------------------------------------------------------------------------- one chunk


def _compress(
    codec: str, src: memoryview, base: memoryview | None, elem_size: int, level: int
) -> bytes:
    cctx = tf.compressor(level)
    if codec == "zstd" or (codec == "shuffle" and elem_size == 1):
        return cctx.compress(src)
    src_arr = tf.as_array(src)
    base_arr = None if base is None else tf.as_array(base)
    if codec == "delta_sub":
        assert base_arr is not None
        src_arr, base_arr = tf.zigzag_diff(src_arr, base_arr, elem_size), None
    staged = np.empty(src.nbytes, dtype=np.uint8)
    tf.shuffle_into(src_arr, base_arr, elem_size, staged)
    return cctx.compress(staged.data)


def _encode_chunk(
    codec: str,
    data: memoryview,
    base: memoryview | None,
    offset: int,
    length: int,
    elem_size: int,
    level: int,
) -> EncodedChunk:
    src = data[offset : offset + length]
    digest = xxhash.xxh64_intdigest(src)
    if codec == "raw":
        return EncodedChunk(codec, offset, length, src, digest, elem_size, digest)
    chunk_base = None if base is None else base[offset : offset + length]
    stored = _compress(codec, src, chunk_base, elem_size, level)
    stored_digest = xxhash.xxh64_intdigest(stored)
    return EncodedChunk(codec, offset, length, stored, digest, elem_size, stored_digest)


def _decode_chunk(chunk: EncodedChunk, out: memoryview, base: memoryview | None) -> None:
    dest = out[chunk.raw_offset : chunk.raw_offset + chunk.raw_len]
    if chunk.codec != "raw" and xxhash.xxh64_intdigest(chunk.stored) != chunk.stored_xxh64:
        raise ChecksumError(
            f"chunk at raw offset {chunk.raw_offset} ({chunk.codec}): stored bytes fail "
            "their xxh64 check"
        )
    try:
        if chunk.codec == "raw":
            if chunk.stored_len != chunk.raw_len:
                raise ValueError(f"raw chunk stores {chunk.stored_len} bytes, not {chunk.raw_len}")
            tf.as_array(dest)[:] = np.frombuffer(chunk.stored, dtype=np.uint8)
        elif chunk.codec == "zstd" or (chunk.codec == "shuffle" and chunk.elem_size == 1):
            tf.decompress_into(chunk.stored, dest)
        else:
            staged = np.empty(chunk.raw_len, dtype=np.uint8)
            tf.decompress_into(chunk.stored, staged.data)
            chunk_base = None
            if base is not None:
                chunk_base = tf.as_array(base[chunk.raw_offset : chunk.raw_offset + chunk.raw_len])
            if chunk.codec == "delta_sub":
                assert chunk_base is not None
                tf.unshuffle_into(staged, None, chunk.elem_size, tf.as_array(dest))
                tf.undo_zigzag_diff(tf.as_array(dest), chunk_base, chunk.elem_size)
            else:
                tf.unshuffle_into(staged, chunk_base, chunk.elem_size, tf.as_array(dest))
    except (zstandard.ZstdError, ValueError) as exc:
        raise ChecksumError(
            f"chunk at raw offset {chunk.raw_offset} ({chunk.codec}) is corrupt: {exc}"
        ) from exc
    if xxhash.xxh64_intdigest(dest) != chunk.xxh64:
        hint = " (or the delta base is not the one it was encoded against)" if base else ""
        raise ChecksumError(
            f"chunk at raw offset {chunk.raw_offset} ({chunk.codec}) fails its xxh64 check{hint}"
        )


# ---------------------------------------------------------------------------- parallel map


def _run_all(tasks: Sequence[Callable[[], _T]], executor: Executor | None) -> list[_T]:
    """Run tasks on the executor (inline without one); on a failure cancel the rest."""
    if executor is None or len(tasks) <= 1:
        return [task() for task in tasks]
    futures: list[Future[_T]] = [executor.submit(task) for task in tasks]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        for f in futures:  # never return while a worker still writes into a caller buffer
            if not f.cancelled():
                f.exception()
        raise


# ---------------------------------------------------------------------------- public API


def encode(
    data: BytesLike,
    *,
    codec: str,
    elem_size: int,
    base: BytesLike | None = None,
    level: int = DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    executor: Executor | None = None,
) -> EncodedPartition:
    """Encode one partition in chunks of about ``chunk_bytes``, in parallel on ``executor``.

    ``data`` must be C-contiguous (call ``.contiguous()`` on a tensor view first) and
    must not change until the result is written out: ``raw`` chunks are views of it.
    ``elem_size`` is the byte width of the tensor's dtype; chunk boundaries fall on
    element boundaries so that shuffling stays aligned.
    """
    _check_codec(codec)
    _check_elem_size(elem_size)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = byte_view(data, "data")
    raw_len = view.nbytes
    base_view = _base_view(base, raw_len, "encode") if codec in _DELTA_CODECS else None
    step = max(elem_size, chunk_bytes - chunk_bytes % elem_size)

    def task(offset: int) -> Callable[[], EncodedChunk]:
        length = min(step, raw_len - offset)
        return lambda: _encode_chunk(codec, view, base_view, offset, length, elem_size, level)

    chunks = _run_all([task(offset) for offset in range(0, raw_len, step)], executor)
    return EncodedPartition(codec, elem_size, raw_len, tuple(chunks))


def _check_coverage(chunks: Sequence[EncodedChunk], raw_len: int) -> None:
    expected = 0
    for chunk in chunks:
        _check_codec(chunk.codec)
        if chunk.raw_offset != expected:
            raise ValueError(
                f"chunks must tile the output: expected one at raw offset {expected}, "
                f"got {chunk.raw_offset}"
            )
        expected += chunk.raw_len
    if expected != raw_len:
        raise ValueError(f"chunks cover {expected} bytes but the output has {raw_len}")


def decode_into(
    chunks: EncodedPartition | Iterable[EncodedChunk],
    out: BytesLike,
    *,
    base: BytesLike | None = None,
    executor: Executor | None = None,
) -> None:
    """Decode chunks straight into their slices of ``out``, verifying each chunk's xxh64.

    Raises :class:`ChecksumError` (naming the chunk's raw offset) for a corrupt chunk or
    a wrong delta base, and ValueError for a missing base or chunks that do not tile
    ``out``. On an error ``out`` holds partial data.
    """
    ordered = sorted(
        chunks.chunks if isinstance(chunks, EncodedPartition) else chunks,
        key=lambda c: c.raw_offset,
    )
    out_view = byte_view(out, "out")
    if out_view.readonly:
        raise ValueError("out must be a writable buffer")
    _check_coverage(ordered, out_view.nbytes)
    base_view = None
    if any(c.codec in _DELTA_CODECS for c in ordered):
        base_view = _base_view(base, out_view.nbytes, "decode_into")

    def task(chunk: EncodedChunk) -> Callable[[], None]:
        chunk_base = base_view if chunk.codec in _DELTA_CODECS else None
        return lambda: _decode_chunk(chunk, out_view, chunk_base)

    _run_all([task(c) for c in ordered], executor)


def estimate_ratio(
    data: BytesLike,
    *,
    codec: str,
    elem_size: int,
    base: BytesLike | None = None,
    sample_bytes: int = 1 << 20,
    level: int = DEFAULT_LEVEL,
) -> float:
    """Estimate raw/stored for ``data`` from evenly spaced pieces of it.

    Gathers about ``sample_bytes`` as 16 KiB pieces into one buffer and compresses it
    once, so the cost model pays a millisecond or two, not a full compression. Many
    small pieces represent a mixed partition (weights next to optimizer moments)
    better than a few large ones, and compressing them together keeps the byte planes
    as long as a real chunk's; on AdamW states the estimate is within about 3%.
    """
    _check_codec(codec)
    _check_elem_size(elem_size)
    view = byte_view(data, "data")
    raw_len = view.nbytes
    base_view = _base_view(base, raw_len, "estimate_ratio") if codec in _DELTA_CODECS else None
    if codec == "raw" or raw_len == 0:
        return 1.0
    sample, sample_base = view, base_view
    if raw_len > sample_bytes:
        piece = max(elem_size, min(_SAMPLE_PIECE_BYTES, sample_bytes))
        piece -= piece % elem_size
        count = max(2, sample_bytes // piece)
        last_start = raw_len - piece
        starts = [(i * last_start) // (count - 1) for i in range(count)]
        starts = [s - s % elem_size for s in starts]
        sample = tf.gather(view, starts, piece)
        sample_base = None if base_view is None else tf.gather(base_view, starts, piece)
    return sample.nbytes / len(_compress(codec, sample, sample_base, elem_size, level))


def _synthetic_weights(nbytes: int, elem_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes that look like trained weights and the same weights one small step earlier."""
    rng = np.random.default_rng(seed)
    dtype = {1: np.float32, 2: np.float16, 4: np.float32, 8: np.float64}[elem_size]
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    weights = (rng.standard_normal(count, dtype=np.float32) * 0.02).astype(dtype)
    step = np.sign(rng.standard_normal(count, dtype=np.float32)) * 1e-4
    earlier = (weights - step.astype(dtype)).astype(dtype)
    return weights.view(np.uint8)[:nbytes], earlier.view(np.uint8)[:nbytes]


def measure_codec_throughput(
    codec: str,
    elem_size: int = 4,
    *,
    nbytes: int = 4 << 20,
    level: int = DEFAULT_LEVEL,
    repeats: int = 3,
) -> tuple[float, float]:
    """Single-thread (compress_bps, decompress_bps) of a codec on weight-like data.

    Best of ``repeats`` runs, including hashing and verification, so the figures are
    what :func:`encode` and :func:`decode_into` deliver per worker thread. About 0.1 s
    with the defaults.
    """
    _check_codec(codec)
    _check_elem_size(elem_size)
    data, earlier = _synthetic_weights(nbytes, elem_size, seed=0)
    base = earlier if codec in _DELTA_CODECS else None
    out = np.empty_like(data)
    best_c = best_d = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        part = encode(
            data,
            codec=codec,
            elem_size=elem_size,
            base=base,
            level=level,
            chunk_bytes=max(nbytes, 1),
        )
        mid = time.perf_counter()
        decode_into(part, out, base=base)
        end = time.perf_counter()
        best_c, best_d = min(best_c, mid - start), min(best_d, end - mid)
    return data.nbytes / max(best_c, 1e-9), data.nbytes / max(best_d, 1e-9)
