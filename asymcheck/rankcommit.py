"""Multi-rank commit: a checkpoint commits on a tier once every rank's shard is durable there.

Per tier and in save order, each rank's pipeline writes its shard, then its shard manifest. The
rank's commit thread for that tier then reports the outcome to every rank (an all-gather on a
gloo group made for that tier when the checkpointer is set up, so it never interleaves with the
training's collectives). When every rank reports its shard durable, rank 0 writes the global
manifest (world size, each rank's shard digest and sizes) and broadcasts the result;
``handle.durable(tier)`` then completes on every rank. A rank that fails or dies means no global
manifest: the previous checkpoint stays the newest on that tier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ._loop import LoopThread
from .errors import CommitError
from .handle import SaveHandle
from .layout import manifest_key, shard_manifest_key
from .manifest import Manifest, checksum, committed_steps
from .retention import kept_bases
from .state import pack_skeleton

if TYPE_CHECKING:
    from .ranks import Ranks

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    """One rank's shard of one checkpoint on one tier, on its way to the global commit."""

    step: int
    tier: str
    handle: SaveHandle
    outcome: concurrent.futures.Future[BaseException | None]


def report_shard(group: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Tell every rank whether this rank's shard is durable on one tier (``report``), and learn
    theirs: an all-gather on that tier's commit group. Runs on the tier's commit thread."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, report, group=group)
    return out


def broadcast(group: Any, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(group: Any, obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class RankCommits:
    """The commit agreement of one Checkpointer's ranks: one queue and worker per tier."""

    def __init__(self, ranks: Ranks, groups: dict[str, Any], loop: LoopThread,
                 on_global: Callable[[str], Awaitable[None]],
                 on_error: Callable[[BaseException], None]) -> None:
        self._ranks = ranks
        self._groups = groups
        self._loop = loop
        self._on_global = on_global
        self._on_error = on_error
        self._threads = {name: concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"asymcheck-commit-{name}") for name in groups}
        self._entries: dict[int, dict[str, _Entry]] = {}
        self._inflight: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._broken: BaseException | None = None
        self._queues: dict[str, asyncio.Queue[_Entry | None]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        for name in self._groups:
            self._queues[name] = asyncio.Queue()
        self._workers = [asyncio.ensure_future(self._work(name)) for name in self._queues]

    def busy(self, tier: str) -> set[int]:
        """Steps whose commit on ``tier`` is still in flight."""
        with self._lock:
            return {s for (t, s) in self._inflight if t == tier}

    def close(self) -> None:
        for pool in self._threads.values():
            pool.shutdown(wait=False)

    def track(self, handle: SaveHandle, tiers: tuple[str, ...]) -> None:
        """Queue the commit of every scheduled tier of a new save (training thread, in save
        order, the same on every rank)."""
        entries = {t: _Entry(handle.step, t, handle, concurrent.futures.Future())
                   for t in tiers}
        with self._lock:
            self._entries[id(handle)] = entries
            for t in entries:
                self._inflight[(t, handle.step)] += 1
        for t, entry in entries.items():
            self._loop.loop.call_soon_threadsafe(self._queues[t].put_nowait, entry)

    def resolve(self, handle: SaveHandle, tier: str, error: BaseException | None) -> None:
        """This rank's shard of ``handle``'s checkpoint is durable on ``tier`` (or failed)."""
        with self._lock:
            entry = self._entries.get(id(handle), {}).get(tier)
        if entry is not None and not entry.outcome.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # set meanwhile
                entry.outcome.set_result(error)

    def abandon(self, handle: SaveHandle, error: BaseException) -> None:
        """The save failed on the training thread: every tier reports the failure."""
        for tier in handle.tiers:
            self.resolve(handle, tier, error)

    async def stop(self) -> None:
        """Finish the queued commits (every rank does the same), then end the commit workers."""
        if self._stopped:
            return
        self._stopped = True
        for q in self._queues.values():
            q.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self, tier: str) -> None:
        queue = self._queues[tier]
        while True:
            entry = await queue.get()
            if entry is None:
                return
            try:
                await self._commit(entry)
            except Exception as e:
                log.exception("commit of step %d on %s failed", entry.step, tier)
                self._complete(entry, e)
            finally:
                with self._lock:
                    self._inflight[(tier, entry.step)] -= 1
                    if self._inflight[(tier, entry.step)] <= 0:
                        del self._inflight[(tier, entry.step)]
                    entries = self._entries.get(id(entry.handle))
                    if entries is not None and entries.get(tier) is entry:
                        del entries[tier]
                        if not entries:
                            del self._entries[id(entry.handle)]

    def _complete(self, entry: _Entry, error: BaseException | None) -> None:
        if entry.tier in entry.handle.tiers:
            done = entry.handle.durable(entry.tier)
            if error is None:
                done.set_done()
            else:
                done.set_failed(error)

    async def _shard_info(self, tier: str, step: int) -> dict[str, Any]:
        """Digest and sizes of this rank's shard manifest of ``step`` on ``tier``."""
        data = await self._ranks.views[tier].get(manifest_key(step))
        source = f"{tier}:{shard_manifest_key(step, self._ranks.rank)}"
        man = Manifest.from_bytes(data, source=source)
        sections: Counter[str] = Counter()
        for t in man.tensors:
            sections[t.path.split("/", 1)[0]] += t.nbytes
        return {"rank": self._ranks.rank, "xxh64": checksum(data), "job": man.job,
                "tensors": len(man.tensors), "tensor_bytes": man.nbytes,
                "stored_bytes": man.stored_bytes, "sections": dict(sections),
                # every rank's bases, so that rank 0 never uncommits one another rank needs
                "base_steps": kept_bases(man.info.get("compression", {}))}

    async def _commit(self, entry: _Entry) -> None:
        tier, step = entry.tier, entry.step
        error = await asyncio.wrap_future(entry.outcome)
        shard = None
        if error is None:
            try:
                shard = await self._shard_info(tier, step)
            except Exception as e:
                error = e
        if self._broken is not None:
            self._complete(entry, CommitError(
                f"step {step} is not committed on tier {tier!r}: the ranks lost contact "
                f"({_describe(self._broken)})"))
            return
        report = {"step": step, "rank": self._ranks.rank, "shard": shard,
                  "error": None if error is None else _describe(error)}
        loop = asyncio.get_running_loop()
        group, thread = self._groups[tier], self._threads[tier]
        try:
            # looked up at call time: a test replaces report_shard to kill a rank right here
            reports = await loop.run_in_executor(thread, lambda: report_shard(group, report))
            mine = await self._decide(tier, step, reports) if self._ranks.rank == 0 else None
            decision: dict[str, Any] = await loop.run_in_executor(thread, broadcast, group,
                                                                  mine)
        except Exception as e:
            self._broken = e
            failure = CommitError(f"step {step} is not committed on tier {tier!r}: the ranks "
                                  f"lost contact ({_describe(e)})")
            log.error("%s", failure)
            if error is None:
                self._on_error(failure)
            self._complete(entry, failure)
            return
        self._ranks.known[tier] = list(decision["steps"])
        if decision["committed"]:
            log.debug("step %d committed on %s by all %d ranks", step, tier, self._ranks.world_size)
            self._complete(entry, None)
        else:
            failure = CommitError(f"step {step} is not committed on tier {tier!r}: "
                                  f"{decision['reason']}")
            if error is None:  # this rank's own failure was reported when it happened
                log.error("%s", failure)
                self._on_error(failure)
            self._complete(entry, failure if error is None else error)
        await self._on_global(tier)

    async def _decide(self, tier: str, step: int, reports: list[dict[str, Any]]
                      ) -> dict[str, Any]:
        """Rank 0: write the global manifest when every shard is durable on ``tier``."""
        problems = [f"rank {r['rank']}: {r['error']}" if r["error"] is not None
                    else f"rank {r['rank']} reported step {r['step']}"
                    for r in reports if r["error"] is not None or r["step"] != step]
        committed = False
        if not problems:
            shards = [r["shard"] for r in reports]
            manifest = Manifest(
                step=step, created_s=time.time(), job=self._ranks.job, objects=pack_skeleton(None),
                tensors=(), files=(), world_size=self._ranks.world_size,
                info={"ranks": shards, "replicated": list(self._ranks.replicated), "tier": tier,
                      "tensor_bytes": sum(s["tensor_bytes"] for s in shards),
                      "stored_bytes": sum(s["stored_bytes"] for s in shards)})
            try:
                await self._ranks.global_tiers[tier].put(manifest_key(step), manifest.to_bytes())
                committed = True
            except Exception as e:
                problems.append(f"rank 0 could not write the global manifest: {_describe(e)}")
        try:
            steps = await committed_steps(self._ranks.global_tiers[tier])
        except Exception as e:
            log.warning("tier %s could not be listed: %s", tier, e)
            steps = self._ranks.known.get(tier, [])
        return {"committed": committed, "reason": "; ".join(problems), "steps": steps}

