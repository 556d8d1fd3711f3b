"""End to end through S3 (a real SeaweedFS server): the GPT-2 example with a host + local + S3
policy, a server killed or frozen in the middle of a flush, an upload cut off half way, the
grace period of uncommitted objects, and secrets kept out of every output.

Needs the server: ``scripts/seaweedfs.sh start`` prints ``ASYMCHECK_TEST_S3`` and the
credentials as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (pyarrow reads them, as it would
for any user). Unset: skipped, or failed when ``CI=true``. The fault tests kill, freeze and
resume that server through ``scripts/seaweedfs.sh`` and leave it running at the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch

import asymcheck
from asymcheck import cli
from asymcheck.commit import _drop_uncommitted
from asymcheck.layout import manifest_key, step_dir
from asymcheck.manifest import committed_steps
from tests._util import assert_same, load_from, make_training, pooled_inodes, train_steps
from tests.remote_example import (
    FaultDuringFlush,
    commit_again_then_close,
    fault_policy_file,
    restore_from_alone,
    restores_from_remote_alone,
    toml_string,
)
from tests.tiers.tier_cases import s3_base_url, s3_url

pytest.importorskip("pyarrow.fs")

import tiers.arrowfs as arrowfs
from tiers.arrowfs import ArrowFsTier
from tiers.base import TierError
from tiers.registry import open_tier

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
SEAWEEDFS = REPO / "scripts" / "seaweedfs.sh"

#: The S3 tier's per-call deadline in the kill test (policy ``options``).
FAULT_TIMEOUT_S = 8.0
#: Client options of the fault tests: one attempt, quick connects; ``request_timeout`` longer
#: than a freeze lasts, so a request in flight across a freeze is answered after the thaw.
CLIENT_OPTIONS = "retries = 1, connect_timeout = 1, request_timeout = 30"


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _delete_all(url: str) -> None:
    async with open_tier(url) as tier:
        await tier.delete_prefix("")


async def _keys(url: str) -> list[str]:
    async with open_tier(url) as tier:
        return await tier.list()


async def _get(url: str, key: str) -> bytes:
    async with open_tier(url) as tier:
        return await tier.get(key)


async def _committed(url: str) -> list[int]:
    async with open_tier(url) as tier:
        return await committed_steps(tier)


@pytest.fixture
def s3_prefix() -> Iterator[str]:
    """A fresh prefix on the test server, removed afterwards."""
    url = s3_url(f"e2e-{uuid.uuid4().hex[:12]}", base=s3_base_url())
    yield url
    with contextlib.suppress(Exception):
        _run(_delete_all(url))


def test_streamed_saves_to_s3_stage_through_the_pieces_the_last_save_freed(
        shm_root: Path, s3_prefix: str) -> None:
    """A state larger than half the host budget streams to S3 alone: a piece's block goes
    back to the host tier's pool once uploaded (the tier lets go of its views when the put
    returns), and the next save's pieces are staged in the same shared memory."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # 2.1 MB
    state_bytes = sum(p.nbytes for p in model.parameters())
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://s3-stream", capacity_bytes=state_bytes // 2),
        asymcheck.TierPolicy(name="s3", url=s3_prefix, keep=2)))
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        first = ckpt.save_sync(1)
        first.durable("s3").wait(120)
        files = pooled_inodes(ckpt.host)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        second = ckpt.save_sync(2)
        second.durable("s3").wait(120)
        reused = pooled_inodes(ckpt.host)
    assert first.metrics["mode"] == second.metrics["mode"] == "streaming"
    assert first.metrics["pieces"] >= 4
    # every block of the first save again; one more only if more pieces were in flight
    assert files and files <= reused and len(reused) <= 4, (files, reused)
    loaded = load_from(s3_prefix, 2)
    assert loaded is not None
    assert_same(expected, loaded.state["model"])


# -------------------------------------------------------------- the GPT-2 example


