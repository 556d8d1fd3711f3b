"""ArrowFsTier (``s3://``, ``gs://``, ``abfs://`` through pyarrow.fs): URLs and secrets, bounded
failures, one-line errors for wrong credentials and a missing bucket.

The first tests need no server (a closed port, a port that never answers). The others need the
SeaweedFS S3 server: ``scripts/seaweedfs.sh start`` prints ``ASYMCHECK_TEST_S3`` and the
credentials as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, which pyarrow reads.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tier_cases import s3_base_url, s3_url

pytest.importorskip("pyarrow.fs")

import pyarrow.fs as pafs

from tiers.arrowfs import ArrowFsTier
from tiers.base import KeyNotFound, TierError, redact_url
from tiers.registry import open_tier

SECRET = "s3cr3t-Value-never-shown"
ACCESS = "AKIAEXAMPLEACCESS"
MARGIN_S = 3.0


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


def _local_url(port: int, bucket: str = "bkt", *, userinfo: str = "") -> str:
    at = f"{userinfo}@" if userinfo else ""
    return (f"s3://{at}{bucket}/prefix?endpoint_override=127.0.0.1:{port}&scheme=http"
            f"&region=us-east-1")


def _calls(tier: ArrowFsTier) -> dict[str, Any]:
    return {
        "put": lambda: tier.put("step-1/data.bin", b"x" * 1024),
        "get": lambda: tier.get("step-1/data.bin"),
        "readinto": lambda: tier.readinto("step-1/data.bin", memoryview(bytearray(4))),
        "stat": lambda: tier.stat("step-1/data.bin"),
        "list": lambda: tier.list("step-"),
        "delete": lambda: tier.delete("step-1/data.bin"),
        "exists": lambda: tier.exists("step-1/data.bin"),
    }


def _assert_one_line_without_secrets(msg: str, *secrets: str) -> None:
    assert "\n" not in msg, msg
    for secret in secrets:
        assert secret not in msg, msg


# ----------------------------------------------------------------------- no server needed


def test_the_registry_opens_object_store_urls() -> None:
    tier = open_tier("s3://bucket/prefix?region=us-east-1", name="remote", timeout_s=5)
    assert isinstance(tier, ArrowFsTier)
    assert (tier.name, tier.scheme, tier.bucket, tier.timeout_s) == ("remote", "s3", "bucket", 5)
    assert tier.capabilities.durable and tier.capabilities.ranged_reads
    assert not tier.capabilities.in_memory and not tier.capabilities.stale_tmp
    assert tier.uncommitted_grace_s == 3600.0 and tier.concurrent_puts > 1
    assert open_tier("s3://b/p", uncommitted_grace_s=0).uncommitted_grace_s == 0
    assert open_tier("gs://bucket/prefix").scheme == "gs"
    assert open_tier("abfs://container@account.dfs.core.windows.net/p").bucket == "container"


@pytest.mark.parametrize("url, shown", [
    (f"s3://{ACCESS}:{SECRET}@bucket/p?region=us-east-1",
     "s3://***:***@bucket/p?region=us-east-1"),
    (f"s3://bucket/p?secret_key={SECRET}&access_key={ACCESS}&session_token={SECRET}&x=1",
     "s3://bucket/p?secret_key=***&access_key=***&session_token=***&x=1"),
    (f"abfs://container:{SECRET}@account.dfs.core.windows.net/p",
     "abfs://container:***@account.dfs.core.windows.net/p"),
    (f"gs://bucket/p?my_password={SECRET}&client_secret_id={SECRET}&sig={SECRET}",
     "gs://bucket/p?my_password=***&client_secret_id=***&sig=***"),
    ("file:///tmp/x", "file:///tmp/x"),
    ("hdfs://user@127.0.0.1:9000/x", "hdfs://user@127.0.0.1:9000/x"),
])
def test_redact_url_hides_every_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_tier_url_and_repr_hide_secrets() -> None:
    tier = open_tier(_local_url(1, userinfo=f"{ACCESS}:{SECRET}"), secret_key=SECRET)
    assert tier.url == _local_url(1, userinfo="***:***")
    for text in (tier.url, repr(tier), str(tier.__dict__.get("url"))):
        _assert_one_line_without_secrets(text, SECRET, ACCESS)


@pytest.mark.parametrize("options, match", [
    ({"retries": 0}, "retries must be an integer >= 1"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
    ({"uncommitted_grace_s": -1}, "uncommitted_grace_s must be >= 0"),
])
def test_bad_options_are_rejected_at_once(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_tier("s3://bucket/p", **options)


async def test_an_unknown_file_system_option_names_the_known_ones() -> None:
    tier = open_tier(_local_url(_closed_port()), no_such_option=1, secret_key=SECRET)
    with pytest.raises(ValueError, match=r"no_such_option.*known:.*endpoint_override") as info:
        await tier.list()
    _assert_one_line_without_secrets(str(info.value), SECRET)


def test_a_missing_pyarrow_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiers.arrowfs", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'asymcheck\[s3\]'"):
        open_tier("s3://bucket/prefix")


@pytest.mark.parametrize("op", ["put", "get", "readinto", "stat", "list", "delete", "exists"])
async def test_an_unreachable_endpoint_fails_fast_without_secrets(op: str) -> None:
    tier = open_tier(_local_url(_closed_port(), userinfo=f"{ACCESS}:{SECRET}"), name="remote",
                     timeout_s=10, retries=1, connect_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(TierError) as info:
        await _calls(tier)[op]()
    elapsed = time.monotonic() - t0
    await tier.close()
    assert not isinstance(info.value, KeyNotFound), "an unreachable store is not a missing key"
    assert elapsed < 10, f"took {elapsed:.1f} s"
    msg = str(info.value)
    _assert_one_line_without_secrets(msg, SECRET, ACCESS)
    assert "remote" in msg and tier.url in msg and "'bkt'" in msg
    assert "cannot connect" in msg


@pytest.mark.parametrize("op", ["put", "get", "list"])
async def test_a_silent_endpoint_fails_within_timeout_s(op: str, silent_port: int) -> None:
    """A server that accepts connections and never answers: the call fails ``timeout_s``
    later, whatever the client's own timeouts (here much longer)."""
    timeout_s = 1.5
    tier = open_tier(_local_url(silent_port), name="hung", timeout_s=timeout_s, retries=1,
                     request_timeout=60, connect_timeout=60, access_key=ACCESS,
                     secret_key=SECRET)
    t0 = time.monotonic()
    with pytest.raises(TierError, match=r"no answer within 1\.5 s") as info:
        await _calls(tier)[op]()
    elapsed = time.monotonic() - t0
    await tier.close()
    assert timeout_s - 0.1 < elapsed < timeout_s + MARGIN_S, f"took {elapsed:.1f} s"
    _assert_one_line_without_secrets(str(info.value), SECRET, ACCESS)
    assert "hung" in str(info.value)


