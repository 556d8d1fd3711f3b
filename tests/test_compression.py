"""Selective compression in the flush: delta chains, bases kept by retention, verified restore."""

from __future__ import annotations

import asyncio
import copy
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
from asymcheck.costmodel import CostModel, LinearFit
from asymcheck.manifest import Manifest
from tests._util import assert_same, load_from, opt_state
from tiers.registry import open_tier


def _policy(tmp_path: Path, mode: str, *, full_every: int = 3, keep: int = 4,
            second_disk: bool = False, capacity: int | None = None) -> Path:
    extra = textwrap.dedent(f"""
        [[tier]]
        name = "mirror"
        url = "file:mirror"
        keep = {keep}
    """) if second_disk else ""
    path = tmp_path / "tiers.toml"
    path.write_text(textwrap.dedent(f"""
        [[tier]]
        name = "host"
        url = "shm://compression"
        keep = 1
        {"" if capacity is None else f"capacity = {capacity}"}
        [[tier]]
        name = "disk"
        url = "file:disk"
        keep = {keep}
    """) + extra + textwrap.dedent(f"""
        [compression]
        mode = "{mode}"
        full_every = {full_every}
        min_bytes = 1
    """))
    return path


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 64).to(torch.bfloat16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
    model[2](model[1](model[0](x)).to(torch.bfloat16)).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def _run(policy: Path, saves: int) -> dict[int, dict[str, Any]]:
    model, opt = _model()
    expected = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt:
        for step in range(saves):
            _train(model, opt, step)
            expected[step] = copy.deepcopy({"model": model.state_dict(),
                                            "opt": opt_state(model, opt)})
            ckpt.save_sync(step).wait_all_sync(60)
    return expected


def _manifests(disk: Path) -> dict[int, Manifest]:
    out = {}
    for path in sorted(disk.glob("step-*/manifest.msgpack")):
        man = Manifest.from_bytes(path.read_bytes())
        out[man.step] = man
    return out


def test_delta_chains_keep_their_bases_and_restore_exactly(tmp_path: Path) -> None:
    expected = _run(_policy(tmp_path, "always", full_every=3, keep=4), saves=20)
    mans = _manifests(tmp_path / "disk")
    newest = sorted(mans)[-4:]
    assert newest == [16, 17, 18, 19]
    bases = {b for s in newest for b in mans[s].info["compression"]["base_steps"]}
    assert bases, "the newest checkpoints include deltas"
    assert bases <= set(mans), "a base that a kept delta needs was deleted"
    assert set(mans) == set(newest) | bases  # nothing else is kept
    fulls = [s for s, m in mans.items() if m.info["compression"]["full"]]
    assert all(s % 3 == 0 for s in fulls)  # a full checkpoint every full_every saves
    for step, man in mans.items():
        codecs = {c.codec for t in man.tensors for c in t.chunks}
        assert codecs == ({"shuffle"} if man.info["compression"]["full"] else {"delta_sub"})
        loaded = load_from(f"file://{tmp_path / 'disk'}", step)
        assert_same(expected[step]["model"], loaded.state["model"], f"step {step}")
        assert_same(expected[step]["opt"], loaded.state["optimizers"][0], f"step {step}")


def test_the_tiers_delta_base_stays_while_the_kept_checkpoints_name_no_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose tensors all went raw (the cost model's choice) names no delta base;
    retention must still keep the tier's base, which the next delta checkpoint needs."""
    from asymcheck.schedule import FlushScheduler

    real_choose = FlushScheduler._choose
    all_raw = [False]

    async def choose(self: FlushScheduler, *args: Any) -> tuple[str, float | None, bool]:
        return ("raw", None, True) if all_raw[0] else await real_choose(self, *args)

    monkeypatch.setattr(FlushScheduler, "_choose", choose)
    disk = tmp_path / "disk"
    model, opt = _model()
    expected = {}
    with asymcheck.Checkpointer(model, opt, policy=_policy(tmp_path, "always", full_every=10,
                                                           keep=1), mode="naive") as ckpt:
        for step in range(4):
            all_raw[0] = step in (1, 2)  # step 0 full (the base), 1-2 raw, 3 a delta on 0
            _train(model, opt, step)
            expected[step] = copy.deepcopy({"model": model.state_dict(),
                                            "opt": opt_state(model, opt)})
            ckpt.save_sync(step).wait_all_sync(60)
    mans = _manifests(disk)
    assert [mans[s].info["compression"]["base_steps"] for s in (3,)] == [[0]]
    assert set(mans) == {0, 3}  # 1 and 2 went (keep = 1); 0 stayed for 3's deltas
    loaded = load_from(f"file://{disk}", 3)
    assert loaded is not None
    assert_same(expected[3]["model"], loaded.state["model"], "step 3")
    assert_same(expected[3]["opt"], loaded.state["optimizers"][0], "step 3")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("budget", [2.5, 4])
def test_a_delta_base_is_held_in_host_memory_only_where_the_budget_has_room(
        tmp_path: Path, budget: float) -> None:
    """Host keep = 1 and a budget of ``budget`` checkpoints: at 2.5 the kept copy and the next
    save's block fit but a base beside them does not, so none is held and every checkpoint is
    coded full (a base held there left the third save waiting for room that never came);
    at 4 the base is held and the checkpoints after it are deltas."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(step: int) -> None:
        x = torch.randn(8, 512, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    train(-1)
    leaves = torch.utils._pytree.tree_leaves([model.state_dict(), opt_state(model, opt)])
    state = sum(t.nbytes for t in leaves if isinstance(t, torch.Tensor))
    policy = _policy(tmp_path, "always", full_every=10, keep=2,
                     capacity=int(budget * state))
    expected = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt:
        for step in range(4):
            train(step)
            expected[step] = copy.deepcopy({"model": model.state_dict(),
                                            "opt": opt_state(model, opt)})
            ckpt.save_sync(step).wait_all_sync(60)
    mans = _manifests(tmp_path / "disk")
    assert sorted(mans) == [2, 3] if budget < 3 else [0, 2, 3]
    bases = [mans[s].info["compression"]["base_steps"] for s in (2, 3)]
    assert bases == ([[], []] if budget < 3 else [[0], [0]])
    loaded = load_from(f"file://{tmp_path / 'disk'}", 3)
    assert loaded is not None
    assert_same(expected[3]["model"], loaded.state["model"], "step 3")
    assert_same(expected[3]["opt"], loaded.state["optimizers"][0], "step 3")


def test_manifest_records_decisions_and_ratios(tmp_path: Path) -> None:
    _run(_policy(tmp_path, "always"), saves=2)
    man = _manifests(tmp_path / "disk")[1]
    comp = man.info["compression"]
    assert comp["mode"] == "always" and comp["base_steps"] == [0]
    assert comp["raw_bytes"] == man.nbytes and comp["stored_bytes"] == man.stored_bytes
    for path, codec, est, real in comp["decisions"]:
        assert codec == "delta_sub" and est > 0 and real > 0
        assert any(t.path == path for t in man.tensors)


def _corrupt_first_chunk(disk: Path, step: int) -> None:
    man = _manifests(disk)[step]
    chunk = max((t for t in man.tensors), key=lambda t: t.nbytes).chunks[0]
    path = disk / f"step-{step:012d}" / chunk.file
    data = bytearray(path.read_bytes())
    data[chunk.offset + chunk.stored_len // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_corrupt_base_never_yields_wrong_tensors(tmp_path: Path) -> None:
    expected = _run(_policy(tmp_path, "always", full_every=10, second_disk=True), saves=3)
    for disk in ("disk", "mirror"):
        assert _manifests(tmp_path / disk)[2].info["compression"]["base_steps"] == [0]
    _corrupt_first_chunk(tmp_path / "disk", 0)
    with pytest.raises(asymcheck.RestoreError, match="base step 0"):
        load_from(f"file://{tmp_path / 'disk'}", 2)
    # with every tier in play (host wiped), the mirror's copy of the base is used
    model, opt = _model()
    pol = asymcheck.load_policy(_policy(tmp_path, "always", full_every=10, second_disk=True))
    shm = open_tier(pol.staging.url)
    asyncio.run(shm.delete_prefix(""))
    with asymcheck.Checkpointer(model, opt, policy=pol) as ckpt:
        assert ckpt.restore_sync() == 2
    assert_same(expected[2]["model"], model.state_dict())


def _auto_run(tmp_path: Path, url: str, options: dict[str, Any]) -> tuple[
        dict[int, Manifest], set[int]]:
    """Six saves of random 4 MiB tensors one small step apart with compression ``auto`` to
    the tier ``url``: its manifests, and the host copies still held as delta bases."""
    from tests import fault_tiers

    fault_tiers.register()
    try:
        torch.manual_seed(0)
        weights = [torch.randn(1 << 20) for _ in range(3)]
        policy = asymcheck.Policy(
            tiers=(asymcheck.TierPolicy(name="host", url="shm://auto-bases", keep=1),
                   asymcheck.TierPolicy(name="disk", url=url, keep=6, options=options)),
            compression=asymcheck.CompressionPolicy(mode="auto", full_every=10))
        state = {"w": weights}
        with asymcheck.Checkpointer(None, extras={"s": _Plain(state)}, policy=policy,
                                    mode="naive") as ckpt:
            for step in range(6):
                for w in weights:
                    w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(step)),
                           alpha=1e-6)
                ckpt.save_sync(step).wait_all_sync(120)
            ckpt.wait_idle_sync()
            held = ckpt._commit.stage.pinned()
            directory = Path(url.split("://", 1)[1])
            return _manifests(directory), held
    finally:
        fault_tiers.unregister()


class _Plain:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError


def test_auto_holds_no_delta_base_in_host_memory_where_no_delta_could_pay(
        tmp_path: Path) -> None:
    # a file tier in memory (tmpfs) writes far faster than any codec compresses
    fast = Path(os.environ["ASYMCHECK_SHM_ROOT"]) / "fast-tier"
    mans, held = _auto_run(tmp_path, f"file://{fast}", {})
    assert sorted(mans) == list(range(6))
    assert all(m.info["compression"]["base_steps"] == [] for m in mans.values())
    assert held == set(), "a base copy held in shared memory for deltas that cannot pay"
    # on a tier slower than the codec, deltas can pay: the base is held and used
    slow, held = _auto_run(tmp_path, f"slowfile://{tmp_path / 'slow'}",
                           {"bandwidth_bps": 5e6})
    assert any(m.info["compression"]["base_steps"] == [0] for m in slow.values()), \
        {s: m.info["compression"]["base_steps"] for s, m in slow.items()}
    assert held == {0}


def test_off_mode_stores_everything_raw(tmp_path: Path) -> None:
    _run(_policy(tmp_path, "off"), saves=2)
    for man in _manifests(tmp_path / "disk").values():
        assert {c.codec for t in man.tensors for c in t.chunks} == {"raw"}
        assert man.info["compression"]["decisions"] == []


def test_cost_model_compresses_only_where_it_pays() -> None:
    cost = CostModel(min_compress_bytes=1 << 20)
    cost.codec("shuffle").add(64 << 20, 0.1)  # ~670 MB/s of compression
    fast = cost.tier("nvme")
    slow = cost.tier("throttled")
    for n in (8 << 20, 64 << 20):
        fast.add(n, n / 3e9)   # 3 GB/s
        slow.add(n, n / 50e6)  # 50 MB/s
    assert not cost.compression_pays("nvme", "shuffle", 64 << 20, ratio=1.3)
    assert cost.compression_pays("throttled", "shuffle", 64 << 20, ratio=1.3)
    assert not cost.compression_pays("throttled", "shuffle", 1 << 10, ratio=5.0)  # too small
    assert not cost.compression_pays("throttled", "shuffle", 64 << 20, ratio=1.0)


def test_ratio_sampling_is_skipped_only_where_no_ratio_could_pay() -> None:
    cost = CostModel(min_compress_bytes=1 << 20)
    for name, bps in (("nvme", 3e9), ("throttled", 50e6)):
        fit = cost.tier(name)
        for n in (8 << 20, 64 << 20):
            fit.add(n, n / bps)
    assert not cost.codec_known("shuffle")  # a prior only: the first full samples anyway
    cost.seed_codec("shuffle", 256 << 10, (256 << 10) / 500e6)  # a sample ran at 500 MB/s
    assert cost.codec_known("shuffle")
    assert cost.codec("shuffle").throughput_bps == pytest.approx(500e6)
    assert not cost.compression_could_pay("nvme", "shuffle", 64 << 20)  # disk outruns zstd
    assert cost.compression_could_pay("throttled", "shuffle", 64 << 20)
    assert not cost.compression_could_pay("throttled", "shuffle", 1 << 10)  # too small
    for n in (8 << 20, 64 << 20, 16 << 20):  # real compressions at ~5 GB/s replace the seed
        cost.codec("shuffle").add(n, n / 5e9)
    cost.seed_codec("shuffle", 256 << 10, 1.0)  # a slow sample no longer overrides them
    assert cost.codec("shuffle").throughput_bps == pytest.approx(5e9, rel=0.01)
    assert cost.compression_could_pay("nvme", "shuffle", 64 << 20)


def test_a_delta_base_is_held_only_where_a_delta_could_pay_at_the_tier_s_best() -> None:
    """A slow fsync or two drag a disk's fit below the codec's speed, so a ratio may be worth
    sampling; but a base is a copy of the state held until the next full checkpoint, and the
    disk at its recent best still outruns the codec."""
    cost = CostModel(min_compress_bytes=1 << 20)
    cost.seed_codec("shuffle", 256 << 10, (256 << 10) / 100e6)  # 100 MB/s
    disk = cost.tier("disk")
    for n in (8 << 20, 64 << 20, 8 << 20):
        disk.add(n, n / 1e9)  # 1 GB/s
    for _ in range(4):
        disk.add(64 << 20, (64 << 20) / 20e6)  # writes stuck behind writeback: 20 MB/s
    assert disk.throughput_bps < 100e6 < disk.peak_bps()
    assert cost.compression_could_pay("disk", "shuffle", 64 << 20)
    assert not cost.compression_could_pay("disk", "shuffle", 64 << 20, at_best=True)
    slow = cost.tier("remote")  # a tier slower than the codec at its best too
    for n in (8 << 20, 64 << 20):
        slow.add(n, n / 50e6)
    assert cost.compression_could_pay("remote", "shuffle", 64 << 20, at_best=True)
    assert LinearFit(latency_s=0.0, throughput_bps=7e6).peak_bps() == 7e6  # no samples


def test_linear_fit_recovers_latency_and_throughput() -> None:
    fit = LinearFit(latency_s=0.5, throughput_bps=1.0)
    for n in (1 << 10, 1 << 20, 16 << 20, 64 << 20):
        fit.add(n, 0.004 + n / 400e6)
    assert fit.latency_s == pytest.approx(0.004, rel=1e-6)
    assert fit.throughput_bps == pytest.approx(400e6, rel=1e-6)


def test_linear_fit_keeps_its_latency_when_noise_hides_it() -> None:
    """Large writes whose jitter exceeds the per-file latency fit a negative intercept; the
    fit keeps its latency instead of dropping to 0, which would shrink B* to its minimum."""
    cost = CostModel(min_batch_bytes=4 << 20)
    fit = cost.tier("disk")
    fit.latency_s, fit.throughput_bps = 0.005, 300e6
    before = cost.batch_bytes("disk", 1 << 30)
    samples = [(256 << 10, 0.0002), (48 << 20, 0.050), (48 << 20, 0.058), (40 << 20, 0.044)]
    xs, ys = [n for n, _ in samples], [t for _, t in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in samples) / sum((x - mx) ** 2 for x in xs)
    assert my - slope * mx < 0  # the least-squares intercept of these samples
    for n, t in samples:
        fit.add(n, t)
    assert fit.latency_s == 0.005
    assert fit.throughput_bps == pytest.approx(sum(xs) / (sum(ys) - 4 * 0.005))
    assert cost.batch_bytes("disk", 1 << 30) > cost.min_batch_bytes
    assert cost.batch_bytes("disk", 1 << 30) != before  # the bandwidth was refitted


def test_batch_size_follows_the_fit() -> None:
    cost = CostModel(min_batch_bytes=1 << 20, max_batch_bytes=1 << 30)
    fit = cost.tier("disk")
    fit.latency_s, fit.throughput_bps = 0.004, 400e6
    b = cost.batch_bytes("disk", 1 << 30)
    assert b == int((2**30 * 0.004 * 400e6) ** 0.5)
    fit.latency_s = 0.04  # a slower-to-open tier wants bigger batches
    assert cost.batch_bytes("disk", 1 << 30) > b
    assert cost.batch_bytes("disk", 1 << 30, budget_bytes=64 << 20) <= 16 << 20
