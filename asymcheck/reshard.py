"""Restore into the current placement, at any world size.

A checkpoint saved by ``W`` ranks holds one shard per rank. A rank restoring it reads its
*primary* shard (its own rank's, or rank 0's when the saving job had fewer ranks): the
non-tensor state, the plain tensors and the sharded chunks already placed as the target wants
them. Every other sharded tensor is rebuilt for the target's placement (a DTensor's local chunk,
or the whole tensor for a plain target) from the saved chunks that overlap it: for each, only
the whole chunks of its stored bytes that cover the overlap are read (ranged reads), verified,
and copied into place. Sections the saving job wrote on rank 0 only (``replicated``) come from
rank 0's shard.

Plain tensors that differ between ranks cannot be resharded, so a checkpoint of several ranks
without sharded tensors restores at its own world size only (or with one rank).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tiers.base import Tier
from tiers.registry import open_tier

from ._loop import gather_or_cancel
from .errors import RestoreError
from .layout import host_shard_url
from .manifest import Manifest
from .policy import Policy
from .rankview import RankScopedTier
from .restore import (
    CopyReader,
    LoadedCheckpoint,
    decode_pool,
    pick_step,
    steps_by_tier,
    verified_copies,
    world_size_error,
)
from .sharding import Box, ShardRef, byte_span, local_box, overlap, place, rebuild
from .state import TensorRef, dtype_from_name, leaves, map_leaves, unflatten, unpack_skeleton
from .statedict import MODEL, REPLICABLE, param_path

log = logging.getLogger(__name__)

#: path -> the tensor a restored value must match (a DTensor: its placement too)
Targets = Mapping[str, torch.Tensor]


@dataclass
class _Held:
    """A sharded leaf of the primary shard, with its stored chunk when that was read."""

    ref: ShardRef
    tensor: torch.Tensor | None


@dataclass
class _Shard:
    rank: int
    reader: CopyReader
    skeleton: Any
    refs: dict[str, ShardRef]  # the sharded chunks this rank stored, by path

    @property
    def manifest(self) -> Manifest:
        return self.reader.manifest


class ShardViews:
    """Readers of one saved rank's shard on every tier of ``policy`` (nearest first).

    ``bases`` are the tiers as every rank sees them (unscoped; the host tier only where this
    process opened it whole); ``own`` this rank's own shard views, used for its own shard.
    Readers of another rank's host directory are opened when that directory is on this host."""

    def __init__(self, policy: Policy, bases: Mapping[str, Tier],
                 own: Mapping[str, Tier] | None = None, rank: int = 0) -> None:
        self.policy, self.bases, self.own, self.rank = policy, bases, own, rank
        self._opened: dict[str, Tier | None] = {}

    def __call__(self, saved_rank: int, saved_world: int, names: Sequence[str]) -> list[Tier]:
        out = []
        for i, tp in enumerate(self.policy.tiers):
            if tp.name not in names:
                continue
            tier: Tier | None
            if self.own is not None and saved_rank == self.rank and saved_world > 1:
                tier = self.own.get(tp.name)
            elif i == 0:
                url = tp.url if saved_world == 1 else host_shard_url(tp.url, saved_rank)
                tier = self.bases.get(tp.name) if saved_world == 1 else None
                tier = tier if tier is not None else self._host_reader(url, tp.name, tp.options)
            elif saved_world == 1:
                tier = self.bases.get(tp.name)
            else:
                tier = RankScopedTier(self.bases[tp.name], saved_rank)
            if tier is not None:
                out.append(tier)
        return out

    def _host_reader(self, url: str, name: str, options: Mapping[str, Any]) -> Tier | None:
        if url not in self._opened:
            reader = open_tier(url, name=name, **options)
            on_host = reader.local_dir is None or reader.local_dir.exists()
            self._opened[url] = reader if on_host else None  # else: on another host
        return self._opened[url]

    async def close(self) -> None:
        for tier in self._opened.values():
            if tier is not None:
                with contextlib.suppress(Exception):
                    await tier.close()
        self._opened.clear()


#: (saved rank) -> its shard's tiers, nearest first
Views = Callable[[int], Sequence[Tier]]


