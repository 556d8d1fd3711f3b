"""Fixtures of the tier conformance suite: one opened tier per backend, same tests for all.

``tier_kind`` is parametrized over every backend. A test that needs a feature only some
backends have narrows it with ``@pytest.mark.parametrize("tier_kind", [...], indirect=True)``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tier_cases import TIER_KINDS, TierFactory, hdfs_base_url, s3_url

from tiers import Tier


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
    if tier_kind == "s3":
        return s3_url("conformance", unique)
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
