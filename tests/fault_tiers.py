"""Fault-injecting tiers for tests and benchmarks: real local files, plus delays or errors.

``slowfile:///path`` writes like ``file://`` but throttled to ``bandwidth_bps`` (option);
``failfile:///path`` raises EIO on every put before anything becomes visible.
``overlapfile:///path`` writes like ``file://`` after a pause (``delay_s``), counting how many
of its puts run at once (``max_concurrent``); ``fail_at=N`` makes the N-th put raise EIO after
its pause, while other puts are still in flight.
``register()`` adds both schemes to the tier registry (undo with ``unregister()``).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from tiers import registry
from tiers.base import Payload, payload_parts, payload_size
from tiers.local import LocalTier


class ThrottledTier(LocalTier):
    scheme = "slowfile"
    concurrent_puts = 1  # a throttled link: one stream at bandwidth_bps

    def __init__(self, url: str, *, bandwidth_bps: float = 50e6, latency_s: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.bandwidth_bps = float(bandwidth_bps)
        self.latency_s = float(latency_s)

    async def put(self, key: str, data: Payload) -> None:
        parts = payload_parts(data)
        await asyncio.sleep(self.latency_s + payload_size(parts) / self.bandwidth_bps)
        await super().put(key, parts)


class FailingTier(LocalTier):
    scheme = "failfile"

    def __init__(self, url: str, *, fail_after: int = 0, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.fail_after = int(fail_after)
        self.puts = 0

    async def put(self, key: str, data: Payload) -> None:
        self.puts += 1
        if self.puts > self.fail_after:
            raise OSError(errno.EIO, f"{self.name}: injected write failure for {key!r}")
        await super().put(key, data)


class OverlapTier(LocalTier):
    scheme = "overlapfile"
    instances: list[OverlapTier] = []

    def __init__(self, url: str, *, delay_s: float = 0.02, fail_at: int = 0,
                 concurrent_puts: int = LocalTier.concurrent_puts, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.delay_s = float(delay_s)
        self.fail_at = int(fail_at)
        self.concurrent_puts = int(concurrent_puts)
        self.puts = self.running = self.max_concurrent = 0
        OverlapTier.instances.append(self)

    async def put(self, key: str, data: Payload) -> None:
        self.puts += 1
        n = self.puts
        self.running += 1
        self.max_concurrent = max(self.max_concurrent, self.running)
        try:
            await asyncio.sleep(self.delay_s)
            if n == self.fail_at:
                raise OSError(errno.EIO, f"{self.name}: injected failure of put {n} ({key!r})")
            await super().put(key, data)
        finally:
            self.running -= 1


_SCHEMES = {"slowfile": "ThrottledTier", "failfile": "FailingTier",
            "overlapfile": "OverlapTier"}


def register() -> None:
    for scheme, cls in _SCHEMES.items():
        registry.TIER_CLASSES[scheme] = (__name__, cls, "")


def unregister() -> None:
    for scheme in _SCHEMES:
        registry.TIER_CLASSES.pop(scheme, None)
