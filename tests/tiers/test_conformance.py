"""The tier conformance suite: every backend must pass these (fixtures in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from tier_cases import CAPACITY_KINDS, FILE_KINDS, TierFactory, tier_dir

from tiers import CapacityError, KeyNotFound, Tier, TierError
from tiers.host import HostTier
from tiers.local import LocalTier

MiB = 1 << 20

PAYLOADS: dict[str, Callable[[], tuple[Any, bytes]]] = {
    "bytes": lambda: (b"hello tier", b"hello tier"),
    "bytearray": lambda: (bytearray(b"\x00\x01\x02\xff"), b"\x00\x01\x02\xff"),
    "memoryview": lambda: (memoryview(b"0123456789")[2:7], b"23456"),
    "typed-memoryview": lambda: (memoryview(np.arange(6, dtype=np.float32)),
                                 np.arange(6, dtype=np.float32).tobytes()),
    "parts": lambda: ([b"head-", bytearray(b"middle-"), memoryview(b"tail"), b""],
                      b"head-middle-tail"),
    "empty": lambda: (b"", b""),
    "5MiB-random": lambda: (lambda d: (d, d))(os.urandom(5 * MiB)),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
async def test_put_then_get_round_trips(tier: Tier, kind: str) -> None:
    payload, expected = PAYLOADS[kind]()
    await tier.put("round/trip.bin", payload)
    assert await tier.get("round/trip.bin") == expected
    assert (await tier.stat("round/trip.bin")).size_bytes == len(expected)


async def test_get_reads_byte_ranges(tier: Tier) -> None:
    data = os.urandom(1000)
    await tier.put("k", data)
    assert await tier.get("k", 10, 20) == data[10:30]
    assert await tier.get("k", 990) == data[990:]
    assert await tier.get("k", 0, 0) == b""
    # Past the end: the bytes that exist. At the end: nothing. Beyond it: ValueError.
    assert await tier.get("k", 995, 100) == data[995:]
    assert await tier.get("k", 1000) == b""
    with pytest.raises(ValueError):
        await tier.get("k", 1001)
    with pytest.raises(ValueError):
        await tier.get("k", -1)


async def test_readinto_fills_the_buffer_from_the_offset(tier: Tier) -> None:
    data = os.urandom(4096)
    await tier.put("k", data)
    out = bytearray(100)
    await tier.readinto("k", memoryview(out), 50)
    assert bytes(out) == data[50:150]
    floats = np.zeros(8, dtype=np.float32)  # a typed buffer is filled byte for byte
    await tier.readinto("k", memoryview(floats), 4000)
    assert floats.tobytes() == data[4000:4032]
    with pytest.raises(TierError, match="short read"):
        await tier.readinto("k", memoryview(bytearray(100)), 4000)
    with pytest.raises(KeyNotFound):
        await tier.readinto("missing", memoryview(bytearray(1)))


async def test_list_returns_sorted_keys_under_a_prefix(tier: Tier) -> None:
    keys = ["b/2", "a/1", "a/10", "a/2/x", "c"]
    await asyncio.gather(*(tier.put(k, k.encode()) for k in keys))
    assert await tier.list() == sorted(keys)
    assert await tier.list("a/") == ["a/1", "a/10", "a/2/x"]
    assert await tier.list("a/1") == ["a/1", "a/10"]
    assert await tier.list("a/2/") == ["a/2/x"]
    assert await tier.list("zzz") == []


@pytest.mark.parametrize("tier_kind", FILE_KINDS, indirect=True)
async def test_list_never_shows_uncommitted_tmp_files(tier: Tier) -> None:
    await tier.put("step/data.bin", b"committed")
    planted = tier_dir(tier) / "step" / f"other.bin.tmp-{os.getpid()}-0123abcd"
    planted.write_bytes(b"half written")  # a write of a live process, in flight
    assert await tier.list() == ["step/data.bin"]
    assert not await tier.exists("step/other.bin")
    if isinstance(tier, HostTier):
        block = await tier.reserve("step/staged.bin", 16)
        assert await tier.list("step/") == ["step/data.bin"]
        await block.abort()


async def test_exists_and_stat_report_committed_sizes(tier: Tier) -> None:
    before = time.time()
    await tier.put("dir/k", b"x" * 123)
    await tier.put("dir/empty", b"")
    assert await tier.exists("dir/k")
    assert await tier.exists("dir/empty")
    assert not await tier.exists("dir/nope")
    assert not await tier.exists("dir")  # a directory is not a key
    st = await tier.stat("dir/k")
    assert (st.key, st.size_bytes) == ("dir/k", 123)
    assert abs(st.mtime_s - before) < 600
    assert (await tier.stat("dir/empty")).size_bytes == 0
    with pytest.raises(KeyNotFound):
        await tier.stat("dir/nope")


async def test_get_after_delete_raises_key_not_found(tier: Tier) -> None:
    await tier.put("gone/k", b"data")
    await tier.delete("gone/k")
    with pytest.raises(KeyNotFound) as info:
        await tier.get("gone/k")
    assert tier.name in str(info.value) and "gone/k" in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, OSError)
    assert not await tier.exists("gone/k")
    assert await tier.list() == []


async def test_delete_of_a_missing_key_raises_key_not_found(tier: Tier) -> None:
    with pytest.raises(KeyNotFound, match="never/was"):
        await tier.delete("never/was")
    with pytest.raises(KeyNotFound):
        await tier.get("never/was")


async def test_overwrite_replaces_the_value_atomically(tier: Tier) -> None:
    old, new = b"A" * (256 << 10), b"B" * (512 << 10)
    await tier.put("k", old)
    seen: set[bytes] = set()
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            value = await tier.get("k")
            assert value in (old, new), f"torn read of {len(value)} bytes"
            seen.add(value[:1])
            await asyncio.sleep(0)

    async def writer() -> None:
        try:
            for _ in range(3):
                await tier.put("k", new)
                await asyncio.sleep(0.01)
        finally:
            done.set()

    await asyncio.gather(reader(), reader(), writer())
    assert await tier.get("k") == new
    assert await tier.list() == ["k"]
    assert b"A" in seen or b"B" in seen


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a\x00b", "a//b", "", "a/./b",
                                 "a/", "a\\b"])
async def test_invalid_keys_are_rejected(tier: Tier, key: str) -> None:
    for call in (lambda: tier.put(key, b"x"), lambda: tier.get(key),
                 lambda: tier.stat(key), lambda: tier.delete(key)):
        with pytest.raises(ValueError):
            await call()
    assert await tier.list() == []


async def test_concurrent_puts_are_all_readable(tier: Tier) -> None:
    values = {f"d{i % 4}/k{i:02d}": os.urandom(1000 + i) for i in range(32)}
    await asyncio.gather(*(tier.put(k, v) for k, v in values.items()))
    assert await tier.list() == sorted(values)
    got = await asyncio.gather(*(tier.get(k) for k in values))
    assert dict(zip(values, got, strict=True)) == values


async def test_delete_prefix_removes_only_that_prefix(tier: Tier) -> None:
    for k in ["x/1", "x/2", "x/y/3", "xy", "z"]:
        await tier.put(k, b"v")
    assert await tier.delete_prefix("x/") == 3
    assert await tier.list() == ["xy", "z"]


async def test_close_is_idempotent_and_keeps_committed_data(
        tier: Tier, tier_factory: TierFactory) -> None:
    await tier.put("k", b"kept")
    await tier.close()
    await tier.close()
    again = tier_factory()
    assert await again.get("k") == b"kept"


async def test_a_new_instance_on_the_same_url_sees_committed_data(
        tier: Tier, tier_factory: TierFactory) -> None:
    data = {"a/1": b"one", "a/2": os.urandom(10_000), "b": b""}
    for k, v in data.items():
        await tier.put(k, v)
    other = tier_factory()
    assert await other.list() == sorted(data)
    for k, v in data.items():
        assert await other.get(k) == v


async def test_a_cancelled_put_leaves_the_whole_value_or_nothing(tier: Tier) -> None:
    data = os.urandom(8 * MiB)
    for i, delay_s in enumerate([0, 0.001, 0.003, 0.01, 0.03]):
        task = asyncio.create_task(tier.put(f"c/{i}", data))
        await asyncio.sleep(delay_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for key in await tier.list():
        assert await tier.get(key) == data, f"{key} is torn"
    if isinstance(tier, HostTier):
        assert tier.reserved_bytes == 0
        assert tier.committed_bytes == len(await tier.list()) * len(data)
    if isinstance(tier, (HostTier, LocalTier)):
        leftovers = [f for _, _, files in os.walk(tier_dir(tier)) for f in files if ".tmp-" in f]
        assert leftovers == []


# ---- byte budget: tiers with capacity ---------------------------------------------------------

capacity_tiers = pytest.mark.parametrize("tier_kind", CAPACITY_KINDS, indirect=True)


@capacity_tiers
async def test_a_put_that_does_not_fit_waits_for_a_delete(tier_factory: TierFactory) -> None:
    tier: Any = tier_factory(capacity_bytes=MiB)
    await tier.put("old", b"o" * (768 << 10))
    order: list[str] = []

    async def late_put() -> None:
        await tier.put("new", b"n" * (512 << 10))
        order.append("put done")

    task = asyncio.create_task(late_put())
    await asyncio.sleep(0.1)
    assert not task.done(), "the put must wait while the budget is full"
    assert not await tier.exists("new")
    order.append("delete")
    await tier.delete("old")
    await asyncio.wait_for(task, 10)
    assert order == ["delete", "put done"]
    assert await tier.get("new") == b"n" * (512 << 10)
    assert tier.used_bytes <= MiB


@capacity_tiers
async def test_an_item_larger_than_the_capacity_fails_at_once(tier_factory: TierFactory) -> None:
    tier = tier_factory(capacity_bytes=1000)
    with pytest.raises(CapacityError, match="capacity"):
        await asyncio.wait_for(tier.put("huge", b"x" * 1001), 5)
    await tier.put("fits", b"x" * 1000)
    assert await tier.list() == ["fits"]


@capacity_tiers
async def test_an_aborted_reservation_releases_its_bytes(tier_factory: TierFactory) -> None:
    tier: Any = tier_factory(capacity_bytes=MiB)
    block = await tier.reserve("staged", 600 << 10)
    assert tier.used_bytes == 600 << 10
    await block.abort()
    assert tier.used_bytes == 0
    with pytest.raises(RuntimeError):  # a failing `async with` aborts too
        async with await tier.reserve("staged", 600 << 10) as blk:
            blk.view[:4] = b"boom"
            raise RuntimeError("copy failed")
    assert tier.used_bytes == 0
    await asyncio.wait_for(tier.put("fits", b"x" * MiB), 5)  # the whole budget is free
    assert await tier.list() == ["fits"]
    assert os.listdir(tier_dir(tier)) == ["fits"]  # no tmp file left


@capacity_tiers
async def test_a_cancelled_waiting_put_reserves_nothing(tier_factory: TierFactory) -> None:
    tier: Any = tier_factory(capacity_bytes=1000)
    await tier.put("full", b"x" * 1000)
    task = asyncio.create_task(tier.put("waits", b"y" * 10))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tier.used_bytes == 1000
    assert await tier.list() == ["full"]


@capacity_tiers
async def test_used_bytes_counts_committed_reserved_and_pooled(
        tier_factory: TierFactory) -> None:
    tier: Any = tier_factory(capacity_bytes=MiB)
    await tier.put("a", b"a" * 100)
    await tier.put("b", b"b" * 200)
    assert tier.used_bytes == 300
    await tier.put("a", b"A" * 50)  # overwrite: the old value's bytes are freed
    assert tier.used_bytes == 250
    block = await tier.reserve("c", 1000)
    assert (tier.committed_bytes, tier.reserved_bytes, tier.used_bytes) == (250, 1000, 1250)
    await block.commit()
    assert (tier.committed_bytes, tier.reserved_bytes) == (1250, 0)
    await tier.delete("b")  # moves into the free pool, still counted
    assert (tier.committed_bytes, tier.pooled_bytes, tier.used_bytes) == (1050, 200, 1250)
    await tier.close()
    reopened: Any = tier_factory(capacity_bytes=MiB)
    assert await reopened.list() == ["a", "c"]
    assert reopened.used_bytes == 1050  # counted from the files already there


@capacity_tiers
async def test_a_deleted_block_is_reused_for_the_same_size(tier_factory: TierFactory) -> None:
    tier: Any = tier_factory(capacity_bytes=2 * MiB)
    inodes = []
    await tier.put("step-0", b"\0" * MiB)
    for step in range(1, 6):  # keep one checkpoint: write the next, then drop the previous
        inodes.append(os.stat(tier_dir(tier) / f"step-{step - 1}").st_ino)
        await tier.put(f"step-{step}", bytes([step]) * MiB)
        await tier.delete(f"step-{step - 1}")
        assert tier.used_bytes <= 2 * MiB
        assert await tier.get(f"step-{step}") == bytes([step]) * MiB
    last_inode = os.stat(tier_dir(tier) / "step-5").st_ino
    assert len(set(inodes)) == 2, "each checkpoint allocated fresh pages"
    await tier.delete("step-5")
    assert tier.committed_bytes == 0 and tier.pooled_bytes == tier.used_bytes == 2 * MiB
    async with await tier.reserve("staged", MiB) as block:
        block.view[:] = b"s" * MiB
    assert os.stat(tier_dir(tier) / "staged").st_ino == last_inode  # most recently freed
    assert tier.used_bytes == 2 * MiB and tier.pooled_bytes == MiB
    assert await tier.get("staged") == b"s" * MiB
    await tier.put("other-size", b"o" * 1000)  # no pooled file fits: the pool makes room
    assert (tier.used_bytes, tier.pooled_bytes) == (MiB + 1000, 0)
