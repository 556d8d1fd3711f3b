"""Multi-rank restore: every rank restores the same step, each its own shard.

Collectives run on a gloo group of the restore's own: rank 0 lists the global manifests, checks
the world size and broadcasts the candidates with every shard's digest; each rank reports which
of them it can read (its shard manifest on a tier where the step is globally committed has the
recorded digest); all ranks load the newest step they can all read, each from its nearest tier,
and agree that every rank loaded it before any state is applied, so steps never mix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._loop import Steps
from .errors import RestoreError
from .layout import manifest_key
from .manifest import checksum, committed_steps, read_manifest
from .rankcommit import broadcast, gather
from .restore import LoadedCheckpoint, load_checkpoint, world_size_error
from .topology import REPLICABLE

if TYPE_CHECKING:
    from .ranks import Ranks

log = logging.getLogger(__name__)


class RankRestore:
    def __init__(self, ranks: Ranks, group: Any) -> None:
        self._ranks = ranks
        self._group = group

    def restore(self, step: int | None) -> Steps[LoadedCheckpoint | None]:
        """Load this rank's shard of the newest checkpoint every rank can read (or ``step``).
        Collective: every rank calls it. Collectives run on a worker thread of the loop."""
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
        candidates: list[tuple[int, dict[str, list[int]]]] = plan["candidates"]
        if not candidates:
            return None
        mine: dict[int, list[str]] = yield self._readable(candidates)
        everyone: list[list[int]] = yield self._collective(gather, sorted(mine))
        common = [s for s, _ in candidates if all(s in have for have in everyone)]
        if not common:
            lacking = {r: [s for s, _ in candidates if s not in have]
                       for r, have in enumerate(everyone)}
            raise RestoreError(
                f"checkpoints {[s for s, _ in candidates]} are committed, but no step has a "
                "readable shard on every rank (steps each rank lacks: "
                + ", ".join(f"rank {r}: {v}" for r, v in lacking.items() if v) + ")")
        failures: list[str] = []
        for s in common:
            loaded = yield from self._load_step(s, mine[s], dict(candidates)[s], failures)
            if loaded is not None:
                return loaded
        raise RestoreError("no committed checkpoint could be read on every rank: "
                           + "; ".join(failures))

    def _load_step(self, step: int, tiers: list[str], digests: dict[str, list[int]],
                   failures: list[str]) -> Steps[LoadedCheckpoint | None]:
        """Every rank loads ``step``; None (and ``failures`` extended) unless all could."""
        ranks = self._ranks
        loaded: LoadedCheckpoint | None = None
        status = "ok"
        try:
            loaded = yield load_checkpoint([ranks.views[t] for t in tiers], step,
                                           world_size=ranks.world_size)
        except Exception as e:
            status = f"rank {ranks.rank}: {e}"
        need = False
        if loaded is not None and ranks.replicated and ranks.rank != 0:
            try:
                self._merge(loaded.state, (yield self._load_replicated(step, digests)))
            except Exception as e:
                log.info("step %d: rank 0's shard is not readable here (%s); rank 0 "
                         "sends the replicated state", step, e)
                need = True
        statuses: list[tuple[str, bool]] = yield self._collective(gather, (status, need))
        bad = [st for st, _ in statuses if st != "ok"]
        if bad:
            log.warning("step %d could not be restored on every rank: %s", step, "; ".join(bad))
            failures.extend(bad)
            return None
        assert loaded is not None
        if any(n for _, n in statuses):
            part = self._parts(loaded.state) if ranks.rank == 0 else None
            part = yield self._collective(broadcast, part)
            if need:
                self._merge(loaded.state, part)
        return loaded

    async def _collective(self, fn: Callable[[Any, Any], Any], obj: Any) -> Any:
        """A blocking collective on the restore group, off the event loop."""
        return await asyncio.to_thread(fn, self._group, obj)

    async def _plan(self, step: int | None) -> dict[str, Any]:
        """Rank 0: the globally committed steps (newest first) with each rank's shard digest
        per tier; an error when the newest was saved by another world size."""
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
        candidates: list[tuple[int, dict[str, list[int]]]] = []
        for s in found:
            per_tier: dict[str, list[int]] = {}
            saved_world = None
            for tp in self._ranks.policy.tiers:
                if s not in known.get(tp.name, []):
                    continue
                try:
                    man = await read_manifest(self._ranks.global_tiers[tp.name], s)
                except Exception as e:
                    log.warning("step %d: global manifest on %s unusable: %s", s, tp.name, e)
                    continue
                if man.world_size != self._ranks.world_size:
                    saved_world = man.world_size
                    break
                ranks = man.info.get("ranks")
                if not isinstance(ranks, list) or len(ranks) != self._ranks.world_size:
                    log.warning("step %d: global manifest on %s lists no shard per rank",
                                s, tp.name)
                    continue
                per_tier[tp.name] = [int(r["xxh64"]) for r in ranks]
            if saved_world is not None:
                if not candidates:  # the newest checkpoint: a clear error, never an older one
                    raise world_size_error(s, saved_world, self._ranks.world_size)
                continue
            if per_tier:
                candidates.append((s, per_tier))
        return {"candidates": candidates, "known": known, "error": None}

    async def _readable(self, candidates: list[tuple[int, dict[str, list[int]]]]
                        ) -> dict[int, list[str]]:
        """Per candidate step, the tiers (nearest first) holding this rank's recorded shard."""
        out: dict[int, list[str]] = {}
        for s, per_tier in candidates:
            tiers = []
            for tp in self._ranks.policy.tiers:
                digests = per_tier.get(tp.name)
                if digests is None:
                    continue
                try:
                    data = await self._ranks.views[tp.name].get(manifest_key(s))
                except Exception:
                    continue
                if checksum(data) == digests[self._ranks.rank]:
                    tiers.append(tp.name)
            if tiers:
                out[s] = tiers
        return out

    def _prefixes(self) -> tuple[str, ...]:
        return tuple(f"{n}/" if n in REPLICABLE else f"extras/{n}/" for n in self._ranks.replicated)

    async def _load_replicated(self, step: int, digests: dict[str, list[int]]) -> dict[str, Any]:
        """The replicated parts of rank 0's shard of ``step``, from the nearest tier here."""
        readers = self._ranks.rank0_readers()
        tiers = []
        for tp in self._ranks.policy.tiers:
            reader = readers.get(tp.name)
            if reader is None or tp.name not in digests:
                continue
            try:
                data = await reader.get(manifest_key(step))
            except Exception:
                continue
            if checksum(data) == digests[tp.name][0]:
                tiers.append(reader)
        if not tiers:
            raise RestoreError(f"step {step}: rank 0's shard is on no tier this rank reaches")
        prefixes = self._prefixes()
        loaded = await load_checkpoint(tiers, step, world_size=self._ranks.world_size,
                                       select=lambda path: path.startswith(prefixes))
        assert loaded is not None
        return self._parts(loaded.state)

    def _parts(self, state: Any) -> dict[str, Any]:
        return {n: state[n] if n in REPLICABLE else state["extras"][n]
                for n in self._ranks.replicated}

    def _merge(self, state: Any, parts: dict[str, Any]) -> None:
        for n, value in parts.items():
            if n in REPLICABLE:
                state[n] = value
            else:
                state["extras"][n] = value
