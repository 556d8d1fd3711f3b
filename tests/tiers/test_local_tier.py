"""LocalTier beyond the conformance suite: failed writes, URLs, and a responsive event loop."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tiers import LocalTier, TierError, local


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_a_write_failing_midway_leaves_no_key_and_no_tmp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = LocalTier(tmp_path.as_uri(), name="disk", direct=False)
    await tier.put("step/old.bin", b"committed")
    real_writev = os.writev
    calls = []

    def failing_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(fd)
        if len(calls) == 1:
            return real_writev(fd, [buffers[0][:10]])  # a partial write first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", failing_writev)
    with pytest.raises(OSError) as info:
        await tier.put("step/new.bin", [b"x" * 100, b"y" * 100])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and len(calls) == 2
    assert "disk" in str(info.value) and "step/new.bin" in str(info.value)
    assert files_under(tmp_path) == ["step/old.bin"]
    assert await tier.list() == ["step/old.bin"]


def _direct_supported(directory: Path) -> bool:
    fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(directory / "probe")


def _aligned(nbytes: int, seed: int) -> memoryview:
    """``nbytes`` random bytes at a page-aligned address (as a host block holds them)."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    buf[:nbytes] = random.Random(seed).randbytes(nbytes)
    return memoryview(buf)[:nbytes]


