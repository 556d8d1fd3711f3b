"""open_tier: the URL scheme picks the tier class; optional backends import lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiers import HostTier, LocalTier, open_tier
from tiers.registry import known_schemes


def test_known_schemes_lists_every_backend() -> None:
    assert known_schemes() == ["abfs", "abfss", "file", "gcs", "gs", "hdfs", "s3", "shm"]


def test_the_scheme_picks_the_class_and_options_pass_through(tmp_path: Path) -> None:
    host = open_tier("shm://reg/job", name="fast", capacity_bytes=123, pool_max_bytes=7)
    assert isinstance(host, HostTier)
    assert (host.name, host.capacity_bytes, host.pool_max_bytes) == ("fast", 123, 7)
    local = open_tier(tmp_path.as_uri(), name="disk", fsync=False)
    assert isinstance(local, LocalTier) and local.name == "disk" and local.fsync is False
    assert isinstance(open_tier("FILE:rel/dir"), LocalTier)


@pytest.mark.parametrize("url", ["ftp://bucket/x", "/plain/path", "ckpt"])
def test_an_unknown_or_missing_scheme_lists_the_known_ones(url: str) -> None:
    with pytest.raises(ValueError, match="file, gcs, gs, hdfs, s3, shm"):
        open_tier(url)


def test_a_backend_that_cannot_import_names_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiers.hdfs", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'asymcheck\[hdfs\]'"):
        open_tier("hdfs://127.0.0.1:9000/ckpt")


def test_importing_tiers_does_not_import_hdfs_or_pyarrow() -> None:
    code = ("import sys, tiers; tiers.open_tier('shm://x'); "
            "print(sorted(m for m in sys.modules if 'hdfs' in m or 'pyarrow' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
