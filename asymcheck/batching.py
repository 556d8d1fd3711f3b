"""Batch files: stored data coalesced into files of a target size, written as they fill.

Many small tensors become a few files of the cost model's size B* instead of one file each.
Raw tensors that lie back to back in a host file are written as one slice of it, recorded as a
``Segment``, so their chunk tables stay as they are. A flush that fails removes the files it
wrote (``remove_written``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from tiers.base import Tier
from tiers.local import DIRECT_ALIGN

from .layout import data_name, manifest_key, step_dir, step_key
from .manifest import FileMeta, Segment, read_manifest

log = logging.getLogger(__name__)


class BatchWriter:
    """Packs stored data into files of about ``target_bytes``, with up to
    ``tier.concurrent_puts`` writes in flight.

    Raw tensors that lie back to back in a host file are written as one slice of it
    (alignment padding included), so many small tensors cost one buffer, not one each.
    """

    def __init__(self, tier: Tier, step: int, save_id: str, target_bytes: int | None,
                 on_write: Callable[[int, float], None]) -> None:
        self._tier, self._step, self._save_id = tier, step, save_id
        self._target = target_bytes
        self._on_write = on_write
        self._parts: list[Any] = []
        self._size = 0  # bytes in _parts, not counting the open region
        self._region: list[Any] | None = None  # [host file, host view, start, end]
        self._index = 0
        self._inflight: collections.deque[asyncio.Task[None]] = collections.deque()
        self.files: list[FileMeta] = []
        self.segments: list[Segment] = []

    @property
    def _name(self) -> str:
        return data_name(self._save_id, self._index)

    def _close_region(self) -> None:
        if self._region is not None:
            src, view, start, end = self._region
            self.segments.append(Segment(src, start, end, self._name, self._size))
            self._parts.append(view[start:end])
            self._size += end - start
            self._region = None

    @property
    def _pending(self) -> int:
        region = self._region
        return self._size + (region[3] - region[2] if region is not None else 0)

    async def add(self, data: Any) -> tuple[str, int]:
        """Append a stored buffer; returns (file, offset) where it will live."""
        self._close_region()
        where = (self._name, self._size)
        self._parts.append(data)
        self._size += memoryview(data).nbytes
        await self._maybe_emit()
        return where

    async def add_raw(self, src: str, view: memoryview, start: int, end: int) -> None:
        """Append bytes [start, end) of host file ``src`` (recorded as a segment); adjacent
        ranges share one slice and one segment."""
        region = self._region
        if region is not None and region[0] == src and 0 <= start - region[3] < DIRECT_ALIGN:
            region[3] = end
        else:
            self._close_region()
            self._region = [src, view, start, end]
        await self._maybe_emit()

    async def _maybe_emit(self) -> None:
        if self._target is not None and self._pending >= self._target:
            await self._emit()

    async def end_tensor(self) -> None:
        if self._target is None and self._pending:  # unbatched: a file per tensor
            await self._emit()

    async def _emit(self) -> None:
        self._close_region()
        while len(self._inflight) >= max(1, self._tier.concurrent_puts):
            await self._inflight.popleft()
        name, parts, size = self._name, self._parts, self._size
        self.files.append(FileMeta(name, size))
        self._parts, self._size, self._index = [], 0, self._index + 1
        self._inflight.append(asyncio.ensure_future(self._write(name, parts, size)))

    async def _write(self, name: str, parts: list[Any], size: int) -> None:
        t0 = time.perf_counter()
        await self._tier.put(step_key(self._step, name), parts)
        self._on_write(size, time.perf_counter() - t0)

    async def drain(self) -> None:
        """Write everything added so far (the buffers it was given may then be freed)."""
        if self._pending:
            await self._emit()
        while self._inflight:
            await self._inflight.popleft()

    async def finish(self) -> list[FileMeta]:
        if not self.files:
            await self._emit()  # at least one file, even for an empty state
        await self.drain()
        return self.files

    async def cancel(self) -> None:
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._inflight.clear()


async def remove_written(tier: Tier, step: int, files: Sequence[FileMeta]) -> None:
    """Best effort, after a flush of ``step`` failed: delete the data ``files`` it put on
    ``tier``. A file that a committed manifest of ``step`` on the tier lists stays."""
    sd = step_dir(step)
    try:
        listed = await tier.list(sd + "/")
        committed: set[str] = set()
        if manifest_key(step) in listed:
            committed = {f.key for f in (await read_manifest(tier, step)).files}
        for f in files:
            key = f"{sd}/{f.key}"
            if key in listed and f.key not in committed:
                await tier.delete(key)
    except Exception as e:
        log.warning("could not remove the data files of the failed flush of step %d from %s: "
                    "%s", step, tier.name, e)
