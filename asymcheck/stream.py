"""States larger than the host budget: staged in pieces and flushed as a stream job.

A checkpoint is staged whole only if two fit the host budget (the newest committed one stays
while the next is copied). A larger state is copied in pieces of a quarter of the budget; each
piece is checksummed once and handed to the flush worker of every scheduled downstream tier as
part of one ``StreamJob``, where it is compressed and batched like any other save
(``FlushScheduler``), then freed into the host tier's pool once every tier wrote it, still
mapped: every piece has a block of the same size, so the next save's pieces are copied into
pages that are already faulted in. For device state each piece's block is page-locked once,
off the training thread, and stays locked while its mapping is pooled. The training thread
waits while the budget is full: that wait is the stall. Each tier commits its manifest once
every piece is written there.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tiers.host import HostBlock

from ._loop import Steps
from .errors import CheckpointError
from .handle import SaveHandle
from .layout import piece_name, step_key
from .manifest import ChunkMeta, Manifest
from .snapshot import Layout, block_tensor
from .stager import Prepared

if TYPE_CHECKING:
    from .commit import Committer


@dataclass
class Piece:
    """One piece of a streamed state in a host block: ``segments`` are (slot, offset in the
    tensor, length), back to back in the block, each with its checksummed chunk."""

    name: str
    block: HostBlock
    segments: list[tuple[int, int, int]]
    chunks: list[ChunkMeta]
    readers: int

    async def release(self) -> None:
        """One tier is done with this piece; the last one frees its block into the host
        tier's pool, where the same piece of the next save is staged through its pages."""
        self.readers -= 1
        if self.readers == 0:
            await self.block.free()


@dataclass
class StreamJob:
    """A save streamed through the host tier in pieces, flushed to ``tiers``."""

    manifest: Manifest  # the fields of every tier's manifest; tensors and files are per tier
    handle: SaveHandle
    layout: Layout
    save_id: str
    piece_bytes: int
    tiers: tuple[str, ...]
    error: BaseException | None = None  # the copy failed: no tier may commit
    _queues: dict[str, asyncio.Queue[Piece | None]] = field(default_factory=dict)
    _adding: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queues = {t: asyncio.Queue() for t in self.tiers}

    async def add(self, name: str, block: HostBlock, segments: list[tuple[int, int, int]]
                  ) -> None:
        """Checksum a copied piece, then queue it for every tier (on the loop)."""
        async def checksum_and_queue() -> None:
            try:
                pairs = await asyncio.to_thread(self.layout.piece_chunks, block.view, name,
                                                segments)
            except BaseException:
                await block.abort()
                raise
            piece = Piece(name, block, segments, [c for _, c in pairs], len(self.tiers))
            for q in self._queues.values():
                q.put_nowait(piece)
        self._adding.append(asyncio.ensure_future(checksum_and_queue()))

    async def end(self) -> None:
        """Every piece is added: the tiers' workers may commit once they wrote them."""
        try:
            await asyncio.gather(*self._adding)
        finally:
            for q in self._queues.values():
                q.put_nowait(None)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    async def next_piece(self, tier: str) -> Piece | None:
        """The next piece for ``tier``; None once every piece was handed out."""
        return await self._queues[tier].get()

    async def discard(self, tier: str) -> None:
        """``tier`` failed: release the pieces it has not taken yet (until the last one)."""
        while (piece := await self.next_piece(tier)) is not None:
            await piece.release()


def save_in_pieces(committer: Committer, prep: Prepared) -> Steps[SaveHandle]:
    """Copy the state in pieces (training thread) and stream each to the downstream tiers."""
    host = committer.host
    assert host.capacity_bytes is not None
    handle = prep.handle
    if not handle.tiers:
        raise CheckpointError(
            f"step {prep.step}: {prep.layout.total_bytes} bytes of state exceed the host "
            f"budget of {host.capacity_bytes} bytes and no other tier takes this save")
    piece_bytes = max(host.capacity_bytes // 4, 64 << 10)
    stage = committer.stage
    stage.page_lock = prep.on_device
    job = StreamJob(committer.manifest(prep, (), (), streamed=True), handle, prep.layout,
                    prep.save_id, piece_bytes, handle.tiers)
    yield committer.hand_off_stream(job)
    count = 0
    try:
        for count, segments in enumerate(prep.layout.pieces(piece_bytes), 1):
            name = piece_name(prep.save_id, count - 1)
            # every piece in a block of the same size (the last one too): a freed piece's
            # block, still mapped, then takes any piece of the next save
            block: HostBlock = yield host.reserve(step_key(prep.step, name), piece_bytes)
            # device state: copied into page-locked memory (a pooled piece stays locked)
            yield stage.ready(block, handle.metrics)
            target = block_tensor(block.view)
            pos = 0
            for slot_index, start, n in segments:
                src = prep.tensors[slot_index].detach().contiguous().reshape(-1)
                target[pos:pos + n].copy_(src.view(torch.uint8)[start:start + n])
                pos += n
            del target  # a live view would keep the block's mapping from going to the pool
            yield job.add(name, block, segments)
    except BaseException as e:
        job.error = e
        handle.staged.set_failed(e)
        raise
    finally:
        committer.track(committer.loop.submit(job.end()))
    handle.stall_s = time.perf_counter() - prep.started_s
    handle.metrics.update(mode="streaming", save_stall_s=handle.stall_s,
                          stall_s=handle.stall_s, state_bytes=prep.layout.total_bytes,
                          tensors=len(prep.tensors), pieces=count, piece_bytes=piece_bytes)
    handle.staged.set_done()
    return handle
