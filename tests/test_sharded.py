"""Sharded training state: FSDP2 (``fully_shard`` on a CPU mesh, gloo on loopback) and DTensors.

Each rank stores its local shards, keyed by fully qualified parameter names; a checkpoint
restores bit for bit into any world size (2 -> 1, 3, 4; 4 -> 2), from a plain single-process
model and into one, from DistributedDataParallel; tied weights are stored once; bad input
(other shapes or names, a region lost on every tier, a rank killed before it reports its shard)
fails cleanly on every rank.

Multi-rank tests start their ranks as processes running ``tests._fsdp.child`` (a scenario
there), with the test's own shared-memory root in their environment; they are forked from a
server process that imported torch once, which saves most of each rank's start-up time. The
model is tiny and its sizes (7 -> 5 -> 5 -> 3) split unevenly: over 4 ranks, some ranks hold
empty shards.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asymcheck
from asymcheck.layout import manifest_key, rank_dir, shard_manifest_key, step_dir
from asymcheck.manifest import Manifest
from tests import _fsdp
from tests._util import assert_same

#: Ranks are processes forked from a server that imported ``tests._fsdp`` (and torch) once.
_RANKS = multiprocessing.get_context("forkserver")
_RANKS.set_forkserver_preload(["tests._fsdp"])
SHM = Path("/dev/shm")

#: steps the shared 2-rank FSDP2 checkpoint saved (1..SAVED_STEPS; the newest is restored)
SAVED_STEPS = 3


# ------------------------------------------------------------------------------ helpers
def _spawn(scenario: str, world: int, work: Path, *, args: dict[str, Any] | None = None,
           shm: Path | None = None, timeout: float = 90) -> list[tuple[int, str]]:
    """Run ``scenario`` on ``world`` ranks; (exit code, output) per rank. ``shm`` overrides the
    shared-memory root of the ranks (a fresh one: nothing staged there)."""
    init = work / f"pg-{uuid.uuid4().hex[:8]}"
    if shm is not None:
        shm.mkdir(parents=True, exist_ok=True)
    env = {"ASYMCHECK_TEST_ARGS": json.dumps(args or {}),
           "ASYMCHECK_SHM_ROOT": str(shm or os.environ["ASYMCHECK_SHM_ROOT"])}
    logs = [work / f"{scenario}-{init.name}-rank{r}.log" for r in range(world)]
    procs = [_RANKS.Process(target=_fsdp.run_rank, name=f"{scenario}-rank{r}",
                            args=(scenario, r, world, str(work), str(init), env, str(logs[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out = []
    for p, log in zip(procs, logs, strict=True):
        p.join(max(0.0, deadline - time.monotonic()))
        killed = p.is_alive()
        if killed:
            p.kill()
            p.join()
        text = log.read_text(errors="replace") if log.exists() else ""
        out.append((p.exitcode if p.exitcode is not None else -1,
                    text + ("\n<killed after the timeout>" if killed else "")))
    return out


def _ok(results: list[tuple[int, str]], word: str) -> None:
    for rank, (code, text) in enumerate(results):
        assert code == 0 and f"{word} {rank}" in text, f"rank {rank} exited {code}:\n{text}"


def _failures(results: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """The error each rank of a ``restore-fails`` run printed (every rank must have failed)."""
    found = []
    for rank, (code, text) in enumerate(results):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"FAILED {rank} ")]
        assert code == 0 and lines, f"rank {rank} did not fail cleanly (exit {code}):\n{text}"
        found.append(json.loads(lines[0][len(f"FAILED {rank} "):]))
    return found


def _shape(shape: tuple[int, ...]) -> re.Pattern[str]:
    """A shape as an error message may write it: (5, 7), [5, 7], torch.Size([5, 7]), 5x7."""
    return re.compile(r"(?<!\d)" + r"\s*[,x]\s*".join(map(str, shape)) + r"(?!\d)")


def _copy_checkpoint(src: Path, dst: Path) -> None:
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copy(src / "expected.pt", dst / "expected.pt")


def _print_sources(results: list[tuple[int, str]]) -> None:
    for _, text in results:
        for line in text.splitlines():
            if line.startswith("SOURCES "):
                print(line)


@pytest.fixture(scope="module")
def fsdp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-rank FSDP2 job's checkpoints (steps 1..SAVED_STEPS, on host + local) and the full
    state of the newest (``expected.pt``). Tests copy ``checkpoints/`` and restore it with a
    fresh shared-memory root, so it comes from the local tier alone."""
    work = tmp_path_factory.mktemp("fsdp2-2ranks")
    shm = SHM / f"asymcheck-test-{uuid.uuid4().hex[:10]}"
    try:
        _ok(_spawn("save", 2, work, args={"kind": "fsdp", "steps": SAVED_STEPS}, shm=shm),
            "SAVED")
        yield work
    finally:
        shutil.rmtree(shm, ignore_errors=True)


