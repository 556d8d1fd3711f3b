"""Commit: a staged block becomes a committed host checkpoint and is handed to the flushes.

Once every byte of a save is in its host block (``Stager``), the block is checksummed and
committed with its manifest on the host tier (``handle.staged``), then queued for each
downstream tier the save is scheduled on (``schedule.FlushScheduler``), whose workers report
back here: this process's copy is durable on that tier (``handle.durable``, through the
``Topology``, which with several ranks waits for every rank), and retention runs. A tier whose
queue is full makes the next save wait (``on_full = "wait"``: backpressure) or skips it there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, cast

from tiers.base import Tier
from tiers.host import HostBlock, HostTier

from ._loop import LoopThread, Steps
from .errors import TierSkipped
from .handle import SaveHandle
from .hoststage import HostStage
from .layout import committed_in, group_step_dirs, manifest_key
from .manifest import FileMeta, Manifest, TensorMeta
from .policy import Policy
from .retention import delete_step, kept_bases, plan_uncommitted, settled_uncommitted
from .schedule import FlushJob, FlushScheduler, Job
from .stager import Prepared
from .stream import StreamJob
from .topology import Topology

log = logging.getLogger(__name__)


class Committer:
    """The pipeline after staging, on the loop thread (``tiers_for``, ``admit`` and
    ``submit`` are called from the training thread)."""

    def __init__(self, policy: Policy, topology: Topology, loop: LoopThread, job: str,
                 errors: list[BaseException]) -> None:
        self.policy = policy
        self.topology = topology
        self.job = job
        self.loop = loop
        self._errors = errors
        self.tiers: dict[str, Tier] = {}
        self.scheduler: FlushScheduler | None = None
        self._stage: HostStage | None = None
        self._commits: set[concurrent.futures.Future[None]] = set()
        self._save_index = 0
        # delta bases of each committed checkpoint, per tier: retention keeps them
        self._bases: dict[str, dict[int, list[int]]] = {tp.name: {} for tp in policy.tiers}
        # one retention pass per tier at a time (two would race to delete the same step)
        self._retain_locks: dict[str, asyncio.Lock] = {}

    @property
    def host(self) -> HostTier:
        # an in-memory tier reserves and maps blocks (open() checked its capabilities)
        return cast(HostTier, self.tiers[self.policy.staging.name])

    @property
    def stage(self) -> HostStage:
        assert self._stage is not None, "the pipeline is not open"
        return self._stage

    async def open(self) -> None:
        """Open every tier, the host stage and the flush queues; remove what a crashed save
        left uncommitted."""
        self.tiers.update(self.topology.open_tiers(self.policy))
        if not self.tiers[self.policy.staging.name].capabilities.in_memory:
            raise TypeError(f"{self.policy.source}: the staging tier "
                            f"{self.policy.staging.name!r} must be held in host memory (shm://)")
        host = self.host
        if host.capacity_bytes is None:  # shared by the ranks of this host
            host.capacity_bytes = _shm_default_capacity(host) // self.topology.local_ranks
        self._stage = HostStage(host, self._retain_lock(host),
                                on_unpinned=lambda: self.retain(self.host),
                                keep=self.policy.staging.retained,
                                reuse_newest=self.policy.staging.keep == 0)
        self.scheduler = FlushScheduler(self.tiers, self.policy, on_done=self._flush_done,
                                        pin_base=self.stage.pin_base,
                                        unpin_base=self.stage.unpin_base,
                                        base_fits=self.stage.base_fits)
        for tier in self.tiers.values():
            await _drop_uncommitted(tier)

    # -------------------------------------------------------------- hand-off
    def tiers_for(self, nbytes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The tiers the next save of ``nbytes`` is scheduled on (the host tier, and each tier
        whose ``every`` divides the save's index), and those it goes to: all of them, but the
        host tier when two such saves do not fit its budget (it streams past, see ``stream``)."""
        index, self._save_index = self._save_index, self._save_index + 1
        scheduled = tuple(t.name for i, t in enumerate(self.policy.tiers)
                          if i == 0 or index % t.every == 0)
        cap = self.host.capacity_bytes
        if cap is None or 2 * nbytes <= cap:
            return scheduled, scheduled
        return scheduled, tuple(t for t in scheduled if t != self.host.name)

    def admit(self, prep: Prepared) -> Steps[HostBlock | None]:
        """Admit a new save: register it with the topology, wait for room in full queues
        (backpressure, part of the stall), and give it a host block (None: it streams)."""
        handle = prep.handle
        self.topology.track(handle, prep.scheduled)
        for tier in set(prep.scheduled) - set(handle.tiers):
            self.topology.resolve(handle, tier, TierSkipped(
                f"step {prep.step} streamed past tier {tier!r}: larger than its budget"))
        waiting = self.full_queues(prep)
        if waiting:
            yield self.await_room(waiting, handle.metrics)
        if self.host.name not in handle.tiers:
            return None
        stage = self.stage
        stage.page_lock = prep.on_device
        block = stage.take_spare(prep.layout.total_bytes)
        t0 = time.perf_counter()
        if block is None and self._commits:
            # an earlier save is still committing: its retention frees a host copy and the
            # spare it then reserves reuses that memory, where a new block would hold one
            # more copy of the state
            yield self._committed()
            block = stage.take_spare(prep.layout.total_bytes)
        if block is None:
            block = yield stage.claim(prep.data_key, prep.layout.total_bytes, handle.metrics)
        handle.metrics["block_wait_s"] = time.perf_counter() - t0  # part of the stall
        stage.copying(block)
        if stage.page_lock:
            yield stage.ready(block, handle.metrics)
        return block

    def full_queues(self, prep: Prepared) -> list[str]:
        """Scheduled tiers with ``on_full = wait`` whose backlog (queued, in flight, and saves
        not yet handed over) has reached the queue depth: this save waits for them
        (backpressure), and the wait is part of its stall."""
        sched = self.scheduler
        if sched is None:
            return []
        handing_over = len(self._commits)
        return [t for t in prep.handle.tiers if t != self.host.name
                and self.policy.tier(t).on_full == "wait"
                and sched.backlog(t) + handing_over > sched.depth]

    async def _committed(self) -> None:
        """Wait for the commits in flight (their failures are reported on their handles)."""
        await asyncio.gather(*map(asyncio.wrap_future, list(self._commits)),
                             return_exceptions=True)

    async def await_room(self, tiers: list[str], metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        if self._commits:  # earlier saves first reach their queues (each may wait there)
            await self._committed()
        for name in tiers:
            assert self.scheduler is not None
            await self.scheduler.wait_room(name)
        metrics["backpressure_s"] = time.perf_counter() - t0

    def submit(self, prep: Prepared, block: HostBlock) -> None:
        """Every byte of ``prep`` is in ``block``: commit it on the loop (any thread)."""
        self.track(self.loop.submit(self._commit_staged(prep, block)))

    def track(self, fut: concurrent.futures.Future[None]) -> None:
        self._commits.add(fut)
        fut.add_done_callback(self._commits.discard)

    async def _commit_staged(self, prep: Prepared, block: HostBlock) -> None:
        # Pinned from before its manifest is visible until its flushes hold their own pins:
        # commits overlap, and a newer step's retention must not delete this one meanwhile.
        self.stage.pin(prep.step)
        try:
            committed = await self._commit_pinned(prep, block)
        finally:
            last = self.stage.drop_pin(prep.step)
        if committed:
            self.stage.committed(prep.step)
        if committed or last:  # older host copies may go now (this one too, once unpinned)
            await self.retain(self.host)
        if committed:
            self.stage.want_spare(prep.layout.total_bytes)  # after retention

    async def _commit_pinned(self, prep: Prepared, block: HostBlock) -> bool:
        """Commit the staged block and its manifest, then queue the flushes; False when the
        commit failed (reported on the handle)."""
        handle, host = prep.handle, self.host
        try:
            hashed = prep.hashed

            def chunk_table() -> tuple[TensorMeta, ...]:
                prep.objects  # noqa: B018  (packs the skeleton here, off the loop)
                return prep.layout.tensor_metas(block.view, prep.data_name,
                                                None if hashed is None else hashed.result())
            metas = await asyncio.to_thread(chunk_table)
            if hashed is not None:
                handle.metrics["hashed_while_copying_bytes"] = hashed.nbytes
            await block.commit(prep.data_key)
            manifest = self.manifest(prep, metas, (FileMeta(prep.data_name,
                                                            prep.layout.total_bytes),),
                                     mode=handle.metrics.get("mode"),
                                     **({"plan": handle.metrics["plan"]}
                                        if "plan" in handle.metrics else {}))
            await host.put(manifest_key(prep.step), manifest.to_bytes())
        except BaseException as e:
            await block.abort()
            self.fail(handle, handle.tiers, e)
            if not isinstance(e, Exception):
                raise
            return False
        handle.staged.set_done()
        self.topology.resolve(handle, host.name, None)
        for name in handle.tiers[1:]:
            await self._hand_off(name, FlushJob(manifest, handle))
        return True

    def manifest(self, prep: Prepared, tensors: Any, files: tuple[FileMeta, ...],
                 **info: Any) -> Manifest:
        """The manifest of this process's copy of ``prep``."""
        return Manifest(step=prep.step, created_s=time.time(), job=self.job,
                        objects=prep.objects, tensors=tensors, files=files,
                        **self.topology.manifest_fields(),
                        info={"save_id": prep.save_id, "stall_s": prep.handle.stall_s, **info,
                              **self.topology.manifest_info()})

    async def _hand_off(self, name: str, job: FlushJob) -> None:
        assert self.scheduler is not None
        step = job.manifest.step
        if self.policy.tier(name).on_full == "skip" and self.scheduler.full(name):
            log.warning("tier %s is behind: step %d is not persisted there (on_full = skip)",
                        name, step)
            job.handle.metrics.setdefault("skipped", []).append(name)
            self.topology.resolve(job.handle, name, TierSkipped(
                f"step {step} skipped on tier {name!r}: its queue was full"))
            return
        self.stage.pin(step, waited=self._waited(name))
        await self.scheduler.submit(name, job)

    async def hand_off_stream(self, job: StreamJob) -> None:
        """Queue a streamed save (``stream.StreamJob``) on each of its tiers."""
        assert self.scheduler is not None
        for name in job.tiers:
            self.stage.pin(job.manifest.step)
            await self.scheduler.submit(name, job)

    async def _flush_done(self, job: Job, tier: str, error: BaseException | None) -> None:
        if error is None:
            comp = job.handle.metrics.get(f"{tier}.compression", {})
            self._bases[tier][job.manifest.step] = kept_bases(comp)
            self.topology.resolve(job.handle, tier, None)
            self.stage.flushed(job.manifest.step, job.handle.durable(tier),
                               waited=self._waited(tier))
            await self.retain(self.tiers[tier])
        else:
            self.fail(job.handle, (tier,), error)
        await self.stage.unpin(job.manifest.step,
                               waited=isinstance(job, FlushJob) and self._waited(tier))

    def _waited(self, tier: str) -> bool:
        """Whether a host copy still read by a flush to ``tier`` makes the next save wait
        rather than map one more block (``on_full = "wait"``, see ``hoststage``)."""
        return self.policy.tier(tier).on_full == "wait"

    def fail(self, handle: SaveHandle, tiers: Iterable[str], error: BaseException) -> None:
        log.error("checkpoint step %d failed on %s: %s", handle.step, ", ".join(tiers), error)
        self._errors.append(error)
        if not handle.staged.done():
            handle.staged.set_failed(error)
        for t in tiers:
            self.topology.resolve(handle, t, error)

    # ------------------------------------------------------------- retention
    async def retain(self, tier: Tier) -> None:
        """Keep the newest ``keep`` checkpoints, the delta bases they need, and pinned host
        copies; delete older ones (only ever after a newer one committed on this tier)."""
        staging = tier.capabilities.in_memory
        async with self._retain_lock(tier):
            try:
                await self.topology.retain(
                    tier, self.policy.tier(tier.name).retained,
                    pinned=self.stage.pinned() if staging else (),
                    bases=not staging and self.policy.compression.mode != "off",
                    cache=self._bases[tier.name])
                if staging:
                    await self.stage.retained()
            except Exception as e:
                log.warning("retention on tier %s failed (will retry after the next save): %s",
                            tier.name, e)

    def _retain_lock(self, tier: Tier) -> asyncio.Lock:
        """Held while deleting from ``tier``: two passes would race to delete one step."""
        return self._retain_locks.setdefault(tier.name, asyncio.Lock())

    # ----------------------------------------------------------------- drain
    async def settle(self) -> None:
        """Wait until every save so far is committed and flushed (or failed)."""
        while self._commits or (self.scheduler and self.scheduler.pending):
            if self._commits:
                await asyncio.gather(*map(asyncio.wrap_future, list(self._commits)),
                                     return_exceptions=True)
            if self.scheduler:
                await self.scheduler.join()

    async def close(self) -> None:
        """Release the host stage, the flush queues and the tiers (after ``settle``)."""
        if self._stage is not None:
            await self._stage.close()
        if self.scheduler:
            await self.scheduler.close()
        for tier in self.tiers.values():
            await tier.close()


async def _drop_uncommitted(tier: Tier) -> None:
    """Remove step directories a crashed save left without a manifest (invisible anyway),
    on a tier with ``uncommitted_grace_s`` only those older than that. With several ranks,
    ``tier`` is this rank's view: only its own shards go."""
    try:
        keys = await tier.list("step-")
    except Exception as e:
        log.warning("tier %s is unreachable at start-up: %s", tier.name, e)
        return
    groups = group_step_dirs(keys)
    found = plan_uncommitted(groups, committed_in(keys), newer_too=True)
    try:
        # Object stores: a step whose data is younger than the grace period may be a save
        # still writing (without rename, its data objects are visible before its manifest).
        settled = await settled_uncommitted(tier, found, groups)
    except Exception as e:
        log.warning("tier %s: uncommitted steps not checked at start-up: %s", tier.name, e)
        settled, found = [], []
    for s in found:
        if s not in settled:
            log.info("keeping uncommitted step %d on tier %s: written less than %g s ago "
                     "(uncommitted_grace_s)", s, tier.name, tier.uncommitted_grace_s)
            continue
        log.info("removing uncommitted step %d from tier %s", s, tier.name)
        await delete_step(tier, s)
    if tier.capabilities.stale_tmp:  # tmp files of writes cut off by a crash
        try:
            await tier.remove_stale_tmp()  # only those older than an hour: never a live write
        except Exception as e:
            log.warning("tier %s: stale tmp files not removed: %s", tier.name, e)


def _shm_default_capacity(host: HostTier) -> int:
    """Half of the shared-memory filesystem: a bound that never starves the machine."""
    d = host.directory
    while not d.exists():
        d = d.parent
    st = os.statvfs(d)
    return st.f_blocks * st.f_frsize // 2
