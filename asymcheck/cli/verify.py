"""``asymcheck verify``: read and check every chunk of a checkpoint on every tier holding it.

Every copy is checked as a restore checks it (``asymcheck.restore``: the files' sizes, each
chunk's checksum, each delta against its base). A multi-rank checkpoint is checked shard by
shard: each rank's shard manifest must be the one the global manifest records, and each
fault names its rank. Exit code 1 on any fault.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tiers.base import Tier

from ..errors import UsageError
from ..manifest import ChunkMeta, Manifest, TensorMeta, committed_steps, read_manifest
from ..restore import check_files, empty_tensor, read_base_tensor, read_tensor
from ._output import EXIT_FAULT, EXIT_OK, dump_json, fmt_bytes, progress
from ._ranks import ShardRecord, read_shard, shard_records
from ._tiers import Session, missing_dir, pick_step, run_with_tiers

_VERIFY_TENSORS = 4  # tensors buffered at once while verifying
_VERIFY_CHUNKS = 8  # chunk reads in flight


@dataclass(frozen=True)
class Fault:
    tier: str
    step: int | None  # None: the tier itself failed
    kind: str  # tier | manifest | shard | file | tensor
    name: str  # the file key or tensor path ("" for tier, manifest and shard faults)
    error: str
    chunk: ChunkMeta | None = None
    rank: int | None = None  # the shard of a multi-rank checkpoint

    def line(self) -> str:
        step = "" if self.step is None else f"  step {self.step}"
        rank = "" if self.rank is None else f"  rank {self.rank}"
        what = f"  {self.kind} {self.name}".rstrip()
        at = (f"  chunk {self.chunk.file}@{self.chunk.offset} ({self.chunk.stored_len} bytes)"
              if self.chunk else "")
        return f"FAULT  {self.tier}{step}{rank}{what}{at}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {"tier": self.tier, "step": self.step, "rank": self.rank, "kind": self.kind,
                "name": self.name, "file": c.file if c else None,
                "offset": c.offset if c else None, "stored_len": c.stored_len if c else None,
                "error": self.error}


@dataclass
class Copy:
    """One tier's copy of one checkpoint (every shard of it), and what was found wrong."""

    tier: Tier
    manifest: Manifest
    records: list[ShardRecord]
    tensors: int = 0
    stored_bytes: int = 0
    files: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The bytes to read, for the progress bar."""
        if self.records:
            return sum(r.stored_bytes for r in self.records)
        return sum(c.stored_len for t in self.manifest.tensors for c in t.chunks)

    def summary(self) -> str:
        ranks = f"{len(self.records)} ranks: " if self.records else ""
        return (f"{ranks}{self.tensors} tensors, {fmt_bytes(self.stored_bytes)} in "
                f"{self.files} file(s)")


async def verify_copy(tier: Tier, m: Manifest, bar: Any, rank: int | None = None) -> list[Fault]:
    """Check one checkpoint's files and read every chunk; each checked by ``read_tensor``."""
    faults: list[Fault] = []
    for f in m.files:
        try:
            await check_files(tier, replace(m, files=(f,)))
        except Exception as e:
            faults.append(Fault(tier.name, m.step, "file", f.key, str(e), rank=rank))
    tensor_slots = asyncio.Semaphore(_VERIFY_TENSORS)
    chunk_slots = asyncio.Semaphore(_VERIFY_CHUNKS)

    async def check_chunk(meta: TensorMeta, out: torch.Tensor, chunk: ChunkMeta) -> None:
        async with chunk_slots:
            try:
                await read_tensor(tier, m.step, meta._replace(chunks=(chunk,)), out,
                                  locate=m.locate)
            except Exception as e:
                file, offset = m.locate(chunk)  # where the bytes are on this tier
                faults.append(Fault(tier.name, m.step, "tensor", meta.path, str(e),
                                    chunk._replace(file=file, offset=offset), rank))
            finally:
                bar.update(chunk.stored_len)

    async def read_base(base_step: int, meta: TensorMeta) -> memoryview:
        return await read_base_tensor([tier], base_step, meta)

    async def check_coded(meta: TensorMeta, out: torch.Tensor) -> None:
        """Coded chunks decode together (a delta needs its base): checked as one tensor."""
        async with chunk_slots:
            try:
                await read_tensor(tier, m.step, meta, out, base=read_base, locate=m.locate)
            except Exception as e:
                faults.append(Fault(tier.name, m.step, "tensor", meta.path, str(e), rank=rank))
            finally:
                bar.update(sum(c.stored_len for c in meta.chunks))

    async def check_tensor(meta: TensorMeta) -> None:
        async with tensor_slots:
            out = empty_tensor(meta)
            if any(c.codec != "raw" for c in meta.chunks):
                await check_coded(meta, out)
            else:
                await asyncio.gather(*(check_chunk(meta, out, c) for c in meta.chunks))

    await asyncio.gather(*(check_tensor(t) for t in m.tensors))
    order = {t.path: i for i, t in enumerate(m.tensors)}
    return sorted(faults, key=lambda f: (f.kind == "tensor", order.get(f.name, -1),
                                         f.chunk.raw_offset if f.chunk else -1))


