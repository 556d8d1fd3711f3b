"""Several ranks: the ``Topology`` of a job run under torch.distributed with world size > 1.

Every rank saves its own shard. On a tier the ranks share (``file://``, ``hdfs://``) rank r's
keys ``step-<N>/KEY`` live at ``step-<N>/rank-<r>/KEY`` (``RankScopedTier``), and rank 0 writes
the global manifest ``step-<N>/manifest.msgpack`` last, once every shard is durable there
(``rankcommit``). Shared memory belongs to one process: rank r stages in its own directory
``shm://NAME-rank<r>``, and rank 0 keeps that tier's global manifests in ``shm://NAME``.

Replicated state (``replicated=("model",)``, e.g. the parameters under DistributedDataParallel)
is written by rank 0 only; every other rank reads it from rank 0's shard (``reshard``). Sharded
state (DTensors: FSDP2, tensor parallel) is stored chunk by chunk, each rank its own, and
restores at any world size (``reshard``).

Retention counts global commits: each rank deletes only its own shards, and only rank 0
removes whole step directories, after a newer global commit.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from typing import Any

import torch.distributed as dist

from tiers.base import Tier
from tiers.registry import open_tier

from ._loop import LoopThread, Steps
from .layout import committed_in, group_step_dirs, host_shard_url
from .manifest import committed_steps
from .policy import Policy
from .rankcommit import RankCommits
from .rankrestore import RankRestore
from .rankview import RankScopedTier
from .reshard import Targets
from .restore import LoadedCheckpoint
from .retention import delete_step, needed_bases, plan_deletions, plan_uncommitted


def active() -> bool:
    """Whether torch.distributed runs with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Ranks:
    """The multi-rank topology of one Checkpointer, on every rank.

    Created on the training thread by every rank at the same point (it creates process
    groups). Every rank must save the same steps in the same order.
    """

    def __init__(self, policy: Policy, *, replicated: Sequence[str], timeout_s: float,
                 loop: LoopThread, job: str,
                 on_global: Callable[[str], Awaitable[None]],
                 on_error: Callable[[BaseException], None]) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        self.policy = policy
        self.replicated = tuple(replicated)
        self.job = job
        timeout = datetime.timedelta(seconds=timeout_s)
        # gloo groups of their own: one per tier for its commit thread, one for restore
        groups = {tp.name: dist.new_group(backend="gloo", timeout=timeout)
                  for tp in policy.tiers}
        self.views: dict[str, Tier] = {}  # this rank's shard on each tier
        self.global_tiers: dict[str, Tier] = {}  # where rank 0 keeps global manifests
        self.known: dict[str, list[int]] = {}  # globally committed steps per tier (rank 0's)
        self.shared: dict[str, Tier] = {}  # the tiers the ranks share, by name
        self._owned: list[Tier] = []
        self._commits = RankCommits(self, groups, loop, on_global, on_error)
        self._restore = RankRestore(self, dist.new_group(backend="gloo", timeout=timeout))
        loop.call(self._commits.start())
        self.track = self._commits.track
        self.resolve = self._commits.resolve
        self.abandon = self._commits.abandon
        self.stop = self._commits.stop

    def skipped(self) -> frozenset[str]:
        return frozenset(self.replicated) if self.rank else frozenset()

    def manifest_fields(self) -> dict[str, Any]:
        return {"world_size": self.world_size}

    def manifest_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "replicated": list(self.replicated)}

    # ------------------------------------------------------------------ tiers
    def open_tiers(self, policy: Policy) -> dict[str, Tier]:
        """This rank's view of every tier (the loop thread calls this when the tiers open)."""
        views: dict[str, Tier] = {}
        for i, tp in enumerate(policy.tiers):
            if i == 0:
                views[tp.name] = open_tier(host_shard_url(tp.url, self.rank), name=tp.name,
                                           capacity_bytes=tp.capacity_bytes, **tp.options)
                if self.rank == 0:
                    self.global_tiers[tp.name] = self.own(open_tier(tp.url, name=tp.name,
                                                                    **tp.options))
                continue
            base = self.own(open_tier(tp.url, name=tp.name, capacity_bytes=tp.capacity_bytes,
                                      **tp.options))
            views[tp.name] = RankScopedTier(base, self.rank)
            self.shared[tp.name] = base
            if self.rank == 0:
                self.global_tiers[tp.name] = base
        self.views = views
        return views

    def own(self, tier: Tier) -> Tier:
        """Close ``tier`` with this topology."""
        self._owned.append(tier)
        return tier

    async def close(self) -> None:
        await self._restore.close()
        for tier in self._owned:
            with contextlib.suppress(Exception):
                await tier.close()
        self._owned.clear()
        self._commits.close()

    # -------------------------------------------------------------- retention
    async def retain(self, tier: Tier, keep: int, *, pinned: Collection[int], bases: bool,
                     cache: MutableMapping[int, list[int]]) -> None:
        """Keep the ``keep`` newest globally committed checkpoints of ``tier``.

        Each rank deletes its own shards of older steps and of steps that never committed
        globally (never one still being committed); rank 0 also uncommits the older global
        manifests and removes their whole step directories. Before this rank learns the
        tier's global commits (from a commit or a restore) it deletes nothing."""
        name = tier.name
        if self.rank == 0:
            self.known[name] = await committed_steps(self.global_tiers[name])
        known = self.known.get(name, [])
        if not known:
            return
        busy = self._commits.busy(name)
        keys = await tier.list("step-")
        mine = set(group_step_dirs(keys))
        committed_here = set(committed_in(keys))
        needs = await needed_bases(tier, [s for s in known[-keep:] if s in committed_here]) \
            if bases else {}
        old = [s for s in plan_deletions(known, keep, needs=needs, pinned={*busy, *pinned})
               if s in mine]
        for s in sorted({*old, *plan_uncommitted(mine, known, busy={*busy, *pinned})},
                        reverse=True):
            await delete_step(tier, s)
        if self.rank != 0:
            return
        gtier = self.global_tiers[name]
        gneeds = await needed_bases(gtier, known[-keep:]) if bases else {}
        for s in plan_deletions(known, keep, needs=gneeds, pinned=busy):
            await delete_step(gtier, s)  # a shared tier: every rank's shard in it goes too

    # ---------------------------------------------------------------- restore
    def restore(self, tiers: Sequence[Tier], step: int | None, targets: Targets | None
                ) -> Steps[LoadedCheckpoint | None]:
        return self._restore.restore(step, targets)
