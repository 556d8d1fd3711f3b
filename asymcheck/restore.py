"""Find the newest committed checkpoint across tiers and read it back, verified.

Each tensor is read from the fastest tier (policy order) whose manifest is
valid and whose chunks pass their checksums; a missing or corrupt chunk falls
back to the next tier. With no good copy the error names the checkpoint, the
tiers tried and the chunk. Restore never silently returns other data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tiers.base import Tier

from ._loop import gather_or_cancel
from .manifest import (
    ChunkMeta,
    Manifest,
    ManifestError,
    TensorMeta,
    checksum,
    manifest_key,
    parse_manifest_key,
    step_dir,
)
from .state import dtype_from_name, unflatten, unpack_skeleton

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """No tier holds a good copy of what was asked for."""


class ChunkError(ValueError):
    """A chunk failed verification on one tier."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    state: Any
    manifest: Manifest
    sources: dict[str, int]  # tier name -> tensors read from it


async def committed_steps(tier: Tier) -> list[int]:
    """Steps with a manifest on ``tier``, ascending."""
    steps = (parse_manifest_key(k) for k in await tier.list("step-"))
    return sorted(s for s in steps if s is not None)


async def read_manifest(tier: Tier, step: int) -> Manifest:
    key = manifest_key(step)
    data = await tier.get(key)
    manifest = Manifest.from_bytes(data, source=f"{tier.name}:{key}")
    if manifest.step != step:
        raise ManifestError(f"{tier.name}:{key}: manifest is for step {manifest.step}")
    return manifest


async def steps_by_tier(tiers: Sequence[Tier]) -> dict[int, list[Tier]]:
    """Every committed step and the tiers holding it (fastest first). Unreachable tiers are
    logged and skipped, so a remote outage never blocks a restore from a near tier."""
    listed = await asyncio.gather(*(committed_steps(t) for t in tiers), return_exceptions=True)
    found: dict[int, list[Tier]] = {}
    for tier, steps in zip(tiers, listed, strict=True):
        if isinstance(steps, BaseException):
            if not isinstance(steps, Exception):
                raise steps
            log.warning("tier %s could not be listed, skipping it: %s", tier.name, steps)
            continue
        for s in steps:
            found.setdefault(s, []).append(tier)
    return found


def empty_tensor(meta: TensorMeta) -> torch.Tensor:
    """A fresh CPU tensor of the manifest's dtype and shape."""
    return torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    if t.numel() == 0:
        return memoryview(bytearray(0))
    array = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array.data).cast("B")


async def read_chunk(tier: Tier, step: int, chunk: ChunkMeta, out: memoryview) -> None:
    """Read one chunk into ``out`` (its decoded bytes) and verify its checksum."""
    key = f"{step_dir(step)}/{chunk.file}"
    if chunk.codec != "raw":
        raise ChunkError(f"codec {chunk.codec!r} is not supported by this build")
    if chunk.raw_len:
        await tier.readinto(key, out, chunk.offset)
    actual = await asyncio.to_thread(checksum, out)
    if actual != chunk.xxh64:
        raise ChunkError(f"checksum mismatch in {tier.name}:{key} at offset {chunk.offset} "
                         f"({chunk.raw_len} bytes)")


async def read_tensor(tier: Tier, step: int, meta: TensorMeta, out: torch.Tensor) -> None:
    view = tensor_bytes(out)
    for chunk in meta.chunks:
        await read_chunk(tier, step, chunk, view[chunk.raw_offset:chunk.raw_offset + chunk.raw_len])


def _same_tensors(a: Manifest, b: Manifest) -> bool:
    return a.objects == b.objects and [(t.path, t.dtype, t.shape) for t in a.tensors] == [
        (t.path, t.dtype, t.shape) for t in b.tensors]


async def load_checkpoint(tiers: Sequence[Tier], step: int | None = None, *,
                          max_parallel: int = 8) -> LoadedCheckpoint | None:
    """Read the newest committed checkpoint (or ``step``). None when nothing is committed."""
    found = await steps_by_tier(tiers)
    if step is None:
        if not found:
            return None
        step = max(found)
    elif step not in found:
        raise RestoreError(f"step {step} is not committed on any tier "
                           f"(committed: {sorted(found) or 'none'})")
    holders = found[step]
    copies: list[tuple[Tier, Manifest]] = []
    problems: list[str] = []
    for tier in holders:
        try:
            man = await read_manifest(tier, step)
        except Exception as e:
            problems.append(f"{tier.name}: {e}")
            log.warning("step %d: manifest on %s unusable: %s", step, tier.name, e)
            continue
        if copies and not _same_tensors(copies[0][1], man):
            problems.append(f"{tier.name}: manifest describes other tensors than "
                            f"{copies[0][0].name}'s copy")
            continue
        copies.append((tier, man))
    if not copies:
        raise RestoreError(f"step {step}: no tier holds a readable manifest "
                           f"(tried {', '.join(t.name for t in holders)}): {'; '.join(problems)}")
    reference = copies[0][1]
    tensors = [empty_tensor(m) for m in reference.tensors]
    sources: dict[str, int] = {}
    sem = asyncio.Semaphore(max_parallel)

    async def fetch(i: int) -> None:
        tried = []
        async with sem:
            for tier, man in copies:
                try:
                    await read_tensor(tier, step, man.tensors[i], tensors[i])
                except Exception as e:
                    tried.append(f"{tier.name} ({e})")
                    log.warning("step %d: %s unreadable on %s, trying the next tier: %s",
                                step, man.tensors[i].path, tier.name, e)
                    continue
                sources[tier.name] = sources.get(tier.name, 0) + 1
                return
        raise RestoreError(f"step {step}: no good copy of tensor {reference.tensors[i].path!r}; "
                           f"tried {', '.join(tried)}")

    await gather_or_cancel(fetch(i) for i in range(len(tensors)))
    state = unflatten(unpack_skeleton(reference.objects), tensors)
    return LoadedCheckpoint(step=step, state=state, manifest=reference, sources=sources)
