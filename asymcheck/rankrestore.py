"""Multi-rank restore: every rank restores the same step, each its own part of it.

Collectives run on a gloo group of the restore's own: rank 0 lists the global manifests and
broadcasts the candidates with the world size that saved each and every shard's digest; each
rank reports which of them it can read (its primary shard, see ``reshard``, on a tier where the
step is globally committed, with the recorded digest); all ranks load the newest step they can
all read, each from its nearest tiers and placed as its model wants it (at any world size when
the state is sharded), and agree that every rank loaded it before any state is applied, so
steps never mix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from tiers.base import Tier

from ._loop import Steps
from .errors import RestoreError
from .layout import manifest_key
from .manifest import Manifest, checksum, committed_steps
from .rankcommit import broadcast, gather
from .reshard import Placer, ShardViews, Targets
from .restore import LoadedCheckpoint

if TYPE_CHECKING:
    from .ranks import Ranks

log = logging.getLogger(__name__)


class RankRestore:
    def __init__(self, ranks: Ranks, group: Any) -> None:
        self._ranks = ranks
        self._group = group
        self._shard_views: ShardViews | None = None

    def restore(self, step: int | None, targets: Targets | None
                ) -> Steps[LoadedCheckpoint | None]:
        """Load this rank's part of the newest checkpoint every rank can read (or ``step``),
        placed like ``targets``. Collective: every rank calls it. Collectives run on a worker
        thread of the loop."""
        ranks = self._ranks
        plan: dict[str, Any] | None = None
        if ranks.rank == 0:
            try:
                plan = yield self._plan(step)
            except Exception as e:
                plan = {"error": str(e)}
        plan = yield self._collective(broadcast, plan)
        assert plan is not None
        if plan.get("error"):
            raise RestoreError(plan["error"])
        if ranks.rank != 0:
            ranks.known.update(plan["known"])
        candidates = [_Candidate(*c) for c in plan["candidates"]]
        if not candidates:
            return None
        mine: dict[int, list[str]] = yield self._readable(candidates)
        everyone: list[list[int]] = yield self._collective(gather, sorted(mine))
        common = [c for c in candidates if all(c.step in have for have in everyone)]
        if not common:
            lacking = {r: [c.step for c in candidates if c.step not in have]
                       for r, have in enumerate(everyone)}
            raise RestoreError(
                f"checkpoints {[c.step for c in candidates]} are committed, but no step has a "
                "readable shard on every rank (steps each rank lacks: "
                + ", ".join(f"rank {r}: {v}" for r, v in lacking.items() if v) + ")")
        failures: list[str] = []
        for c in common:
            loaded = yield from self._load_step(c, mine[c.step], targets, failures)
            if loaded is not None:
                return loaded
        raise RestoreError("no committed checkpoint could be read on every rank: "
                           + "; ".join(failures))

    def _primary(self, saved_world: int) -> int:
        return self._ranks.rank if self._ranks.rank < saved_world else 0

    def _load_step(self, c: _Candidate, tiers: list[str], targets: Targets | None,
                   failures: list[str]) -> Steps[LoadedCheckpoint | None]:
        """Every rank loads step ``c``; None (and ``failures`` extended) unless all could."""
        ranks = self._ranks
        primary = self._primary(c.world)

        def views(q: int) -> list[Tier]:
            return self._views(q, c.world, tiers if q == primary else list(c.digests))

        loaded: LoadedCheckpoint | None = None
        status = "ok"
        try:
            loaded = yield Placer(c.step, c.world, views, rank=ranks.rank, world=ranks.world_size,
                                  targets=targets, digests=c.digests).load()
        except Exception as e:
            status = f"rank {ranks.rank}: {e}"
        statuses: list[str] = yield self._collective(gather, status)
        bad = [st for st in statuses if st != "ok"]
        if bad:
            log.warning("step %d could not be restored on every rank: %s", c.step, "; ".join(bad))
            failures.extend(bad)
            return None
        return loaded

    async def _collective(self, fn: Callable[[Any, Any], Any], obj: Any) -> Any:
        """A blocking collective on the restore group, off the event loop."""
        return await asyncio.to_thread(fn, self._group, obj)

    async def _plan(self, step: int | None) -> dict[str, Any]:
        """Rank 0: the globally committed steps (newest first), each with the world size that
        saved it and each rank's shard digest per tier."""
        known: dict[str, list[int]] = {}
        for tp in self._ranks.policy.tiers:
            try:
                known[tp.name] = await committed_steps(self._ranks.global_tiers[tp.name])
            except Exception as e:
                log.warning("tier %s could not be listed, skipping it: %s", tp.name, e)
        found = sorted({s for steps in known.values() for s in steps}, reverse=True)
        if step is not None:
            if step not in found:
                raise RestoreError(f"step {step} is not committed by all {self._ranks.world_size} "
                                   f"ranks on any tier (committed: {sorted(found) or 'none'})")
            found = [step]
        candidates: list[tuple[int, int, dict[str, list[int]]]] = []
        for s in found:
            per_tier: dict[str, list[int]] = {}
            worlds = set()
            for tp in self._ranks.policy.tiers:
                if s not in known.get(tp.name, []):
                    continue
                try:
                    data = await self._ranks.global_tiers[tp.name].get(manifest_key(s))
                    man = Manifest.from_bytes(data, source=f"{tp.name}:{manifest_key(s)}")
                except Exception as e:
                    log.warning("step %d: global manifest on %s unusable: %s", s, tp.name, e)
                    continue
                if man.world_size == 1:  # a checkpoint of one process: its manifest
                    per_tier[tp.name] = [checksum(data)]
                    worlds.add(1)
                    continue
                ranks = man.info.get("ranks")
                if not isinstance(ranks, list) or len(ranks) != man.world_size:
                    log.warning("step %d: global manifest on %s lists no shard per rank",
                                s, tp.name)
                    continue
                per_tier[tp.name] = [int(r["xxh64"]) for r in ranks]
                worlds.add(man.world_size)
            if len(worlds) == 1 and per_tier:
                candidates.append((s, worlds.pop(), per_tier))
        return {"candidates": candidates, "known": known, "error": None}

    def _views(self, q: int, saved_world: int, names: Sequence[str]) -> list[Tier]:
        if self._shard_views is None:
            ranks = self._ranks
            self._shard_views = ShardViews(ranks.policy, ranks.shared, ranks.views, ranks.rank)
        return self._shard_views(q, saved_world, names)

    async def _readable(self, candidates: list[_Candidate]) -> dict[int, list[str]]:
        """Per candidate step, the tiers (nearest first) holding this rank's primary shard as
        the commit recorded it."""
        out: dict[int, list[str]] = {}
        for c in candidates:
            q = self._primary(c.world)
            tiers = []
            for tier in self._views(q, c.world, list(c.digests)):
                try:
                    data = await tier.get(manifest_key(c.step))
                except Exception:
                    continue
                if checksum(data) == c.digests[tier.name][q]:
                    tiers.append(tier.name)
            if tiers:
                out[c.step] = tiers
        return out

    async def close(self) -> None:
        if self._shard_views is not None:
            await self._shard_views.close()


class _Candidate(NamedTuple):
    step: int
    world: int
    digests: dict[str, list[int]]
