"""HostTier beyond the conformance suite: crash survival, zero-copy views, the free pool."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import tiers
from tiers import HostTier, KeyNotFound, TierError
from tiers.local import buffer_address

REPO = Path(tiers.__file__).resolve().parents[1]

CHILD = """
import asyncio, sys
from tiers.host import HostTier

async def main():
    tier = HostTier(sys.argv[1])
    await tier.put("step-1/data.bin", bytes(range(256)) * 4096)
    block = await tier.reserve("step-2/data.bin", 4096)  # staged, never committed
    block.view[:] = b"x" * 4096
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_committed_data_survives_sigkill_of_the_writer(shm_root: Path) -> None:
    url = "shm://crash/job"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    job = shm_root / "crash" / "job"
    stale = list(job.glob(f"step-2/data.bin.tmp-{proc.pid}-*"))
    assert len(stale) == 1, "the child's uncommitted block should be on tmpfs"

    tier = HostTier(url)
    try:
        assert await tier.list() == ["step-1/data.bin"]
        assert await tier.get("step-1/data.bin") == bytes(range(256)) * 4096
        assert not stale[0].exists(), "a dead writer's tmp file must be removed at open"
        assert tier.used_bytes == 256 * 4096
    finally:
        await tier.destroy()
    assert not job.exists()


async def test_tmp_files_of_live_processes_are_kept(shm_root: Path) -> None:
    job = shm_root / "live"
    job.mkdir()
    mine = job / f"k.tmp-{os.getpid()}-abcdef"
    mine.write_bytes(b"in flight")
    tier = HostTier("shm://live")
    assert await tier.list() == []
    assert mine.exists()
    await tier.destroy()


def test_url_maps_to_a_directory_under_the_root(shm_root: Path) -> None:
    assert HostTier("shm://asymcheck/job1").directory == shm_root / "asymcheck" / "job1"
    assert HostTier("shm://x", root="/elsewhere").directory == Path("/elsewhere/x")
    for bad in ["shm://", "shm://a/../b", "file:///x", "shm://a?x=1"]:
        with pytest.raises(ValueError):
            HostTier(bad)


async def test_view_is_read_only_and_zero_copy() -> None:
    tier = HostTier("shm://views")
    async with await tier.reserve("k", 8) as block:
        block.view[:] = b"abcdefgh"
    view = await tier.view("k")
    assert view.readonly and bytes(view) == b"abcdefgh"
    with pytest.raises(TypeError):
        view[0] = 0
    assert (await tier.view("k")).obj is view.obj  # one cached mapping, no copies
    assert bytes(await tier.view("k")) == b"abcdefgh"
    view.release()
    await tier.destroy()


async def test_deleting_a_key_under_a_live_view_does_not_recycle_its_pages() -> None:
    tier = HostTier("shm://held", capacity_bytes=1 << 20)
    await tier.put("k", b"a" * 4096)
    inode = os.stat(tier.directory / "k").st_ino
    view = await tier.view("k")
    await tier.delete("k")
    assert tier.pooled_bytes == 0 and tier.used_bytes == 0
    await tier.put("k2", b"b" * 4096)  # same size, but the pages are still in use
    assert os.stat(tier.directory / "k2").st_ino != inode
    assert bytes(view) == b"a" * 4096
    with pytest.raises(KeyNotFound):
        await tier.view("k")
    view.release()
    await tier.destroy()


async def test_reserve_of_zero_bytes_commits_an_empty_key() -> None:
    tier = HostTier("shm://empty")
    block = await tier.reserve("nothing", 0)
    assert block.view.nbytes == 0 and not block.view.readonly
    await block.commit()
    await block.commit()  # idempotent
    assert await tier.get("nothing") == b""
    assert bytes(await tier.view("nothing")) == b""
    await tier.delete("nothing")
    assert await tier.list() == []
    await tier.destroy()


