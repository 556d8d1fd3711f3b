"""``asymcheck inspect``: one checkpoint's manifest, from the first tier holding a good copy.

For a multi-rank checkpoint it shows the global manifest: the total size and one row per
rank's shard; ``--rank R`` shows rank R's shard manifest (its tensors and files) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from tiers.base import Tier

from ..errors import UsageError
from ..manifest import Manifest
from ._output import (
    EXIT_OK,
    chunk_codecs,
    dump_json,
    fmt_bytes,
    fmt_time,
    hex64,
    json_default,
    manifest_codecs,
    table,
)
from ._ranks import ShardRecord, read_shard, shard_records
from ._tiers import Session, first_readable_manifest, pick_step, run_with_tiers, steps_on


def cmd_inspect(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        found = await steps_on(session.tiers)
        step = pick_step(args.step, found)
        tier, m = await first_readable_manifest(
            [t for t in session.tiers if step in found[t.name]], step)
        records = shard_records(m)
        title = f"step {m.step} on {tier.name} ({tier.url})"
        if args.rank is not None:
            m = await read_rank(session, tier, m, records, args.rank)
            title += f", rank {args.rank}'s shard of {len(records)}"
            records = []
        if args.json:
            dump_json(manifest_json(tier, m, records, args.rank), sys.stdout)
        else:
            lines = inspect_ranks(title, m, records) if records else inspect_lines(title, m)
            for line in lines:
                print(line)
        return EXIT_OK

    return run_with_tiers(args.specs, body)


async def read_rank(session: Session, tier: Tier, m: Manifest, records: Sequence[ShardRecord],
                    rank: int) -> Manifest:
    if not records:
        raise UsageError(f"step {m.step} was saved by one process: it has no shards")
    if rank >= len(records):
        raise UsageError(f"step {m.step} was saved by {len(records)} ranks: there is no "
                         f"rank {rank}")
    shard = session.shard(tier, rank)
    if shard is None:
        raise UsageError(f"step {m.step}: rank {rank}'s shared-memory directory on "
                         f"{tier.name} is not on this host")
    return await read_shard(shard, m.step, records[rank], m.world_size)


def manifest_json(tier: Tier, m: Manifest, records: Sequence[ShardRecord],
                  rank: int | None = None) -> dict[str, Any]:
    return {
        "tier": tier.name, "url": tier.url, "step": m.step, "created": fmt_time(m.created_s),
        "created_s": m.created_s, "job": m.job, "world_size": m.world_size, "rank": rank,
        "tensor_bytes": sum(r.tensor_bytes for r in records) if records else m.nbytes,
        "stored_bytes": sum(r.stored_bytes for r in records) if records else m.stored_bytes,
        "shards": [r.to_json() for r in records], "info": m.info,
        "files": [{"key": f.key, "size": f.size} for f in m.files],
        "tensors": [{"path": t.path, "dtype": t.dtype, "shape": list(t.shape),
                     "nbytes": t.nbytes,
                     "chunks": [{"file": c.file, "offset": c.offset, "stored_len": c.stored_len,
                                 "raw_offset": c.raw_offset, "raw_len": c.raw_len,
                                 "xxh64": f"{c.xxh64:016x}", "stored_xxh64": hex64(c.stored_xxh64),
                                 "codec": c.codec, "elem_size": c.elem_size,
                                 "base_step": c.base_step}
                                for c in t.chunks]} for t in m.tensors],
    }


def header_lines(title: str, m: Manifest) -> Iterator[str]:
    yield title
    yield f"  created     {fmt_time(m.created_s)}"
    yield f"  job         {m.job}    world size {m.world_size}"


def inspect_lines(title: str, m: Manifest) -> Iterator[str]:
    info = dict(m.info)
    yield from header_lines(title, m)
    yield (f"  state       {len(m.tensors)} tensors, {fmt_bytes(m.nbytes)}; stored "
           f"{fmt_bytes(m.stored_bytes)} in {len(m.files)} file(s)")
    yield f"  codecs      {', '.join(manifest_codecs(m)) or '-'}"
    if "save_id" in info:
        yield f"  save id     {info.pop('save_id')}"
    if isinstance(info.get("stall_s"), (int, float)):
        yield f"  stall       {info.pop('stall_s') * 1e3:.1f} ms"
    yield ""
    yield "tensors"
    rows = [[t.path, t.dtype, str(list(t.shape)), fmt_bytes(t.nbytes), str(len(t.chunks)),
             ",".join(chunk_codecs(t.chunks)) or "-"] for t in m.tensors]
    yield from table(["PATH", "DTYPE", "SHAPE", "BYTES", "CHUNKS", "CODECS"], rows, right=(3, 4))
    plan = info.pop("plan", None)
    if isinstance(plan, dict):
        yield ""
        yield from plan_lines(plan)
    compression = info.pop("compression", None)
    if isinstance(compression, dict):
        yield ""
        yield from compression_lines(compression)
    yield ""
    yield "files"
    yield from table(["FILE", "SIZE"], [[f.key, fmt_bytes(f.size)] for f in m.files], right=(1,))
    yield from info_lines(info)


def inspect_ranks(title: str, m: Manifest, records: Sequence[ShardRecord]) -> Iterator[str]:
    """A global manifest: the totals, and one row per rank's shard."""
    info = {k: v for k, v in m.info.items()
            if k not in ("ranks", "tensor_bytes", "stored_bytes")}
    yield from header_lines(title, m)
    yield (f"  state       {sum(r.tensors for r in records)} tensors, "
           f"{fmt_bytes(sum(r.tensor_bytes for r in records))}; stored "
           f"{fmt_bytes(sum(r.stored_bytes for r in records))} in {len(records)} shards")
    replicated = info.pop("replicated", None)
    if replicated:
        yield f"  replicated  {', '.join(map(str, replicated))} (saved by rank 0 only)"
    yield ""
    yield "shards"
    rows = [[str(r.rank), str(r.tensors), fmt_bytes(r.tensor_bytes), fmt_bytes(r.stored_bytes),
             ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.sections.items()) or "-"]
            for r in records]
    yield from table(["RANK", "TENSORS", "BYTES", "STORED", "SECTIONS"], rows,
                     right=(0, 1, 2, 3))
    yield from info_lines(info)