# ---------------------------------------------------- 1. local shards, asym mode, bit for bit
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_checkpoints_hold_each_ranks_local_shards_bit_exact(
        tmp_path: Path, world: int) -> None:
    """Save every 2nd of 8 steps (asym mode after a 2-iteration warm-up); every committed
    checkpoint, loaded and restored, equals the local shards recorded right after its save."""
    results = _spawn("train", world, tmp_path, args={"steps": 8, "every": 2})
    _ok(results, "VERIFIED")
    man = Manifest.from_bytes((tmp_path / "checkpoints" / manifest_key(8)).read_bytes())
    assert man.world_size == world
    stored = [0] * world
    for rank in range(world):
        shard = Manifest.from_bytes(
            (tmp_path / "checkpoints" / shard_manifest_key(8, rank)).read_bytes())
        model_paths = [t.path for t in shard.tensors if t.path.startswith("model")]
        assert not any("module." in p for p in model_paths), model_paths
        params = [p for p in model_paths if p.endswith((".weight", ".bias"))]
        stored[rank] = sum(t.nbytes for t in shard.tensors if t.path in params)
    # each parameter's bytes are stored once, split over the ranks' shards
    assert sum(stored) == sum(p.nbytes for p in _fsdp.Net().parameters()), stored


# --------------------------------------------------------------- 2. resharding, model + AdamW
@pytest.mark.parametrize("world", [1, 3, 4])
def test_a_2_rank_fsdp2_checkpoint_restores_at_another_world_size(
        fsdp2_checkpoint: Path, tmp_path: Path, shm_root: Path, world: int) -> None:
    """2 -> 1, 3, 4 ranks, from the local tier: every full tensor (model and AdamW state)
    equals the one saved, bit for bit."""
    _copy_checkpoint(fsdp2_checkpoint, tmp_path)
    results = _spawn("restore", world, tmp_path, args={"kind": "fsdp", "tier": "local"})
    _ok(results, "RESTORED")
    _print_sources(results)


def test_a_4_rank_fsdp2_checkpoint_restores_at_2_ranks(tmp_path: Path, shm_root: Path) -> None:
    _ok(_spawn("save", 4, tmp_path, args={"kind": "fsdp", "steps": 2}, shm=shm_root / "save"),
        "SAVED")
    man = Manifest.from_bytes((tmp_path / "checkpoints" / manifest_key(2)).read_bytes())
    assert man.world_size == 4
    results = _spawn("restore", 2, tmp_path, args={"kind": "fsdp", "tier": "local"})
    _ok(results, "RESTORED")
    _print_sources(results)


@pytest.fixture
def hdfs_url() -> Iterator[str]:
    """A fresh directory on the MiniDFS test cluster (ASYMCHECK_TEST_HDFS), removed afterwards."""
    pytest.importorskip("hdfs_native")
    from tests.tiers.tier_cases import hdfs_base_url
    from tiers.hdfs import HdfsTier

    url = f"{hdfs_base_url()}/sharded-{uuid.uuid4().hex[:12]}"

    async def delete() -> None:
        async with HdfsTier(url) as tier:
            await tier.delete_prefix("")
            await tier.remove_stale_tmp(older_than_s=0)

    yield url
    asyncio.run(delete())