class Placer:
    """Restores one checkpoint on one rank into the targets' placement (see the module doc).

    ``digests`` (tier name -> one xxh64 per saved rank) are the shard manifests the global
    commit recorded; None for a checkpoint of one process, whose manifest is the commit."""

    def __init__(self, step: int, saved_world: int, views: Views, *, rank: int, world: int,
                 targets: Targets | None,
                 digests: Mapping[str, Sequence[int]] | None = None) -> None:
        self.step, self.saved_world, self.views = step, saved_world, views
        self.rank, self.world, self.targets = rank, world, targets
        self.digests = digests
        self.sources: dict[str, int] = {}
        self._shards: dict[int, asyncio.Future[_Shard]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def load(self) -> LoadedCheckpoint:
        self._pool = decode_pool()
        try:
            return await self._load()
        finally:
            self._pool.shutdown(wait=True)

    # ----------------------------------------------------------------- shards
    async def _shard(self, q: int) -> _Shard:
        if q not in self._shards:
            self._shards[q] = asyncio.ensure_future(self._open(q))
        return await self._shards[q]

    async def _open(self, q: int) -> _Shard:
        tiers = self.views(q)
        digests = None if self.digests is None else {
            name: int(d[q]) for name, d in self.digests.items() if q < len(d)}
        try:
            copies = await verified_copies(tiers, self.step, digests)
        except RestoreError as e:
            raise RestoreError(f"step {self.step}: the shard of saved rank {q} is unreadable: "
                               f"{e}") from None
        assert self._pool is not None
        reader = CopyReader(self.step, copies, self._pool, self.sources)
        skeleton = unpack_skeleton(reader.manifest.objects)
        refs = {path: ref for path, ref in leaves(skeleton)
                if isinstance(ref, ShardRef) and ref.index >= 0}
        return _Shard(q, reader, skeleton, refs)

    # ------------------------------------------------------------------- load
    async def _load(self) -> LoadedCheckpoint:
        primary = await self._shard(self.rank if self.rank < self.saved_world else 0)
        found = leaves(primary.skeleton)
        sharded = any(isinstance(ref, ShardRef) for _, ref in found)  # see has_shards
        if self.saved_world not in (1, self.world) and not sharded and self.targets is not None:
            raise world_size_error(self.step, self.saved_world, self.world)
        state = await self._read(primary, found)
        replicated = primary.manifest.info.get("replicated", [])
        if primary.rank != 0 and replicated:
            rank0 = await self._shard(0)
            wanted = tuple(f"{n}/" if n in REPLICABLE else f"extras/{n}/" for n in replicated)
            part = await self._read(rank0, [(p, r) for p, r in leaves(rank0.skeleton)
                                            if p.startswith(wanted)])
            for n in replicated:
                if n in REPLICABLE:
                    state[n] = part[n]
                else:
                    state["extras"][n] = part["extras"][n]
        if self.targets is not None:
            self._check_keys(state)
        placed = await self._place(state)
        shards = [f.result() for f in self._shards.values()
                  if f.done() and not f.cancelled() and f.exception() is None]
        return LoadedCheckpoint(step=self.step, state=placed, manifest=primary.manifest,
                                sources=self.sources,
                                read_bytes=sum(s.reader.read_bytes for s in shards))

    async def _read(self, shard: _Shard, found: Sequence[tuple[str, Any]]) -> Any:
        """``shard``'s state with the tensors of ``found`` read: plain ones, and sharded chunks
        placed as their target wants them; other sharded leaves stay ``_Held``."""
        wanted = {path for path, ref in found if isinstance(ref, TensorRef) or (
            ref.index >= 0 and ref.box == self._box(path, ref.global_shape))}
        paths = {i: m.path for i, m in enumerate(shard.manifest.tensors)}
        tensors = await shard.reader.read_all(lambda p: p in wanted)

        def held(path: str, ref: ShardRef) -> _Held:
            t = tensors[ref.index] if ref.index >= 0 and paths[ref.index] in wanted else None
            return _Held(ref, t)

        return unflatten(shard.skeleton, tensors, shard=held)

    # ------------------------------------------------------------ placement
    def _target(self, path: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """What ``path`` restores into: the model's tensor, or for optimizer state the
        parameter's (when the shapes agree); None for state that has no target."""
        if self.targets is None:
            return None
        target = self.targets.get(path)
        if target is None:
            owner = param_path(path)
            target = self.targets.get(owner) if owner is not None else None
            if target is not None and tuple(target.shape) != shape:
                return None
        return target

    def _box(self, path: str, shape: tuple[int, ...]) -> Box:
        target = self._target(path, shape)
        return local_box(target) if target is not None else ((0,) * len(shape), shape)

    def _check_keys(self, state: Any) -> None:
        """One line naming the first key or global shape the model and checkpoint disagree on."""
        assert self.targets is not None
        model = state.get(MODEL) if isinstance(state, dict) else None
        if not isinstance(model, dict):
            return
        saved = {f"{MODEL}/{k}": v for k, v in model.items()}
        for path, value in saved.items():
            shape = value.ref.global_shape if isinstance(value, _Held) else \
                tuple(value.shape) if isinstance(value, torch.Tensor) else None
            if shape is None:
                continue
            target = self.targets.get(path)
            if target is None:
                raise RestoreError(f"step {self.step}: checkpoint key {path[len(MODEL) + 1:]!r} "
                                   f"(shape {list(shape)}) is not in the model")
            if tuple(target.shape) != shape:
                raise RestoreError(f"step {self.step}: {path[len(MODEL) + 1:]!r} has shape "
                                   f"{list(shape)} in the checkpoint and "
                                   f"{list(target.shape)} in the model")
        for path, target in self.targets.items():
            if path.startswith(f"{MODEL}/") and path not in saved:
                raise RestoreError(f"step {self.step}: model key {path[len(MODEL) + 1:]!r} "
                                   f"(shape {list(target.shape)}) is not in the checkpoint")

    async def _place(self, state: Any) -> Any:
        jobs: dict[str, asyncio.Future[torch.Tensor]] = {}

        def schedule(obj: Any, path: str) -> Any:
            if isinstance(obj, (_Held, torch.Tensor)):
                jobs[path] = asyncio.ensure_future(self._value(path, obj))
            return obj

        map_leaves(state, schedule)
        await gather_or_cancel(jobs.values())
        return map_leaves(state, lambda obj, path: jobs[path].result() if path in jobs else obj)

    async def _value(self, path: str, value: _Held | torch.Tensor) -> torch.Tensor:
        shape = value.ref.global_shape if isinstance(value, _Held) else tuple(value.shape)
        target = self._target(path, shape)
        box = local_box(target) if target is not None else ((0,) * len(shape), shape)
        if isinstance(value, torch.Tensor):  # a plain tensor: the target's part of it
            local = value
            if box[1] != shape:
                local = value[tuple(slice(o, o + n) for o, n in zip(*box, strict=True))]
                local = local.contiguous()
        elif value.tensor is not None:
            local = value.tensor
        else:
            local = await self._gather(path, value.ref, box)
        return rebuild(local, target) if target is not None else local

    async def _gather(self, path: str, ref: ShardRef, box: Box) -> torch.Tensor:
        """The part ``box`` of sharded tensor ``path`` from every saved chunk overlapping it."""
        dtype = dtype_from_name(ref.dtype)
        out = torch.empty(box[1], dtype=dtype)
        shards = await gather_or_cancel(self._shard(q) for q in range(self.saved_world))
        reads = []
        covered = 0
        for shard in shards:
            chunk = shard.refs.get(path)
            part = overlap(chunk.box, box) if chunk is not None else None
            if chunk is None or part is None:
                continue
            if chunk.global_shape != ref.global_shape:
                raise RestoreError(f"step {self.step}: {path!r} has global shape "
                                   f"{list(chunk.global_shape)} in rank {shard.rank}'s shard "
                                   f"and {list(ref.global_shape)} in another")
            covered += _numel(part)
            reads.append(self._read_part(shard, path, chunk, part, box, out))
        if covered != _numel(box):
            raise RestoreError(f"step {self.step}: the saved chunks of {path!r} cover "
                               f"{covered} of the {_numel(box)} elements of region "
                               f"offsets {list(box[0])} sizes {list(box[1])}")
        await gather_or_cancel(reads)
        return out

    async def _read_part(self, shard: _Shard, path: str, chunk: ShardRef, part: Box, box: Box,
                         out: torch.Tensor) -> None:
        itemsize = out.element_size()
        start, stop = byte_span(chunk.box, part, itemsize)
        span = torch.empty(stop - start, dtype=torch.uint8)
        try:
            await shard.reader.read(chunk.index, span, (start, stop))
        except RestoreError as e:
            raise RestoreError(f"{e} (region offsets {list(part[0])} sizes {list(part[1])} of "
                               f"{path!r}, saved rank {shard.rank})") from None
        place(out, box, span.view(out.dtype), chunk.box, part)


def _numel(box: Box) -> int:
    n = 1
    for d in box[1]:
        n *= d
    return n


async def load_single(policy: Policy, tiers: Sequence[Tier], step: int | None,
                      targets: Targets | None) -> LoadedCheckpoint | None:
    """One process restores the newest committed checkpoint of ``tiers`` (or ``step``), saved
    by any number of ranks: a multi-rank checkpoint's global manifest names each rank's shard,
    read through rank-scoped views of the same tiers. None when nothing is committed."""
    found = await steps_by_tier(tiers)
    step = pick_step(found, step)
    if step is None:
        return None
    holders = found[step]
    copies = await verified_copies(holders, step)
    saved_world = copies[0][1].world_size
    if saved_world == 1:
        return await Placer(step, 1, lambda q: [t for t, _ in copies], rank=0, world=1,
                            targets=targets).load()
    digests: dict[str, list[int]] = {}
    for tier, man in copies:
        shards = man.info.get("ranks")
        if man.world_size == saved_world and isinstance(shards, list) \
                and len(shards) == saved_world:
            digests[tier.name] = [int(r["xxh64"]) for r in shards]
    views = ShardViews(policy, {t.name: t for t in tiers})
    try:
        return await Placer(step, saved_world, lambda q: views(q, saved_world, list(digests)),
                            rank=0, world=1, targets=targets, digests=digests).load()
    finally:
        await views.close()


def has_shards(manifest: Manifest) -> bool:
    """Whether a (shard) manifest holds sharded tensors."""
    return any(isinstance(ref, ShardRef) for _, ref in leaves(unpack_skeleton(manifest.objects)))


def model_targets(model: torch.nn.Module | None) -> dict[str, torch.Tensor] | None:
    """The restore targets of ``model`` (None: restore whole tensors as saved)."""
    if model is None:
        return None
    from .statedict import model_state

    return {f"{MODEL}/{k}": v for k, v in model_state(model).items()
            if isinstance(v, torch.Tensor)}


