"""The counters behind the fault suite's summary line (one instance per session)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FaultStats:
    kills: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    bytes_compared: int = 0

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def summary(self) -> str:
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        return (f"fault suite: {self.kills} kills survived, faults injected: {faults}, "
                f"{human_bytes(self.bytes_compared)} compared")


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
