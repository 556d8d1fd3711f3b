"""How many ranks save one checkpoint, and how they agree: one protocol, one seam.

The checkpointer asks its ``Topology`` what this process captures, where it writes, when a
checkpoint counts as committed on a tier, how retention is coordinated and how a restore is
agreed, and never asks how many ranks there are. Two cases:

- ``SingleProcess``: one process writes every tier itself; a tier's commit is this process's
  manifest, and restore reads the newest committed checkpoint from the nearest tier;
- ``Ranks`` (``ranks.py``): every rank writes its shard, rank 0 commits a global manifest once
  every shard is durable, and restore is collective (``rankrestore.py``).

Operations that restore are written as ``Steps``: generators that yield the coroutines to run
on the checkpointer's loop and run everything else on the calling thread (see ``_loop.drive``).
"""

from __future__ import annotations

from collections.abc import Collection, MutableMapping, Sequence
from typing import Any, Protocol

from tiers.base import Tier
from tiers.registry import open_tier

from ._loop import Steps
from .handle import SaveHandle
from .manifest import committed_steps
from .policy import Policy
from .reshard import Targets, load_single
from .restore import LoadedCheckpoint
from .retention import delete_step, needed_bases, plan_deletions


class Topology(Protocol):
    rank: int
    world_size: int
    #: ranks sharing this host's shared memory
    local_ranks: int

    def open_tiers(self, policy: Policy) -> dict[str, Tier]:
        """This process's view of every tier of ``policy`` (on the loop thread)."""

    def skipped(self) -> frozenset[str]:
        """State this process does not capture (another rank writes it)."""

    def manifest_fields(self) -> dict[str, Any]:
        """Keyword fields of this process's manifests (``world_size``)."""

    def manifest_info(self) -> dict[str, Any]:
        """What this process's manifests record about its place (``rank``, ...)."""

    def track(self, handle: SaveHandle, tiers: tuple[str, ...]) -> None:
        """A new save scheduled on ``tiers`` (training thread, in save order); a tier missing
        from ``handle.tiers`` is resolved with an error."""

    def resolve(self, handle: SaveHandle, tier: str, error: BaseException | None) -> None:
        """This process's copy of ``handle`` is durable on ``tier``, or failed there; the
        topology completes ``handle.durable(tier)`` once the checkpoint is committed."""

    def abandon(self, handle: SaveHandle, error: BaseException) -> None:
        """The save failed before it reached any tier."""

    async def retain(self, tier: Tier, keep: int, *, pinned: Collection[int], bases: bool,
                     cache: MutableMapping[int, list[int]]) -> None:
        """Apply retention to ``tier`` (``retention.plan_deletions``)."""

    def restore(self, tiers: Sequence[Tier], step: int | None, targets: Targets | None
                ) -> Steps[LoadedCheckpoint | None]:
        """Load the newest checkpoint every process can read (or ``step``), each process its
        part of it placed like ``targets`` (None: whole tensors, as saved)."""

    async def stop(self) -> None:
        """Finish the commits in flight."""

    async def close(self) -> None:
        """Release what the topology opened."""


class SingleProcess:
    """One process, no coordination: the ``no_dist`` case."""

    rank = 0
    world_size = 1
    local_ranks = 1

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def open_tiers(self, policy: Policy) -> dict[str, Tier]:
        return {tp.name: open_tier(tp.url, name=tp.name, capacity_bytes=tp.capacity_bytes,
                                   **tp.options) for tp in policy.tiers}

    def skipped(self) -> frozenset[str]:
        return frozenset()

    def manifest_fields(self) -> dict[str, Any]:
        return {}

    def manifest_info(self) -> dict[str, Any]:
        return {}

    def track(self, handle: SaveHandle, tiers: tuple[str, ...]) -> None:
        pass

    def resolve(self, handle: SaveHandle, tier: str, error: BaseException | None) -> None:
        if tier not in handle.tiers:
            return
        if error is None:
            handle.durable(tier).set_done()
        else:
            handle.durable(tier).set_failed(error)

    def abandon(self, handle: SaveHandle, error: BaseException) -> None:
        pass

    async def retain(self, tier: Tier, keep: int, *, pinned: Collection[int], bases: bool,
                     cache: MutableMapping[int, list[int]]) -> None:
        steps = await committed_steps(tier)
        if len(steps) <= keep:
            return
        needs = await needed_bases(tier, steps[-keep:], cache) if bases else {}
        for s in plan_deletions(steps, keep, needs=needs, pinned=pinned):
            await delete_step(tier, s)
            cache.pop(s, None)

    def restore(self, tiers: Sequence[Tier], step: int | None, targets: Targets | None
                ) -> Steps[LoadedCheckpoint | None]:
        loaded: LoadedCheckpoint | None = yield load_single(self.policy, tiers, step, targets)
        return loaded

    async def stop(self) -> None:
        pass

    async def close(self) -> None:
        pass


def make_topology(policy: Policy, *, replicated: Sequence[str], timeout_s: float, job: str,
                  loop: Any, on_global: Any, on_error: Any) -> Topology:
    """``Ranks`` when torch.distributed runs with more than one rank, else ``SingleProcess``.
    Every rank calls this at the same point (it creates process groups)."""
    from . import ranks  # torch.distributed is imported only where it is used

    if not ranks.active():
        return SingleProcess(policy)
    return ranks.Ranks(policy, replicated=replicated, timeout_s=timeout_s, loop=loop, job=job,
                       on_global=on_global, on_error=on_error)
