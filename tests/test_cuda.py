"""CUDA paths: page-locked host blocks, side-stream snapshots, compressed flushes of device state.

Skipped without a CUDA device; run them with ``pytest -m gpu`` on a machine that has one.
"""

from __future__ import annotations

import asyncio
import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
from asymcheck.copier import pin_memory
from tests._util import assert_same, opt_state
from tiers.host import HostTier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    model = model.to(device="cuda", dtype=dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(32, 256, device="cuda", dtype=dtype, generator=gen)
    model(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "opt": opt_state(model, opt)})


def test_pinned_host_block_is_page_locked_until_unregistered() -> None:
    async def go() -> None:
        host = HostTier("shm://pin", capacity_bytes=64 << 20)
        try:
            block = await host.reserve("a.bin", 8 << 20)
            unregister = pin_memory(block.view)
            assert unregister is not None
            dst = torch.frombuffer(block.view, dtype=torch.uint8)
            assert dst.is_pinned()
            src = torch.randint(0, 255, (8 << 20,), dtype=torch.uint8, device="cuda")
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(dst, src.cpu())
            unregister()
            unregister()  # idempotent
            assert not dst.is_pinned()
            del dst
            await block.commit()
        finally:
            await host.close()
    asyncio.run(go())


def test_asym_saves_copy_into_page_locked_blocks_locked_once_per_mapping(
        policy: asymcheck.Policy) -> None:
    model, opt = _model()
    expected, handles = {}, []
    with asymcheck.Checkpointer(model, opt, policy=policy, warmup_iterations=3) as ckpt:
        for step in range(8):
            _train(model, opt, step)
            expected[step] = _state(model, opt)
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.wait_all_sync(60)
        assert {h.metrics["mode"] for h in handles[4:]} == {"asym"}
        assert all(h.metrics["host_pinned"] for h in handles)
        # blocks are reused through their mappings, which stay page-locked: after the first
        # blocks no save page-locks memory on its way
        assert all("host_pin_s" not in h.metrics for h in handles[3:])
        assert 0 < len(ckpt._commit.stage._locked) <= 3
        for step in (5, 7):
            loaded = ckpt.load_sync(step)
            assert loaded is not None
            assert_same(expected[step]["model"], loaded.state["model"], f"step {step}")
            assert_same(expected[step]["opt"], loaded.state["optimizers"][0], f"step {step}")
    assert not ckpt._commit.stage._locked  # closing unmapped every block, unlocking it first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_device_state_restores_bit_exactly_onto_the_device(
        tmp_path: Path, dtype: torch.dtype) -> None:
    disk = textwrap.dedent(f"""
        [[tier]]
        name = "disk"
        url = "file://{tmp_path / 'disk'}"
        keep = 3
        [compression]
        mode = "always"
        full_every = 2
        min_bytes = 1
    """)
    policy, disk_only = tmp_path / "tiers.toml", tmp_path / "disk.toml"
    policy.write_text('[[tier]]\nname = "host"\nurl = "shm://cuda"\nkeep = 1\n' + disk)
    disk_only.write_text('[[tier]]\nname = "host"\nurl = "shm://empty"\nkeep = 1\n' + disk)
    model, opt = _model(dtype)
    with asymcheck.Checkpointer(model, opt, policy=policy, warmup_iterations=3) as ckpt:
        for step in range(6):
            _train(model, opt, step)
            want = _state(model, opt)
            handle = ckpt.save_sync(step)
            handle.wait_all_sync(60)
        codecs = handle.metrics["disk.compression"]
    assert codecs["base_steps"], "the last checkpoint is a delta"
    fresh, fresh_opt = _model(dtype)
    _train(fresh, fresh_opt, 99)  # different values, same structure
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=disk_only) as ckpt:
        assert ckpt.restore_sync() == 5  # from the disk: base + delta, decoded
    got = _state(fresh, fresh_opt)
    assert all(p.is_cuda for p in fresh.parameters())
    assert_same(want["model"], got["model"])
    assert_same(want["opt"], got["opt"])


def test_a_device_state_larger_than_the_host_budget_streams_through_locked_pieces(
        tmp_path: Path) -> None:
    """Two copies of the state do not fit the host budget: each save streams the device
    state through page-locked pieces (locked by the first save, reused by the next) and
    restores bit for bit onto the device."""
    model, opt = _model()
    _train(model, opt, 0)
    state_bytes = sum(t.nbytes for t in _state(model, opt)["model"].values()) * 3  # + AdamW
    policy = tmp_path / "tiers.toml"
    policy.write_text(textwrap.dedent(f"""
        [[tier]]
        name = "host"
        url = "shm://cuda-stream"
        capacity = {state_bytes // 2}
        [[tier]]
        name = "disk"
        url = "file://{tmp_path / 'disk'}"
    """))
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt:
        handles = []
        for step in (1, 2):
            _train(model, opt, step)
            want = _state(model, opt)
            handles.append(ckpt.save_sync(step))
            handles[-1].durable("disk").wait(60)
    assert all(h.metrics["mode"] == "streaming" and h.metrics["host_pinned"] for h in handles)
    assert "host_pin_s" in handles[0].metrics
    fresh, fresh_opt = _model()
    _train(fresh, fresh_opt, 99)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=policy) as ckpt:
        assert ckpt.restore_sync() == 2
    got = _state(fresh, fresh_opt)
    assert all(p.is_cuda for p in fresh.parameters())
    assert_same(want["model"], got["model"])
    assert_same(want["opt"], got["opt"])


def test_fsdp2_on_the_device_saves_local_shards_and_restores_on_device_and_on_the_cpu(
        tmp_path: Path) -> None:
    """FSDP2 on a one-GPU mesh (NCCL): the asym snapshot copies the device shards on the side
    stream; restore fills a fresh FSDP2 model on the device and a plain model on the CPU."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))

        def sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            model, _ = _model()
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

        policy = asymcheck.default_policy(tmp_path / "ckpt")
        model, opt = sharded()
        with asymcheck.Checkpointer(model, opt, policy=policy, warmup_iterations=3) as ckpt:
            for step in range(8):
                _train(model, opt, step)
                handle = ckpt.save_sync(step)
            want = {k: v.full_tensor().cpu() for k, v in get_model_state_dict(model).items()}
            handle.wait_all_sync(60)
        assert handle.metrics["mode"] == "asym"
        fresh, fresh_opt = sharded()
        with asymcheck.Checkpointer(fresh, fresh_opt, policy=policy) as ckpt:
            assert ckpt.restore_sync() == 7
        got = {k: v.full_tensor().cpu() for k, v in get_model_state_dict(fresh).items()}
        assert_same(want, got)
    finally:
        dist.destroy_process_group()
    plain = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    with asymcheck.Checkpointer(plain, plain_opt, policy=policy) as ckpt:
        assert ckpt.restore_sync() == 7
    assert_same(want, plain.state_dict())
