"""Multi-rank checkpoints: every rank saves its own shard, and a checkpoint is committed on a
tier only when every rank's shard is durable there (rank 0 writes the global manifest last).

Keys on a tier the ranks share (``file://``, ``hdfs://``)::

    step-<N>/rank-<r>/data-*.bin          rank r's shard (its own state), r in five digits
    step-<N>/rank-<r>/manifest.msgpack    rank r's shard manifest, written last by rank r
    step-<N>/manifest.msgpack             the global manifest, written last by rank 0

Shared memory belongs to one process: rank r stages its shard in its own directory
``shm://NAME-rank<r>`` (keys ``step-<N>/...``), and rank 0 keeps the global manifests of that
tier in ``shm://NAME``.

Commit, per tier and in save order: each rank's pipeline writes its shard, then its shard
manifest. The rank's commit thread for that tier then reports the outcome to every rank (an
all-gather on a gloo group made for that tier when the checkpointer is set up, so it never
interleaves with the training's collectives). When every rank reports its shard durable, rank
0 writes the global manifest (world size, each rank's shard digest and sizes) and broadcasts
the result; ``handle.durable(tier)`` then completes on every rank. A rank that fails or dies
means no global manifest: the previous checkpoint stays the newest on that tier.

Restore runs on the training thread, with collectives on a gloo group of its own: rank 0 lists
the global manifests, checks the world size and broadcasts the candidates with every shard's
digest; each rank reports which of them it can read (its shard manifest on a tier where the
step is globally committed has the recorded digest); all ranks load the newest step they can
all read, each from its nearest tier, and agree that every rank loaded it before any state is
applied, so steps never mix.

Replicated state (``replicated=("model",)``, e.g. the parameters under DistributedDataParallel)
is written by rank 0 only; every other rank reads it from rank 0's shard, or receives it from
rank 0 when no tier it reaches holds that shard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch.distributed as dist

from tiers.base import KeyNotFound, Payload, Tier, TierStat, validate_prefix
from tiers.host import HostTier
from tiers.registry import open_tier

from ._loop import LoopThread
from .errors import CommitError
from .handle import SaveHandle
from .layout import manifest_key, parse_manifest_key, step_dir
from .manifest import Manifest, checksum
from .policy import Policy
from .restore import (
    LoadedCheckpoint,
    RestoreError,
    committed_steps,
    load_checkpoint,
    read_manifest,
    world_size_error,
)
from .state import pack_skeleton

log = logging.getLogger(__name__)

Call = Callable[[Coroutine[Any, Any, Any]], Any]

_STEP = re.compile(r"^step-(\d{12})$")
#: what ``replicated`` may name besides the extras
REPLICABLE = ("model", "optimizers")



def active() -> bool:
    """Whether torch.distributed runs with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


def shard_manifest_key(step: int, rank: int) -> str:
    return f"{step_dir(step)}/{rank_dir(rank)}/manifest.msgpack"


def host_shard_url(url: str, rank: int) -> str:
    """``shm://NAME`` -> ``shm://NAME-rank00001``: each rank stages in a directory of its own."""
    parts = urlsplit(url)
    suffix = f"-rank{rank:05d}"
    if parts.path.strip("/"):
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))
    return urlunsplit(parts._replace(netloc=parts.netloc + suffix, path=""))


def _step_of(key: str) -> int | None:
    m = _STEP.match(key.split("/", 1)[0])
    return int(m.group(1)) if m else None


