"""Host staging: the shared-memory blocks a save is copied into, and what keeps them.

A block is reserved against the host tier's byte budget; under pressure the oldest host
copies that nothing needs any more are evicted. After each commit a spare block for the next
save is reserved in the background (a freed block is reused, still mapped, so its pages stay
faulted in; freed blocks beyond the spare are given back, and no spare is reserved while a
save's block is still being copied, so the host holds its kept checkpoints and one block more),
and a save that finds the spare still being reserved waits for it rather than reserving a second
block. While an older host copy is still being flushed and no freed block is pooled, the spare
waits for retention to free that copy's block instead of mapping a new one, and so does a save:
while a host copy that retention would free (older than the ``keep`` newest, no delta base) is
still read by a flush to an ``on_full = "wait"`` tier, the next save waits for that flush
(backpressure, part of its stall) rather than map one more block, so the host holds its kept
checkpoints, the delta bases, and one block more. A flush to an ``on_full = "skip"`` tier never
makes a save wait: its host copy may hold one more block, within the tier's byte budget.
With ``keep = 0`` no spare is reserved: the host holds its newest copy (a restore reads it)
until the next save, which takes that copy's block once a tier below holds the copy and nothing
reads it any more. The same backpressure applies: while a flush to an ``on_full = "wait"`` tier
still reads that copy, or its commit there is not yet durable (with several ranks, every
rank's shard), the save waits for it rather than map a second block, so the host holds one
block of the state, never two; only a copy no such flush frees (a delta base, a host-only
policy, ``on_full = "skip"`` tiers) leaves the save a block of its own.
For CUDA state the spare is page-locked there too, off the training thread: a device-to-host
copy into pageable memory would block the training thread for the whole transfer. A mapping
stays page-locked until the host tier unmaps it, so a block reused from the pool is locked
already and steady-state saves register nothing. Pins count who
still reads a host copy (a flush, a delta base): a pinned step is never evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from tiers.host import HostBlock, HostTier
from tiers.local import buffer_address

from .copier import pin_memory
from .handle import Completion
from .layout import spare_key
from .manifest import committed_steps
from .retention import delete_step

log = logging.getLogger(__name__)


class HostStage:
    """Blocks, spares, page-locks and pins of one Checkpointer's host tier (loop thread,
    except ``take_spare``, which is thread-safe). Made on the loop thread."""

    def __init__(self, host: HostTier, lock: asyncio.Lock,
                 on_unpinned: Callable[[], Awaitable[None]], keep: int = 1,
                 reuse_newest: bool = False) -> None:
        self.host = host
        self.keep = keep  # the host tier's kept checkpoints (its policy's ``retained``)
        self.reuse_newest = reuse_newest  # ``keep = 0``: the next save takes the newest's block
        self._flushed: set[int] = set()  # host copies a tier below holds
        self._durable_pending: set[int] = set()  # flushed here, their commit not yet durable
        self.page_lock = False  # CUDA state: blocks are page-locked for device copies
        self._lock = lock  # the host tier's retention lock: eviction deletes under it
        self._on_unpinned = on_unpinned
        self._pins: Counter[int] = Counter()
        self._base_pins: Counter[int] = Counter()  # the delta bases among them
        self._waited_pins: Counter[int] = Counter()  # flushes a new save waits for
        self._pins_changed = asyncio.Event()
        self._released = asyncio.Event()  # a waited-for pin dropped, and retention ran
        self._spare_lock = threading.Lock()
        self._spare: HostBlock | None = None
        self._spare_wanted: int | None = None
        self._deferred: int | None = None  # nbytes of a spare to ask for again
        self._newest = -1  # the newest step this stage committed on the host tier
        self._spare_tasks: set[asyncio.Task[None]] = set()
        self._locked: dict[int, Callable[[], None]] = {}  # unregister fn by mapped address
        self._copying = 0  # blocks handed to saves, not yet committed or aborted
        self._closed = False
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ pins
    def pinned(self) -> set[int]:
        return {s for s, n in self._pins.items() if n > 0}

    def pin(self, step: int, *, waited: bool = False) -> None:
        """Keep the host copy of ``step``: a flush or a delta base still reads it. ``waited``:
        a flush that the next save waits for rather than map one more block."""
        self._pins[step] += 1
        if waited:
            self._waited_pins[step] += 1

    def drop_pin(self, step: int, *, waited: bool = False) -> bool:
        """Release one pin of ``step``; True when it was the last."""
        if waited:
            self._waited_pins[step] -= 1
            if self._waited_pins[step] <= 0:
                del self._waited_pins[step]
        self._pins[step] -= 1
        if self._pins[step] > 0:
            return False
        del self._pins[step]
        self._pins_changed.set()
        return True

    async def unpin(self, step: int, *, waited: bool = False) -> None:
        if self.drop_pin(step, waited=waited):
            await self._on_unpinned()  # retention: this copy's block may be freed now
        if waited:
            self._released.set()

    def pin_base(self, step: int) -> None:
        """Keep the host copy of ``step`` while deltas are coded against it."""
        self._base_pins[step] += 1
        self.pin(step)

    def base_fits(self, step: int, nbytes: int, replacing: int | None) -> bool:
        """Whether the byte budget holds the host copy of ``step`` (a block of ``nbytes``) as
        a delta base, in place of base ``replacing``, beside the other bases, the kept
        checkpoints and the next save's block: a base is pinned until the next full
        checkpoint, so one the budget cannot hold would leave the next save waiting for room
        that never comes."""
        cap = self.host.capacity_bytes
        if cap is None:
            return True
        bases = {s for s, n in self._base_pins.items() if n > 0 and s != replacing} | {step}
        return (self.keep + 1 + len(bases)) * nbytes <= cap

    async def unpin_base(self, step: int) -> None:
        self._base_pins[step] -= 1
        if self._base_pins[step] <= 0:
            del self._base_pins[step]
        await self.unpin(step)

    def flushed(self, step: int, durable: Completion, *, waited: bool) -> None:
        """``step`` was flushed to a tier below: with ``keep = 0`` its host copy may go once
        it is committed there (``durable``: with several ranks, once every rank's shard is);
        ``waited``: the next save waits for that commit (an ``on_full = "wait"`` tier)."""
        if not self.reuse_newest:
            return
        if waited:
            self._durable_pending.add(step)

        def settled(ok: bool) -> None:
            self._durable_pending.discard(step)
            if ok:
                self._flushed.add(step)
            self._released.set()

        def done(ok: bool) -> None:
            if not self._closed:
                with contextlib.suppress(RuntimeError):  # the loop closed since
                    self._loop.call_soon_threadsafe(settled, ok)
        durable.on_done(done)

    def _flushing_before(self, step: int) -> bool:
        """Whether a host copy older than ``step`` is pinned for something other than a delta
        base (a flush, a commit): retention frees its block soon."""
        return any(s < step and n > self._base_pins[s] for s, n in self._pins.items())

    # ---------------------------------------------------------------- blocks
    def take_spare(self, nbytes: int) -> HostBlock | None:
        """The block reserved ahead for a save of ``nbytes`` (any thread), if it is ready."""
        with self._spare_lock:
            block, self._spare = self._spare, None
        if block is not None and block.nbytes != nbytes:
            asyncio.run_coroutine_threadsafe(block.abort(), self._loop)
            return None
        return block

    async def claim(self, key: str, nbytes: int,
                    metrics: dict[str, Any] | None = None) -> HostBlock:
        """A block for a save of ``nbytes`` when no spare was ready as it asked: once a flush
        that holds a copy retention would free is done (:meth:`_await_flushed`), the spare
        reserved since, or the reservation of one still in flight (a second block beside it
        would hold one more copy of the state in shared memory until it is given back), else
        a new one. With ``keep = 0``, the newest host copy's block once it may go
        (:meth:`_give_up_held`)."""
        await self._await_flushed(nbytes, metrics)
        if self.reuse_newest:
            await self._give_up_held()
        cap = self.host.capacity_bytes
        with self._spare_lock:
            # wait only for a reservation that cannot be blocked by the byte budget (under
            # pressure, ``reserve`` frees room, which a waiting spare does not)
            in_flight = self._spare_wanted == nbytes and (
                cap is None or self.host.used_bytes + nbytes <= cap)
            if not in_flight:
                self._spare_wanted = None  # one still in flight is given back when done
        if in_flight:
            await asyncio.gather(*self._spare_tasks, return_exceptions=True)
        block = self.take_spare(nbytes)  # reserved in flight, or since the save asked
        if block is not None:
            return block
        return await self.reserve(key, nbytes)

    async def _await_flushed(self, nbytes: int, metrics: dict[str, Any] | None) -> None:
        """Wait while no block of ``nbytes`` is pooled or being reserved and a host copy that
        retention would free (with ``keep = 0``, any) is still read by a waited-for flush, or
        with ``keep = 0`` is flushed but its commit not yet durable (counted in the save's
        ``backpressure_s``)."""
        t0 = time.perf_counter()
        waited = False
        while (not self._closed and (self._waited_pins or self._durable_pending)
               and not self.host.has_pooled(nbytes)):
            with self._spare_lock:
                if self._spare_wanted == nbytes:
                    break  # a spare is being reserved (from a freed block, if one is pooled)
            self._released.clear()
            steps = await committed_steps(self.host)
            freed = steps if self.reuse_newest else steps[:-self.keep]
            if not any((self._waited_pins[s] or s in self._durable_pending)
                       and not self._base_pins[s] for s in freed):
                break
            await self._released.wait()
            waited = True
        if waited and metrics is not None:
            metrics["backpressure_s"] = (metrics.get("backpressure_s", 0.0)
                                         + time.perf_counter() - t0)

    async def _give_up_held(self) -> None:
        """``keep = 0``: delete the host copies a tier below holds and nothing reads (no flush,
        no delta base), so that their blocks go to the pool, still mapped, for this save."""
        async with self._lock:
            steps = await committed_steps(self.host)
            self._flushed.intersection_update(steps)
            for s in steps:
                if s in self._flushed and not self._pins[s]:
                    await delete_step(self.host, s)
                    self._flushed.discard(s)

    def copying(self, block: HostBlock) -> None:
        """``block`` is a save's, until it is committed or aborted (any thread)."""
        with self._spare_lock:
            self._copying += 1

        def done() -> None:
            with self._spare_lock:
                self._copying -= 1
        block.on_close(done)

    def committed(self, step: int) -> None:
        """``step`` committed on the host tier (before its retention pass)."""
        self._newest = max(self._newest, step)

    def want_spare(self, nbytes: int) -> None:
        """Reserve (and page-lock) a block for the next save in the background, after a
        commit. Not while a save's block is still being copied (its commit asks again), so
        that the host never holds a spare beside a block being copied and the checkpoints it
        keeps; and not while a host copy older than the newest committed one is still being
        flushed with no freed block of ``nbytes`` pooled (:meth:`retained` asks again once it
        is deleted). Never with ``keep = 0``: the next save takes the newest copy's block."""
        with self._spare_lock:
            self._deferred = None
            if (self._closed or self.reuse_newest or self._spare is not None
                    or self._spare_wanted is not None or self._copying):
                return
            if not self.host.has_pooled(nbytes) and self._flushing_before(self._newest):
                self._deferred = nbytes
                return
            self._spare_wanted = nbytes
        task = asyncio.ensure_future(self._reserve_spare(nbytes))
        self._spare_tasks.add(task)
        task.add_done_callback(self._spare_tasks.discard)

    async def _reserve_spare(self, nbytes: int) -> None:
        try:
            block = await self.host.reserve(spare_key(), nbytes)
            if self.page_lock:  # page-locked here, off the training thread
                await asyncio.to_thread(self.lock_pages, block)
        except Exception as e:
            log.debug("no spare host block reserved: %s", e)
            with self._spare_lock:
                self._spare_wanted = None
            return
        with self._spare_lock:
            keep = self._spare_wanted == nbytes and self._spare is None
            if keep:
                self._spare, self._spare_wanted = block, None
        if not keep:
            await block.abort()
        await self.trim_pool()

    async def retained(self) -> None:
        """After a retention pass on the host tier: a deferred spare is asked for again (the
        block it waited for may be pooled now), judged against the newest committed copy (a
        save committed since it was deferred makes the copy that asked an older one, whose
        flush holds a block too); with a spare held, freed blocks in the pool are surplus,
        each one more copy of the state in shared memory, and are given back."""
        if self._deferred is not None:
            self.want_spare(self._deferred)
        await self.trim_pool()

    async def trim_pool(self) -> None:
        if self._spare is not None and self.host.pooled_bytes:
            await self.host.drop_pool()

    def lock_pages(self, block: HostBlock) -> bool:
        """Page-lock ``block``'s memory for device-to-host copies until the host tier unmaps
        it (a block staged through a mapping locked before is locked already)."""
        if not block.nbytes:
            return False
        address = buffer_address(block.view)
        if address in self._locked:
            return True
        unregister = pin_memory(block.view)
        if unregister is None:
            return False
        self._locked[address] = unregister

        def unlock() -> None:
            self._locked.pop(address, None)
            unregister()
        block.on_unmap(unlock)
        return True

    def is_locked(self, block: HostBlock) -> bool:
        return bool(block.nbytes) and buffer_address(block.view) in self._locked

    async def ready(self, block: HostBlock, metrics: dict[str, Any]) -> None:
        """Page-lock ``block`` now if state is on a device and no spare was locked ahead (a
        streamed save's pieces: each block once, the pool's are locked already); metrics add
        up over the blocks of one save."""
        if not self.page_lock:
            return
        pinned = self.is_locked(block)
        if not pinned:
            t0 = time.perf_counter()
            pinned = await asyncio.to_thread(self.lock_pages, block)
            metrics["host_pin_s"] = metrics.get("host_pin_s", 0.0) + time.perf_counter() - t0
        metrics["host_pinned"] = pinned and metrics.get("host_pinned", True)

    async def reserve(self, key: str, nbytes: int) -> HostBlock:
        """A host block for a new checkpoint; under memory pressure, evict old host copies."""
        host = self.host
        task = asyncio.ensure_future(host.reserve(key, nbytes))
        while True:
            await asyncio.wait({task}, timeout=0.01)
            if task.done():
                return task.result()
            cap = host.capacity_bytes
            if cap is None or host.committed_bytes + host.reserved_bytes + nbytes <= cap:
                continue  # not blocked by the budget, only slow
            with self._spare_lock:  # a block reserved ahead must not starve this one
                spare, self._spare, self._spare_wanted = self._spare, None, None
            if spare is not None:
                await spare.abort()
                continue
            if await self._evict_one():
                continue
            self._pins_changed.clear()
            waiter = asyncio.ensure_future(self._pins_changed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _evict_one(self) -> bool:
        """Drop the oldest host checkpoint that no flush needs, never the newest one."""
        async with self._lock:
            steps = await committed_steps(self.host)
            for s in steps[:-1]:
                if not self._pins[s]:
                    log.info("host budget full: evicting step %d from %s", s, self.host.name)
                    await delete_step(self.host, s)
                    return True
        return False

    async def close(self) -> None:
        self._closed = True
        self._released.set()  # a save waiting for a flush goes on (and finds the tier closed)
        for task in list(self._spare_tasks):
            task.cancel()
        await asyncio.gather(*self._spare_tasks, return_exceptions=True)
        with self._spare_lock:
            spare, self._spare, self._spare_wanted = self._spare, None, None
        if spare is not None:
            await spare.abort()

