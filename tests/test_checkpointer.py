"""Save/restore through the default tiers: bit-exact, crash-safe, with clear errors."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import asymcheck
from asymcheck.layout import manifest_key
from asymcheck.restore import load_checkpoint
from tests._util import assert_same, make_training, snapshot, train_steps
from tiers.registry import open_tier

REPO = Path(__file__).resolve().parents[1]


def _data_files(root: Path, step: int) -> list[Path]:
    return sorted((root / f"step-{step:012d}").glob("data-*.bin"))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _host_dir(shm_root: Path, policy: asymcheck.Policy) -> Path:
    return shm_root / policy.staging.url.removeprefix("shm://")


def test_restore_returns_none_when_nothing_is_committed(policy: asymcheck.Policy) -> None:
    model, opt, sched = make_training()
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        assert ckpt.restore_sync() is None


def test_save_and_restore_are_bit_exact_in_the_same_process(policy: asymcheck.Policy) -> None:
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 3)
    expected = snapshot(model, opt, sched)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        handle = ckpt.save_sync(3)
        handle.wait_all_sync(timeout=60)
        rng_after_save = torch.rand(5)
        assert handle.stall_s > 0 and handle.metrics["state_bytes"] > 0
        train_steps(model, opt, sched, 2)  # move everything away from the saved state
        assert ckpt.restore_sync() == 3
        assert_same(expected, snapshot(model, opt, sched))
        assert torch.equal(torch.rand(5), rng_after_save), "RNG stream must continue identically"


async def test_async_api_saves_and_restores(policy: asymcheck.Policy) -> None:
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 2)
    expected = snapshot(model, opt, sched)
    async with asymcheck.Checkpointer(model, opt, policy=policy, extras={"s": sched}) as ckpt:
        handle = await ckpt.save(7)
        await handle.staged
        await handle.durable("local")
        train_steps(model, opt, sched, 1)
        assert await ckpt.restore() == 7
    assert_same(expected, snapshot(model, opt, sched))


def test_restore_in_a_new_process_is_bit_exact(policy: asymcheck.Policy, tmp_path: Path,
                                               shm_root: Path) -> None:
    model, opt, sched = make_training(seed=3)
    train_steps(model, opt, sched, 4)
    torch.save(snapshot(model, opt, sched), tmp_path / "expected.pt")
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        ckpt.save_sync(4).wait_all_sync(60)
        torch.save(torch.rand(8), tmp_path / "rng.pt")
    child = textwrap.dedent(f"""
        import torch, asymcheck
        from tests._util import make_training, snapshot, assert_same
        model, opt, sched = make_training(seed=99)
        policy = asymcheck.default_policy({str(tmp_path / "checkpoints")!r})
        with asymcheck.Checkpointer(model, opt, policy=policy, extras={{"sched": sched}}) as c:
            assert c.restore_sync() == 4
        assert_same(torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True),
                    snapshot(model, opt, sched))
        assert torch.equal(torch.rand(8), torch.load({str(tmp_path / "rng.pt")!r}))
        print("RESTORED-OK")
    """)
    out = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "RESTORED-OK" in out.stdout


def test_host_copy_survives_sigkill_of_the_saving_process(policy: asymcheck.Policy,
                                                          tmp_path: Path, local_dir: Path) -> None:
    child = textwrap.dedent(f"""
        import os, signal, torch, asymcheck
        from tests._util import make_training, snapshot, train_steps
        model, opt, sched = make_training(seed=5)
        train_steps(model, opt, sched, 3)
        torch.save(snapshot(model, opt, sched), {str(tmp_path / "expected.pt")!r})
        policy = asymcheck.default_policy({str(tmp_path / "checkpoints")!r})
        c = asymcheck.Checkpointer(model, opt, policy=policy, extras={{"sched": sched}})
        c.save_sync(3).staged.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == -signal.SIGKILL, out.stderr
    if local_dir.exists():  # whatever reached the disk is removed: only memory remains
        for p in sorted(local_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    model, opt, sched = make_training(seed=11)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        loaded = ckpt.load_sync(None)
        assert loaded is not None and set(loaded.sources) == {"host"}
        assert ckpt.restore_sync() == 3
    assert_same(torch.load(tmp_path / "expected.pt", weights_only=True),
                snapshot(model, opt, sched))


def _save_on_both_tiers(policy: asymcheck.Policy, step: int = 2) -> dict:
    model, opt, sched = make_training(seed=7)
    train_steps(model, opt, sched, step)
    expected = snapshot(model, opt, sched)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        ckpt.save_sync(step).wait_all_sync(60)
    return expected


def _restore_fresh(policy: asymcheck.Policy) -> tuple[int | None, dict, dict[str, int]]:
    model, opt, sched = make_training(seed=8)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        loaded = ckpt.load_sync(None)
        step = ckpt.restore_sync()
    assert loaded is not None
    return step, snapshot(model, opt, sched), loaded.sources


def test_corrupt_host_chunk_falls_back_to_the_local_copy(policy: asymcheck.Policy,
                                                         shm_root: Path) -> None:
    expected = _save_on_both_tiers(policy)
    [data] = _data_files(_host_dir(shm_root, policy), 2)
    _flip_byte(data, 100)
    step, state, sources = _restore_fresh(policy)
    # only the tensor with the flipped byte comes from disk; the rest are read from memory
    assert step == 2 and sources.get("local", 0) == 1 and sources.get("host", 0) >= 1
    assert_same(expected, state)


def test_corrupt_local_chunk_is_detected_and_the_host_copy_is_used(
        policy: asymcheck.Policy, local_dir: Path) -> None:
    expected = _save_on_both_tiers(policy)
    [data] = _data_files(local_dir, 2)
    _flip_byte(data, 100)
    step, state, sources = _restore_fresh(policy)
    assert step == 2 and set(sources) == {"host"}
    assert_same(expected, state)

    async def read_local_only() -> None:
        tier = open_tier(policy.tier("local").url, name="local")
        try:
            await load_checkpoint([tier], 2)
        finally:
            await tier.close()

    import asyncio
    with pytest.raises(asymcheck.RestoreError, match="checksum mismatch"):
        asyncio.run(read_local_only())


def test_no_good_copy_gives_a_clear_error(policy: asymcheck.Policy, local_dir: Path,
                                          shm_root: Path) -> None:
    _save_on_both_tiers(policy)
    _flip_byte(_data_files(local_dir, 2)[0], 100)
    _flip_byte(_data_files(_host_dir(shm_root, policy), 2)[0], 100)
    model, opt, sched = make_training()
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt, \
            pytest.raises(asymcheck.RestoreError) as err:
        ckpt.restore_sync()
    msg = str(err.value)
    assert "step 2" in msg and "host" in msg and "local" in msg and "checksum mismatch" in msg


def test_corrupt_manifest_on_host_uses_the_local_manifest(policy: asymcheck.Policy,
                                                          shm_root: Path) -> None:
    expected = _save_on_both_tiers(policy)
    _flip_byte(_host_dir(shm_root, policy) / manifest_key(2), 40)
    step, state, sources = _restore_fresh(policy)
    assert step == 2 and set(sources) == {"local"}
    assert_same(expected, state)


KILL_CHILD = """
import os, signal, sys, torch, asymcheck
from tests._util import make_training, snapshot, train_steps
where = sys.argv[1]
model, opt, sched = make_training(seed=21)
policy = asymcheck.default_policy(sys.argv[2])
c = asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched})
train_steps(model, opt, sched, 1)
torch.save(snapshot(model, opt, sched), sys.argv[3])
c.save_sync(1).wait_all_sync(60)
train_steps(model, opt, sched, 1)
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "staging":
    import tiers.host
    tiers.host.HostBlock.commit = die        # dies before the host commit of step 2
else:
    os.fsync = die                           # dies while step 2's data goes to disk
c.save_sync(2).wait_all_sync(60)
print("NOT-KILLED")
"""


@pytest.mark.parametrize("where", ["staging", "flush"])
def test_kill_during_a_save_keeps_the_previous_checkpoint(
        where: str, policy: asymcheck.Policy, tmp_path: Path, local_dir: Path,
        shm_root: Path) -> None:
    expected = tmp_path / "expected.pt"
    out = subprocess.run([sys.executable, "-c", KILL_CHILD, where,
                          str(tmp_path / "checkpoints"), str(expected)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    assert not (local_dir / manifest_key(2)).exists(), "the partial save must stay uncommitted"
    host_dir = _host_dir(shm_root, policy)
    if where == "staging":
        assert not (host_dir / manifest_key(2)).exists()
    else:  # step 2 was complete in memory; drop it to prove step 1 on disk is intact
        assert (host_dir / manifest_key(2)).exists()
        for p in sorted(host_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    step, state, _ = _restore_fresh(policy)
    assert step == 1
    assert_same(torch.load(expected, weights_only=True), state)
    # the partial step directory was cleaned up when the tiers were opened again
    assert not (local_dir / "step-000000000002").exists()


def test_retention_keeps_the_newest_per_tier(policy: asymcheck.Policy, local_dir: Path,
                                             shm_root: Path) -> None:
    model, opt, sched = make_training()
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        for step in range(6):
            train_steps(model, opt, sched, 1)
            ckpt.save_sync(step).wait_all_sync(60)
    host_dir = _host_dir(shm_root, policy)
    host_steps = sorted(p.parent.name for p in host_dir.glob("step-*/manifest.msgpack"))
    local_steps = sorted(p.parent.name for p in local_dir.glob("step-*/manifest.msgpack"))
    assert host_steps == [f"step-{s:012d}" for s in (4, 5)]
    assert local_steps == [f"step-{s:012d}" for s in (3, 4, 5)]
    assert sorted(p.name for p in local_dir.iterdir()) == local_steps  # no leftovers


def test_every_sends_only_every_nth_checkpoint_to_a_tier(tmp_path: Path) -> None:
    policy_file = tmp_path / "tiers.toml"
    policy_file.write_text(textwrap.dedent("""
        [[tier]]
        name = "host"
        url = "shm://every-test"
        keep = 1
        [[tier]]
        name = "disk"
        url = "file:disk"
        keep = 10
        every = 3
    """))
    model, opt, _ = make_training()
    with asymcheck.Checkpointer(model, opt, policy=policy_file) as ckpt:
        handles = [ckpt.save_sync(s) for s in range(7)]
        for h in handles:
            h.wait_all_sync(60)
    assert [h.tiers for h in handles][:4] == [("host", "disk"), ("host",), ("host",),
                                              ("host", "disk")]
    with pytest.raises(KeyError, match="not scheduled"):
        handles[1].durable("disk")
    steps = sorted(p.parent.name for p in (tmp_path / "disk").glob("step-*/manifest.msgpack"))
    assert steps == [f"step-{s:012d}" for s in (0, 3, 6)]


def test_background_failure_is_reported_on_the_tier_and_raised_once_at_close(
        tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://failing-test"),
        asymcheck.TierPolicy(name="local", url=f"file://{blocker}/ckpt"),
    ))
    model, opt, sched = make_training()
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy)
    handle = ckpt.save_sync(1)
    handle.staged.wait(60)  # memory still works
    with pytest.raises(OSError):
        handle.durable("local").wait(60)
    train_steps(model, opt, sched, 1)  # training goes on
    ckpt.save_sync(2).staged.wait(60)
    with pytest.raises(asymcheck.CheckpointError, match="failed in the background"):
        ckpt.close_sync()
    ckpt.close_sync()  # raised exactly once


def test_extras_without_state_dict_are_rejected(policy: asymcheck.Policy) -> None:
    model, opt, _ = make_training()
    with pytest.raises(TypeError, match="state_dict"):
        asymcheck.Checkpointer(model, opt, policy=policy, extras={"bad": object()})  # type: ignore[dict-item]


def test_a_closed_checkpointer_frees_its_stager_and_the_state_it_holds_without_gc(
        policy: asymcheck.Policy) -> None:
    """Its hooks' listeners held the stager, and through it the model and optimizers, in a
    reference cycle: a job that made a new checkpointer kept the old one's state (a copy of
    the state's size per closed checkpointer) until the garbage collector ran."""
    model, opt, sched = make_training()
    ckpt = asymcheck.Checkpointer(model, opt, policy=policy, mode="asym", warmup_iterations=2)
    for step in range(4):
        train_steps(model, opt, sched, 1)
        ckpt.save_sync(step)
    ckpt.close_sync()
    stager = weakref.ref(ckpt._stager)
    gc.disable()
    try:
        del ckpt
        assert stager() is None
    finally:
        gc.enable()