async def test_a_committing_block_is_never_counted_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``used_bytes`` read at any point of a commit (as a thread sampling it may) holds the
    block once at most: its reservation goes before its committed bytes come."""
    tier = HostTier("shm://accounting")
    seen: list[int] = []
    for name in ("_release", "_drop_mapping"):  # the steps around the committed count
        step = getattr(tier, name)

        def spy(*args: Any, _step: Any = step) -> Any:
            seen.append(tier.used_bytes)
            return _step(*args)
        monkeypatch.setattr(tier, name, spy)
    block = await tier.reserve("k", 4096)
    await block.commit()
    assert len(seen) >= 2 and max(seen) <= 4096
    assert tier.used_bytes == tier.committed_bytes == 4096
    await tier.destroy()


async def test_block_view_is_released_at_commit_and_aborted_block_cannot_commit() -> None:
    tier = HostTier("shm://blocks")
    block = await tier.reserve("a", 4)
    block.view[:] = b"1234"
    await block.commit()
    with pytest.raises(ValueError):  # the writable view is gone; the data is immutable
        block.view[0] = 0
    other = await tier.reserve("b", 4)
    await other.abort()
    with pytest.raises(TierError, match="aborted"):
        await other.commit()
    assert await tier.list() == ["a"]
    await tier.destroy()


async def test_the_free_pool_is_hidden_reserved_and_emptied_at_close(shm_root: Path) -> None:
    tier = HostTier("shm://pool")
    await tier.put("a/b", b"x" * 100)
    await tier.delete("a/b")
    pool = tier.directory / ".free"
    assert len(os.listdir(pool)) == 1 and tier.pooled_bytes == 100
    assert not (tier.directory / "a").exists(), "empty parents are pruned"
    assert await tier.list() == []
    assert await tier.list(".free/") == []
    with pytest.raises(ValueError, match="reserved"):
        await tier.put(".free/x", b"")
    with pytest.raises(ValueError, match="tmp"):
        await tier.put("k.tmp-1-abc", b"")
    await tier.close()
    await tier.close()
    assert not pool.exists()
    with pytest.raises(TierError, match="closed"):
        await tier.get("a/b")


async def test_a_freed_block_is_reused_through_its_mapping_with_its_pages_still_mapped() -> None:
    """A save every iteration reuses the block freed by retention: mapping it again would cost
    a minor fault per few pages of the state on every save."""
    size = 64 << 20
    tier = HostTier("shm://remap")

    async def faults_of(coro: Any) -> tuple[Any, int]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        got = await coro
        return got, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    fresh, fresh_faults = await faults_of(tier.reserve("a", size))
    fresh.view[:] = b"a" * size
    await fresh.commit()
    with await tier.view("a") as view:  # a reader, done before the delete
        assert bytes(view[:1]) == b"a"
    await tier.delete("a")
    assert tier.pooled_bytes == size
    reused, reused_faults = await faults_of(tier.reserve("b", size))
    assert tier.pooled_bytes == 0 and bytes(reused.view[:1]) == b"a"  # the same pages
    # mapping a 64 MiB block again takes ~1,000 faults (16 pages each), mapping a new one ~16,000
    assert reused_faults * 64 < fresh_faults, (reused_faults, fresh_faults)
    reused.view[:1] = b"b"
    await reused.commit()
    assert (await tier.get("b", 0, 2)) == b"ba"
    await tier.destroy()


async def test_a_block_done_with_is_freed_into_the_pool_and_stages_the_next_one_mapped(
) -> None:
    """A streamed save's pieces are freed once written, never committed: the next save's
    pieces of the same size are staged through their mappings, not mapped afresh."""
    size = 8 << 20
    tier = HostTier("shm://free")
    piece = await tier.reserve("s1/piece-0", size)
    piece.view[:] = b"p" * size
    address = buffer_address(piece.view)
    await piece.free()
    assert (tier.reserved_bytes, tier.pooled_bytes, tier.used_bytes) == (0, size, size)
    assert await tier.list() == []
    await piece.free()  # once freed, a no-op
    await piece.abort()
    assert tier.pooled_bytes == size
    again = await tier.reserve("s2/piece-0", size)
    assert buffer_address(again.view) == address and bytes(again.view[:1]) == b"p"
    assert tier.pooled_bytes == 0
    viewed = again.view[:4]  # a view still alive: its pages are not handed on
    await again.free()
    assert (tier.pooled_bytes, tier.used_bytes) == (0, 0)
    assert bytes(viewed) == b"pppp"
    viewed.release()
    assert os.listdir(tier.directory) == [".free"] and not os.listdir(tier.directory / ".free")
    await tier.destroy()


async def test_unmap_hooks_run_once_when_the_mapping_is_let_go_not_when_its_block_is_freed(
) -> None:
    """What is done to a block's memory (page-locking it for a device) is undone when the tier
    unmaps it: not at commit, not while the block waits in the pool or stages the next one."""
    tier = HostTier("shm://hooks")
    undone: list[str] = []
    block = await tier.reserve("a", 4096)
    block.on_unmap(lambda: undone.append("first"))
    await block.commit()
    await tier.delete("a")  # to the pool, still mapped
    again = await tier.reserve("b", 4096)  # staged through the same mapping
    again.on_unmap(lambda: undone.append("second"))
    await again.commit()
    assert undone == []
    await tier.delete("b")
    await tier.drop_pool()  # unmapped now
    assert undone == ["first", "second"]
    aborted = await tier.reserve("c", 4096)
    aborted.on_unmap(lambda: undone.append("aborted"))
    await aborted.abort()
    kept = await tier.reserve("d", 4096)
    kept.on_unmap(lambda: undone.append("closed"))
    await kept.commit()
    await tier.close()
    assert undone == ["first", "second", "aborted", "closed"]
    await tier.destroy()


async def test_close_aborts_open_blocks_and_wakes_waiters() -> None:
    tier = HostTier("shm://closing", capacity_bytes=100)
    block = await tier.reserve("a", 100)
    waiter = asyncio.create_task(tier.put("b", b"x" * 10))
    await asyncio.sleep(0.05)
    await tier.close()
    with pytest.raises(TierError, match="closed"):
        await waiter
    assert not block.committed
    assert os.listdir(tier.directory) == []
    await tier.destroy()