@pytest.mark.hdfs
@pytest.mark.parametrize(("saved", "restored"), [(2, (1, 3, 4)), (4, (2,))])
def test_an_fsdp2_checkpoint_restores_at_other_world_sizes_from_hdfs(
        tmp_path: Path, hdfs_url: str, saved: int, restored: tuple[int, ...]) -> None:
    """The save's only durable tier is HDFS; each restore job (another host tier) reads it
    from HDFS alone: 2 -> 1, 3, 4 and 4 -> 2."""
    tag = uuid.uuid4().hex[:10]
    save = {"host": f"sharded-save-{tag}", "tier": "hdfs", "url": hdfs_url}
    _ok(_spawn("save", saved, tmp_path, args={"kind": "fsdp", "steps": 2, "policy": save}),
        "SAVED")
    for world in restored:
        restore = {**save, "host": f"sharded-restore-{tag}-{world}"}
        results = _spawn("restore", world, tmp_path,
                         args={"kind": "fsdp", "policy": restore, "tier": "hdfs"})
        _ok(results, "RESTORED")
        _print_sources(results)


# ------------------------------------------------------- 3. plain single process <-> FSDP2
def test_a_plain_checkpoint_restores_into_a_2_rank_fsdp2_run(
        tmp_path: Path, shm_root: Path) -> None:
    _fsdp.save_run("plain", tmp_path, steps=2)  # this process: no torch.distributed
    results = _spawn("restore", 2, tmp_path, args={"kind": "fsdp", "tier": "local"},
                     shm=shm_root / "restore")
    _ok(results, "RESTORED")


def test_a_2_rank_fsdp2_checkpoint_restores_into_a_plain_model(
        fsdp2_checkpoint: Path, tmp_path: Path) -> None:
    _copy_checkpoint(fsdp2_checkpoint, tmp_path)
    _fsdp.restore_run("plain", tmp_path, tier="local")  # this process: no torch.distributed


# ----------------------------------------------------------------- 4. tied weights, once
def test_tied_weights_are_stored_once_and_restored_tied(tmp_path: Path) -> None:
    policy = asymcheck.default_policy(tmp_path / "checkpoints")
    model, opt = _fsdp.build_tied(seed=0)
    with asymcheck.Checkpointer(model, opt, policy=policy) as ck:
        for step in (1, 2):
            _fsdp.train_tied_step(model, opt, step)
        ck.save_sync(2).wait_all_sync(60)
        expected = _fsdp.full_state(model, opt)
    man = Manifest.from_bytes((tmp_path / "checkpoints" / manifest_key(2)).read_bytes())
    model_paths = [t.path for t in man.tensors if t.path.startswith("model")]
    tied = [p for p in model_paths if p.endswith(("wte.weight", "lm_head.weight"))]
    assert len(tied) == 1, f"the tied pair is stored {len(tied)} times: {model_paths}"
    unique = {id(p) for p in model.parameters()}
    assert len(model_paths) == len(unique), model_paths
    stored = sum(t.nbytes for t in man.tensors if t.path.startswith("model"))
    assert stored == sum(p.nbytes for p in model.parameters())  # parameters() dedups ties

    fresh, fresh_opt = _fsdp.build_tied(seed=5)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=policy) as ck:
        assert ck.restore_sync() == 2
    assert fresh.lm_head.weight is fresh.wte.weight, "the restore keeps the weights tied"
    got = _fsdp.full_state(fresh, fresh_opt)
    assert_same(expected, got)
    assert_same(got["model"]["wte.weight"], got["model"]["lm_head.weight"])


def test_tied_weights_under_fsdp2_are_stored_once_per_shard(tmp_path: Path) -> None:
    _ok(_spawn("tied", 2, tmp_path), "TIED")
    for rank in range(2):
        shard = Manifest.from_bytes(
            (tmp_path / "checkpoints" / shard_manifest_key(2, rank)).read_bytes())
        model_paths = [t.path for t in shard.tensors if t.path.startswith("model")]
        tied = [p for p in model_paths if p.endswith(("wte.weight", "lm_head.weight"))]
        assert len(tied) == 1, f"rank {rank}: the tied pair is stored {len(tied)} times: {tied}"


