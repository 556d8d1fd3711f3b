"""Host staging: a save's block, and page-locking (each mapped block is locked once and stays
locked while the host tier reuses its mapping, so steady-state saves of device state register no
memory).

There is no device here: ``pin_memory`` (cudaHostRegister) is replaced by a recorder;
``tests/test_cuda.py`` runs the real registration on a GPU.
"""

from __future__ import annotations

import asyncio

import pytest

from asymcheck.hoststage import HostStage
from asymcheck.layout import manifest_key, step_key
from tests._util import record_page_locks
from tiers import HostTier


async def _nothing() -> None:
    return None


async def test_a_claim_takes_the_spare_reserved_since_its_save_looked_for_one() -> None:
    """A save looks for a spare on the training thread and then claims a block on the loop; a
    spare whose reservation finished in between is taken, not left beside a new block (which
    held three copies of the state in shared memory where the host keeps one)."""
    host = HostTier("shm://stage-spare")
    stage = HostStage(host, asyncio.Lock(), on_unpinned=_nothing)
    nbytes = 1 << 20
    kept = await stage.claim("step-0", nbytes)
    await kept.commit()
    stage.committed(0)
    assert stage.take_spare(nbytes) is None  # the next save looks: nothing reserved yet
    stage.want_spare(nbytes)  # step 0 committed: a spare is reserved in the background
    await asyncio.gather(*stage._spare_tasks)
    block = await stage.claim("step-1", nbytes)
    assert host.used_bytes == 2 * nbytes  # the kept copy and this save's block, no third
    assert stage.take_spare(nbytes) is None  # the spare was this save's block
    await block.abort()
    await stage.close()
    await host.destroy()


async def test_a_mapping_is_page_locked_once_and_unlocked_when_the_tier_unmaps_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    locked, unlocked = record_page_locks(monkeypatch)
    host = HostTier("shm://stage-locks")
    stage = HostStage(host, asyncio.Lock(), on_unpinned=_nothing)
    stage.page_lock = True
    metrics: list[dict[str, object]] = []
    for step in range(6):
        block = await stage.claim(f"step-{step}", 1 << 20)
        metrics.append({})
        await stage.ready(block, metrics[-1])
        await block.commit()
        if step:  # retention: the older copy's block goes to the pool, still mapped
            await host.delete(f"step-{step - 1}")
    assert all(m["host_pinned"] for m in metrics)
    # two blocks in turn (the kept copy and the one being saved), each locked once
    assert len(locked) == len(set(locked)) == 2
    assert all("host_pin_s" in m for m in metrics[:2])
    assert not any("host_pin_s" in m for m in metrics[2:])
    assert unlocked == []
    await host.close()
    assert sorted(unlocked) == sorted(locked) and not stage._locked
    await host.destroy()


async def test_a_deferred_spare_is_judged_against_the_newest_committed_copy() -> None:
    """Step 13's spare waits for step 12's flush; 12 stays as a delta base and 14 is saved beside
    them (the base, the kept copy and one block more). When 14 commits, 13 is the older copy
    still being flushed: the spare 13 asked for waits for that flush instead of mapping a fourth
    block, and then reuses 13's freed block."""
    host = HostTier("shm://stage-deferred")
    stage = HostStage(host, asyncio.Lock(), on_unpinned=_nothing)
    nbytes = 1 << 20

    async def save(step: int) -> None:
        block = await stage.claim(step_key(step, "data.bin"), nbytes)
        stage.copying(block)
        await block.commit()
        await host.put(manifest_key(step), b"manifest")
        stage.committed(step)

    def blocks() -> int:  # host blocks held (a manifest's few bytes left out)
        return host.used_bytes // nbytes

    await save(12)
    stage.pin_base(12)  # the next deltas are coded against 12
    stage.pin(12, waited=True)  # 12's flush
    await save(13)
    stage.pin(13, waited=True)  # 13's flush
    stage.want_spare(nbytes)  # deferred: 12 is still being flushed
    await stage.unpin(12, waited=True)  # 12's flush is done; the base pin keeps it
    await save(14)
    assert blocks() == 3  # the base, 13 being flushed, and 14
    stage.pin(14, waited=True)
    await stage.retained()  # the retention pass after 14's commit
    await asyncio.gather(*stage._spare_tasks)
    assert blocks() == 3  # no spare beside them while 13 is flushed
    await stage.unpin(13, waited=True)
    await host.delete(step_key(13, "data.bin"))  # retention: 13's block goes to the pool
    await host.delete(manifest_key(13))
    await stage.retained()
    await asyncio.gather(*stage._spare_tasks)
    assert blocks() == 3 and host.pooled_bytes == 0
    assert stage.take_spare(nbytes) is not None  # the spare reused 13's block
    await stage.close()
    await host.destroy()