def info_lines(info: dict[str, Any]) -> Iterator[str]:
    if not info:
        return
    yield ""
    yield "info"
    for key, value in sorted(info.items()):
        if isinstance(value, dict) and value:
            yield f"  {key}:"
            for k, v in value.items():
                yield f"    {k}: {json.dumps(v, default=json_default)}"
        else:
            yield f"  {key}: {json.dumps(value, default=json_default)}"


def compression_lines(comp: dict[str, Any]) -> Iterator[str]:
    raw, stored = comp.get("raw_bytes"), comp.get("stored_bytes")
    ratio = f"{raw / stored:.3f}x" if isinstance(raw, int) and isinstance(stored, int) and stored \
        else "-"
    kind = "full" if comp.get("full") else f"delta on step(s) {comp.get('base_steps')}"
    yield (f"compression ({comp.get('mode')}, {kind}): {fmt_bytes(raw)} -> {fmt_bytes(stored)}, "
           f"{ratio}")
    rows = [[str(path), str(codec), "-" if est is None else f"{est:.3f}", f"{real:.3f}"]
            for path, codec, est, real in comp.get("decisions", [])
            if isinstance(real, (int, float))]
    if rows:
        yield from table(["PATH", "CODEC", "ESTIMATED", "ACHIEVED"], rows, right=(2, 3))


def plan_lines(plan: dict[str, Any]) -> Iterator[str]:
    windows = [w for w in plan.get("windows", []) if isinstance(w, (list, tuple)) and len(w) == 4]
    by_kind: dict[str, list[int]] = {}
    for _, kind, _, nbytes in windows:
        by_kind.setdefault(str(kind), []).append(int(nbytes))
    yield f"partitions ({fmt_bytes(plan.get('total_bytes'))} planned in {len(windows)} windows)"
    for kind, sizes in by_kind.items():
        yield f"  {kind:<9} {len(sizes):4d} partitions  {fmt_bytes(sum(sizes))}"
    rows = [[str(w), str(kind), fmt_bytes(int(n)), str(name)] for w, kind, name, n in windows]
    if rows:
        yield from table(["WINDOW", "KIND", "BYTES", "NAME"], rows, right=(0, 2))
