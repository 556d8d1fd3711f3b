"""HdfsTier under faults: an unreachable NameNode, and puts that fail or are cancelled midway.

The unreachable-NameNode tests need no cluster. The others need the MiniDFS cluster:
``export "$(scripts/minidfs.sh start)"`` sets ``ASYMCHECK_TEST_HDFS``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from tier_cases import hdfs_base_url, hdfs_raw_files

pytest.importorskip("hdfs_native")

from hdfs_native import Client

from tiers.base import KeyNotFound, TierError
from tiers.hdfs import HdfsTier, _shared

TIMEOUT_S = 5.0
MARGIN_S = 3.0


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# hdfs-native's own NameNode retries: with them on, its async client panics
# (pyo3_runtime.PanicException) instead of raising; the tier must turn both into TierError.
@pytest.mark.parametrize("config", [None, {"dfs.client.failover.max.attempts": "3"}],
                         ids=["default", "client-retries"])
@pytest.mark.parametrize("op", ["put", "get", "stat", "list", "delete", "exists"])
async def test_unreachable_namenode_fails_fast(op: str, config: dict[str, str] | None) -> None:
    url = f"hdfs://127.0.0.1:{_closed_port()}/asymcheck"
    tier = HdfsTier(url, name="remote", timeout_s=TIMEOUT_S, config=config)
    calls = {
        "put": lambda: tier.put("step-1/data.bin", b"x" * 1024),
        "get": lambda: tier.get("step-1/data.bin"),
        "stat": lambda: tier.stat("step-1/data.bin"),
        "list": lambda: tier.list(),
        "delete": lambda: tier.delete("step-1/data.bin"),
        "exists": lambda: tier.exists("step-1/data.bin"),
    }
    t0 = time.monotonic()
    with pytest.raises(TierError) as info:
        await calls[op]()
    elapsed = time.monotonic() - t0
    await tier.close()
    assert not isinstance(info.value, KeyNotFound), "an unreachable tier is not a missing key"
    assert elapsed < TIMEOUT_S + MARGIN_S, f"took {elapsed:.2f} s"
    msg = str(info.value)
    assert "remote" in msg and url in msg
    if op not in ("list",):
        assert "step-1/data.bin" in msg


async def test_tier_recovers_after_panic() -> None:
    """After a wrapped client panic the tier keeps answering with TierError, not a dead client."""
    url = f"hdfs://127.0.0.1:{_closed_port()}/asymcheck"
    tier = HdfsTier(url, timeout_s=TIMEOUT_S, config={"dfs.client.failover.max.attempts": "3"})
    for _ in range(3):
        with pytest.raises(TierError):
            await tier.stat("k")
    await tier.close()
    await tier.close()  # idempotent


async def test_a_call_that_hangs_fails_within_timeout_while_the_loop_runs_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client call that does not return (a cluster that stopped answering) fails with a
    TierError about ``timeout_s`` later; meanwhile it blocks a worker thread, never the loop."""
    released = threading.Event()
    callers: list[str] = []

    def hangs(self: Client, path: str) -> None:
        callers.append(threading.current_thread().name)
        released.wait(30)

    monkeypatch.setattr(Client, "get_file_info", hangs)
    url = f"hdfs://127.0.0.1:{_closed_port()}/asymcheck"
    tier = HdfsTier(url, name="remote", timeout_s=0.5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    t0 = time.monotonic()
    try:
        with pytest.raises(TierError, match=r"stat 'k'.*no answer within 0.5 s"):
            await tier.stat("k")
        elapsed = time.monotonic() - t0
    finally:
        released.set()
        ticker.cancel()
        await tier.close()
    assert 0.5 <= elapsed < 0.5 + MARGIN_S
    assert ticks >= 10  # the loop ran on while the call hung
    assert callers and callers[0].startswith("asymcheck-hdfs")


def test_calls_failing_at_once_from_two_loops_all_fail_fast() -> None:
    """Many calls in flight on one shared client while the NameNode refuses them all, from two
    threads' event loops: each fails with a TierError and nothing freezes (the calls wake no
    Python code from the client's reader)."""
    url = f"hdfs://127.0.0.1:{_closed_port()}/asymcheck"
    errors: list[BaseException] = []
    failed: list[int] = []

    async def calls() -> None:
        async with HdfsTier(url, name="remote", timeout_s=TIMEOUT_S) as tier:
            ops = [tier.stat(f"k{i}") for i in range(10)]
            ops += [tier.put(f"k{i}", b"x" * 1000) for i in range(10)]
            ops += [tier.delete(f"k{i}") for i in range(10)]
            results = await asyncio.gather(*ops, return_exceptions=True)
        assert all(isinstance(r, TierError) and not isinstance(r, KeyNotFound)
                   for r in results), results
        failed.append(len(results))

    def run() -> None:
        try:
            asyncio.run(calls())
        except BaseException as exc:
            errors.append(exc)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + MARGIN_S + 30)
    assert not any(t.is_alive() for t in threads), "calls froze"
    assert not errors, errors
    assert failed == [30, 30]
    assert time.monotonic() - t0 < TIMEOUT_S + MARGIN_S


