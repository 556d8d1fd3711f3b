"""What a save returns: completion events for "staged" and "durable on tier X"."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any


class Completion:
    """A one-shot event, awaitable from any event loop and waitable from any thread."""

    def __init__(self, what: str, kick: Callable[[], None] | None = None) -> None:
        self.what = what
        self._kick = kick  # completes work that otherwise waits for training to go on
        self._fut: concurrent.futures.Future[None] = concurrent.futures.Future()

    def __await__(self) -> Generator[Any, None, None]:
        if self._kick is not None and not self._fut.done():
            self._kick()
        return asyncio.wrap_future(self._fut).__await__()

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; re-raises the failure. TimeoutError if not done in time."""
        if self._kick is not None and not self._fut.done():
            self._kick()
        try:
            self._fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.what}: not done after {timeout} s") from None

    def done(self) -> bool:
        return self._fut.done()

    def exception(self) -> BaseException | None:
        """The failure of a finished event, None if it succeeded or is still pending."""
        return self._fut.exception() if self._fut.done() else None

    def on_done(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(succeeded)`` once done: in the thread that completes it, or now."""
        self._fut.add_done_callback(lambda f: fn(f.exception() is None))

    def set_done(self) -> None:
        if not self._fut.done():
            self._fut.set_result(None)

    def set_failed(self, exc: BaseException) -> None:
        if not self._fut.done():
            self._fut.set_exception(exc)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self.exception() else "done")
        return f"<Completion {self.what}: {state}>"


@dataclass
class SaveHandle:
    """One save: ``staged`` (training may change the state) and ``durable(tier)`` per tier."""

    step: int
    tiers: tuple[str, ...]
    staged: Completion
    stall_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    _durable: dict[str, Completion] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, step: int, tiers: tuple[str, ...],
               kick: Callable[[], None] | None = None) -> SaveHandle:
        durable = {t: Completion(f"step {step} durable on {t!r}", kick) for t in tiers}
        return cls(step=step, tiers=tiers, staged=Completion(f"step {step} staged", kick),
                   _durable=durable)

    def durable(self, tier: str) -> Completion:
        try:
            return self._durable[tier]
        except KeyError:
            raise KeyError(f"step {self.step} is not scheduled for tier {tier!r} "
                           f"(scheduled: {', '.join(self.tiers)})") from None

    async def wait_all(self) -> None:
        """Await staging and every scheduled tier; raises the first failure."""
        await self.staged
        for tier in self.tiers:
            await self._durable[tier]

    def wait_all_sync(self, timeout: float | None = None) -> None:
        self.staged.wait(timeout)
        for tier in self.tiers:
            self._durable[tier].wait(timeout)
