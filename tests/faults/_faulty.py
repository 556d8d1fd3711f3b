"""A real LocalTier that injects faults: delays, errors on the Nth call, a full disk.

Served as ``faulty:///abs/path`` once the ``faulty_scheme`` fixture registered it; the policy
names a plan with ``options = {"plan": "<token>"}`` and the test keeps the FaultPlan to steer
it and to read what was injected.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tiers.base import Payload, payload_parts, payload_size
from tiers.local import LocalTier

PLANS: dict[str, FaultPlan] = {}
_tokens = itertools.count()


@dataclass
class FaultPlan:
    """Which calls of a tier misbehave. ``ops`` and ``keys`` (substrings) select the calls;
    each selected call is delayed by ``delay_s``; the calls numbered in ``fail_on`` (1-based,
    counted over selected calls) raise OSError(``errno``); ``fail_all`` makes every one fail
    (the tier is down); ``space_bytes`` emulates a disk of that many free bytes for puts."""

    ops: tuple[str, ...] = ("put",)
    keys: tuple[str, ...] = ("",)
    delay_s: float = 0.0
    fail_on: frozenset[int] = frozenset()
    fail_all: bool = False
    errno: int = errno.EIO
    space_bytes: int | None = None
    calls: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    def register(self) -> str:
        token = f"plan-{next(_tokens)}"
        PLANS[token] = self
        return token

    def selects(self, op: str, key: str) -> bool:
        return op in self.ops and any(k in key for k in self.keys)

    async def before(self, tier: str, op: str, key: str, nbytes: int = 0) -> None:
        if self.space_bytes is not None and op == "put":
            if nbytes > self.space_bytes:
                self.injected["enospc"] += 1
                raise OSError(errno.ENOSPC, f"{tier}: put {key!r} failed: "
                              f"{os.strerror(errno.ENOSPC)}")
            self.space_bytes -= nbytes
        if not self.selects(op, key):
            return
        self.calls += 1
        if self.delay_s:
            self.injected["slow"] += 1
            await asyncio.sleep(self.delay_s)
        if self.fail_all or self.calls in self.fail_on:
            self.injected["raise"] += 1
            raise OSError(self.errno, f"{tier}: {op} {key!r} failed: injected fault "
                          f"(call {self.calls}): {os.strerror(self.errno)}")

    def freed(self, nbytes: int) -> None:
        if self.space_bytes is not None:
            self.space_bytes += nbytes


class FaultyLocalTier(LocalTier):
    scheme = "faulty"

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None, plan: str, **options: Any) -> None:
        super().__init__(url, name=name, capacity_bytes=capacity_bytes, **options)
        self.plan = PLANS[plan]

    async def put(self, key: str, data: Payload) -> None:
        parts = payload_parts(data)
        await self.plan.before(self.name, "put", key, payload_size(parts))
        await super().put(key, parts)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await self.plan.before(self.name, "get", key)
        return await super().get(key, offset, length)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        await self.plan.before(self.name, "get", key)
        await super().readinto(key, out, offset)

    async def delete(self, key: str) -> None:
        await self.plan.before(self.name, "delete", key)
        size = (await self.stat(key)).size_bytes
        await super().delete(key)
        self.plan.freed(size)

    async def list(self, prefix: str = "") -> list[str]:
        await self.plan.before(self.name, "list", prefix)
        return await super().list(prefix)
