"""Multi-rank checkpoints: two ranks (gloo on loopback), per-rank shards, rank 0's global commit.

Each test starts its ranks as subprocesses running ``_child`` below (a scenario of this file),
with the test's own shared-memory root in their environment.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
import tiers.host
from asymcheck.layout import host_shard_url, manifest_key, shard_manifest_key
from asymcheck.manifest import Manifest
from tests import _ranks
from tests._util import assert_same, host_peak, model_state, opt_state, with_host_keep

WORLD = 2
WIDTH = 32


# ---------------------------------------------------------------- the ranks' side
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
                                        torch.nn.Dropout(0.1), torch.nn.Linear(WIDTH, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _policy(work: Path) -> asymcheck.Policy:
    return asymcheck.default_policy(work / "checkpoints")


def _keep_0_policy(work: Path) -> asymcheck.Policy:
    """The default policy with host ``keep = 0``: a save takes over the newest copy's block."""
    return with_host_keep(_policy(work), 0)


def _ddp_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(seed)
    model = DistributedDataParallel(Net())  # broadcasts rank 0's parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _ddp_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    model(torch.randn(8, WIDTH)).square().mean().backward()  # per-rank data, per-rank dropout
    opt.step()
    opt.zero_grad()
    sched.step()


def _state(model: torch.nn.Module, opts: list[torch.optim.Optimizer], sched: Any = None
           ) -> dict[str, Any]:
    import copy
    return copy.deepcopy({"model": model_state(model), "opts": [opt_state(model, o) for o in opts],
                          "sched": sched.state_dict() if sched is not None else None})


def _scenario_ddp_save(rank: int, work: Path) -> None:
    model, opt, sched = _ddp_training(seed=0)
    torch.manual_seed(100 + rank)
    with asymcheck.Checkpointer(model, opt, policy=_policy(work), extras={"sched": sched},
                                replicated=("model",), warmup_iterations=2) as ckpt:
        handles = []
        for step in range(5):
            _ddp_step(model, opt, sched)
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.wait_all_sync(60)  # every rank waits: each durable means all shards are
        assert handles[-1].metrics["mode"] == "asym"  # deferred copies (after the warm-up)
        torch.save({"state": _state(model, [opt], sched), "rng": torch.rand(4)},
                   work / f"expected-{rank}.pt")
        _ddp_step(model, opt, sched)  # the live state moves on; step 4 stays the newest
    print(f"SAVED {rank}", flush=True)


def _scenario_ddp_keep_0(rank: int, work: Path) -> None:
    """Host keep = 0, saves back to back: each save waits until the newest host copy is
    committed on disk by both ranks and stages into its block, so each rank's shared memory
    holds one block; step 3 restores from there, and from disk on a rank whose host copy is
    gone (a crash as its next save took it over)."""
    model, opt, sched = _ddp_training(seed=0)
    torch.manual_seed(100 + rank)
    policy = _keep_0_policy(work)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                replicated=("model",), mode="naive") as ckpt, \
            host_peak(ckpt) as peak:
        handles = []
        for step in range(4):
            _ddp_step(model, opt, sched)
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.wait_all_sync(60)
        ckpt.wait_idle_sync()
        expected = _state(model, [opt], sched)
        assert _steps(ckpt.host.directory, "step-*/manifest.msgpack") == [3]
        block = ckpt.host.committed_bytes  # the newest copy: its block and manifest
    assert peak[0] <= block, f"rank {rank} held {peak[0]} bytes, one copy is {block}"
    assert sum(h.metrics.get("backpressure_s", 0) > 0 for h in handles) >= 1
    model, opt, sched = _ddp_training(seed=7)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                replicated=("model",)) as ckpt:
        loaded = ckpt.load_sync()
        assert loaded is not None and loaded.step == 3
        assert set(loaded.sources) == {policy.staging.name}, loaded.sources
        assert ckpt.restore_sync() == 3
    assert_same(expected, _state(model, [opt], sched))
    # a crash as rank 1's next save had taken over its host copy: the disk's copy restores
    if rank == 1:
        shard = host_shard_url(policy.staging.url, rank).removeprefix("shm://")
        shutil.rmtree(tiers.host.shm_root() / shard / "step-000000000003")
    torch.distributed.barrier()
    model, opt, sched = _ddp_training(seed=8)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                replicated=("model",)) as ckpt:
        loaded = ckpt.load_sync()
        assert loaded is not None and loaded.step == 3
        # rank 1 reads its shard from disk (rank 0's model, shared, from memory)
        assert ("local" in loaded.sources) == (rank == 1), loaded.sources
        assert ckpt.restore_sync() == 3
    assert_same(expected, _state(model, [opt], sched))
    print(f"RESTORED {rank}", flush=True)


