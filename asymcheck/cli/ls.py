"""``asymcheck ls``: every step directory of each tier, newest first, with its status and size.

A multi-rank checkpoint's sizes are the sums of its shards (from the global manifest), and its
codecs those of its shards' manifests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tiers.base import Tier

from ..errors import UsageError
from ..layout import STEP_PREFIX, group_step_dirs, manifest_key
from ..manifest import Manifest, read_manifest
from ._output import EXIT_OK, dump_json, fmt_bytes, fmt_time, manifest_codecs, table
from ._ranks import read_shard, shard_records
from ._tiers import Session, missing_dir, run_with_tiers


@dataclass
class Entry:
    """One step directory on one tier."""

    step: int
    status: str  # committed | uncommitted | corrupt
    created_s: float | None = None
    stored_bytes: int | None = None
    tensor_bytes: int | None = None
    codecs: list[str] = field(default_factory=list)
    world_size: int | None = None
    job: str | None = None
    error: str | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status, "committed": self.status == "committed",
                "created": fmt_time(self.created_s) if self.created_s else None,
                "created_s": self.created_s, "stored_bytes": self.stored_bytes,
                "tensor_bytes": self.tensor_bytes, "codecs": self.codecs,
                "world_size": self.world_size, "job": self.job, "error": self.error,
                "ranks": self.ranks}


async def describe_committed(session: Session, tier: Tier, m: Manifest) -> Entry:
    """A committed checkpoint: sizes and codecs from its manifest, or its shards'."""
    records = shard_records(m)
    if not records:
        return Entry(m.step, "committed", m.created_s, m.stored_bytes, m.nbytes,
                     manifest_codecs(m), m.world_size, m.job)
    entry = Entry(m.step, "committed", m.created_s, sum(r.stored_bytes for r in records),
                  sum(r.tensor_bytes for r in records), [], m.world_size, m.job,
                  ranks=[{"rank": r.rank, "tensors": r.tensors, "tensor_bytes": r.tensor_bytes,
                          "stored_bytes": r.stored_bytes} for r in records])
    codecs: set[str] = set()
    problems = []
    for r in records:
        shard = session.shard(tier, r.rank)
        if shard is None:
            problems.append(f"rank {r.rank}: its shared-memory directory is not on this host")
            continue
        try:
            codecs.update(manifest_codecs(await read_shard(shard, m.step, r, m.world_size)))
        except Exception as e:
            problems.append(f"rank {r.rank}: {e}")
    entry.codecs = sorted(codecs)
    entry.error = "; ".join(problems) or None
    return entry


async def describe_step(session: Session, tier: Tier, step: int, keys: Sequence[str]) -> Entry:
    if manifest_key(step) in keys:
        try:
            m = await read_manifest(tier, step)
            return await describe_committed(session, tier, m)
        except Exception as e:
            entry = Entry(step, "corrupt", error=str(e))
    else:
        entry = Entry(step, "uncommitted")
    stats = await asyncio.gather(*(tier.stat(k) for k in keys), return_exceptions=True)
    found = [s for s in stats if not isinstance(s, BaseException)]
    entry.stored_bytes = sum(s.size_bytes for s in found)
    entry.created_s = max((s.mtime_s for s in found), default=None)
    return entry


async def scan_tier(session: Session, tier: Tier) -> list[Entry]:
    """Every step directory of ``tier``, newest first."""
    groups = group_step_dirs(await tier.list(STEP_PREFIX))
    entries = await asyncio.gather(*(describe_step(session, tier, s, k)
                                     for s, k in groups.items()))
    return sorted(entries, key=lambda e: e.step, reverse=True)


def cmd_ls(args: argparse.Namespace) -> int:
    async def body(session: Session) -> int:
        report, failed = [], []
        for tier in session.tiers:
            absent = missing_dir(tier)
            doc: dict[str, Any] = {"name": tier.name, "url": tier.url, "exists": absent is None,
                                   "checkpoints": [], "error": None}
            if absent is None:
                try:
                    doc["checkpoints"] = await scan_tier(session, tier)
                except Exception as e:
                    doc["error"] = str(e)
                    failed.append(f"tier {tier.name}: {e}")
            report.append(doc)
        if args.json:
            dump_json({"tiers": [{**d, "checkpoints": [e.to_json() for e in d["checkpoints"]]}
                                 for d in report]}, sys.stdout)
        else:
            print_ls(report)
        if failed:
            raise UsageError("; ".join(failed))
        return EXIT_OK

    return run_with_tiers(args.specs, body)


def print_ls(report: Sequence[dict[str, Any]]) -> None:
    for i, doc in enumerate(report):
        entries: list[Entry] = doc["checkpoints"]
        committed = sum(e.status == "committed" for e in entries)
        print(("\n" if i else "") + f"{doc['name']}  {doc['url']}  ({committed} committed)")
        if doc["error"]:
            print(f"  cannot list: {doc['error']}")
        elif not doc["exists"]:
            print("  no checkpoints (the directory does not exist)")
        elif not entries:
            print("  no checkpoints")
        else:
            rows = [[str(e.step), fmt_time(e.created_s), e.status, fmt_bytes(e.stored_bytes),
                     ",".join(e.codecs) or "-", str(e.world_size or "-")] for e in entries]
            for line in table(["STEP", "CREATED", "STATUS", "STORED", "CODECS", "WORLD"], rows,
                              right=(0, 3, 5)):
                print(line)
            for e in entries:
                if e.error:
                    print(f"  step {e.step}: {e.error}")
