"""Host staging: a save's block, and page-locking (each mapped block is locked once and stays
locked while the host tier reuses its mapping, so steady-state saves of device state register no
memory).

There is no device here: ``pin_memory`` (cudaHostRegister) is replaced by a recorder;
``tests/test_cuda.py`` runs the real registration on a GPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asymcheck.hoststage
from asymcheck.hoststage import HostStage
from tiers import HostTier
from tiers.local import buffer_address


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
    assert stage.take_spare(nbytes) is None  # the next save looks: nothing reserved yet
    stage.want_spare(nbytes, 0)  # step 0 committed: a spare is reserved in the background
    await asyncio.gather(*stage._spare_tasks)
    block = await stage.claim("step-1", nbytes)
    assert host.used_bytes == 2 * nbytes  # the kept copy and this save's block, no third
    assert stage.take_spare(nbytes) is None  # the spare was this save's block
    await block.abort()
    await stage.close()
    await host.destroy()


async def test_a_mapping_is_page_locked_once_and_unlocked_when_the_tier_unmaps_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    locked: list[int] = []
    unlocked: list[int] = []

    def pin(view: memoryview) -> Any:
        address = buffer_address(view)
        locked.append(address)
        return lambda: unlocked.append(address)

    monkeypatch.setattr(asymcheck.hoststage, "pin_memory", pin)
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
