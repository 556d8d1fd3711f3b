"""Lossless partition codecs: bit-exact round trips, chunking, verification, estimates."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymcheck.codec import (
    CODECS,
    ChecksumError,
    EncodedChunk,
    EncodedPartition,
    decode_into,
    encode,
    estimate_ratio,
    measure_codec_throughput,
)

DELTAS = ("delta", "delta_sub")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The caller's contract: make the tensor contiguous, then view its bytes."""
    return t.contiguous().view(torch.uint8).numpy()


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=torch.int64)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def nudged(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` after one small update, like the same weights one optimizer step later."""
    gen = torch.Generator().manual_seed(seed)
    if t.dtype == torch.bool:
        return t ^ (torch.rand(t.shape, generator=gen) > 0.9)
    if t.dtype == torch.int64:
        return t + torch.randint(-3, 4, t.shape, generator=gen)
    step = torch.randn(t.shape, generator=gen).sign() * 1e-4
    return (t.float() - step).to(t.dtype)


def round_trip(
    data: np.ndarray,
    *,
    codec: str,
    elem_size: int,
    base: np.ndarray | None = None,
    chunk_bytes: int = 4 << 20,
    executor: ThreadPoolExecutor | None = None,
) -> tuple[EncodedPartition, np.ndarray]:
    part = encode(
        data,
        codec=codec,
        elem_size=elem_size,
        base=base,
        chunk_bytes=chunk_bytes,
        executor=executor,
    )
    out = np.full(data.nbytes, 0xA5, dtype=np.uint8)  # garbage a lazy decoder would leave
    decode_into(part, memoryview(out), base=base, executor=executor)
    return part, out


def base_for(codec: str, data: np.ndarray, seed: int = 7) -> np.ndarray | None:
    if codec not in DELTAS:
        return None
    return np.random.default_rng(seed).integers(0, 256, data.nbytes, dtype=np.uint8)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_bytes_round_trip_bit_exact(
    codec: str, dtype: torch.dtype, pool: ThreadPoolExecutor
) -> None:
    t = make_tensor(dtype, (301, 67), seed=1)
    data = tensor_bytes(t)
    base = tensor_bytes(nudged(t, seed=2)) if codec in DELTAS else None
    part, out = round_trip(
        data,
        codec=codec,
        elem_size=t.element_size(),
        base=base,
        chunk_bytes=16 << 10,
        executor=pool,
    )
    assert len(part.chunks) > 1
    assert out.tobytes() == data.tobytes()
    restored = torch.frombuffer(bytearray(out.tobytes()), dtype=dtype).reshape(t.shape)
    assert torch.equal(restored, t)


@pytest.mark.parametrize("codec", CODECS)
def test_empty_input_round_trips_with_no_chunks(codec: str) -> None:
    empty = np.empty(0, dtype=np.uint8)
    base = empty if codec in DELTAS else None
    part = encode(empty, codec=codec, elem_size=4, base=base)
    assert part.chunks == () and part.raw_len == 0 and part.ratio == 1.0
    decode_into(part, bytearray(), base=base)


@pytest.mark.parametrize("codec", CODECS)
def test_non_contiguous_view_round_trips_once_made_contiguous(codec: str) -> None:
    t = make_tensor(torch.float32, (64, 90), seed=3)
    view = t.t()[::3]  # transposed and strided
    assert not view.is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        encode(view.numpy(), codec=codec, elem_size=4, base=None)
    data = tensor_bytes(view)
    base = base_for(codec, data)
    _, out = round_trip(data, codec=codec, elem_size=4, base=base, chunk_bytes=1000)
    restored = torch.frombuffer(bytearray(out.tobytes()), dtype=torch.float32)
    assert torch.equal(restored.reshape(view.shape), view)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("elem_size", [1, 2, 4, 8])
@pytest.mark.parametrize("nbytes", [1, 7, 4096 - 1, 4096, 4096 + 1, 3 * 4096 + 5])
def test_odd_sizes_and_chunk_boundaries_round_trip(codec: str, elem_size: int, nbytes: int) -> None:
    rng = np.random.default_rng(nbytes * 10 + elem_size)
    data = (rng.standard_normal(nbytes) * 4).astype(np.int8).view(np.uint8)
    base = base_for(codec, data)
    part, out = round_trip(data, codec=codec, elem_size=elem_size, base=base, chunk_bytes=4096)
    assert np.array_equal(out, data)
    for chunk in part.chunks[:-1]:  # every chunk but the last holds whole elements
        assert chunk.raw_len % elem_size == 0


def test_chunks_split_on_element_boundaries_when_chunk_size_is_not_a_multiple() -> None:
    data = np.arange(1001, dtype=np.float64).view(np.uint8)
    part = encode(data, codec="shuffle", elem_size=8, chunk_bytes=1001)
    assert [c.raw_len for c in part.chunks[:-1]] == [1000] * (len(part.chunks) - 1)
    assert sum(c.raw_len for c in part.chunks) == data.nbytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=5000),
    codec=st.sampled_from(CODECS),
    elem_size=st.sampled_from([1, 2, 4, 8]),
    chunk_bytes=st.integers(min_value=1, max_value=3000),
    base_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_bytes_round_trip(
    payload: bytes, codec: str, elem_size: int, chunk_bytes: int, base_seed: int
) -> None:
    data = np.frombuffer(payload, dtype=np.uint8)
    base = None
    if codec in DELTAS:
        base = np.random.default_rng(base_seed).integers(0, 256, len(payload), dtype=np.uint8)
    part = encode(payload, codec=codec, elem_size=elem_size, base=base, chunk_bytes=chunk_bytes)
    out = bytearray(len(payload))
    decode_into(part, out, base=base)
    assert bytes(out) == payload
    assert part.raw_len == len(payload) == sum(c.raw_len for c in part.chunks)
    assert all(
        c.xxh64 == xxhash.xxh64_intdigest(bytes(data[c.raw_offset : c.raw_offset + c.raw_len]))
        for c in part.chunks
    )


@pytest.mark.parametrize("codec", DELTAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_delta_round_trips_against_a_random_and_a_near_base(codec: str, dtype: torch.dtype) -> None:
    t = make_tensor(dtype, (50_001,), seed=4)
    data = tensor_bytes(t)
    near = tensor_bytes(nudged(t, seed=5))
    for base in (near, base_for(codec, data, seed=6), data):
        assert base is not None
        _, out = round_trip(data, codec=codec, elem_size=t.element_size(), base=base)
        assert np.array_equal(out, data)


@pytest.mark.parametrize("elem_size", [1, 2, 4, 8])
def test_subtractive_delta_wraps_around_at_the_extremes(elem_size: int) -> None:
    extremes = np.array([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE], dtype=np.uint8)
    data = np.repeat(extremes, 8 * elem_size).reshape(-1)  # whole elements of each byte
    base = np.roll(data, 8 * elem_size)
    tail = 3 if elem_size > 1 else 0
    data, base = np.concatenate([data, data[:tail]]), np.concatenate([base, base[:tail]])
    for a, b in ((data, base), (base, data)):
        _, out = round_trip(a, codec="delta_sub", elem_size=elem_size, base=b, chunk_bytes=16)
        assert np.array_equal(out, a)


def test_delta_against_a_near_base_compresses_better_than_a_full_checkpoint() -> None:
    t = make_tensor(torch.float32, (200_000,), seed=8)
    data, base = tensor_bytes(t), tensor_bytes(nudged(t, seed=9))
    plain = encode(data, codec="zstd", elem_size=4).ratio
    full = encode(data, codec="shuffle", elem_size=4).ratio
    delta = encode(data, codec="delta", elem_size=4, base=base).ratio
    delta_sub = encode(data, codec="delta_sub", elem_size=4, base=base).ratio
    assert delta_sub > delta > full > plain > 1.0


def test_raw_chunks_are_views_of_the_input() -> None:
    data = np.arange(10_000, dtype=np.float32).view(np.uint8)
    part = encode(data, codec="raw", elem_size=4, chunk_bytes=4096)
    for chunk in part.chunks:
        assert isinstance(chunk.stored, memoryview)
        assert np.shares_memory(np.frombuffer(chunk.stored, dtype=np.uint8), data)


def test_parallel_and_inline_encoding_store_the_same_bytes(pool: ThreadPoolExecutor) -> None:
    data = tensor_bytes(make_tensor(torch.float32, (100_000,), seed=10))
    inline = encode(data, codec="shuffle", elem_size=4, chunk_bytes=64 << 10)
    parallel = encode(data, codec="shuffle", elem_size=4, chunk_bytes=64 << 10, executor=pool)
    assert [bytes(c.stored) for c in inline.chunks] == [bytes(c.stored) for c in parallel.chunks]


def test_decode_accepts_chunks_in_any_order() -> None:
    data = tensor_bytes(make_tensor(torch.float16, (9_999,), seed=11))
    part = encode(data, codec="shuffle", elem_size=2, chunk_bytes=2048)
    out = bytearray(data.nbytes)
    decode_into(list(reversed(part.chunks)), out)
    assert bytes(out) == data.tobytes()


# ---------------------------------------------------------------------------- verification


def flip(chunk: EncodedChunk, position: int) -> EncodedChunk:
    """A copy of the chunk with one stored byte changed (the input buffer stays intact)."""
    stored = bytearray(chunk.stored)
    stored[position % len(stored)] ^= 0x40
    return EncodedChunk.from_meta(chunk.meta(), bytes(stored))


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_stored_byte_raises_checksum_error_naming_the_chunk(
    codec: str, pool: ThreadPoolExecutor
) -> None:
    data = tensor_bytes(make_tensor(torch.float32, (30_000,), seed=12))
    base = base_for(codec, data)
    part = encode(data, codec=codec, elem_size=4, base=base, chunk_bytes=32 << 10)
    victim = part.chunks[1]
    for position in (0, 4, 5, victim.stored_len // 2, victim.stored_len - 1):
        chunks = list(part.chunks)
        chunks[1] = flip(victim, position)
        with pytest.raises(ChecksumError, match=f"raw offset {victim.raw_offset}"):
            decode_into(chunks, bytearray(data.nbytes), base=base, executor=pool)


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(CODECS), position=st.integers(min_value=0, max_value=10**6))
def test_any_flipped_stored_byte_is_caught(codec: str, position: int) -> None:
    data = tensor_bytes(make_tensor(torch.bfloat16, (5_000,), seed=13))
    base = base_for(codec, data)
    (chunk,) = encode(data, codec=codec, elem_size=2, base=base).chunks
    with pytest.raises(ChecksumError):
        decode_into([flip(chunk, position)], bytearray(data.nbytes), base=base)


@pytest.mark.parametrize("codec", CODECS[1:])
def test_undecodable_frame_with_a_matching_stored_hash_is_a_checksum_error(codec: str) -> None:
    data = tensor_bytes(make_tensor(torch.float32, (2_000,), seed=14))
    base = base_for(codec, data)
    (chunk,) = encode(data, codec=codec, elem_size=4, base=base).chunks
    for garbage in (b"not a zstd frame", bytes(chunk.stored)[:-3], bytes(chunk.stored) + b"x"):
        forged = dataclasses.replace(
            chunk, stored=garbage, stored_xxh64=xxhash.xxh64_intdigest(garbage)
        )
        with pytest.raises(ChecksumError, match="raw offset 0"):
            decode_into([forged], bytearray(data.nbytes), base=base)


def test_wrong_decoded_hash_is_a_checksum_error() -> None:
    data = tensor_bytes(make_tensor(torch.float32, (2_000,), seed=15))
    (chunk,) = encode(data, codec="shuffle", elem_size=4).chunks
    bad = dataclasses.replace(chunk, xxh64=chunk.xxh64 ^ 1)
    with pytest.raises(ChecksumError, match="xxh64"):
        decode_into([bad], bytearray(data.nbytes))


@pytest.mark.parametrize("codec", DELTAS)
def test_wrong_base_raises_checksum_error(codec: str, pool: ThreadPoolExecutor) -> None:
    t = make_tensor(torch.float32, (40_000,), seed=16)
    data, base = tensor_bytes(t), tensor_bytes(nudged(t, seed=17))
    part = encode(data, codec=codec, elem_size=4, base=base, chunk_bytes=32 << 10)
    other = tensor_bytes(nudged(t, seed=18))
    with pytest.raises(ChecksumError, match="base"):
        decode_into(part, bytearray(data.nbytes), base=other, executor=pool)


@pytest.mark.parametrize("codec", DELTAS)
def test_missing_or_wrong_length_base_is_a_value_error(codec: str) -> None:
    data = tensor_bytes(make_tensor(torch.float32, (1_000,), seed=19))
    with pytest.raises(ValueError, match="needs a base"):
        encode(data, codec=codec, elem_size=4)
    with pytest.raises(ValueError, match="base has 3996 bytes"):
        encode(data, codec=codec, elem_size=4, base=data[:-4])
    part = encode(data, codec=codec, elem_size=4, base=data)
    with pytest.raises(ValueError, match="needs a base"):
        decode_into(part, bytearray(data.nbytes))
    with pytest.raises(ValueError, match="base has"):
        decode_into(part, bytearray(data.nbytes), base=bytes(8))


def test_chunks_that_do_not_tile_the_output_are_rejected() -> None:
    data = np.arange(4_000, dtype=np.int64).view(np.uint8)
    part = encode(data, codec="zstd", elem_size=8, chunk_bytes=8_000)
    with pytest.raises(ValueError, match="tile"):
        decode_into(part.chunks[1:], bytearray(data.nbytes))
    with pytest.raises(ValueError, match="cover"):
        decode_into(part, bytearray(data.nbytes + 1))
    with pytest.raises(ValueError, match="writable"):
        decode_into(part, bytes(data.nbytes))


def test_unknown_codec_and_bad_element_size_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        encode(b"abc", codec="lz4", elem_size=1)
    with pytest.raises(ValueError, match="elem_size"):
        encode(b"abc", codec="zstd", elem_size=3)
    with pytest.raises(ValueError, match="chunk_bytes"):
        encode(b"abc", codec="zstd", elem_size=1, chunk_bytes=0)


# ---------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("codec", CODECS)
def test_chunk_metadata_round_trips_through_msgpack(codec: str) -> None:
    data = tensor_bytes(make_tensor(torch.float64, (3_001,), seed=20))
    base = base_for(codec, data)
    part = encode(data, codec=codec, elem_size=8, base=base, chunk_bytes=8 << 10)
    packed = msgpack.packb([c.meta() for c in part.chunks])
    stored = [bytes(c.stored) for c in part.chunks]
    rebuilt = [
        EncodedChunk.from_meta(meta, blob)
        for meta, blob in zip(msgpack.unpackb(packed), stored, strict=True)
    ]
    assert [dataclasses.replace(c, stored=b"") for c in rebuilt] == [
        dataclasses.replace(c, stored=b"") for c in part.chunks
    ]
    out = bytearray(data.nbytes)
    decode_into(rebuilt, out, base=base)
    assert bytes(out) == data.tobytes()


def test_from_meta_rejects_bad_metadata() -> None:
    (chunk,) = encode(b"x" * 100, codec="zstd", elem_size=1).chunks
    meta = chunk.meta()
    with pytest.raises(ValueError, match="version"):
        EncodedChunk.from_meta({**meta, "v": 99}, chunk.stored)
    with pytest.raises(ValueError, match="lacks the key 'xxh64'"):
        EncodedChunk.from_meta({k: v for k, v in meta.items() if k != "xxh64"}, chunk.stored)
    with pytest.raises(ValueError, match="unknown codec"):
        EncodedChunk.from_meta({**meta, "codec": "gzip"}, chunk.stored)
    with pytest.raises(ChecksumError, match="stored"):
        EncodedChunk.from_meta(meta, bytes(chunk.stored)[:-1])


# ---------------------------------------------------------------------------- cost model


@pytest.mark.parametrize("codec", CODECS)
def test_estimated_ratio_is_close_to_the_real_one(codec: str) -> None:
    t = make_tensor(torch.float32, (1_500_000,), seed=21)  # 6 MB: sampled, not whole
    data = tensor_bytes(t)
    base = tensor_bytes(nudged(t, seed=22)) if codec in DELTAS else None
    real = encode(data, codec=codec, elem_size=4, base=base).ratio
    estimate = estimate_ratio(data, codec=codec, elem_size=4, base=base)
    assert estimate == pytest.approx(real, rel=0.1)


def test_estimated_ratio_samples_the_whole_of_a_mixed_partition() -> None:
    rng = np.random.default_rng(23)
    noise = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    data = np.concatenate([noise[: 1 << 20], np.zeros(1 << 20, np.uint8), noise[1 << 20 :]])
    real = encode(data, codec="zstd", elem_size=1).ratio
    assert estimate_ratio(data, codec="zstd", elem_size=1) == pytest.approx(real, rel=0.05)


def test_estimated_ratio_of_small_or_empty_data() -> None:
    small = np.zeros(1000, dtype=np.uint8)
    assert estimate_ratio(small, codec="zstd", elem_size=1) > 10
    assert estimate_ratio(b"", codec="shuffle", elem_size=4) == 1.0
    assert estimate_ratio(small, codec="raw", elem_size=1) == 1.0
    with pytest.raises(ValueError, match="needs a base"):
        estimate_ratio(small, codec="delta", elem_size=4)


@pytest.mark.parametrize("codec", CODECS)
def test_measured_throughput_is_positive(codec: str) -> None:
    compress_bps, decompress_bps = measure_codec_throughput(codec, 4, nbytes=256 << 10)
    assert compress_bps > 1e6 and decompress_bps > 1e6