# ------------------------------------------------------------------------ 5. bad input
def _plain_checkpoint(tmp_path: Path) -> asymcheck.Policy:
    policy = asymcheck.default_policy(tmp_path / "checkpoints")
    model, opt = _fsdp.build("plain", seed=0)
    with asymcheck.Checkpointer(model, opt, policy=policy) as ck:
        _fsdp.train_step(model, opt, 1)
        ck.save_sync(1).wait_all_sync(60)
    return policy


def test_a_different_global_shape_is_refused_naming_the_key_and_both_shapes(
        tmp_path: Path) -> None:
    policy = _plain_checkpoint(tmp_path)
    model, opt = _fsdp.build("plain", seed=1, hidden=6)  # layers.0.weight: (5, 7) -> (6, 7)
    with asymcheck.Checkpointer(model, opt, policy=policy) as ck, \
            pytest.raises((ValueError, RuntimeError)) as err:
        ck.restore_sync()
    msg = str(err.value)
    assert "\n" not in msg, f"one line: {msg!r}"
    assert "layers.0.weight" in msg, msg
    assert _shape((5, 7)).search(msg) and _shape((6, 7)).search(msg), msg


def test_different_parameter_names_are_refused_naming_the_key(tmp_path: Path) -> None:
    policy = _plain_checkpoint(tmp_path)
    model, opt = _fsdp.build("plain", seed=1, name="blocks")  # blocks.0.weight, ...
    with asymcheck.Checkpointer(model, opt, policy=policy) as ck, \
            pytest.raises((ValueError, RuntimeError)) as err:
        ck.restore_sync()
    msg = str(err.value)
    assert "\n" not in msg, f"one line: {msg!r}"
    assert "layers.0.weight" in msg or "blocks.0.weight" in msg, msg


def test_a_different_global_shape_is_refused_on_every_fsdp2_rank(
        fsdp2_checkpoint: Path, tmp_path: Path) -> None:
    _copy_checkpoint(fsdp2_checkpoint, tmp_path)
    results = _spawn("restore-fails", 2, tmp_path, args={"hidden": 6}, timeout=60)
    for rank, err in enumerate(_failures(results)):
        msg = err["message"]
        assert "\n" not in msg, f"rank {rank}: one line: {msg!r}"
        assert "layers.0.weight" in msg, f"rank {rank}: {msg}"
        assert _shape((5, 7)).search(msg) and _shape((6, 7)).search(msg), f"rank {rank}: {msg}"


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_region_lost_on_every_tier_fails_the_restore_on_every_rank(
        fsdp2_checkpoint: Path, tmp_path: Path, damage: str) -> None:
    """Rank 1's shard of ``layers.0.weight`` (rows 3..4 of 5) is flipped or its data file
    deleted on the local tier, the only tier holding it for the restoring job; restoring at 3
    ranks fails on every rank, naming what is lost, within the spawn's timeout."""
    _copy_checkpoint(fsdp2_checkpoint, tmp_path)
    local = tmp_path / "checkpoints"
    shard = Manifest.from_bytes((local / shard_manifest_key(SAVED_STEPS, 1)).read_bytes())
    target = [t for t in shard.tensors
              if t.path.startswith("model") and t.path.endswith("layers.0.weight")]
    assert len(target) == 1 and target[0].nbytes > 0, [t.path for t in shard.tensors]
    file, offset = shard.locate(target[0].chunks[0])
    data = local / step_dir(SAVED_STEPS) / rank_dir(1) / file
    names = {file, "layers.0.weight"}
    if damage == "corrupt":
        raw = bytearray(data.read_bytes())
        raw[offset] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        lost = [t.path for t in shard.tensors
                if any(shard.locate(c)[0] == file for c in t.chunks)]
        names |= {fqn for fqn in _fsdp.Net().state_dict() if any(fqn in p for p in lost)}
        data.unlink()
    results = _spawn("restore-fails", 3, tmp_path,
                     args={"step": SAVED_STEPS, "timeout": 20}, timeout=90)
    for rank, err in enumerate(_failures(results)):
        print(f"rank {rank}: {err['type']}: {err['message']}")
        assert err["asymcheck"], f"rank {rank}: {err}"
        msg = err["message"]
        if damage == "corrupt":
            assert "layers.0.weight" in msg, f"rank {rank}: {msg}"
        else:
            assert any(n in msg for n in names), f"rank {rank}: none of {names} in {msg}"