def _scenario_ddp_restore(rank: int, work: Path) -> None:
    model, opt, sched = _ddp_training(seed=7)
    torch.manual_seed(999)
    with asymcheck.Checkpointer(model, opt, policy=_policy(work), extras={"sched": sched},
                                replicated=("model",)) as ckpt:
        assert ckpt.restore_sync() == 4
    expected = torch.load(work / f"expected-{rank}.pt", weights_only=True)
    assert_same(expected["state"], _state(model, [opt], sched))
    assert torch.equal(torch.rand(4), expected["rng"]), "each rank's RNG stream goes on"
    print(f"RESTORED {rank}", flush=True)


def _sharded_training(rank: int, seed: int) -> tuple[Net, torch.optim.Optimizer,
                                                     list[list[torch.nn.Parameter]]]:
    """A ZeRO-like split: each rank owns (and keeps optimizer state for) half the parameters."""
    torch.manual_seed(seed)
    model = Net()
    params = list(model.parameters())
    owned = [params[0::2], params[1::2]]
    return model, torch.optim.Adam(owned[rank], lr=1e-2), owned


def _sharded_step(model: Net, opt: torch.optim.Optimizer,
                  owned: list[list[torch.nn.Parameter]]) -> None:
    import torch.distributed as dist

    model(torch.randn(8, WIDTH)).square().mean().backward()
    for p in model.parameters():
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        for owner, ps in enumerate(owned):
            for p in ps:
                dist.broadcast(p, src=owner)


def _scenario_sharded(rank: int, work: Path) -> None:
    model, opt, owned = _sharded_training(rank, seed=0)
    torch.manual_seed(100 + rank)
    with asymcheck.Checkpointer(model, opt, policy=_policy(work),
                                replicated=("model",)) as ckpt:
        for _ in range(3):
            _sharded_step(model, opt, owned)
        ckpt.save_sync(3).wait_all_sync(60)
        expected, rng = _state(model, [opt]), torch.rand(4)
        _sharded_step(model, opt, owned)
    assert len(expected["opts"][0]["state"]) == len(owned[rank])
    fresh, fresh_opt, _ = _sharded_training(rank, seed=5)
    torch.manual_seed(5)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=_policy(work),
                                replicated=("model",)) as ckpt:
        assert ckpt.restore_sync() == 3
    assert_same(expected, _state(fresh, [fresh_opt]))
    assert torch.equal(torch.rand(4), rng)
    print(f"RESTORED {rank}", flush=True)