async def test_a_closed_tier_refuses_calls() -> None:
    tier = open_tier(_local_url(_closed_port()))
    await tier.close()
    await tier.close()  # idempotent
    with pytest.raises(TierError, match="closed"):
        await tier.list()


# ----------------------------------------------------------------- against the S3 server


@pytest.fixture
def s3_root() -> str:
    return s3_base_url()  # skips, or fails when CI=true, without ASYMCHECK_TEST_S3


@pytest.fixture
async def tier(s3_root: str) -> AsyncIterator[ArrowFsTier]:
    url = s3_url("tier-tests", uuid.uuid4().hex[:12], base=s3_root)
    t = open_tier(url, name="remote", timeout_s=20)
    assert isinstance(t, ArrowFsTier)
    yield t
    await t.close()
    async with open_tier(url) as cleanup:
        await cleanup.delete_prefix("")


@pytest.mark.s3
@pytest.mark.parametrize("creds", ["unknown-key", "wrong-secret"])
async def test_wrong_credentials_give_one_line_naming_tier_bucket_and_cause(
        s3_root: str, creds: str) -> None:
    access = ACCESS if creds == "unknown-key" else os.environ.get("AWS_ACCESS_KEY_ID", ACCESS)
    tier = open_tier(s3_url("creds", base=s3_root), name="remote", access_key=access,
                     secret_key=SECRET, retries=1)
    bucket = tier.bucket
    for op in ("list", "put", "get"):
        with pytest.raises(TierError) as info:
            await _calls(tier)[op]()
        msg = str(info.value)
        _assert_one_line_without_secrets(msg, SECRET)
        assert not isinstance(info.value, KeyNotFound)
        assert msg.startswith(f"remote ({tier.url}): ")
        assert f"bucket '{bucket}'" in msg and "access denied" in msg, msg
    await tier.close()


@pytest.mark.s3
async def test_a_missing_bucket_gives_one_line_and_is_created_only_when_allowed(
        s3_root: str) -> None:
    bucket = f"asymcheck-missing-{uuid.uuid4().hex[:8]}"
    url = s3_url(base=s3_root).replace(s3_root.split("/")[2], bucket, 1)
    tier = open_tier(url, name="remote", retries=1)
    for op in ("list", "put", "get", "stat"):
        with pytest.raises(TierError) as info:
            await _calls(tier)[op]()
        msg = str(info.value)
        assert not isinstance(info.value, KeyNotFound)
        _assert_one_line_without_secrets(msg, os.environ.get("AWS_SECRET_ACCESS_KEY", SECRET))
        assert msg.startswith(f"remote ({tier.url}): {op} '"), msg
        assert msg.endswith(f"in bucket '{bucket}': the bucket does not exist"), msg
    await tier.close()

    created = open_tier(url, allow_bucket_creation=True)
    try:
        await created.put("k", b"v")
        assert await created.get("k") == b"v"
    finally:
        await created.delete_prefix("")
        await created.close()
        fs, _ = pafs.FileSystem.from_uri(url)
        rebuild, args = fs.__reduce__()
        rebuild({**args[0], "allow_bucket_deletion": True}).delete_dir(bucket)


@pytest.mark.s3
async def test_large_objects_round_trip_through_multipart_uploads(tier: ArrowFsTier) -> None:
    data = os.urandom(24 << 20)  # larger than pyarrow's part size: a multipart upload
    parts = [memoryview(data)[i:i + (5 << 20)] for i in range(0, len(data), 5 << 20)]
    await tier.put("big/object.bin", parts)
    assert (await tier.stat("big/object.bin")).size_bytes == len(data)
    assert await tier.get("big/object.bin") == data
    out = bytearray(9 << 20)
    await tier.readinto("big/object.bin", memoryview(out), 7 << 20)
    assert out == data[7 << 20:16 << 20]
    small_chunks = open_tier(tier._raw_url, chunk_bytes=1 << 20)
    assert await small_chunks.get("big/object.bin", 3, 5 << 20) == data[3:3 + (5 << 20)]
    await small_chunks.close()