def test_gpt2_example_restores_from_s3_alone(tmp_path: Path, shm_root: Path,
                                             s3_prefix: str) -> None:
    out = restores_from_remote_alone(tmp_path, shm_root, "s3", s3_prefix,
                                     lambda: _run(_committed(s3_prefix)))
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    assert not secret or secret not in out.stdout + out.stderr


# ------------------------------------------------------- the server killed or frozen


def _seaweedfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SEAWEEDFS), *args], capture_output=True, text=True,
                          timeout=timeout)


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + parts.path.strip("/").split("/")[0]))


def _server_running(url: str) -> bool:
    out = _seaweedfs("status", timeout=30)
    lines = [ln.partition("=")[2] for ln in out.stdout.split()
             if ln.startswith("ASYMCHECK_TEST_S3=")]
    return out.returncode == 0 and bool(lines) and _endpoint(lines[0]) == _endpoint(url)


@pytest.fixture
def seaweedfs(s3_prefix: str) -> Iterator[str]:
    """The server of ``scripts/seaweedfs.sh`` (the one these tests may kill or freeze);
    afterwards it runs again at the same URL, its data kept (resume), else fresh."""
    if not _server_running(s3_prefix):
        msg = ("ASYMCHECK_TEST_S3 is not the server of scripts/seaweedfs.sh (the fault tests "
               "kill, freeze and resume that one)")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield s3_prefix
    finally:
        _seaweedfs("thaw", timeout=30)  # in case a test stopped between freeze and thaw
        if not _server_running(s3_prefix):
            resumed = _seaweedfs("resume")
            if resumed.returncode != 0:
                started = _seaweedfs("start")
                assert started.returncode == 0, (
                    f"could not bring SeaweedFS back:\n{resumed.stderr}\n{started.stderr}")
        assert _server_running(s3_prefix)


def _policy_file(tmp_path: Path, url: str, timeout_s: float) -> Path:
    return fault_policy_file(tmp_path, "s3", url, f"timeout_s = {timeout_s:g}, {CLIENT_OPTIONS}")


