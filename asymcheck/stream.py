"""States larger than the host budget: staged and written in pieces, never over budget.

A checkpoint is staged whole only if two fit the host budget (the newest committed one stays
while the next is copied). A larger state is copied in pieces of a quarter of the budget;
each piece is checksummed, written to every scheduled downstream tier, then freed. The
training thread waits while the budget is full: that wait is the stall. The manifest of each
tier is written once every piece is there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import torch

from tiers.host import HostBlock

from ._loop import Steps
from .commit import Committer
from .errors import CheckpointError
from .handle import SaveHandle
from .layout import data_name, manifest_key, step_key
from .manifest import ChunkMeta, FileMeta, TensorMeta
from .snapshot import block_tensor
from .stager import Prepared

Pieces = list[concurrent.futures.Future[list[tuple[int, ChunkMeta]]]]


def save_in_pieces(committer: Committer, prep: Prepared) -> Steps[SaveHandle]:
    """Copy the state in pieces (training thread) and stream each to the downstream tiers."""
    host = committer.host
    assert host.capacity_bytes is not None
    downstream = prep.handle.tiers
    if not downstream:
        raise CheckpointError(
            f"step {prep.step}: {prep.layout.total_bytes} bytes of state exceed the host "
            f"budget of {host.capacity_bytes} bytes and no other tier takes this save")
    handle = prep.handle
    piece_bytes = max(host.capacity_bytes // 4, 64 << 10)
    pieces: Pieces = []
    failed: dict[str, BaseException] = {}
    for i, segments in enumerate(prep.layout.pieces(piece_bytes)):
        name = data_name(prep.save_id, i)
        block: HostBlock = yield host.reserve(step_key(prep.step, name),
                                              sum(n for _, _, n in segments))
        target = block_tensor(block.view)
        pos = 0
        for slot_index, start, n in segments:
            src = prep.tensors[slot_index].detach().contiguous().reshape(-1)
            target[pos:pos + n].copy_(src.view(torch.uint8)[start:start + n])
            pos += n
        pieces.append(committer.loop.submit(
            _write_piece(committer, prep, block, name, segments, downstream, failed)))
    handle.stall_s = time.perf_counter() - prep.started_s
    handle.metrics.update(mode="streaming", save_stall_s=handle.stall_s,
                          stall_s=handle.stall_s, state_bytes=prep.layout.total_bytes,
                          tensors=len(prep.tensors), pieces=len(pieces), piece_bytes=piece_bytes)
    handle.staged.set_done()
    committer.track(committer.loop.submit(_commit(committer, prep, pieces, downstream, failed)))
    return handle


async def _write_piece(committer: Committer, prep: Prepared, block: HostBlock, name: str,
                       segments: list[tuple[int, int, int]], downstream: tuple[str, ...],
                       failed: dict[str, BaseException]) -> list[tuple[int, ChunkMeta]]:
    """Checksum one piece, write it to every downstream tier, then free its host memory."""
    try:
        chunks = await asyncio.to_thread(prep.layout.piece_chunks, block.view, name, segments)
        for tier_name in downstream:
            if tier_name in failed:
                continue
            try:
                await committer.tiers[tier_name].put(step_key(prep.step, name), block.view)
            except Exception as e:
                failed.setdefault(tier_name, e)
        return chunks
    finally:
        await block.abort()


async def _commit(committer: Committer, prep: Prepared, pieces: Pieces,
                  downstream: tuple[str, ...], failed: dict[str, BaseException]) -> None:
    handle = prep.handle
    try:
        results = [await asyncio.wrap_future(p) for p in pieces]
    except BaseException as e:
        committer.fail(handle, [t for t in downstream if t not in failed], e)
        for t, err in failed.items():
            committer.topology.resolve(handle, t, err)
        raise
    by_slot: dict[int, list[ChunkMeta]] = {}
    files = []
    for i, chunks in enumerate(results):
        files.append(FileMeta(data_name(prep.save_id, i), sum(c.stored_len for _, c in chunks)))
        for slot_index, chunk in chunks:
            by_slot.setdefault(slot_index, []).append(chunk)
    tensors = tuple(
        TensorMeta(s.path, s.dtype, s.shape, s.nbytes,
                   tuple(sorted(by_slot.get(i, []), key=lambda c: c.raw_offset)))
        for i, s in enumerate(prep.layout.slots))
    data = committer.manifest(prep, tensors, tuple(files), streamed=True).to_bytes()
    for tier_name in downstream:
        if tier_name in failed:
            committer.fail(handle, (tier_name,), failed[tier_name])
            continue
        try:
            await committer.tiers[tier_name].put(manifest_key(prep.step), data)
        except Exception as e:
            committer.fail(handle, (tier_name,), e)
            continue
        committer.topology.resolve(handle, tier_name, None)
        await committer.retain(committer.tiers[tier_name])
