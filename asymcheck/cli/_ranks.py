"""Checkpoints of several ranks, read back: the shard records of a global manifest, and each
rank's shard read as a tier of its own, so the single-rank readers (``asymcheck.restore``)
check it as they check any checkpoint.

A global manifest (``world_size`` > 1) lists no tensors and no files; its ``info["ranks"]``
records each rank's shard: its manifest's xxh64 digest, tensor count, sizes, sections and
delta bases. The shards are ``step-<N>/rank-<r>/`` on a tier the ranks share and
``shm://NAME-rank<r>`` for shared memory (see ``asymcheck.layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiers.base import Tier

from ..errors import ManifestError
from ..layout import manifest_key
from ..manifest import Manifest, checksum


@dataclass(frozen=True)
class ShardRecord:
    """What a global manifest records of one rank's shard."""

    rank: int
    xxh64: int  # of the shard's manifest
    tensors: int
    tensor_bytes: int
    stored_bytes: int
    sections: dict[str, int]
    base_steps: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "tensors": self.tensors, "tensor_bytes": self.tensor_bytes,
                "stored_bytes": self.stored_bytes, "sections": self.sections,
                "base_steps": list(self.base_steps), "xxh64": f"{self.xxh64:016x}"}


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _record(raw: Any) -> ShardRecord:
    if not isinstance(raw, dict):
        raise TypeError(f"{type(raw).__name__} is not a map")
    sections = raw.get("sections", {})
    if not isinstance(sections, dict):
        raise TypeError("sections is not a map")
    return ShardRecord(rank=_count(raw["rank"]), xxh64=_count(raw["xxh64"]),
                       tensors=_count(raw["tensors"]), tensor_bytes=_count(raw["tensor_bytes"]),
                       stored_bytes=_count(raw["stored_bytes"]),
                       sections={str(k): _count(v) for k, v in sections.items()},
                       base_steps=tuple(_count(b) for b in raw.get("base_steps", [])))


def shard_records(m: Manifest) -> list[ShardRecord]:
    """Each rank's shard as the global manifest ``m`` records it, in rank order; [] for a
    checkpoint saved by one process."""
    if m.world_size == 1:
        return []
    ranks = m.info.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != m.world_size:
        listed = len(ranks) if isinstance(ranks, list) else "no"
        raise ManifestError(f"step {m.step}: the global manifest of {m.world_size} ranks lists "
                            f"{listed} shard(s)")
    records = []
    for i, raw in enumerate(ranks):
        try:
            record = _record(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"step {m.step}: shard record {i} of the global manifest is "
                                f"malformed ({type(e).__name__}: {e})") from None
        if record.rank != i:
            raise ManifestError(f"step {m.step}: shard record {i} names rank {record.rank}")
        records.append(record)
    return records


async def read_shard(shard: Tier, step: int, record: ShardRecord, world_size: int) -> Manifest:
    """Rank ``record.rank``'s shard manifest of ``step`` on ``shard``: the very one the global
    manifest records (the same xxh64 digest, as a restore requires)."""
    key = manifest_key(step)
    where = f"{shard.name}:{key} of rank {record.rank}"
    data = await shard.get(key)
    digest = checksum(data)
    if digest != record.xxh64:
        raise ManifestError(f"{where}: the shard manifest is not the one the global manifest "
                            f"records (xxh64 {digest:016x}, recorded {record.xxh64:016x})")
    man = Manifest.from_bytes(data, source=where)
    if man.step != step or man.world_size != world_size:
        raise ManifestError(f"{where}: the shard manifest is of step {man.step} and world size "
                            f"{man.world_size}, not step {step} of {world_size} ranks")
    return man
