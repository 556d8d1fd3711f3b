"""Measured cost models: tier write time, codec time, the compression decision, batch size.

Every fit is ``latency + bytes / throughput`` learned online from the operations
the pipeline really performs (so it measures throughput under the training
load, not on an idle machine), starting from a conservative prior.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LinearFit:
    """time(n) = latency_s + n / throughput_bps, fitted to recent (bytes, seconds) samples."""

    latency_s: float
    throughput_bps: float
    window: int = 64
    samples: deque[tuple[int, float]] = field(default_factory=deque)

    def time_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.throughput_bps

    def add(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 0:
            return
        self.samples.append((nbytes, seconds))
        while len(self.samples) > self.window:
            self.samples.popleft()
        self._refit()

    def _refit(self) -> None:
        xs = [float(n) for n, _ in self.samples]
        ys = [t for _, t in self.samples]
        n = len(xs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        var_x = sum((x - mean_x) ** 2 for x in xs)
        if n >= 3 and var_x > 0 and max(xs) > 4 * max(min(xs), 1.0):
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x
            intercept = mean_y - slope * mean_x
            if slope > 0 and intercept > 0:
                self.throughput_bps = 1.0 / slope
                self.latency_s = intercept
                return
        # sizes too alike, or noise in the large writes swamping the small ones' latency (a
        # fit with no positive intercept, which would drive B* to its minimum and keep it
        # there): keep the latency, refit the bandwidth
        busy = sum(ys) - n * self.latency_s
        if busy > 0 and sum(xs) > 0:
            self.throughput_bps = sum(xs) / busy

    def peak_bps(self) -> float:
        """The fastest rate of a recent sample (bytes per second), at least the fit's."""
        return max([self.throughput_bps, *(n / t for n, t in self.samples)])

    def to_dict(self) -> dict[str, float]:
        return {"latency_s": self.latency_s, "throughput_bps": self.throughput_bps,
                "samples": len(self.samples)}


#: priors for a tier's writes by URL scheme: (latency_s, throughput_bps)
TIER_PRIORS = {"file": (0.005, 300e6), "hdfs": (0.02, 100e6), "shm": (0.0002, 3e9),
               **dict.fromkeys(("s3", "gs", "gcs", "abfs", "abfss"), (0.03, 100e6))}


@dataclass
class CostModel:
    """Per-tier write fits and per-codec compression fits, with the decisions built on them."""

    min_compress_bytes: int = 1 << 20
    min_batch_bytes: int = 4 << 20
    max_batch_bytes: int = 256 << 20
    tiers: dict[str, LinearFit] = field(default_factory=dict)
    codecs: dict[str, LinearFit] = field(default_factory=dict)
    seeded: set[str] = field(default_factory=set)

    def tier(self, name: str, scheme: str = "file") -> LinearFit:
        if name not in self.tiers:
            self.tiers[name] = LinearFit(*TIER_PRIORS.get(scheme, TIER_PRIORS["file"]))
        return self.tiers[name]

    def codec(self, name: str, prior_bps: float = 200e6) -> LinearFit:
        if name not in self.codecs:
            self.codecs[name] = LinearFit(0.0, prior_bps)
        return self.codecs[name]

    def seed_codec(self, name: str, nbytes: int, seconds: float) -> None:
        """Replace a codec's prior throughput with one measured on a sample of real data
        (single-threaded, so conservative); a codec with measured compressions keeps its fit."""
        fit = self.codec(name)
        if not fit.samples and nbytes > 0 and seconds > 0:
            fit.throughput_bps, fit.latency_s = nbytes / seconds, 0.0
            self.seeded.add(name)

    def codec_known(self, name: str) -> bool:
        """True once the codec's speed was measured on this job's data."""
        return name in self.seeded or bool(self.codec(name).samples)

    def compression_could_pay(self, tier: str, codec: str, nbytes: int, *,
                              at_best: bool = False) -> bool:
        """T_c(n) < T_w(n): false when even an infinite ratio would not shorten the write, so
        estimating the ratio is not worth its cost. ``at_best``: T_w at the tier's fastest
        recent write, not its fit, for a decision that lasts (a delta base held in host
        memory until the next full checkpoint), which a fit dipping for a save or two, a
        slow fsync under someone else's writeback, must not make."""
        write = self.tiers[tier]
        bps = write.peak_bps() if at_best else write.throughput_bps
        return nbytes >= self.min_compress_bytes and self.codec(codec).time_s(nbytes) < nbytes / bps

    def compression_pays(self, tier: str, codec: str, nbytes: int, ratio: float) -> bool:
        """T_c(n) + T_w(n / ratio) < T_w(n): compress only when it shortens time to durable."""
        if nbytes < self.min_compress_bytes or ratio <= 1.0:
            return False
        write = self.tiers[tier]
        t_raw = nbytes / write.throughput_bps
        t_comp = self.codec(codec).time_s(nbytes) + nbytes / ratio / write.throughput_bps
        return t_comp < t_raw

    def batch_bytes(self, tier: str, total_bytes: int, budget_bytes: int | None = None) -> int:
        """B* = sqrt(S * latency * throughput): the minimum of (S/B)*latency + B/throughput."""
        fit = self.tiers[tier]
        best = math.sqrt(max(total_bytes, 1) * max(fit.latency_s, 1e-6) * fit.throughput_bps)
        hi = self.max_batch_bytes if budget_bytes is None else min(self.max_batch_bytes,
                                                                   max(budget_bytes // 4, 1))
        return int(min(max(best, min(self.min_batch_bytes, hi)), hi))

    def to_dict(self) -> dict[str, Any]:
        return {"tiers": {k: v.to_dict() for k, v in self.tiers.items()},
                "codecs": {k: v.to_dict() for k, v in self.codecs.items()}}