async def verify_shards(session: Session, copy: Copy, bar: Any) -> None:
    """Check every rank's shard of a multi-rank copy, as ``verify_copy`` checks one."""
    tier, m = copy.tier, copy.manifest
    for record in copy.records:
        shard = session.shard(tier, record.rank)
        try:
            if shard is None:
                raise FileNotFoundError("its shared-memory directory is not on this host")
            sm = await read_shard(shard, m.step, record, m.world_size)
        except Exception as e:
            copy.faults.append(Fault(tier.name, m.step, "shard", "", str(e), rank=record.rank))
            continue
        copy.faults.extend(await verify_copy(shard, sm, bar, record.rank))
        copy.tensors += len(sm.tensors)
        copy.stored_bytes += sm.stored_bytes
        copy.files += len(sm.files)


async def verify(session: Session, copy: Copy, bar: Any) -> None:
    if copy.records:
        await verify_shards(session, copy, bar)
        return
    m = copy.manifest
    copy.faults.extend(await verify_copy(copy.tier, m, bar))
    copy.tensors, copy.stored_bytes, copy.files = len(m.tensors), m.stored_bytes, len(m.files)


async def find_steps(tiers: Sequence[Tier], faults: list[Fault]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for tier in tiers:
        try:
            found[tier.name] = [] if missing_dir(tier) else await committed_steps(tier)
        except Exception as e:
            faults.append(Fault(tier.name, None, "tier", "", f"cannot list: {e}"))
            found[tier.name] = []
    return found


async def read_copies(tiers: Sequence[Tier], steps: Sequence[int], found: dict[str, list[int]],
                      faults: list[Fault]) -> list[Copy]:
    copies: list[Copy] = []
    for step in steps:
        for tier in tiers:
            if step in found[tier.name]:
                try:
                    m = await read_manifest(tier, step)
                    copies.append(Copy(tier, m, shard_records(m)))
                except Exception as e:
                    faults.append(Fault(tier.name, step, "manifest", "", str(e)))
    return copies


def cmd_verify(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        faults: list[Fault] = []
        found = await find_steps(session.tiers, faults)
        everywhere = sorted({s for steps in found.values() for s in steps})
        if args.all:
            if not everywhere and not faults:
                raise UsageError(f"no committed checkpoint on tier(s) {', '.join(found)}")
            steps = everywhere
        else:
            steps = [pick_step(args.step, found)]
        copies = await read_copies(session.tiers, steps, found, faults)
        bar = progress(sum(c.total_bytes for c in copies), "verify", args.quiet)
        try:
            for copy in copies:
                await verify(session, copy, bar)
                faults.extend(copy.faults)
        finally:
            bar.close()
        report_verify(args, steps, copies, faults)
        return EXIT_FAULT if faults else EXIT_OK

    return run_with_tiers(args.specs, body)


def report_verify(args: argparse.Namespace, steps: Sequence[int], copies: Sequence[Copy],
                  faults: Sequence[Fault]) -> None:
    if args.json:
        dump_json({"ok": not faults, "steps": list(steps),
                   "copies": [{"tier": c.tier.name, "step": c.manifest.step,
                               "world_size": c.manifest.world_size, "tensors": c.tensors,
                               "stored_bytes": c.stored_bytes, "ok": not c.faults}
                              for c in copies],
                   "faults": [f.to_json() for f in faults]}, sys.stdout)
        return
    for f in faults:
        if not any(f in c.faults for c in copies):
            print(f.line())  # a tier or manifest fault: no copy to report it under
    for c in copies:
        if not c.faults and not args.quiet:
            print(f"ok     {c.tier.name}  step {c.manifest.step}  {c.summary()}")
        for f in c.faults:
            print(f.line())
    if not args.quiet or faults:
        n = len(copies) + sum(f.kind == "manifest" for f in faults)
        print(f"verified {len(steps)} checkpoint(s), {n} cop{'y' if n == 1 else 'ies'}:"
              f" {len(faults)} fault(s)")
