"""Flush committed host checkpoints to the downstream tiers through async queues.

One bounded queue and one worker per tier, so a slow or failing tier never
holds back another. A tier commits a checkpoint by writing its manifest after
all of its data; files of an earlier save of the same step are then removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from tiers.base import KeyNotFound, Tier
from tiers.host import HostTier

from .handle import SaveHandle
from .manifest import Manifest, manifest_key, step_dir
from .policy import Policy

log = logging.getLogger(__name__)

DoneCallback = Callable[["FlushJob", str, "BaseException | None"], Awaitable[None]]


@dataclass(frozen=True)
class FlushJob:
    manifest: Manifest
    data_name: str
    handle: SaveHandle


async def delete_checkpoint(tier: Tier, step: int) -> None:
    """Uncommit first (manifest), then remove the data: never a manifest without its data."""
    with contextlib.suppress(KeyNotFound):
        await tier.delete(manifest_key(step))
    await tier.delete_prefix(step_dir(step) + "/")


class FlushScheduler:
    def __init__(self, tiers: Mapping[str, Tier], policy: Policy, on_done: DoneCallback,
                 queue_depth: int = 4) -> None:
        self._tiers = tiers
        self._host = tiers[policy.staging.name]
        self._on_done = on_done
        self._queues: dict[str, asyncio.Queue[FlushJob | None]] = {
            tp.name: asyncio.Queue(queue_depth) for tp in policy.tiers[1:]}
        self._busy: dict[str, bool] = dict.fromkeys(self._queues, False)
        self._workers = [asyncio.ensure_future(self._work(name)) for name in self._queues]

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues.values()) + sum(self._busy.values())

    async def submit(self, tier: str, job: FlushJob) -> None:
        """Queue ``job`` for ``tier``; waits while that tier's queue is full (backpressure)."""
        await self._queues[tier].put(job)

    async def join(self) -> None:
        for q in self._queues.values():
            await q.join()

    async def close(self) -> None:
        for q in self._queues.values():
            await q.put(None)
        await asyncio.gather(*self._workers)

    async def _work(self, name: str) -> None:
        tier, queue = self._tiers[name], self._queues[name]
        while True:
            job = await queue.get()
            if job is None:
                queue.task_done()
                return
            self._busy[name] = True
            error: BaseException | None = None
            try:
                await self._flush(tier, job)
            except Exception as e:
                error = e
            try:
                await self._on_done(job, name, error)
            except Exception:
                log.exception("flush completion of step %d on %s failed",
                              job.manifest.step, name)
            finally:
                self._busy[name] = False
                queue.task_done()

    async def _flush(self, tier: Tier, job: FlushJob) -> None:
        step = job.manifest.step
        sd = step_dir(step)
        host = self._host
        assert isinstance(host, HostTier)
        data_key = f"{sd}/{job.data_name}"
        with await host.view(data_key) as view:
            await tier.put(data_key, view)
        await tier.put(manifest_key(step), job.manifest.to_bytes())
        wanted = {f"{sd}/{f.key}" for f in job.manifest.files} | {manifest_key(step)}
        for key in await tier.list(sd + "/"):
            if key not in wanted:
                await tier.delete(key)
        log.debug("step %d durable on %s", step, tier.name)
