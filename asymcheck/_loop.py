"""One private event-loop thread per Checkpointer: the pipeline always runs there.

Training code calls in from its own thread (sync facade) or its own event loop
(async API); neither nests loops, and the pipeline progresses while the
training thread computes.

Each public operation is written once, as ``Steps``: a generator that runs on the caller's
thread (capturing state, copying it, applying a restored one: the work that belongs to the
training thread) and yields each coroutine the pipeline must run. ``drive`` runs those
coroutines on the loop thread and blocks a plain thread for them; ``drive_async`` awaits them
from the caller's event loop, which stays free meanwhile. A coroutine's failure is thrown back
into the generator at its ``yield``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")
#: an operation: yields coroutines for the loop thread, returns its result
Steps = Generator[Coroutine[Any, Any, Any], Any, T]


#: threads that run the pipeline's blocking calls (``asyncio.to_thread``: file writes, syncs,
#: checksums): all started with the loop, so their number never changes while it runs
IO_THREADS = 6


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._io = concurrent.futures.ThreadPoolExecutor(IO_THREADS,
                                                         thread_name_prefix=f"{name}-io")
        started = threading.Barrier(IO_THREADS + 1)
        for _ in range(IO_THREADS):
            self._io.submit(started.wait)
        started.wait()
        self.loop.set_default_executor(self._io)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the checkpointer is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread and block the calling thread for its result."""
        if self.in_loop:
            coro.close()
            raise RuntimeError("blocking call from the checkpointer's own loop thread")
        return self.submit(coro).result(timeout)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread, awaited from another event loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self._io.shutdown(wait=True)


def _resume(steps: Steps[Any], ok: bool, value: Any) -> tuple[bool, Any]:
    """Send ``value`` into ``steps`` (or throw it, when not ``ok``): (finished, next item)."""
    try:
        return False, steps.send(value) if ok else steps.throw(value)
    except StopIteration as stop:
        return True, stop.value


def drive(loop: LoopThread, steps: Steps[T]) -> T:
    """Run ``steps`` on this (plain) thread, its coroutines on the loop thread."""
    finished, item = _resume(steps, True, None)
    while not finished:
        try:
            ok, value = True, loop.call(item)
        except BaseException as e:
            ok, value = False, e
        finished, item = _resume(steps, ok, value)
    result: T = item
    return result


async def drive_async(loop: LoopThread, steps: Steps[T]) -> T:
    """Run ``steps`` from an event loop, its coroutines on the loop thread (awaited)."""
    finished, item = _resume(steps, True, None)
    while not finished:
        try:
            ok, value = True, await loop.run(item)
        except BaseException as e:
            ok, value = False, e
        finished, item = _resume(steps, ok, value)
    result: T = item
    return result


async def gather_or_cancel(coros: Any) -> list[Any]:
    """Run coroutines concurrently; on the first failure cancel the rest, then re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
