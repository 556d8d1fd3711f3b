"""Shared-memory hygiene: per-job names, retention, a clean close, explicit clean-up only.

Guards: the host tier's directory named after the checkpoint directory (jobs never share or
clobber blocks, a restarted job finds its own), retention deleting old host blocks (the free
pool reuses them, close() drops it), close() aborting the spare block and finishing a pending
asymmetric snapshot so only committed checkpoints remain, and stale blocks of dead jobs being
removed only by an explicit ``asymcheck gc --stale-shm``, never as a side effect; and an
explicit ``asymcheck gc --keep N`` keeping the delta bases of the checkpoints it keeps.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

import asymcheck
from asymcheck import cli
from tests._util import load_from, make_training, snapshot, train_steps
from tests.faults._helpers import (
    MANIFEST,
    committed_steps,
    compare,
    host_dir,
    loaded_as_snapshot,
    read_manifest_file,
    restore_fresh,
    tmp_files,
    wait_until,
)
from tests.faults._stats import FaultStats


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def only_committed(root: Path, steps: list[int]) -> None:
    """``root`` holds exactly ``steps``, each its manifest and the files it lists."""
    expected = set()
    for step in steps:
        man = read_manifest_file(root, step)
        expected |= {f"step-{step:012d}/{MANIFEST}"} | {f"step-{step:012d}/{f.key}"
                                                       for f in man.files}
    assert set(files_under(root)) == expected
    extra = sorted(p.name for p in root.iterdir() if p.name not in
                   {f"step-{s:012d}" for s in steps})
    assert not extra, f"left in {root} besides the committed checkpoints: {extra}"


def save_steps(policy: asymcheck.Policy, steps: range, **options: Any) -> dict[int, Any]:
    model, opt, sched = make_training(seed=11)
    refs = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                **options) as ckpt:
        for step in steps:
            train_steps(model, opt, sched, 1)
            refs[step] = snapshot(model, opt, sched)
            ckpt.save_sync(step).wait_all_sync(60)
    return refs


def test_host_blocks_are_named_after_the_job_directory(tmp_path: Path, shm_root: Path,
                                                       fault_stats: FaultStats) -> None:
    a, b = asymcheck.default_policy(tmp_path / "a"), asymcheck.default_policy(tmp_path / "b")
    assert a.staging.url == asymcheck.default_policy(tmp_path / "a").staging.url
    assert a.staging.url != b.staging.url
    refs_a = save_steps(a, range(1, 3), mode="naive")
    refs_b = save_steps(b, range(7, 9), mode="naive")
    assert sorted(p.name for p in shm_root.iterdir()) == sorted(
        p.staging.url.removeprefix("shm://") for p in (a, b))
    assert committed_steps(host_dir(shm_root, a)) == [1, 2]
    assert committed_steps(host_dir(shm_root, b)) == [7, 8]
    for policy, refs, step in ((a, refs_a, 2), (b, refs_b, 8)):  # a restart finds its own
        restored, state = restore_fresh(policy)
        assert restored == step
        compare(refs[step], state, fault_stats)


def test_retention_removes_old_host_blocks_and_close_leaves_only_committed(
        tmp_path: Path, shm_root: Path) -> None:
    policy = asymcheck.Policy(tiers=(asymcheck.TierPolicy(name="host", url="shm://hyg", keep=2),))
    root = shm_root / "hyg"
    model, opt, sched = make_training(seed=12)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        for step in range(10):
            train_steps(model, opt, sched, 1)
            ckpt.save_sync(step).wait_all_sync(60)
            newest = [step - 1, step][-min(step + 1, 2):]
            wait_until(lambda n=newest: committed_steps(root) == n
                       and len(list(root.glob("step-*"))) == len(n),
                       f"host keeps only steps {newest}")
            pooled = list((root / ".free").glob("*")) if (root / ".free").exists() else []
            assert len(pooled) <= 4, f"free pool of {len(pooled)} blocks after {step + 1} saves"
    assert not tmp_files(root)
    only_committed(root, [8, 9])


def test_close_finishes_a_pending_asym_snapshot_and_leaves_only_committed(
        tmp_path: Path, shm_root: Path, fault_stats: FaultStats) -> None:
    policy = asymcheck.default_policy(tmp_path / "ckpt")
    model, opt, sched = make_training(seed=13)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                warmup_iterations=3, min_partition_bytes=1024) as ckpt:
        train_steps(model, opt, sched, 5)
        expected = snapshot(model, opt, sched)
        handle = ckpt.save_sync(5)
        assert handle.metrics["mode"] == "asym", handle.metrics
        assert not handle.staged.done(), "the copy is deferred to the next iteration"
    assert handle.staged.done() and handle.durable("local").done()
    root = host_dir(shm_root, policy)
    assert not tmp_files(root)
    only_committed(root, [5])
    restored, state = restore_fresh(policy)
    assert restored == 5
    compare(expected, state, fault_stats)


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_blocks_of_dead_jobs_go_only_through_an_explicit_gc(
        tmp_path: Path, shm_root: Path, capsys: pytest.CaptureFixture[str],
        fault_stats: FaultStats) -> None:
    dead = asymcheck.default_policy(tmp_path / "dead")
    live = asymcheck.default_policy(tmp_path / "live")
    node = os.uname().nodename
    save_steps(dead, range(1, 3), mode="naive", job=f"{node}-{dead_pid()}-{secrets.token_hex(3)}")
    dead_dir, live_dir = host_dir(shm_root, dead), host_dir(shm_root, live)
    stale_tmp = dead_dir / "step-000000000003" / f"data-x.bin.tmp-{dead_pid()}-00ab"
    stale_tmp.parent.mkdir()
    stale_tmp.write_bytes(b"half a block")
    before = files_under(dead_dir)

    refs = save_steps(live, range(1, 3), mode="naive")  # this process: a job that is alive
    assert files_under(dead_dir) == before, "another job's blocks changed implicitly"
    restored, _ = restore_fresh(live)
    assert restored == 2 and files_under(dead_dir) == before

    empty = f"file://{tmp_path}/empty"  # gc needs a tier; this one holds nothing
    assert cli.main(["gc", "--stale-shm", "--dry-run", "--tier", empty, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert f"would remove shm {dead_dir}" in out and "is dead" in out, out
    assert f"kept shm {live_dir}" in out and "is alive" in out, out
    assert files_under(dead_dir) == before

    assert cli.main(["gc", "--stale-shm", "--tier", empty, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert f"removed shm {dead_dir}" in out, out
    assert not dead_dir.exists()
    assert committed_steps(live_dir) == [1, 2]
    restored, state = restore_fresh(live)  # the live job is unaffected
    assert restored == 2
    compare(refs[2], state, fault_stats)


def test_explicit_gc_keeps_the_delta_bases_of_what_it_keeps(
        tmp_path: Path, shm_root: Path, capsys: pytest.CaptureFixture[str],
        fault_stats: FaultStats) -> None:
    """Steps 0 and 3 full, 1, 2 and 4 deltas; ``gc --keep 1`` keeps 4, so also its base 3."""
    local = tmp_path / "local"
    policy = asymcheck.Policy(
        tiers=(asymcheck.TierPolicy(name="host", url="shm://gc-bases", keep=1),
               asymcheck.TierPolicy(name="local", url=f"file://{local}", keep=10)),
        compression=asymcheck.CompressionPolicy(mode="always", full_every=3, min_bytes=1))
    refs = save_steps(policy, range(5), mode="naive")
    assert read_manifest_file(local, 4).info["compression"]["base_steps"] == [3]
    assert cli.main(["gc", "--tier", f"file://{local}", "--keep", "1"]) == 0
    out = capsys.readouterr().out
    loaded = None
    try:
        loaded = load_from(f"file://{local}", None, name="local")
    except asymcheck.RestoreError as e:
        raise AssertionError(f"gc broke the newest checkpoint ({out.strip()}): {e}") from e
    assert loaded is not None and loaded.step == 4
    compare(refs[4], loaded_as_snapshot(loaded), fault_stats)
    assert committed_steps(local) == [3, 4], out
