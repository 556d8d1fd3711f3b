"""Fixtures shared by the whole suite: an isolated shared-memory root and a policy."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import asymcheck
from tiers.base import redact_url

SHM = Path("/dev/shm")


@pytest.fixture(autouse=True)
def shm_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own directory of real shared memory, removed afterwards."""
    root = SHM / f"asymcheck-test-{uuid.uuid4().hex[:10]}"
    root.mkdir()
    monkeypatch.setenv("ASYMCHECK_SHM_ROOT", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def policy(tmp_path: Path) -> asymcheck.Policy:
    """The embedded default policy (host shared memory + local files) under tmp_path."""
    return asymcheck.default_policy(tmp_path / "checkpoints")


@pytest.fixture
def local_dir(policy: asymcheck.Policy) -> Path:
    return Path(policy.tier("local").url.removeprefix("file://"))


def pytest_report_header() -> list[str]:
    hdfs = os.environ.get("ASYMCHECK_TEST_HDFS")
    s3 = os.environ.get("ASYMCHECK_TEST_S3")
    return [f"asymcheck: HDFS tests {'against ' + hdfs if hdfs else 'not configured'}",
            f"asymcheck: S3 tests {'against ' + redact_url(s3) if s3 else 'not configured'}"]
