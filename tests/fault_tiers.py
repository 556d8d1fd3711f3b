"""Fault-injecting tiers for tests and benchmarks: real local files, plus delays or errors.

``slowfile:///path`` writes like ``file://`` but throttled to ``bandwidth_bps`` (option);
``failfile:///path`` raises EIO on every put before anything becomes visible.
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


_SCHEMES = {"slowfile": "ThrottledTier", "failfile": "FailingTier"}


def register() -> None:
    for scheme, cls in _SCHEMES.items():
        registry.TIER_CLASSES[scheme] = (__name__, cls, "")


def unregister() -> None:
    for scheme in _SCHEMES:
        registry.TIER_CLASSES.pop(scheme, None)