def _wait_committed(url: str, want: list[int], within_s: float = 15.0) -> list[int]:
    """The committed steps once they are ``want`` (a put given up during a fault is deleted
    when it completes late), or what they are after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        steps = _run(_committed(url))
        if steps == want or time.monotonic() > deadline:
            return steps
        time.sleep(0.25)


class _CutOffUpload:
    """A multipart upload (48 MiB in 16 MiB writes) over an existing object, in a thread of
    its own: its first part goes out, then it waits (``go_on``) while the server dies, and the
    rest fails. The key must keep its old value: the upload is never completed."""

    OLD = b"the old value"

    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.url = url
        self.first_part = threading.Event()
        self.go_on = threading.Event()
        self.error: BaseException | None = None
        data = os.urandom(48 << 20)
        self.parts = [memoryview(data)[i:i + (16 << 20)] for i in range(0, len(data), 16 << 20)]
        write_object = arrowfs._write_object

        def paced(late: Any, fs: Any, path: str, parts: Sequence[memoryview]) -> None:
            if not path.endswith("/cut-off.bin") or len(parts) != 3:
                return write_object(late, fs, path, parts)

            def pieces() -> Iterator[memoryview]:
                yield parts[0]
                self.first_part.set()
                self.go_on.wait(60)
                yield from parts[1:]
            return write_object(late, fs, path, pieces())  # type: ignore[arg-type]

        monkeypatch.setattr(arrowfs, "_write_object", paced)
        self.thread = threading.Thread(target=asyncio.run, args=(self._put(),), daemon=True)

    async def _put(self) -> None:
        async with open_tier(self.url, timeout_s=30, retries=1, connect_timeout=1) as tier:
            await tier.put("cut-off.bin", self.OLD)
            try:
                await tier.put("cut-off.bin", self.parts)
            except BaseException as exc:
                self.error = exc

    def start(self) -> None:
        self.thread.start()
        assert self.first_part.wait(60), "the upload never started"

    def finish(self) -> None:
        self.go_on.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_server_killed_during_a_flush(tmp_path: Path, seaweedfs: str,
                                      monkeypatch: pytest.MonkeyPatch,
                                      record_property: Any) -> None:
    s3 = seaweedfs
    policy_file = _policy_file(tmp_path, s3, FAULT_TIMEOUT_S)
    model, opt, sched = make_training(seed=5, width=1536)  # ~57 MB of state
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy_file, extras={"sched": sched})
    closed = False
    try:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(1).durable("s3").wait(60)

        # Step 2: SIGKILL the server once its data is on the way, and while a multipart
        # upload of another object is half done.
        fault = FaultDuringFlush(ArrowFsTier, 2, _seaweedfs)
        with monkeypatch.context() as patch:
            cut = _CutOffUpload(s3, patch)
            cut.start()
            fault.install(patch)
            train_steps(model, opt, sched, 1)
            h2 = ckpt.save_sync(2)
            t_kill = fault.inject("kill")
            cut.finish()
            with pytest.raises(TierError) as info:
                h2.durable("s3").wait(FAULT_TIMEOUT_S + 20)
            detect_s = time.monotonic() - t_kill
        h2.durable("local").wait(60)
        assert isinstance(cut.error, TierError), cut.error
        assert detect_s < FAULT_TIMEOUT_S + 5, f"the failure took {detect_s:.1f} s to surface"
        assert "\n" not in str(info.value) and "s3 (" in str(info.value)

        # Training and the local tier go on while S3 is down; S3 saves fail fast.
        down_s = []
        for step in (3, 4):
            train_steps(model, opt, sched, 1)
            t0 = time.monotonic()
            h = ckpt.save_sync(step)
            with pytest.raises(TierError, match="cannot connect"):
                h.durable("s3").wait(FAULT_TIMEOUT_S + 20)
            down_s.append(time.monotonic() - t0)
            h.durable("local").wait(60)
        assert (tmp_path / "local" / step_dir(4) / "manifest.msgpack").is_file()

        # The server comes back with its data: the failed steps were never committed.
        t0 = time.monotonic()
        resumed = _seaweedfs("resume")
        assert resumed.returncode == 0, resumed.stderr
        resume_s = time.monotonic() - t0
        assert _wait_committed(s3, [1]) == [1]
        keys = _run(_keys(s3))
        assert not [k for k in keys if k.startswith((step_dir(3), step_dir(4)))]
        cut_off = _run(_get(s3, "cut-off.bin"))
        assert cut_off == cut.OLD, f"{len(cut_off)} bytes at cut-off.bin: a partial upload"
        leftovers = [k for k in keys if k.startswith(step_dir(2) + "/")]
        assert manifest_key(2) not in leftovers  # data without a manifest: invisible

        # The same Checkpointer (and its S3 client) commits the next save there.
        closed = True
        expected = commit_again_then_close(ckpt, model, opt, sched, remote="s3", step=5, failures=3)
    finally:
        if not closed:
            with contextlib.suppress(asymcheck.CheckpointError):
                ckpt.close_sync()

    restore_from_alone("s3", s3, 5, expected, seed=6, timeout_s=FAULT_TIMEOUT_S)
    assert _run(_committed(s3)) == [1, 5]

    summary = (f"S3 server SIGKILL mid-flush: durable failed {detect_s:.2f} s after the kill "
               f"({info.value}); step-2 data puts ok/failed {fault.data_puts['ok']}/"
               f"{fault.data_puts['failed']}, manifest put {fault.manifest_put}; saves while "
               f"down failed {', '.join(f'{s:.3f}' for s in down_s)} s after save_sync; "
               f"resume took {resume_s:.1f} s; step-2 leftovers: {len(leftovers)} key(s); "
               f"a multipart upload cut off by the kill failed ({cut.error}) and the key "
               f"kept its old value")
    record_property("fault_summary", summary)
    print(summary)


def test_frozen_server_fails_within_timeout(tmp_path: Path, seaweedfs: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            record_property: Any) -> None:
    """A server that stops answering (SIGSTOP) mid-flush: the S3 awaitable fails about
    ``timeout_s`` later, the local tier is unaffected, no manifest of that step stays
    visible, and after the thaw the same Checkpointer commits the next save there."""
    s3 = seaweedfs
    timeout_s = 4.0
    policy_file = _policy_file(tmp_path, s3, timeout_s)
    model, opt, sched = make_training(seed=7, width=1536)
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy_file, extras={"sched": sched})
    closed = False
    try:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(1).durable("s3").wait(60)
        fault = FaultDuringFlush(ArrowFsTier, 2, _seaweedfs)
        try:
            with monkeypatch.context() as patch:
                fault.install(patch)
                train_steps(model, opt, sched, 1)
                h2 = ckpt.save_sync(2)
                t_freeze = fault.inject("freeze")
                with pytest.raises(TierError, match=r"no answer within") as info:
                    h2.durable("s3").wait(timeout_s + 20)
                detect_s = time.monotonic() - t_freeze
            h2.durable("local").wait(60)
        finally:
            thawed = _seaweedfs("thaw", timeout=30)
        assert thawed.returncode == 0, thawed.stderr
        # a put of at most one 8 MiB batch: timeout_s + 8 MiB / min_put_bps (16 MB/s)
        assert detect_s < timeout_s + 0.6 + 3, f"the failure took {detect_s:.1f} s to surface"

        closed = True
        expected = commit_again_then_close(ckpt, model, opt, sched, remote="s3", step=3, failures=1)
    finally:
        if not closed:
            with contextlib.suppress(asymcheck.CheckpointError):
                ckpt.close_sync()

    assert _wait_committed(s3, [1, 3]) == [1, 3]
    restore_from_alone("s3", s3, 3, expected, seed=8, timeout_s=FAULT_TIMEOUT_S)

    summary = (f"S3 server frozen (SIGSTOP) mid-flush, timeout_s={timeout_s:g}: durable "
               f"failed {detect_s:.2f} s after the freeze ({info.value}); step-2 data puts "
               f"ok/failed {fault.data_puts['ok']}/{fault.data_puts['failed']}, manifest put "
               f"{fault.manifest_put}")
    record_property("frozen_summary", summary)
    print(summary)


# ------------------------------------------------ uncommitted data and its grace period


def _write_policy(path: Path, s3: str, **options: Any) -> Path:
    opts = ", ".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                     for k, v in options.items())
    path.write_text(f"""\