def _scenario_crash(rank: int, work: Path) -> None:
    import asymcheck.rankcommit

    kill_rank, kill_step = map(int, os.environ["ASYMCHECK_TEST_KILL"].split(":"))
    report = asymcheck.rankcommit.report_shard

    def report_or_die(group: Any, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if rank == kill_rank and msg["step"] == kill_step:  # shard written, not reported yet
            os.kill(os.getpid(), signal.SIGKILL)
        return report(group, msg)

    asymcheck.rankcommit.report_shard = report_or_die
    model, opt, owned = _sharded_training(rank, seed=0)
    torch.manual_seed(100 + rank)
    ckpt = asymcheck.Checkpointer(model, opt, policy=_policy(work), replicated=("model",))
    _sharded_step(model, opt, owned)
    ckpt.save_sync(1).wait_all_sync(60)
    torch.save({"state": _state(model, [opt]), "rng": torch.rand(4)},
               work / f"expected-{rank}.pt")
    _sharded_step(model, opt, owned)
    handle = ckpt.save_sync(2)
    _ranks.exit_on_commit(handle, rank)


def _scenario_crash_restore(rank: int, work: Path) -> None:
    model, opt, _ = _sharded_training(rank, seed=7)
    with asymcheck.Checkpointer(model, opt, policy=_policy(work),
                                replicated=("model",)) as ckpt:
        assert ckpt.restore_sync() == 1
    expected = torch.load(work / f"expected-{rank}.pt", weights_only=True)
    assert_same(expected["state"], _state(model, [opt]))
    assert torch.equal(torch.rand(4), expected["rng"])
    print(f"RESTORED {rank}", flush=True)


SCENARIOS: dict[str, Callable[[int, Path], None]] = {
    "ddp-save": _scenario_ddp_save, "ddp-restore": _scenario_ddp_restore,
    "sharded": _scenario_sharded, "crash": _scenario_crash,
    "crash-restore": _scenario_crash_restore, "ddp-keep-0": _scenario_ddp_keep_0,
}


def _child(scenario: str, rank: str, world: str, work: str, init: str) -> None:
    _ranks.run(SCENARIOS, scenario, rank, world, work, init)


# ------------------------------------------------------------------ the test's side
def _spawn(scenario: str, work: Path, *, env: dict[str, str] | None = None,
           timeout: float = 90) -> list[tuple[int, str]]:
    """Run ``scenario`` on ranks 0 and 1; (exit code, output) per rank."""
    return _ranks.spawn("tests.test_dist", scenario, work, WORLD, env=env, timeout=timeout)


def _ok(results: list[tuple[int, str]], word: str) -> None:
    for rank, (code, text) in enumerate(results):
        assert code == 0 and f"{word} {rank}" in text, f"rank {rank} exited {code}:\n{text}"


def _local(work: Path) -> Path:
    return work / "checkpoints"


def _global(work: Path, step: int) -> Manifest:
    return Manifest.from_bytes((_local(work) / manifest_key(step)).read_bytes())


async def test_a_rank_scoped_view_maps_step_keys_into_the_rank_directory(
        tmp_path: Path) -> None:
    from asymcheck.rankview import RankScopedTier
    from tiers.local import LocalTier

    shared = LocalTier(f"file://{tmp_path / 'ckpt'}", name="local")
    one, zero = RankScopedTier(shared, 1), RankScopedTier(shared, 0)
    await one.put("step-000000000002/data-a.bin", b"abc")
    await one.put(manifest_key(2), b"m1")
    await zero.put(manifest_key(2), b"m0")
    await shared.put(manifest_key(2), b"global")
    assert await shared.list("step-") == [
        "step-000000000002/manifest.msgpack", "step-000000000002/rank-00000/manifest.msgpack",
        "step-000000000002/rank-00001/data-a.bin", "step-000000000002/rank-00001/manifest.msgpack"]
    assert await one.list("step-") == ["step-000000000002/data-a.bin", manifest_key(2)]
    assert await one.list("step-000000000002/d") == ["step-000000000002/data-a.bin"]
    assert await one.get(manifest_key(2)) == b"m1" and await zero.get(manifest_key(2)) == b"m0"
    assert (await one.stat("step-000000000002/data-a.bin")).size_bytes == 3
    await one.delete_prefix("step-000000000002/")
    assert await shared.list("step-") == [
        "step-000000000002/manifest.msgpack", "step-000000000002/rank-00000/manifest.msgpack"]
    with pytest.raises(ValueError, match="step directory"):
        await one.put("other", b"x")
    await shared.close()
    assert host_shard_url("shm://asymcheck-ab", 1) == "shm://asymcheck-ab-rank00001"
    assert host_shard_url("shm://jobs/a/", 3) == "shm://jobs/a-rank00003"


def _steps(root: Path, pattern: str) -> list[int]:
    return sorted(int(p.relative_to(root).parts[0][5:]) for p in root.glob(pattern))


def test_ddp_checkpoint_restores_bit_exact_on_every_rank_and_writes_the_model_once(
        tmp_path: Path, shm_root: Path) -> None:
    _ok(_spawn("ddp-save", tmp_path), "SAVED")
    # layout and retention (keep: host 2, local 3), counted in global commits
    local = _local(tmp_path)
    assert _steps(local, "step-*/manifest.msgpack") == [2, 3, 4]
    for r in range(WORLD):
        assert _steps(local, f"step-*/rank-{r:05d}/manifest.msgpack") == [2, 3, 4]
    assert sorted(p.name for p in local.iterdir()) == [f"step-{s:012d}" for s in (2, 3, 4)]
    url = _policy(tmp_path).staging.url
    assert _steps(shm_root / url.removeprefix("shm://"), "step-*/manifest.msgpack") == [3, 4]
    for r in range(WORLD):
        shard_dir = shm_root / host_shard_url(url, r).removeprefix("shm://")
        assert _steps(shard_dir, "step-*/manifest.msgpack") == [3, 4]
    man = _global(tmp_path, 4)
    assert man.world_size == WORLD and man.info["replicated"] == ["model"]
    # the model's bytes are written once per checkpoint (by rank 0), not once per rank
    model_bytes = sum(t.numel() * t.element_size() for t in Net().state_dict().values())
    shards = [Manifest.from_bytes((local / shard_manifest_key(4, r)).read_bytes())
              for r in range(WORLD)]
    written = [sum(t.nbytes for t in s.tensors if t.path.startswith("model/")) for s in shards]
    assert written == [model_bytes, 0]
    assert [r["sections"].get("model", 0) for r in man.info["ranks"]] == written
    assert [s.info["rank"] for s in shards] == [0, 1]
    _ok(_spawn("ddp-restore", tmp_path), "RESTORED")


def test_with_host_keep_0_each_rank_stages_every_save_in_one_block(
        tmp_path: Path, shm_root: Path) -> None:
    _ok(_spawn("ddp-keep-0", tmp_path), "RESTORED")
    assert _steps(_local(tmp_path), "step-*/manifest.msgpack") == [1, 2, 3]
    url = _policy(tmp_path).staging.url
    assert _steps(shm_root / url.removeprefix("shm://"), "step-*/manifest.msgpack") == [3]


def test_each_rank_restores_its_own_optimizer_shard_and_world_size_1_is_refused(
        tmp_path: Path) -> None:
    _ok(_spawn("sharded", tmp_path), "RESTORED")
    man = _global(tmp_path, 3)
    opt_bytes = [r["sections"]["optimizers"] for r in man.info["ranks"]]
    assert opt_bytes[0] != opt_bytes[1] and min(opt_bytes) > 0
    # world size 1 (no torch.distributed here) restoring a world-size-2 checkpoint
    model, opt, _ = _sharded_training(0, seed=1)
    with asymcheck.Checkpointer(model, opt, policy=_policy(tmp_path)) as ckpt, \
            pytest.raises(asymcheck.RestoreError) as err:
        ckpt.restore_sync()
    assert "world size 2" in str(err.value) and "world size 1" in str(err.value), err.value


def test_a_rank_killed_before_reporting_its_shard_leaves_the_previous_checkpoint(
        tmp_path: Path, shm_root: Path) -> None:
    results = _spawn("crash", tmp_path, env={"ASYMCHECK_TEST_KILL": "1:2"})
    assert results[1][0] == -signal.SIGKILL, results[1][1]
    assert results[0][0] == 3 and "NOT COMMITTED 0" in results[0][1], results[0][1]
    host_global = shm_root / _policy(tmp_path).staging.url.removeprefix("shm://")
    for root in (_local(tmp_path), host_global):
        assert (root / manifest_key(1)).exists()
        assert not (root / manifest_key(2)).exists(), f"step 2 must not commit in {root}"
    assert (shm_root / host_shard_url(_policy(tmp_path).staging.url, 0)
            .removeprefix("shm://") / manifest_key(2)).exists(), "rank 0's shard was durable"
    _ok(_spawn("crash-restore", tmp_path), "RESTORED")
