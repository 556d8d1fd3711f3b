"""Slow and failing tiers: a real LocalTier wrapped to delay calls or raise on the Nth one.

Guards: one flush queue and worker per tier (a slow tier never holds back another), a flush
error reported on that tier's own awaitable (``handle.durable(name)``) in bounded time while
staging and the other tiers commit, no manifest for a step whose flush failed (and its data
removed when the tier is opened again), and ``close()`` raising CheckpointError exactly once.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import asymcheck
from tests._util import load_from, make_training, snapshot, train_steps
from tests.faults._faulty import FaultPlan
from tests.faults._helpers import (
    committed_steps,
    compare,
    loaded_as_snapshot,
    read_manifest_file,
    restore_fresh,
    tmp_files,
    uncommitted_dirs,
)
from tests.faults._stats import FaultStats


def three_tiers(tmp_path: Path, plan: FaultPlan) -> asymcheck.Policy:
    """host, a faulty local tier ``flaky`` and a healthy local tier ``disk``."""
    return asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://tier-faults", keep=3),
        asymcheck.TierPolicy(name="flaky", url=f"faulty://{tmp_path}/flaky", keep=3,
                             options={"plan": plan.register()}),
        asymcheck.TierPolicy(name="disk", url=f"file://{tmp_path}/disk", keep=3),
    ))


def timed(fn: Callable[[], None]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def test_a_slow_tier_delays_only_its_own_durable_event(
        tmp_path: Path, faulty_scheme: str, fault_stats: FaultStats) -> None:
    plan = FaultPlan(ops=("put",), delay_s=0.8)
    policy = three_tiers(tmp_path, plan)
    model, opt, sched = make_training(seed=4)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        handles = []
        for step in (1, 2):
            train_steps(model, opt, sched, 1)
            handles.append(ckpt.save_sync(step))
            assert timed(lambda: handles[-1].staged.wait(10)) < 5
        for h in handles:
            h.durable("disk").wait(10)
        assert not handles[0].durable("flaky").done(), "the slow tier finished too soon"
        for h in handles:  # each put waits 0.8 s: two saves, at least two puts each
            h.durable("flaky").wait(30)
    fault_stats.fault("slow", plan.injected["slow"])
    assert plan.injected["slow"] >= 4
    assert committed_steps(tmp_path / "flaky") == [1, 2]
    assert committed_steps(tmp_path / "disk") == [1, 2]


def test_a_failing_tier_reports_on_its_own_event_and_close_raises_once(
        tmp_path: Path, faulty_scheme: str, fault_stats: FaultStats) -> None:
    plan = FaultPlan(ops=("put",), keys=("step-000000000002/",), fail_on=frozenset({1}))
    policy = three_tiers(tmp_path, plan)
    model, opt, sched = make_training(seed=5)
    refs = {}
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                  mode="naive")
    handles = {}
    for step in (1, 2, 3):
        train_steps(model, opt, sched, 1)
        refs[step] = snapshot(model, opt, sched)
        handles[step] = ckpt.save_sync(step)
        handles[step].staged.wait(10)
        if step == 2:
            with pytest.raises(OSError) as info:  # not TimeoutError: errno says which
                handles[2].durable("flaky").wait(10)
            assert info.value.errno == errno.EIO
            assert "injected fault" in str(info.value) and "flaky" in str(info.value)
        else:
            handles[step].durable("flaky").wait(10)
        handles[step].durable("host").wait(10)
        handles[step].durable("disk").wait(10)
    fault_stats.fault("raise", plan.injected["raise"])
    assert handles[2].staged.exception() is None
    assert committed_steps(tmp_path / "flaky") == [1, 3], "no manifest for the failed flush"
    assert committed_steps(tmp_path / "disk") == [1, 2, 3], "the healthy tier got every step"

    with pytest.raises(asymcheck.CheckpointError, match="1 checkpoint operation") as err:
        ckpt.close_sync()
    assert isinstance(err.value.__cause__, OSError)
    ckpt.close_sync()  # raised once: a second close is quiet
    assert not tmp_files(tmp_path / "flaky") and not uncommitted_dirs(tmp_path / "flaky")

    loaded = load_from(f"file://{tmp_path}/flaky", 3, name="flaky")
    assert loaded is not None
    compare(refs[3], loaded_as_snapshot(loaded), fault_stats)
    restored, state = restore_fresh(policy)
    assert restored == 3
    compare(refs[3], state, fault_stats)


def test_a_tier_that_is_down_fails_every_save_on_it_in_bounded_time(
        tmp_path: Path, faulty_scheme: str, fault_stats: FaultStats) -> None:
    plan = FaultPlan(ops=("put", "list", "get", "delete"), fail_all=True,
                     errno=errno.ECONNREFUSED, delay_s=0.05)
    policy = three_tiers(tmp_path, plan)
    model, opt, sched = make_training(seed=6)
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                  mode="naive")
    for step in range(4):
        train_steps(model, opt, sched, 1)
        handle = ckpt.save_sync(step)
        handle.durable("disk").wait(10)
        with pytest.raises(OSError) as info:
            handle.durable("flaky").wait(10)
        assert info.value.errno == errno.ECONNREFUSED
    fault_stats.fault("raise", plan.injected["raise"])
    with pytest.raises(asymcheck.CheckpointError, match="4 checkpoint operation"):
        ckpt.close_sync()
    ckpt.close_sync()
    assert committed_steps(tmp_path / "disk") == [1, 2, 3]
    expected = snapshot(model, opt, sched)
    restored, state = restore_fresh(policy)  # an unreachable tier never blocks a restore
    assert restored == 3
    compare(expected, state, fault_stats)


def test_a_failing_manifest_write_leaves_the_step_uncommitted(
        tmp_path: Path, faulty_scheme: str, fault_stats: FaultStats) -> None:
    plan = FaultPlan(ops=("put",), keys=("step-000000000002/manifest",), fail_on=frozenset({1}))
    policy = three_tiers(tmp_path, plan)
    model, opt, sched = make_training(seed=7)
    refs = {}
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                  mode="naive")
    for step in (1, 2):
        train_steps(model, opt, sched, 1)
        refs[step] = snapshot(model, opt, sched)
        handle = ckpt.save_sync(step)
        handle.durable("disk").wait(10)
        if step == 2:
            with pytest.raises(OSError, match="injected fault"):
                handle.durable("flaky").wait(10)
        else:
            handle.durable("flaky").wait(10)
    fault_stats.fault("raise", plan.injected["raise"])
    with pytest.raises(asymcheck.CheckpointError):
        ckpt.close_sync()
    assert committed_steps(tmp_path / "flaky") == [1]
    loaded = load_from(f"file://{tmp_path}/flaky", None, name="flaky")
    assert loaded is not None and loaded.step == 1
    compare(refs[1], loaded_as_snapshot(loaded), fault_stats)
    restored, state = restore_fresh(policy)  # opening the tiers removes the orphaned data
    assert restored == 2
    compare(refs[2], state, fault_stats)
    assert not uncommitted_dirs(tmp_path / "flaky") and not tmp_files(tmp_path / "flaky")


def test_a_failing_retention_delete_never_leaves_a_delta_without_its_base(
        tmp_path: Path, faulty_scheme: str, fault_stats: FaultStats) -> None:
    """Steps 0 and 3 are full, 1, 2 and 4 deltas (full_every=3); keep=2. After step 4,
    retention removes 0 and 2: if removing 2 fails (or the process dies there), 2 must not
    be left committed without its base 0. Deleting newest first guarantees it."""
    plan = FaultPlan(ops=("delete",), keys=("step-000000000002/",), fail_all=True)
    policy = asymcheck.Policy(
        tiers=(asymcheck.TierPolicy(name="host", url="shm://bases", keep=2),
               asymcheck.TierPolicy(name="local", url=f"faulty://{tmp_path}/local", keep=2,
                                    options={"plan": plan.register()})),
        compression=asymcheck.CompressionPolicy(mode="always", full_every=3, min_bytes=1))
    model, opt, sched = make_training(seed=8)
    refs = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        for step in range(5):
            train_steps(model, opt, sched, 1)
            refs[step] = snapshot(model, opt, sched)
            ckpt.save_sync(step).wait_all_sync(30)
    fault_stats.fault("raise", plan.injected["raise"])
    local = tmp_path / "local"
    bases = {s: read_manifest_file(local, s).info.get("compression", {}).get("base_steps")
             for s in committed_steps(local)}
    assert any(bases.values()), f"no delta was written: {bases}"
    for step in committed_steps(local):  # every committed checkpoint restores on its own
        try:
            loaded = load_from(f"file://{local}", step, name="local")
        except asymcheck.RestoreError as e:
            raise AssertionError(f"committed step {step} is unrestorable (manifests and their "
                                 f"delta bases: {bases}): {e}") from e
        assert loaded is not None
        compare(refs[step], loaded_as_snapshot(loaded), fault_stats)