PAYLOADS = {
    "aligned-with-tail": lambda: [_aligned(3 * 4096 + 123, 1)],
    "unaligned-bytes": lambda: [random.Random(2).randbytes(10_000)],
    "mixed": lambda: [_aligned(2 * 4096, 3), b"small", _aligned(5 * 4096, 4)[1:], b"z"],
    "empty": lambda: [b""],
    "bounce-full-plus-one": lambda: [random.Random(5).randbytes((4 << 20) + 1)],
    "several-bounces": lambda: [b"x", _aligned(9 << 20, 6)],
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
async def test_durable_writes_bypass_the_page_cache_and_store_the_bytes_exactly(
        tmp_path: Path, name: str) -> None:
    tier = LocalTier(tmp_path.as_uri())
    parts = PAYLOADS[name]()
    await tier.put("step/k.bin", parts)
    want = b"".join(bytes(p) for p in parts)
    assert (tmp_path / "step" / "k.bin").read_bytes() == want
    assert await tier.get("step/k.bin") == want
    assert tier.direct == _direct_supported(tmp_path)  # O_DIRECT stayed on where it works


def test_bounce_buffers_are_shared_by_the_writing_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One bounce buffer per write in flight, not one per thread that ever wrote: each holds
    4 MiB of faulted-in memory."""
    bounces = local._Bounces()
    monkeypatch.setattr(local, "_bounces", bounces)
    payload = random.Random(7).randbytes(1 << 20)  # unaligned: all of it through the bounce

    async def put(key: str, n: int = 1) -> None:
        tier = LocalTier(tmp_path.as_uri())
        await asyncio.gather(*(tier.put(f"{key}-{i}.bin", [payload]) for i in range(n)))

    for i in range(4):  # each on a new event loop: a new worker thread writes
        writer = threading.Thread(target=asyncio.run, args=(put(f"one/{i}"),))
        writer.start()
        writer.join()
    sequential = len(bounces._free)
    asyncio.run(put("many", 3))
    for i in range(4):
        assert (tmp_path / "one" / f"{i}-0.bin").read_bytes() == payload
    if _direct_supported(tmp_path):
        assert sequential == 1 and 1 <= len(bounces._free) <= 3, sequential
    else:
        assert len(bounces._free) == 0


async def test_a_direct_write_failing_midway_leaves_no_key_and_no_tmp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = LocalTier(tmp_path.as_uri(), name="disk")
    real_writev = os.writev
    calls = []

    def failing_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(fd)
        if len(calls) == 1:
            return real_writev(fd, buffers)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", failing_writev)
    with pytest.raises(OSError) as info:
        await tier.put("step/new.bin", [_aligned((8 << 20) + 1, 7)])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and len(calls) == 2
    assert files_under(tmp_path) == []


async def test_a_filesystem_refusing_direct_writes_gets_buffered_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = LocalTier(tmp_path.as_uri())
    real_writev = os.writev

    def refusing_writev(fd: int, buffers: list[memoryview]) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", refusing_writev)
    parts = PAYLOADS["mixed"]()
    await tier.put("a", parts)
    await tier.put("b", parts)
    monkeypatch.undo()
    want = b"".join(bytes(p) for p in parts)
    assert (tmp_path / "a").read_bytes() == want == (tmp_path / "b").read_bytes()
    assert tier.direct is False


def test_the_direct_option_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="option direct must be true or false"):
        LocalTier(tmp_path.as_uri(), direct="yes")  # type: ignore[arg-type]


async def test_a_payload_with_a_bad_part_writes_nothing(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path.as_uri())
    with pytest.raises(TypeError):
        await tier.put("k", [b"good", "not bytes"])  # type: ignore[list-item]
    assert files_under(tmp_path) == []


async def test_a_key_below_a_file_fails_with_an_os_error_naming_it(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path.as_uri(), name="disk")
    await tier.put("f", b"file")
    with pytest.raises(OSError) as info:
        await tier.put("f/g", b"below a file")
    assert not isinstance(info.value, TierError)
    assert "disk" in str(info.value) and "f/g" in str(info.value)
    assert files_under(tmp_path) == ["f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_permission_denied_propagates_with_the_key(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path.as_uri(), name="disk")
    await tier.list()
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(PermissionError, match=r"disk.*'k'"):
            await tier.put("k", b"x")
    finally:
        os.chmod(tmp_path, 0o700)


async def test_relative_url_resolves_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tier = LocalTier("file:ckpt/run1")
    monkeypatch.chdir("/")  # resolved once, at construction
    await tier.put("k", b"v")
    assert (tmp_path / "ckpt" / "run1" / "k").read_bytes() == b"v"
    assert LocalTier("file://localhost/abs/x").root == Path("/abs/x")


@pytest.mark.parametrize("url", ["file://somehost/x", "file:", "shm://x", "file:///x?q=1"])
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        LocalTier(url)


def test_capacity_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity"):
        LocalTier(tmp_path.as_uri(), capacity_bytes=100)


async def test_stale_tmp_files_of_dead_processes_are_removed_at_open(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # its pid is now dead
    (tmp_path / "d").mkdir()
    dead = tmp_path / "d" / f"k.tmp-{proc.pid}-0a1b2c"
    live = tmp_path / "d" / f"j.tmp-{os.getpid()}-0a1b2c"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    tier = LocalTier(tmp_path.as_uri())
    assert await tier.list() == []
    assert not dead.exists() and live.exists()


async def test_delete_prunes_empty_directories_but_not_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tier = LocalTier(root.as_uri())
    await tier.put("a/b/c/k", b"1")
    await tier.put("a/k", b"2")
    await tier.delete("a/b/c/k")
    assert sorted(p.name for p in (root / "a").iterdir()) == ["k"]
    await tier.delete("a/k")
    assert root.is_dir() and list(root.iterdir()) == []


async def test_the_event_loop_stays_responsive_during_a_large_put(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path.as_uri())
    payload = bytearray(256 << 20)
    payload[::4096] = b"\x01" * len(payload[::4096])  # not all zeros
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    start = time.monotonic()
    await tier.put("big.bin", payload)
    duration_s = time.monotonic() - start
    stop.set()
    await task
    end = start + duration_s
    during = [start] + [t for t in ticks if start <= t <= end] + [end]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    max_gap_s = max(gaps)
    assert max_gap_s < max(0.25 * duration_s, 0.05), (max_gap_s, duration_s)
    assert len(during) >= max(5, duration_s / 0.025), (len(during), duration_s)
    assert (await tier.stat("big.bin")).size_bytes == len(payload)
    await tier.delete("big.bin")
