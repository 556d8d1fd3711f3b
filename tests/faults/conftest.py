"""Fixtures of the fault suite, and the summary line it prints at the end of a run.

Every test that injects a fault or compares restored bytes records it in ``fault_stats``;
``pytest_terminal_summary`` prints the totals, e.g.
``fault suite: 34 kills survived, faults injected: enospc=2 bitflip=6, 1.2 GB compared``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults._stats import FaultStats
from tiers.registry import TIER_CLASSES

_STATS = pytest.StashKey[FaultStats]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATS] = FaultStats()


@pytest.fixture(scope="session")
def fault_stats(pytestconfig: pytest.Config) -> FaultStats:
    return pytestconfig.stash[_STATS]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    stats = config.stash.get(_STATS, None)
    if stats is not None and (stats.kills or stats.faults or stats.bytes_compared):
        terminalreporter.write_line(stats.summary())


@pytest.fixture
def faulty_scheme(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Registers ``faulty://`` (a LocalTier that injects the faults of a FaultPlan)."""
    monkeypatch.setitem(TIER_CLASSES, "faulty", ("tests.faults._faulty", "FaultyLocalTier", ""))
    yield "faulty"
    from tests.faults._faulty import PLANS
    PLANS.clear()


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"