class RankScopedTier(Tier):
    """Rank ``rank``'s view of a tier shared by the ranks: its ``step-<N>/KEY`` is the shared
    tier's ``step-<N>/rank-<r>/KEY``. Closing the view leaves the shared tier open."""

    def __init__(self, inner: Tier, rank: int) -> None:
        super().__init__(inner.url, name=inner.name, capacity_bytes=inner.capacity_bytes)
        self.scheme = inner.scheme
        self.concurrent_puts = inner.concurrent_puts
        self.inner = inner
        self.rank = rank
        self._dir = rank_dir(rank)

    def _key(self, key: str) -> str:
        head, sep, rest = key.partition("/")
        if not sep or _STEP.match(head) is None:
            raise ValueError(f"{self.name}: a rank's keys live in a step directory, got {key!r}")
        return f"{head}/{self._dir}/{rest}"

    def _unkey(self, key: str) -> str | None:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] == self._dir and _STEP.match(parts[0]):
            return f"{parts[0]}/{parts[2]}"
        return None

    async def put(self, key: str, data: Payload) -> None:
        await self.inner.put(self._key(key), data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get(self._key(key), offset, length)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        await self.inner.readinto(self._key(key), out, offset)

    async def delete(self, key: str) -> None:
        await self.inner.delete(self._key(key))

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        if "/" in prefix:
            if _STEP.match(prefix.split("/", 1)[0]) is None:
                return []
            inner_prefix = self._key(prefix)
        else:
            inner_prefix = prefix
        keys = (self._unkey(k) for k in await self.inner.list(inner_prefix))
        return sorted(k for k in keys if k is not None and k.startswith(prefix))

    async def stat(self, key: str) -> TierStat:
        st = await self.inner.stat(self._key(key))
        return TierStat(key=key, size_bytes=st.size_bytes, mtime_s=st.mtime_s)

    async def close(self) -> None:
        """The shared tier is closed by its owner."""


async def _delete_quietly(tier: Tier, key: str) -> None:
    with contextlib.suppress(KeyNotFound, FileNotFoundError):
        await tier.delete(key)


async def _delete_tree(tier: Tier, prefix: str) -> None:
    """Delete every key under ``prefix``; keys another rank removed meanwhile are no error."""
    for key in await tier.list(prefix):
        await _delete_quietly(tier, key)


async def delete_shard(view: Tier, step: int) -> None:
    """Uncommit a rank's shard (its manifest first), then remove its data."""
    await _delete_quietly(view, manifest_key(step))
    await _delete_tree(view, step_dir(step) + "/")


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


def _broadcast(group: Any, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(group: Any, obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class DistContext:
    """The multi-rank side of a Checkpointer (one per Checkpointer, on every rank).

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
        self._loop = loop
        self._on_global = on_global
        self._on_error = on_error
        timeout = datetime.timedelta(seconds=timeout_s)
        # gloo groups of their own: one per tier for its commit thread, one for restore
        self._groups = {tp.name: dist.new_group(backend="gloo", timeout=timeout)
                        for tp in policy.tiers}
        self._control = dist.new_group(backend="gloo", timeout=timeout)
        self._threads = {name: concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"asymcheck-commit-{name}") for name in self._groups}
        self.views: dict[str, Tier] = {}  # this rank's shard on each tier
        self.global_tiers: dict[str, Tier] = {}  # where rank 0 keeps global manifests
        self._owned: list[Tier] = []
        self._rank0_views: dict[str, Tier] | None = None
        self.known: dict[str, list[int]] = {}  # globally committed steps per tier (rank 0's list)
        self._entries: dict[int, dict[str, _Entry]] = {}
        self._inflight: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._broken: BaseException | None = None
        self._queues: dict[str, asyncio.Queue[_Entry | None]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._stopped = False
        loop.call(self._start())

    async def _start(self) -> None:
        for name in self._groups:
            self._queues[name] = asyncio.Queue()
        self._workers = [asyncio.ensure_future(self._work(name)) for name in self._queues]

    # ------------------------------------------------------------------ tiers
    def open_tiers(self) -> dict[str, Tier]:
        """This rank's view of every tier (the loop thread calls this when the tiers open)."""
        views: dict[str, Tier] = {}
        for i, tp in enumerate(self.policy.tiers):
            if i == 0:
                views[tp.name] = open_tier(host_shard_url(tp.url, self.rank), name=tp.name,
                                           capacity_bytes=tp.capacity_bytes, **tp.options)
                if self.rank == 0:
                    self.global_tiers[tp.name] = open_tier(tp.url, name=tp.name, **tp.options)
                    self._owned.append(self.global_tiers[tp.name])
                continue
            base = open_tier(tp.url, name=tp.name, capacity_bytes=tp.capacity_bytes,
                             **tp.options)
            self._owned.append(base)
            views[tp.name] = RankScopedTier(base, self.rank)
            if self.rank == 0:
                self.global_tiers[tp.name] = base
        self.views = views
        return views

    def _rank0(self) -> dict[str, Tier]:
        """Readers of rank 0's shard on the tiers this rank reaches (for replicated state)."""
        if self._rank0_views is None:
            views: dict[str, Tier] = {}
            for i, tp in enumerate(self.policy.tiers):
                view = self.views[tp.name]
                if i == 0:
                    reader = open_tier(host_shard_url(tp.url, 0), name=tp.name, **tp.options)
                    if isinstance(reader, HostTier) and not reader.directory.exists():
                        continue  # rank 0 runs on another host
                    self._owned.append(reader)
                    views[tp.name] = reader
                elif isinstance(view, RankScopedTier):
                    views[tp.name] = RankScopedTier(view.inner, 0)
            self._rank0_views = views
        return self._rank0_views

    async def close(self) -> None:
        for tier in self._owned:
            with contextlib.suppress(Exception):
                await tier.close()
        self._owned.clear()
        for pool in self._threads.values():
            pool.shutdown(wait=False)

    # ----------------------------------------------------------------- commit
    def track(self, handle: SaveHandle) -> None:
        """Queue the commit of every scheduled tier of a new save (training thread, in save
        order, the same on every rank)."""
        entries = {t: _Entry(handle.step, t, handle, concurrent.futures.Future())
                   for t in handle.tiers}
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

    def rekey(self, old: SaveHandle, new: SaveHandle, error: BaseException) -> None:
        """A save went on with another handle (streaming past the host tier): the tiers the new
        handle lacks fail with ``error``."""
        with self._lock:
            entries = self._entries.pop(id(old), {})
            self._entries[id(new)] = entries
            for entry in entries.values():
                entry.handle = new
        for tier in entries:
            if tier not in new.tiers:
                self.resolve(new, tier, error)

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
        data = await self.views[tier].get(manifest_key(step))
        man = Manifest.from_bytes(data, source=f"{tier}:{shard_manifest_key(step, self.rank)}")
        sections: Counter[str] = Counter()
        for t in man.tensors:
            sections[t.path.split("/", 1)[0]] += t.nbytes
        bases = man.info.get("compression", {}).get("base_steps", [])
        return {"rank": self.rank, "xxh64": checksum(data), "job": man.job,
                "tensors": len(man.tensors), "tensor_bytes": man.nbytes,
                "stored_bytes": man.stored_bytes, "sections": dict(sections),
                "base_steps": sorted({int(b) for b in bases})}

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
        report = {"step": step, "rank": self.rank, "shard": shard,
                  "error": None if error is None else _describe(error)}
        loop = asyncio.get_running_loop()
        group, thread = self._groups[tier], self._threads[tier]
        try:
            # looked up at call time: a test replaces report_shard to kill a rank right here
            reports = await loop.run_in_executor(thread, lambda: report_shard(group, report))
            mine = await self._decide(tier, step, reports) if self.rank == 0 else None
            decision: dict[str, Any] = await loop.run_in_executor(thread, _broadcast, group,
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
        self.known[tier] = list(decision["steps"])
        if decision["committed"]:
            log.debug("step %d committed on %s by all %d ranks", step, tier, self.world_size)
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
                step=step, created_s=time.time(), job=self.job, objects=pack_skeleton(None),
                tensors=(), files=(), world_size=self.world_size,
                info={"ranks": shards, "replicated": list(self.replicated), "tier": tier,
                      "tensor_bytes": sum(s["tensor_bytes"] for s in shards),
                      "stored_bytes": sum(s["stored_bytes"] for s in shards)})
            try:
                await self.global_tiers[tier].put(manifest_key(step), manifest.to_bytes())
                committed = True
            except Exception as e:
                problems.append(f"rank 0 could not write the global manifest: {_describe(e)}")
        try:
            steps = await committed_steps(self.global_tiers[tier])
        except Exception as e:
            log.warning("tier %s could not be listed: %s", tier, e)
            steps = self.known.get(tier, [])
        return {"committed": committed, "reason": "; ".join(problems), "steps": steps}

    # -------------------------------------------------------------- retention
    async def retain(self, view: Tier, keep: int, *, is_host: bool,
                     pinned: Callable[[int], bool], bases: bool) -> None:
        """Keep the ``keep`` newest globally committed checkpoints of ``view``'s tier.

        Each rank deletes its own shards of older steps and of steps that never committed
        globally (never one still being committed); rank 0 also uncommits the older global
        manifests and removes their whole step directories. Before this rank learns the
        tier's global commits (from a commit or a restore) it deletes nothing."""
        name = view.name
        if self.rank == 0:
            known = await committed_steps(self.global_tiers[name])
            self.known[name] = known
        else:
            known = self.known.get(name, [])
        if not known:
            return
        kept, newest = known[-keep:], known[-1]
        with self._lock:
            busy = {s for (t, s) in self._inflight if t == name}
        keys = await view.list("step-")
        mine = {s for s in map(_step_of, keys) if s is not None}
        committed_here = {s for s in map(parse_manifest_key, keys) if s is not None}
        needed: set[int] = set()
        if bases:
            for s in kept:
                if s in committed_here:
                    man = await read_manifest(view, s)
                    needed.update(man.info.get("compression", {}).get("base_steps", []))
        known_set = set(known)
        for s in sorted(mine, reverse=True):  # newest first: a delta goes before its base
            if s >= newest or s in busy or s in needed or pinned(s):
                continue
            if s not in known_set or s < kept[0]:
                await delete_shard(view, s)
        if self.rank != 0:
            return
        gtier = self.global_tiers[name]
        gneeded: set[int] = set()
        if bases:
            for s in kept:
                man = await read_manifest(gtier, s)
                for shard in man.info.get("ranks", []):
                    gneeded.update(shard.get("base_steps", []))
        for s in reversed(known[:-keep]):  # newest first: a delta goes before its base
            if s in gneeded or s in busy:
                continue
            await _delete_quietly(gtier, manifest_key(s))
            if not is_host:  # the shared step directory, every rank's shard in it
                await _delete_tree(gtier, step_dir(s) + "/")

    # ---------------------------------------------------------------- restore
    def restore(self, step: int | None, call: Call) -> LoadedCheckpoint | None:
        """Load this rank's shard of the newest checkpoint every rank can read (or ``step``).
        Collective: every rank calls it (training thread); ``call`` runs a coroutine on the
        checkpointer's loop."""
        plan: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                plan = call(self._plan(step))
            except Exception as e:
                plan = {"error": str(e)}
        plan = _broadcast(self._control, plan)
        assert plan is not None
        if plan.get("error"):
            raise RestoreError(plan["error"])
        if self.rank != 0:
            self.known.update(plan["known"])
        candidates: list[tuple[int, dict[str, list[int]]]] = plan["candidates"]
        if not candidates:
            return None
        mine: dict[int, list[str]] = call(self._readable(candidates))
        everyone: list[list[int]] = _gather(self._control, sorted(mine))
        common = [s for s, _ in candidates if all(s in have for have in everyone)]
        if not common:
            lacking = {r: [s for s, _ in candidates if s not in have]
                       for r, have in enumerate(everyone)}
            raise RestoreError(
                f"checkpoints {[s for s, _ in candidates]} are committed, but no step has a "
                "readable shard on every rank (steps each rank lacks: "
                + ", ".join(f"rank {r}: {v}" for r, v in lacking.items() if v) + ")")
        digests = dict(candidates)
        failures: list[str] = []
        for s in common:
            loaded: LoadedCheckpoint | None = None
            status = "ok"
            try:
                loaded = call(load_checkpoint([self.views[t] for t in mine[s]], s,
                                              world_size=self.world_size))
            except Exception as e:
                status = f"rank {self.rank}: {e}"
            need = False
            if loaded is not None and self.replicated and self.rank != 0:
                try:
                    self._merge(loaded.state, call(self._load_replicated(s, digests[s])))
                except Exception as e:
                    log.info("step %d: rank 0's shard is not readable here (%s); rank 0 "
                             "sends the replicated state", s, e)
                    need = True
            statuses: list[tuple[str, bool]] = _gather(self._control, (status, need))
            bad = [st for st, _ in statuses if st != "ok"]
            if bad:
                log.warning("step %d could not be restored on every rank: %s", s, "; ".join(bad))
                failures.extend(bad)
                continue
            assert loaded is not None
            if any(n for _, n in statuses):
                part = self._parts(loaded.state) if self.rank == 0 else None
                part = _broadcast(self._control, part)
                if need:
                    self._merge(loaded.state, part)
            return loaded
        raise RestoreError("no committed checkpoint could be read on every rank: "
                           + "; ".join(failures))

    async def _plan(self, step: int | None) -> dict[str, Any]:
        """Rank 0: the globally committed steps (newest first) with each rank's shard digest
        per tier; an error when the newest was saved by another world size."""
        known: dict[str, list[int]] = {}
        for tp in self.policy.tiers:
            try:
                known[tp.name] = await committed_steps(self.global_tiers[tp.name])
            except Exception as e:
                log.warning("tier %s could not be listed, skipping it: %s", tp.name, e)
        found = sorted({s for steps in known.values() for s in steps}, reverse=True)
        if step is not None:
            if step not in found:
                raise RestoreError(f"step {step} is not committed by all {self.world_size} "
                                   f"ranks on any tier (committed: {sorted(found) or 'none'})")
            found = [step]
        candidates: list[tuple[int, dict[str, list[int]]]] = []
        for s in found:
            per_tier: dict[str, list[int]] = {}
            saved_world = None
            for tp in self.policy.tiers:
                if s not in known.get(tp.name, []):
                    continue
                try:
                    man = await read_manifest(self.global_tiers[tp.name], s)
                except Exception as e:
                    log.warning("step %d: global manifest on %s unusable: %s", s, tp.name, e)
                    continue
                if man.world_size != self.world_size:
                    saved_world = man.world_size
                    break
                ranks = man.info.get("ranks")
                if not isinstance(ranks, list) or len(ranks) != self.world_size:
                    log.warning("step %d: global manifest on %s lists no shard per rank",
                                s, tp.name)
                    continue
                per_tier[tp.name] = [int(r["xxh64"]) for r in ranks]
            if saved_world is not None:
                if not candidates:  # the newest checkpoint: a clear error, never an older one
                    raise world_size_error(s, saved_world, self.world_size)
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
            for tp in self.policy.tiers:
                digests = per_tier.get(tp.name)
                if digests is None:
                    continue
                try:
                    data = await self.views[tp.name].get(manifest_key(s))
                except Exception:
                    continue
                if checksum(data) == digests[self.rank]:
                    tiers.append(tp.name)
            if tiers:
                out[s] = tiers
        return out

    def _prefixes(self) -> tuple[str, ...]:
        return tuple(f"{n}/" if n in REPLICABLE else f"extras/{n}/" for n in self.replicated)

    async def _load_replicated(self, step: int, digests: dict[str, list[int]]) -> dict[str, Any]:
        """The replicated parts of rank 0's shard of ``step``, from the nearest tier here."""
        readers = self._rank0()
        tiers = []
        for tp in self.policy.tiers:
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
        loaded = await load_checkpoint(tiers, step, world_size=self.world_size,
                                       select=lambda path: path.startswith(prefixes))
        assert loaded is not None
        return self._parts(loaded.state)

    def _parts(self, state: Any) -> dict[str, Any]:
        return {n: state[n] if n in REPLICABLE else state["extras"][n] for n in self.replicated}

    def _merge(self, state: Any, parts: dict[str, Any]) -> None:
        for n, value in parts.items():
            if n in REPLICABLE:
                state[n] = value
            else:
                state["extras"][n] = value
