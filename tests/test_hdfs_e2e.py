"""End to end through HDFS: the GPT-2 example with a host + local + HDFS policy, and a NameNode
that dies (SIGKILL) in the middle of a flush.

Needs the MiniDFS cluster: ``export "$(scripts/minidfs.sh start)"`` sets ``ASYMCHECK_TEST_HDFS``
(unset: skipped, or failed when ``CI=true``). The fault test kills and resumes that cluster
through ``scripts/minidfs.sh`` and leaves it running at the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import asymcheck
from asymcheck.layout import manifest_key, step_dir
from asymcheck.manifest import committed_steps
from tests._util import make_training, train_steps
from tests.remote_example import (
    FaultDuringFlush,
    commit_again_then_close,
    fault_policy_file,
    restore_from_alone,
    restores_from_remote_alone,
)
from tests.tiers.tier_cases import hdfs_base_url, hdfs_raw_files

pytest.importorskip("hdfs_native")

from tiers.base import TierError
from tiers.hdfs import HdfsTier

pytestmark = pytest.mark.hdfs

REPO = Path(__file__).resolve().parents[1]
MINIDFS = REPO / "scripts" / "minidfs.sh"

#: The HDFS tier's per-call deadline in the fault test (policy ``options``).
FAULT_TIMEOUT_S = 10.0


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _delete_tree(url: str) -> None:
    async with HdfsTier(url) as tier:
        await tier.delete_prefix("")
        await tier.remove_stale_tmp(older_than_s=0)


async def _raw_files(url: str) -> list[str]:
    """Every file under the tier's directory, temporary ones included."""
    async with HdfsTier(url) as tier:
        return await hdfs_raw_files(tier)


@pytest.fixture
def hdfs_url() -> Iterator[str]:
    """A fresh directory on the test cluster, removed afterwards."""
    url = f"{hdfs_base_url()}/e2e-{uuid.uuid4().hex[:12]}"
    yield url
    _run(_delete_tree(url))


# -------------------------------------------------------------- the GPT-2 example


def test_gpt2_example_restores_from_hdfs_alone(tmp_path: Path, shm_root: Path,
                                               hdfs_url: str) -> None:
    async def hdfs_steps() -> list[int]:
        async with HdfsTier(hdfs_url) as tier:
            return await committed_steps(tier)
    restores_from_remote_alone(tmp_path, shm_root, "hdfs", hdfs_url, lambda: _run(hdfs_steps()))


# --------------------------------------------------------- a NameNode killed mid-flush


def _minidfs(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(MINIDFS), *args], capture_output=True, text=True,
                          timeout=timeout)


def _cluster_running(url: str) -> bool:
    out = _minidfs("status", timeout=30)
    return out.returncode == 0 and f"ASYMCHECK_TEST_HDFS={url}" in out.stdout.split()


@pytest.fixture
def minidfs(hdfs_url: str) -> Iterator[str]:
    """The URL of the cluster that ``scripts/minidfs.sh`` runs (the one this test may kill);
    afterwards it runs again at the same URL, its file system kept (resume), else fresh."""
    parts = urlsplit(hdfs_url)
    cluster = f"{parts.scheme}://{parts.netloc}"
    if not _cluster_running(cluster):
        msg = (f"{cluster} is not the cluster of scripts/minidfs.sh (the fault test kills and "
               "resumes that one)")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield cluster
    finally:
        _minidfs("thaw", timeout=30)  # in case a test stopped between freeze and thaw
        if not _cluster_running(cluster):
            resumed = _minidfs("resume")
            if resumed.returncode != 0:
                started = _minidfs("start")
                assert started.returncode == 0, (
                    f"could not bring MiniDFS back:\n{resumed.stderr}\n{started.stderr}")
        assert _cluster_running(cluster)


def _policy_file(tmp_path: Path, url: str, timeout_s: float) -> Path:
    return fault_policy_file(tmp_path, "hdfs", url,
                             f"timeout_s = {timeout_s:g}, chunk_bytes = 1048576")