# ------------------------------------------------------------------ against the cluster


@pytest.fixture
def hdfs_root() -> str:
    return hdfs_base_url()  # skips, or fails when CI=true, without ASYMCHECK_TEST_HDFS


@pytest.fixture
async def tier(hdfs_root: str) -> AsyncIterator[HdfsTier]:
    t = HdfsTier(f"{hdfs_root}/faults/{uuid.uuid4().hex}", name="remote",
                 timeout_s=60.0, chunk_bytes=1 << 20)
    yield t
    await t.close()
    async with HdfsTier(t.url) as cleanup:  # a test may have closed ``t``
        await cleanup.delete_prefix("")


@pytest.mark.hdfs
@pytest.mark.slow
async def test_cancelled_put_leaves_nothing_visible(tier: HdfsTier) -> None:
    await tier.put("ckpt/manifest", b"old")
    payload = bytes(256 << 20)
    task = asyncio.ensure_future(tier.put("ckpt/manifest", payload))
    # Wait until the temporary file exists, i.e. the put is under way, then cancel it.
    deadline = time.monotonic() + 30
    while not any(".tmp-" in f for f in await hdfs_raw_files(tier)):
        assert time.monotonic() < deadline, "the put never created its temporary file"
        assert not task.done(), "put finished before it could be interrupted"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert not task.done(), "put finished before it could be interrupted"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await tier.list() == ["ckpt/manifest"]
    assert await tier.get("ckpt/manifest") == b"old"
    await tier.close()  # waits for the background removal of the temporary file
    assert await hdfs_raw_files(tier) == ["ckpt/manifest"]


@pytest.mark.hdfs
async def test_failed_put_leaves_nothing_visible(tier: HdfsTier,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit step (rename) fails after the temporary file was fully written.
    def failing_rename(self: Client, src: str, dst: str, overwrite: bool = False) -> None:
        raise OSError(f"injected rename failure {src} -> {dst}")

    monkeypatch.setattr(Client, "rename", failing_rename)
    with pytest.raises(TierError, match="injected rename failure") as info:
        await tier.put("step-2/data.bin", b"y" * (3 << 20))
    monkeypatch.undo()
    assert "step-2/data.bin" in str(info.value)

    assert await tier.list() == []
    assert not await tier.exists("step-2/data.bin")
    assert await hdfs_raw_files(tier) == []


@pytest.mark.hdfs
async def test_tmp_names_are_not_keys(tier: HdfsTier) -> None:
    await tier.put("a/b", b"1")
    client = _shared(tier._fs_url, tier.config)

    def write_partial() -> None:
        with client.create(tier._base + "/a/b.tmp-123-0123456789abcdef") as w:
            w.write(b"partial")
    await asyncio.to_thread(write_partial)
    assert await tier.list() == ["a/b"]
    assert await tier.list("a/b") == ["a/b"]
    with pytest.raises(ValueError):
        await tier.put("a/c.tmp-1-0123456789abcdef", b"x")
    assert await tier.remove_stale_tmp(older_than_s=0) == 1
    assert await hdfs_raw_files(tier) == ["a/b"]
    with pytest.raises(KeyNotFound):
        await tier.get("a/missing")


@pytest.mark.hdfs
def test_tiers_on_two_event_loops_share_the_client(hdfs_root: str) -> None:
    url = f"{hdfs_root}/faults/{uuid.uuid4().hex}"
    clients: list[Client | None] = []

    async def traffic(rank: int) -> None:
        async with HdfsTier(url, name=f"remote{rank}", chunk_bytes=4096) as tier:
            blobs = {f"r{rank}/k{i}": bytes([rank, i]) * 5000 for i in range(12)}
            await asyncio.gather(*(tier.put(k, v) for k, v in blobs.items()))
            got = await asyncio.gather(*(tier.get(k) for k in blobs))
            assert got == list(blobs.values())
            clients.append(tier._client)

    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            asyncio.run(traffic(rank))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(clients) == 2 and clients[0] is not None and clients[0] is clients[1]

    async def cleanup() -> None:
        async with HdfsTier(url) as tier:
            assert len(await tier.list()) == 24
            await tier.delete_prefix("")

    asyncio.run(cleanup())