[[tier]]
name = "host"
url = "shm://grace-{uuid.uuid4().hex[:12]}"
keep = 2

[[tier]]
name = "s3"
url = "{toml_string(s3)}"
keep = 5
options = {{ {opts} }}
""")
    return path


def test_uncommitted_objects_go_only_after_the_grace_period(
        tmp_path: Path, s3_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    grace_s = 2.0
    policy_file = _write_policy(tmp_path / "tiers.toml", s3_prefix, timeout_s=20,
                                uncommitted_grace_s=grace_s)
    model, opt, sched = make_training(seed=3)
    with asymcheck.Checkpointer(model, opt, policy=policy_file,
                                extras={"sched": sched}) as ckpt:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(5).wait_all_sync(60)

    async def plant(*steps: int) -> None:
        async with open_tier(s3_prefix) as tier:
            for s in steps:
                await tier.put(f"{step_dir(s)}/data-dead{s}.bin", b"x" * 100)

    def steps_on_s3() -> set[int]:
        return {int(k.split("/")[0][5:]) for k in _run(_keys(s3_prefix))}

    _run(plant(3))  # a crashed save older than the grace period (once we slept) ...
    time.sleep(grace_s + 0.5)
    _run(plant(4, 7))  # ... and two young ones (7 is newer than the newest commit)

    code = cli.main(["gc", "--policy", str(policy_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "removed s3 step 3 (uncommitted)" in out
    assert "step 4" not in out and "step 7" not in out
    assert steps_on_s3() == {4, 5, 7}

    # Start-up removes what a crash left, once older than the grace period.
    async def start_up() -> None:
        async with open_tier(s3_prefix, uncommitted_grace_s=grace_s) as tier:
            await _drop_uncommitted(tier)
    _run(start_up())
    assert steps_on_s3() == {4, 5, 7}, "young uncommitted data went at start-up"
    time.sleep(grace_s + 0.5)
    with asymcheck.Checkpointer(model, opt, policy=policy_file,
                                extras={"sched": sched}) as ckpt:
        loaded = ckpt.load_sync()  # opening the pipeline drops uncommitted steps
        assert loaded is not None and loaded.step == 5
    assert steps_on_s3() == {5}
    assert _run(_committed(s3_prefix)) == [5]


async def test_tiers_without_a_grace_period_drop_uncommitted_steps_at_once(
        tmp_path: Path) -> None:
    """The local tier (grace 0) behaves as before: no mtime is read, every step goes."""
    from asymcheck.retention import settled_uncommitted

    tier = open_tier(tmp_path.as_uri())
    assert tier.uncommitted_grace_s == 0
    await tier.put(f"{step_dir(3)}/data-x.bin", b"x")
    assert await settled_uncommitted(tier, [3, 9], {3: [f"{step_dir(3)}/data-x.bin"]}) == [3, 9]
    await _drop_uncommitted(tier)
    assert await tier.list() == []
    await tier.close()


# ------------------------------------------------------------- secrets stay secret


def _with_userinfo(url: str, access: str, secret: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{access}:{secret}@{parts.netloc}"))


def test_secrets_never_appear_in_ls_logs_or_errors(
        tmp_path: Path, s3_prefix: str, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    access = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        pytest.skip("the S3 credentials come from elsewhere than AWS_* variables")
    caplog.set_level(logging.DEBUG)

    # Credentials in the URL (the user info): the saves work, and nothing shows them.
    good = _write_policy(tmp_path / "good.toml", _with_userinfo(s3_prefix, access, secret),
                         timeout_s=20)
    model, opt, sched = make_training(seed=4)
    with asymcheck.Checkpointer(model, opt, policy=good, extras={"sched": sched}) as ckpt:
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(1).wait_all_sync(60)
    assert cli.main(["ls", "--policy", str(good)]) == 0
    assert cli.main(["ls", "--json", "--policy", str(good)]) == 0
    assert cli.main(["inspect", "--policy", str(good), "--tier", "s3", "latest"]) == 0
    out, err = capfd.readouterr()
    assert "s3://***:***@" in out and "committed" in out
    for text in (out, err):
        assert secret not in text and access not in text

    # A wrong secret key, in the options: one-line errors naming the tier, nothing secret.
    wrong = "Wr0ng-Secret-Key-For-The-Test"
    bad = _write_policy(tmp_path / "bad.toml", s3_prefix, timeout_s=20, retries=1,
                        access_key=access, secret_key=wrong)
    assert cli.main(["ls", "--policy", str(bad)]) == 2
    out, err = capfd.readouterr()
    assert "access denied" in out + err and "s3" in err
    model, opt, sched = make_training(seed=4)
    ckpt = asymcheck.Checkpointer(model, opt, policy=bad, extras={"sched": sched})
    try:
        train_steps(model, opt, sched, 1)
        handle = ckpt.save_sync(2)
        with pytest.raises(TierError) as failed:
            handle.durable("s3").wait(60)
    finally:
        with pytest.raises(asymcheck.CheckpointError) as info:
            ckpt.close_sync()
    out, err = capfd.readouterr()
    texts = [out, err, str(info.value), str(failed.value), repr(failed.value), caplog.text]
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert "access denied" in str(failed.value)
    for text in texts:
        assert wrong not in text and secret not in text, text
