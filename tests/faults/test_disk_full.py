"""Disk full: the local tier lives on an 8 MiB tmpfs that runs out of space mid-run.

Guards: the local tier's tmp + rename commit (a failed write leaves no partial file and no
tmp file), data before manifest (no manifest for the failed step), the errno kept through
the tier's error wrapping (ENOSPC, with tier and key in the message), retention that runs
only after a successful commit (older local checkpoints stay), and the host tier committing
independently of the local one (the failed step still restores from shared memory).

The same test also runs against ``faulty://``, a real LocalTier that raises ENOSPC once its
emulated free space is used up; it is the one that runs where mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import asymcheck
from tests._util import load_from, make_training, snapshot, train_steps
from tests.faults._faulty import FaultPlan
from tests.faults._helpers import (
    committed_steps,
    compare,
    host_dir,
    loaded_as_snapshot,
    restore_fresh,
    tmp_files,
    uncommitted_dirs,
    wait_until,
)
from tests.faults._stats import FaultStats

WIDTH = 256  # about 1.6 MB per checkpoint: an 8 MiB disk holds a few


class SmallDisk:
    """An 8 MiB file system (tmpfs) or, where mounting is not allowed, an emulated one."""

    def __init__(self, mount_point: Path, emulate: bool) -> None:
        self.root = mount_point
        self.plan: FaultPlan | None = None
        self.filler = mount_point / "filler"
        self.mounted = False
        mount_point.mkdir()
        if emulate:
            self.plan = FaultPlan(ops=())
            return
        try:
            out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                  str(mount_point)], capture_output=True, text=True, timeout=30)
            self.mounted = out.returncode == 0
        except (OSError, subprocess.SubprocessError):
            pass

    def url(self) -> str:
        if self.plan is None:
            return f"file://{self.root}/ckpt"
        return f"faulty://{self.root}/ckpt"

    def options(self) -> dict[str, Any]:
        return {} if self.plan is None else {"plan": self.plan.register()}

    def fill(self, leave_bytes: int) -> None:
        if self.plan is not None:
            self.plan.space_bytes = leave_bytes
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, free - leave_bytes)
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.plan is not None:
            self.plan.space_bytes = None
        else:
            self.filler.unlink()

    def close(self) -> None:
        if self.mounted:
            out = subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30)
            if out.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)


@pytest.fixture(params=["tmpfs", "emulated"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path,
               faulty_scheme: str) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "small", emulate=request.param == "emulated")
    if request.param == "tmpfs" and not disk.mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the emulated disk runs instead")
    yield disk
    disk.close()


def trainer(ckpt: asymcheck.Checkpointer, model: Any, opt: Any, sched: Any,
            refs: dict[int, dict[str, Any]]) -> Callable[[int], asymcheck.SaveHandle]:
    """Train one step, keep a reference copy of the state, save it as ``step``."""
    def save(step: int) -> asymcheck.SaveHandle:
        train_steps(model, opt, sched, 1)
        refs[step] = snapshot(model, opt, sched)
        return ckpt.save_sync(step)
    return save


def test_disk_full_fails_the_local_save_only_and_keeps_every_committed_checkpoint(
        small_disk: SmallDisk, tmp_path: Path, shm_root: Path, fault_stats: FaultStats) -> None:
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://disk-full", keep=2),
        asymcheck.TierPolicy(name="local", url=small_disk.url(), keep=2,
                             options=small_disk.options()),
    ))
    local = small_disk.root / "ckpt"
    refs: dict[int, dict[str, Any]] = {}
    model, opt, sched = make_training(seed=2, width=WIDTH)
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                  mode="naive")

    save = trainer(ckpt, model, opt, sched, refs)

    for step in (1, 2, 3):
        save(step).wait_all_sync(60)
    wait_until(lambda: sorted(p.name for p in local.iterdir()) == [
        "step-000000000002", "step-000000000003"], "local retention removed step 1 entirely")

    small_disk.fill(leave_bytes=300_000)  # less than one checkpoint
    fault_stats.fault("enospc")
    failed = save(4)
    failed.staged.wait(60)
    failed.durable("host").wait(60)
    with pytest.raises(OSError) as info:
        failed.durable("local").wait(60)
    err = info.value
    assert err.errno == errno.ENOSPC, repr(err)
    assert "No space left on device" in str(err) and "local" in str(err) \
        and "step-000000000004" in str(err), str(err)

    again = save(5)  # training goes on: the host tier still takes every checkpoint
    again.staged.wait(60)
    with pytest.raises(OSError) as info:
        again.durable("local").wait(60)
    assert info.value.errno == errno.ENOSPC
    fault_stats.fault("enospc")
    with pytest.raises(asymcheck.CheckpointError):
        ckpt.close_sync()

    assert committed_steps(local) == [2, 3], "no manifest for a failed step, none deleted"
    assert committed_steps(host_dir(shm_root, policy)) == [4, 5]
    for step in (5, 4):  # the host tier holds the failed steps
        restored, state = restore_fresh(policy, step if step != 5 else None, width=WIDTH)
        assert restored == step
        compare(refs[step], state, fault_stats)

    shutil.rmtree(host_dir(shm_root, policy))  # memory lost: the local copies must do
    for step in (3, 2):
        restored, state = restore_fresh(policy, step if step != 3 else None, width=WIDTH)
        assert restored == step
        compare(refs[step], state, fault_stats)
    assert not tmp_files(local), tmp_files(local)
    assert not uncommitted_dirs(local), uncommitted_dirs(local)
    assert sorted(p.name for p in local.iterdir()) == ["step-000000000002",
                                                       "step-000000000003"]

    small_disk.free()  # space again: saving to disk works, retention resumes
    model, opt, sched = make_training(seed=2, width=WIDTH)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        assert ckpt.restore_sync() == 3
        train_steps(model, opt, sched, 1)
        refs[6] = snapshot(model, opt, sched)
        ckpt.save_sync(6).wait_all_sync(60)
    assert committed_steps(local) == [3, 6]
    restored, state = restore_fresh(policy, width=WIDTH)
    assert restored == 6
    compare(refs[6], state, fault_stats)


@pytest.mark.parametrize("fails", ["second batch file", "manifest"])
def test_a_flush_failing_partway_removes_the_data_files_it_wrote(
        fails: str, tmp_path: Path, shm_root: Path, faulty_scheme: str,
        fault_stats: FaultStats) -> None:
    """The failed flush deletes its own batch files right after the failure is reported (not
    when the tiers are next opened; done once ``wait_idle`` returns); the host copy of the
    step and the next save are unaffected."""
    plan = FaultPlan(keys=("data-",) if fails == "second batch file" else ("manifest",),
                     fail_on=frozenset({2 if fails == "second batch file" else 1}),
                     errno=errno.ENOSPC)
    local = tmp_path / "ckpt"
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://partial-flush", keep=2),
        asymcheck.TierPolicy(name="local", url=f"{faulty_scheme}://{local}", keep=2,
                             batch_bytes=64 << 10, options={"plan": plan.register()}),
    ))
    refs: dict[int, dict[str, Any]] = {}
    model, opt, sched = make_training(seed=3, width=WIDTH)
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                  mode="naive")

    save = trainer(ckpt, model, opt, sched, refs)

    failed = save(1)
    failed.durable("host").wait(60)
    with pytest.raises(OSError) as info:
        failed.durable("local").wait(60)
    assert info.value.errno == errno.ENOSPC, repr(info.value)
    fault_stats.fault("enospc")
    assert plan.injected["raise"] == 1
    ckpt.wait_idle_sync()
    left = [p for p in (local / "step-000000000001").rglob("*") if p.is_file()]
    assert not left, f"the failed flush left {left}"
    assert committed_steps(local) == [] and not tmp_files(local)
    loaded = load_from("shm://partial-flush", 1)  # the host copy is whole
    assert loaded is not None and loaded.step == 1
    compare(refs[1], loaded_as_snapshot(loaded), fault_stats)

    save(2).wait_all_sync(60)  # the next save commits normally
    with pytest.raises(asymcheck.CheckpointError, match="injected fault"):
        ckpt.close_sync()
    assert committed_steps(local) == [2]
    assert [p.name for p in local.iterdir()] == ["step-000000000002"]
    shutil.rmtree(host_dir(shm_root, policy))  # from the disk alone
    restored, state = restore_fresh(policy, width=WIDTH)
    assert restored == 2
    compare(refs[2], state, fault_stats)