def test_namenode_killed_during_a_flush(tmp_path: Path, minidfs: str, hdfs_url: str,
                                        monkeypatch: pytest.MonkeyPatch,
                                        record_property: Any) -> None:
    policy_file = _policy_file(tmp_path, hdfs_url, FAULT_TIMEOUT_S)
    model, opt, sched = make_training(seed=5, width=1536)  # ~57 MB of state
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy_file, extras={"sched": sched})
    closed = False
    try:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(1).durable("hdfs").wait(60)

        # Step 2: SIGKILL the cluster once its data is on the way.
        fault = FaultDuringFlush(HdfsTier, 2, _minidfs)
        with monkeypatch.context() as patch:
            fault.install(patch)
            train_steps(model, opt, sched, 1)
            h2 = ckpt.save_sync(2)
            t_kill = fault.inject("kill")
            with pytest.raises(TierError) as info:
                h2.durable("hdfs").wait(FAULT_TIMEOUT_S + 20)
            detect_s = time.monotonic() - t_kill
        h2.durable("local").wait(60)
        assert detect_s < FAULT_TIMEOUT_S + 5, f"the failure took {detect_s:.1f} s to surface"

        # Training and the local tier go on while HDFS is down; HDFS saves fail fast.
        down_s = []
        for step in (3, 4):
            train_steps(model, opt, sched, 1)
            t0 = time.monotonic()
            h = ckpt.save_sync(step)
            with pytest.raises(TierError):
                h.durable("hdfs").wait(FAULT_TIMEOUT_S + 20)
            down_s.append(time.monotonic() - t0)
            h.durable("local").wait(60)
        assert (tmp_path / "local" / step_dir(4) / "manifest.msgpack").is_file()

        # The cluster comes back with its file system: the failed steps were never committed.
        t0 = time.monotonic()
        resumed = _minidfs("resume")
        assert resumed.returncode == 0, resumed.stderr
        resume_s = time.monotonic() - t0

        async def after_restart() -> tuple[list[int], list[str]]:
            async with HdfsTier(hdfs_url) as tier:
                return await committed_steps(tier), await tier.list()
        steps, keys = _run(after_restart())
        assert steps == [1]
        assert not [k for k in keys if k.startswith(("step-000000000003", "step-000000000004"))]
        leftovers = [k for k in keys if k.startswith(step_dir(2) + "/")]
        assert manifest_key(2) not in leftovers  # data without a manifest: invisible to restore

        # The same Checkpointer (and its HDFS client) commits the next save there.
        closed = True
        expected = commit_again_then_close(ckpt, model, opt, sched, remote="hdfs", step=5,
                                           failures=3)
    finally:
        if not closed:
            with contextlib.suppress(asymcheck.CheckpointError):
                ckpt.close_sync()

    # A new job that has only HDFS restores step 5; opening the tier drops step 2's leftovers.
    restore_from_alone("hdfs", hdfs_url, 5, expected, seed=6, timeout_s=FAULT_TIMEOUT_S)

    async def final_state() -> tuple[list[int], list[str], int, list[str]]:
        async with HdfsTier(hdfs_url) as tier:
            steps, keys = await committed_steps(tier), await tier.list()
            stale = await tier.remove_stale_tmp(older_than_s=0)
        return steps, keys, stale, await _raw_files(hdfs_url)
    steps, keys, stale, raw = _run(final_state())
    assert steps == [1, 5]
    assert {k.split("/", 1)[0] for k in keys} == {step_dir(1), step_dir(5)}
    assert {k.split("/", 1)[0] for k in raw} == {step_dir(1), step_dir(5)}

    summary = (f"NameNode SIGKILL mid-flush: HDFS durable failed {detect_s:.2f} s after the kill "
               f"({info.value}); "
               f"step-2 data puts ok/failed {fault.data_puts['ok']}/{fault.data_puts['failed']}; "
               f"saves while down failed {', '.join(f'{s:.3f}' for s in down_s)} s after "
               f"save_sync; "
               f"resume took {resume_s:.1f} s; step-2 leftovers after restart: {len(leftovers)} "
               f"key(s); stale tmp files removed: {stale}")
    record_property("fault_summary", summary)
    print(summary)


def test_hung_namenode_fails_within_timeout(tmp_path: Path, minidfs: str, hdfs_url: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            record_property: Any) -> None:
    """A cluster that stops answering (SIGSTOP) mid-flush: the HDFS awaitable fails about
    ``timeout_s`` later, the local tier is unaffected, and after it answers again the same
    Checkpointer commits the next save there."""
    timeout_s = 4.0
    policy_file = _policy_file(tmp_path, hdfs_url, timeout_s)
    model, opt, sched = make_training(seed=7, width=1536)
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy_file, extras={"sched": sched})
    closed = False
    try:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(1).durable("hdfs").wait(60)
        fault = FaultDuringFlush(HdfsTier, 2, _minidfs)
        try:
            with monkeypatch.context() as patch:
                fault.install(patch)
                train_steps(model, opt, sched, 1)
                h2 = ckpt.save_sync(2)
                t_freeze = fault.inject("freeze")
                with pytest.raises(TierError, match=r"no answer within 4 s") as info:
                    h2.durable("hdfs").wait(timeout_s + 20)
                detect_s = time.monotonic() - t_freeze
            h2.durable("local").wait(60)
        finally:
            thawed = _minidfs("thaw", timeout=30)
        assert thawed.returncode == 0, thawed.stderr
        assert detect_s < timeout_s + 3, f"the failure took {detect_s:.1f} s to surface"

        closed = True
        expected = commit_again_then_close(ckpt, model, opt, sched, remote="hdfs", step=3,
                                           failures=1)
    finally:
        if not closed:
            with contextlib.suppress(asymcheck.CheckpointError):
                ckpt.close_sync()

    async def hdfs_state() -> list[int]:
        async with HdfsTier(hdfs_url) as tier:
            return await committed_steps(tier)
    assert _run(hdfs_state()) == [1, 3]
    restore_from_alone("hdfs", hdfs_url, 3, expected, seed=8, timeout_s=FAULT_TIMEOUT_S)

    summary = (f"NameNode hung (SIGSTOP) mid-flush, timeout_s={timeout_s:g}: HDFS durable "
               f"failed {detect_s:.2f} s after the freeze ({info.value})")
    record_property("hung_summary", summary)
    print(summary)
