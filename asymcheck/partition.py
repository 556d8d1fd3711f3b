"""Turn a window profile into one partition plan: which state bytes to copy in which window.

ONE list over all windows sums to the state size R. Window k's share is
proportional to its weight (its idle time, scaled by the forward or backward
policy), so short forward windows get small partitions and long backward
windows large ones. Shares below ``min_partition_bytes`` are carried into the
next window; shares above ``max_partition_bytes`` spill forward; the last
window takes what remains, so the sum is exact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .profile import BACKWARD, FORWARD, Profile, Window


@dataclass(frozen=True)
class ForwardPolicy:
    """Forward windows: bytes in proportion to idle time times ``weight``."""

    weight: float = 1.0

    def share(self, window: Window) -> float:
        return window.duration_s * self.weight if window.kind == FORWARD else 0.0


@dataclass(frozen=True)
class BackwardPolicy:
    """Backward windows: bytes in proportion to idle time times ``weight``."""

    weight: float = 1.0

    def share(self, window: Window) -> float:
        return window.duration_s * self.weight if window.kind == BACKWARD else 0.0


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of deferred tensor ``item``."""

    item: int
    start: int
    stop: int


@dataclass(frozen=True)
class Partition:
    window: int
    kind: str
    name: str
    nbytes: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class PartitionPlan:
    partitions: tuple[Partition, ...]  # one per window, in window order (some may be empty)
    total_bytes: int

    def __post_init__(self) -> None:
        if sum(p.nbytes for p in self.partitions) != self.total_bytes:
            raise ValueError("partitions do not sum to the state size")

    def summary(self) -> dict[str, object]:
        """A compact, msgpack/JSON-friendly description (for manifests and tools)."""
        return {"total_bytes": self.total_bytes,
                "windows": [[p.window, p.kind, p.name, p.nbytes] for p in self.partitions
                            if p.nbytes]}

    def __str__(self) -> str:
        rows = [f"{p.window:4d} {p.kind:8s} {p.nbytes:>12d}  {p.name}" for p in self.partitions
                if p.nbytes]
        return "\n".join([f"PartitionPlan: {self.total_bytes} bytes in {len(rows)} windows",
                          *rows])

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def share_bytes(weights: Sequence[float], total_bytes: int, min_partition_bytes: int = 0,
                max_partition_bytes: int | None = None) -> list[int]:
    """Integer shares of ``total_bytes`` proportional to ``weights``; they sum exactly."""
    if total_bytes < 0:
        raise ValueError("total_bytes must be >= 0")
    if max_partition_bytes is not None and max_partition_bytes < max(min_partition_bytes, 1):
        raise ValueError("max_partition_bytes must be >= min_partition_bytes and > 0")
    n = len(weights)
    if n == 0:
        raise ValueError("a plan needs at least one window")
    w_total = sum(weights)
    if w_total <= 0:
        weights, w_total = [1.0] * n, float(n)
    shares, carry, given, cum_w = [], 0, 0, 0.0
    for i, w in enumerate(weights):
        cum_w += w
        ideal = round(total_bytes * cum_w / w_total) - given - carry
        want = max(ideal, 0) + carry
        if i == n - 1:
            want = total_bytes - given
        elif want < min_partition_bytes:
            carry, want = want, 0
        else:
            carry = 0
            if max_partition_bytes is not None and want > max_partition_bytes:
                carry, want = want - max_partition_bytes, max_partition_bytes
        shares.append(want)
        given += want
    return shares


def make_plan(profile: Profile, item_bytes: Sequence[int], *,
              forward: ForwardPolicy = ForwardPolicy(), backward: BackwardPolicy = BackwardPolicy(),
              min_partition_bytes: int = 256 << 10,
              max_partition_bytes: int | None = None) -> PartitionPlan:
    """Cut the byte stream of the deferred tensors (in order) into one partition per window."""
    weights = [forward.share(w) + backward.share(w) for w in profile.windows]
    total = sum(item_bytes)
    shares = share_bytes(weights, total, min_partition_bytes, max_partition_bytes)
    partitions, item, offset = [], 0, 0
    for k, (window, nbytes) in enumerate(zip(profile.windows, shares, strict=True)):
        pieces, left = [], nbytes
        while left > 0:
            while item_bytes[item] - offset == 0:
                item, offset = item + 1, 0
            take = min(left, item_bytes[item] - offset)
            pieces.append(Piece(item, offset, offset + take))
            offset += take
            left -= take
        partitions.append(Partition(k, window.kind, window.name, nbytes, tuple(pieces)))
    return PartitionPlan(tuple(partitions), total)
