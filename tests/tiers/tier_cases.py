"""Backends of the tier conformance suite and helpers its tests share."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tiers import HostTier, LocalTier, Tier
from tiers.registry import open_tier

TIER_KINDS = [
    pytest.param("host", id="host"),
    pytest.param("local", id="local"),
    pytest.param("hdfs", id="hdfs", marks=pytest.mark.hdfs),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]
#: Backends where a test gets its own prefix on a shared server and cleans it up itself.
REMOTE_KINDS = ["hdfs", "s3"]
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


def s3_base_url() -> str:
    """The S3 test URL (``scripts/seaweedfs.sh start`` prints it, with the credentials as
    AWS_* variables, which pyarrow reads as it would for any user)."""
    url = os.environ.get("ASYMCHECK_TEST_S3")
    if url:
        pytest.importorskip("pyarrow.fs")
        return url
    if os.environ.get("CI") == "true":
        pytest.fail("ASYMCHECK_TEST_S3 is not set: the SeaweedFS S3 server must be running in CI")
    pytest.skip("ASYMCHECK_TEST_S3 is not set (start SeaweedFS: scripts/seaweedfs.sh start)")


def s3_url(*parts: str, base: str | None = None, **query: Any) -> str:
    """The S3 test URL with ``parts`` appended to its prefix and ``query`` added to its
    query string (the URL's own parameters stay)."""
    split = urlsplit(base or s3_base_url())
    path = "/".join([split.path.rstrip("/"), *parts])
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    q = "&".join(x for x in (split.query, extra) if x)
    return urlunsplit(split._replace(path=path, query=q))


async def hdfs_raw_files(tier: Tier) -> list[str]:
    """Every file under an HDFS tier's base directory, temporary ones included."""
    from tiers.hdfs import HdfsTier, _shared

    assert isinstance(tier, HdfsTier)
    client = _shared(tier._fs_url, tier.config)
    base = tier._base

    def walk() -> list[str]:
        return sorted(st.path[len(base) + 1:] for st in client.list_status(base, True)
                      if not st.isdir)
    try:
        return await asyncio.to_thread(walk)
    except FileNotFoundError:
        return []


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
            elif self.kind in REMOTE_KINDS:
                await last.delete_prefix("")
        finally:
            await last.close()