def test_a_rank_killed_before_reporting_its_shard_leaves_the_previous_checkpoint(
        tmp_path: Path, shm_root: Path) -> None:
    results = _spawn("crash", 2, tmp_path, args={"kill": [1, 2]})
    assert results[1][0] == -signal.SIGKILL, results[1][1]
    assert results[0][0] == 3 and "NOT COMMITTED 0" in results[0][1], results[0][1]
    local = tmp_path / "checkpoints"
    assert (local / manifest_key(1)).exists()
    assert not (local / manifest_key(2)).exists(), "step 2 must not commit"
    _ok(_spawn("crash-restore", 2, tmp_path), "RESTORED")


# ----------------------------------------------------------------------- 6. DDP -> FSDP2
def test_a_2_rank_ddp_checkpoint_restores_into_a_2_rank_fsdp2_run(
        tmp_path: Path, shm_root: Path) -> None:
    _ok(_spawn("save", 2, tmp_path, args={"kind": "ddp", "steps": 2}, shm=shm_root / "save"),
        "SAVED")
    for rank in range(2):
        shard = Manifest.from_bytes(
            (tmp_path / "checkpoints" / shard_manifest_key(2, rank)).read_bytes())
        assert not any("module." in t.path for t in shard.tensors), \
            [t.path for t in shard.tensors]
    results = _spawn("restore", 2, tmp_path, args={"kind": "fsdp", "tier": "local"})
    _ok(results, "RESTORED")


# ------------------------------------------------- other placements: tensor parallel, HSDP
def _param_bytes(work: Path, step: int, world: int) -> list[dict[str, int]]:
    """Per rank, the bytes its shard stores of each parameter."""
    out = []
    for rank in range(world):
        shard = Manifest.from_bytes(
            (work / "checkpoints" / shard_manifest_key(step, rank)).read_bytes())
        out.append({t.path.removeprefix("model/"): t.nbytes for t in shard.tensors
                    if t.path.startswith("model/")})
    return out


def test_tensor_parallel_splits_on_any_dim_and_a_replica_is_written_once(
        tmp_path: Path, shm_root: Path) -> None:
    """Shard(1), Shard(0) and Replicate on 2 ranks: each rank stores its own columns or rows,
    rank 0 alone the replicated tensor; restored into all-rows placements at 3 ranks, bit for
    bit."""
    _ok(_spawn("placed-save", 2, tmp_path, args={"layout": "tp"}, shm=shm_root / "save"),
        "SAVED")
    stored = _param_bytes(tmp_path, 2, 2)
    assert stored[0]["b"] == 3 * 4 * 4 and "b" not in stored[1], stored
    assert stored[0]["a"] + stored[1]["a"] == 5 * 7 * 4, stored
    _ok(_spawn("placed-restore", 3, tmp_path, args={"layout": "rows"}), "RESTORED")


def test_hsdp_on_a_2d_mesh_writes_one_replica_group_and_restores_at_2_ranks(
        tmp_path: Path, shm_root: Path) -> None:
    """(Replicate, Shard(0)) on a 2 x 2 mesh: ranks 0 and 1 (the first replica group) store the
    state, ranks 2 and 3 nothing of it; restored into a 2-rank Shard(1)/Replicate layout and
    back into the 2 x 2 mesh, bit for bit."""
    _ok(_spawn("placed-save", 4, tmp_path, args={"layout": "hsdp"}, shm=shm_root / "save"),
        "SAVED")
    stored = _param_bytes(tmp_path, 2, 4)
    assert stored[2] == {} and stored[3] == {}, stored
    assert sum(stored[0].values()) + sum(stored[1].values()) == (5 * 7 + 3 * 4 + 9) * 4
    _ok(_spawn("placed-restore", 2, tmp_path, args={"layout": "tp"}), "RESTORED")
    _ok(_spawn("placed-restore", 4, tmp_path, args={"layout": "hsdp"}), "RESTORED")
