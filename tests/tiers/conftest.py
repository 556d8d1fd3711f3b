"""Fixtures of the tier conformance suite: one opened tier per backend, same tests for all.

``tier_kind`` is parametrized over every backend. A test that needs a feature only some
backends have narrows it with ``@pytest.mark.parametrize("tier_kind", [...], indirect=True)``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tiers import HostTier, LocalTier, Tier
from tiers.registry import open_tier

TIER_KINDS = [
    pytest.param("host", id="host"),
    pytest.param("local", id="local"),
    pytest.param("hdfs", id="hdfs", marks=pytest.mark.hdfs),
]
#: Backends with a byte budget (capacity_bytes, reserve, used_bytes).
CAPACITY_KINDS = ["host"]
#: Backends whose directory on this machine the tests may inspect (tier_dir below).
FILE_KINDS = ["host", "local"]


def hdfs_base_url() -> str:
    url = os.environ.get("ASYMCHECK_TEST_HDFS")
    if url:
        return url.rstrip("/")
    if os.environ.get("CI") == "true":
        pytest.fail("ASYMCHECK_TEST_HDFS is not set: the MiniDFS cluster must be running in CI")
    pytest.skip("ASYMCHECK_TEST_HDFS is not set (start MiniDFS: scripts/minidfs.sh start)")


def tier_dir(tier: Tier) -> Path:
    """Where a file-backed tier keeps its keys."""
    if isinstance(tier, HostTier):
        return tier.directory
    if isinstance(tier, LocalTier):
        return tier.root
    raise TypeError(f"{tier!r} has no local directory")


class TierFactory:
    """Opens tiers on one URL (a second instance plays "another process"); closes them all."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.opened: list[Tier] = []

    def __call__(self, **options: Any) -> Tier:
        tier = open_tier(self.url, **options)
        self.opened.append(tier)
        return tier

    async def cleanup(self) -> None:
        for tier in self.opened:
            await tier.close()
        last = open_tier(self.url)
        try:
            if isinstance(last, HostTier):
                await last.destroy()
            elif self.kind == "hdfs":
                await last.delete_prefix("")
        finally:
            await last.close()


@pytest.fixture(params=TIER_KINDS)
def tier_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tier_url(tier_kind: str, tmp_path: Path, shm_root: Path) -> str:
    unique = uuid.uuid4().hex[:12]
    if tier_kind == "host":  # shm_root (tests/conftest.py) points the tier at a private dir
        return f"shm://conformance/{unique}"
    if tier_kind == "local":
        return (tmp_path / "tier").as_uri()
    if tier_kind == "hdfs":
        return f"{hdfs_base_url()}/conformance/{unique}"
    raise AssertionError(f"unknown tier kind {tier_kind!r}")


@pytest.fixture
async def tier_factory(tier_kind: str, tier_url: str) -> AsyncIterator[TierFactory]:
    factory = TierFactory(tier_kind, tier_url)
    try:
        yield factory
    finally:
        await factory.cleanup()


@pytest.fixture
def tier(tier_factory: TierFactory) -> Tier:
    return tier_factory()
