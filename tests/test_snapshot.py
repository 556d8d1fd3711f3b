"""Asymmetric partitioned snapshots: every checkpoint equals S_t exactly, plans are sound."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import asymcheck
from asymcheck.partition import Piece, make_plan, share_bytes
from asymcheck.profile import BACKWARD, FORWARD, Profile, Window
from asymcheck.restore import load_checkpoint
from asymcheck.snapshot import ChunkDigests, host_bytes
from tests._util import assert_same, model_state, opt_state
from tiers.registry import open_tier

transformers.logging.set_verbosity_error()


def host_only(keep: int) -> asymcheck.Policy:
    return asymcheck.Policy(tiers=(asymcheck.TierPolicy(name="host", url="shm://snap",
                                                        keep=keep),))


def gpt2() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)

    def loss(i: int) -> torch.Tensor:
        ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i))
        return model(ids, labels=ids).loss
    return model, loss


def bert() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=256,
                                  max_position_embeddings=32)
    model = transformers.BertForMaskedLM(cfg)

    def loss(i: int) -> torch.Tensor:
        ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i))
        return model(input_ids=ids, labels=ids).loss
    return model, loss


def resnet() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=5)
    model = transformers.ResNetForImageClassification(cfg)  # BatchNorm: buffers change in forward

    def loss(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 3, 32, 32, generator=g)
        return model(pixel_values=x, labels=torch.randint(0, 5, (4,), generator=g)).loss
    return model, loss


class WithUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        self.unused = torch.nn.Linear(64, 64)  # never in the forward pass
        self.frozen = torch.nn.Linear(64, 64).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.frozen(x))))


def unused() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    model = WithUnused()

    def loss(i: int) -> torch.Tensor:
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        return model(x).square().mean()
    return model, loss


def run_and_check(build: Callable[[], tuple[torch.nn.Module, Callable[[int], torch.Tensor]]],
                  *, iterations: int = 20, accumulate: int = 1) -> list[dict[str, Any]]:
    """Train with save() after every step; every committed checkpoint must equal S_t."""
    torch.manual_seed(0)
    model, loss_fn = build()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    expected, handles = {}, []
    with asymcheck.Checkpointer(model, opt, policy=host_only(iterations + 1),
                                warmup_iterations=3, min_partition_bytes=1024) as ckpt:
        for step in range(iterations):
            for micro in range(accumulate):
                (loss_fn(step * accumulate + micro) / accumulate).backward()
            opt.step()
            opt.zero_grad()
            expected[step] = copy.deepcopy({"model": model_state(model),
                                            "opt": opt_state(model, opt)})
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.staged.wait(60)
        metrics = [h.metrics for h in handles]

    async def read_all() -> None:
        tier = open_tier("shm://snap", name="host")
        try:
            for step, state in expected.items():
                loaded = await load_checkpoint([tier], step)
                assert loaded is not None
                assert_same(state["model"], loaded.state["model"], f"step {step} model")
                assert_same(state["opt"], loaded.state["optimizers"][0], f"step {step} opt")
        finally:
            await tier.close()

    asyncio.run(read_all())
    modes = [m["mode"] for m in metrics]
    assert modes[:2] == ["naive"] * 2 and set(modes[3:]) == {"asym"}, modes
    assert all(m["overlapped_bytes"] > 0 for m in metrics[4:-1]), \
        "copies must run during the next iteration's windows"
    # what the windows copied was checksummed as it was copied (restore verified those sums)
    assert all(0 < m["hashed_while_copying_bytes"] <= m["overlapped_bytes"]
               for m in metrics[4:-1]), metrics
    return metrics


@pytest.mark.parametrize("build", [gpt2, bert, resnet], ids=["gpt2", "bert", "resnet"])
def test_every_checkpoint_equals_the_state_after_its_step(build: Any) -> None:
    run_and_check(build)


def test_gradient_accumulation_keeps_checkpoints_exact() -> None:
    run_and_check(gpt2, iterations=12, accumulate=3)


def test_unused_and_frozen_parameters_are_saved_exactly() -> None:
    metrics = run_and_check(unused, iterations=10)
    assert metrics[-1]["residual_bytes"] >= 0


class TrainState:
    """Training state handed over as an extra (as an integration does): the parameters and the
    optimizer's state, the live tensors themselves."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict[str, Any]:
        return {"params": {n: p.detach() for n, p in self.model.named_parameters()},
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError


def test_an_extras_parameters_and_optimizer_state_are_copied_behind_the_hooks_step_gate(
        ) -> None:
    torch.manual_seed(0)
    model, loss_fn = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected, handles = {}, []
    with asymcheck.Checkpointer(None, extras={"train": TrainState(model, opt)},
                                policy=host_only(12), warmup_iterations=3,
                                min_partition_bytes=1024, snapshot_hooks=(model, [opt])) as ckpt:
        for step in range(10):
            loss_fn(step).backward()
            opt.step()
            opt.zero_grad()
            expected[step] = copy.deepcopy(TrainState(model, opt).state_dict())
            handles.append(ckpt.save_sync(step))
        for step, h in enumerate(handles):
            h.staged.wait(60)
            loaded = ckpt.load_sync(step)
            assert loaded is not None
            assert_same(expected[step], loaded.state["extras"]["train"], f"step {step}")
    modes = [h.metrics["mode"] for h in handles]
    assert set(modes[3:]) == {"asym"}, modes
    assert all(h.metrics["overlapped_bytes"] > 0 for h in handles[4:-1]), \
        "copies must run during the next iteration's windows"
    with pytest.raises(ValueError, match="snapshot_hooks is for state saved as an extra"):
        asymcheck.Checkpointer(model, opt, snapshot_hooks=(model, [opt]))


def test_save_twice_without_a_step_between(policy: asymcheck.Policy) -> None:
    model, loss_fn = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    with asymcheck.Checkpointer(model, opt, policy=host_only(5), warmup_iterations=2) as ckpt:
        for step in range(4):
            loss_fn(step).backward()
            opt.step()
            opt.zero_grad()
            ckpt.save_sync(step)
        want = copy.deepcopy(model.state_dict())
        first, second = ckpt.save_sync(10), ckpt.save_sync(11)
        first.staged.wait(60)
        second.staged.wait(60)
        for step in (10, 11):
            loaded = ckpt.load_sync(step)
            assert loaded is not None
            assert_same(want, loaded.state["model"])


class _Tally:
    """An extra whose state_dict hands out its live array and list, changed after each save."""

    def __init__(self) -> None:
        self.counts = np.zeros(4, dtype=np.int64)
        self.history: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "history": self.history}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.counts, self.history = sd["counts"].copy(), list(sd["history"])


def test_non_tensor_state_changed_after_save_is_saved_as_it_was_at_save() -> None:
    """The skeleton (numbers, lists, numpy arrays) is packed by the commit, which for an asym
    save runs after the next step: what the program changes in between stays out of it."""
    model, loss_fn = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    tally = _Tally()
    expected, handles = {}, []
    with asymcheck.Checkpointer(model, opt, policy=host_only(8), warmup_iterations=2,
                                extras={"tally": tally}) as ckpt:
        for step in range(6):
            loss_fn(step).backward()
            opt.step()
            opt.zero_grad()
            expected[step] = (tally.counts.tolist(), list(tally.history))
            handles.append(ckpt.save_sync(step))
            tally.counts += step + 1  # in place, before the commit packs the save
            tally.history.append(step)
        assert handles[-2].metrics["mode"] == "asym"
        for h in handles:
            h.staged.wait(60)
        for step, (counts, history) in expected.items():
            loaded = ckpt.load_sync(step)
            assert loaded is not None
            saved = loaded.state["extras"]["tally"]
            assert (saved["counts"].tolist(), saved["history"]) == (counts, history), step


def test_staged_completes_without_a_further_step(tmp_path: Path) -> None:
    model, loss_fn = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    with asymcheck.Checkpointer(model, opt, policy=host_only(2), warmup_iterations=2) as ckpt:
        for step in range(4):
            loss_fn(step).backward()
            opt.step()
            opt.zero_grad()
            handle = ckpt.save_sync(step)
        assert handle.metrics["mode"] == "asym"
        handle.staged.wait(30)  # training stopped: waiting must finish the copies itself
        assert handle.metrics["residual_bytes"] == handle.metrics["plan"]["total_bytes"]


def test_a_parameter_turned_buffer_is_copied_at_save_time_again() -> None:
    """The tensors a save defers are found again when the model or optimizer changes between
    saves: a bias made a buffer (same name, same place in the state, same memory) is no
    longer deferred, nor is one whose buffer has new memory while the optimizer still steps
    the parameter; a parameter given new memory still is; every save restores bit-exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no optimizer state

    def step(i: int) -> None:
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(i))).sum().backward()
        opt.step()
        opt.zero_grad()

    nbytes = 64 * 4
    with asymcheck.Checkpointer(model, opt, policy=host_only(12), warmup_iterations=2,
                                min_partition_bytes=1024) as ckpt:
        handles = []
        for i in range(5):
            step(i)
            handles.append(ckpt.save_sync(i))
        total = handles[-1].metrics["plan"]["total_bytes"]
        assert total == sum(p.nbytes for p in model.parameters())
        bias = model[0].bias
        del model[0].bias
        model[0].register_buffer("bias", bias.detach())  # same path and place, same memory
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"]
                                         if p is not bias]
        step(5)
        moved = ckpt.save_sync(5)
        assert moved.metrics["plan"]["total_bytes"] == total - nbytes
        want = copy.deepcopy(model.state_dict())
        model[1].weight.data = model[1].weight.data.clone()  # new memory, still a parameter
        step(6)
        again = ckpt.save_sync(6)
        assert again.metrics["plan"]["total_bytes"] == total - nbytes
        want_6 = copy.deepcopy(model.state_dict())
        orphan = model[1].bias  # still stepped by the optimizer, no longer in the model
        del model[1].bias
        model[1].register_buffer("bias", orphan.detach().clone())  # same path, new memory
        step(7)
        last = ckpt.save_sync(7)
        assert last.metrics["plan"]["total_bytes"] == total - 2 * nbytes
        want_7 = copy.deepcopy(model.state_dict())
        step(8)  # the windows of step 8 copy save 7's deferred tensors
        for h in (moved, again, last):
            h.staged.wait(60)
        for i, expected in ((5, want), (6, want_6), (7, want_7)):
            loaded = ckpt.load_sync(i)
            assert loaded is not None
            assert_same(expected, loaded.state["model"])


class _Wrapped:
    """An optimizer as a framework may hand it over (the torch optimizer as ``optimizer``):
    state, state_dict and step pre-hooks, no param_groups."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_pre_hook(hook)


def test_an_optimizer_without_param_groups_is_gated_and_its_state_deferred() -> None:
    model, loss_fn = gpt2()
    inner = torch.optim.AdamW(model.parameters())
    with asymcheck.Checkpointer(model, _Wrapped(inner), policy=host_only(3),
                                warmup_iterations=2) as ckpt:
        handles = []
        for step in range(5):
            loss_fn(step).backward()
            inner.step()
            inner.zero_grad()
            handles.append(ckpt.save_sync(step))
        want = copy.deepcopy((model.state_dict(), opt_state(model, inner)))
        loss_fn(5).backward()
        inner.step()  # the copies of save 4 run in this step's windows, behind its gate
        handles[-1].staged.wait(60)
        assert handles[-1].metrics["mode"] == "asym"
        assert handles[-1].metrics["overlapped_bytes"] > 0
        loaded = ckpt.load_sync(4)
        assert loaded is not None
        assert_same(want[0], loaded.state["model"])
        assert_same(want[1], loaded.state["optimizers"][0])


def test_plan_partitions_sum_exactly_and_forward_ones_are_smaller() -> None:
    windows = []
    for i in range(4):
        windows.append(Window(FORWARD, f"block{i}", 0.002))
    for i in reversed(range(4)):
        windows.append(Window(BACKWARD, f"block{i}", 0.010))
    profile = Profile(tuple(windows), iterations=5)
    sizes = [1000, 3, 70_001, 0, 12_345, 999]
    plan = make_plan(profile, sizes, min_partition_bytes=0)
    assert sum(p.nbytes for p in plan.partitions) == plan.total_bytes == sum(sizes)
    fwd = [p.nbytes for p in plan.partitions if p.kind == FORWARD]
    bwd = [p.nbytes for p in plan.partitions if p.kind == BACKWARD]
    assert max(fwd) < min(bwd)
    covered: dict[int, list[Piece]] = {}
    for p in plan.partitions:
        assert sum(x.stop - x.start for x in p.pieces) == p.nbytes
        for x in p.pieces:
            covered.setdefault(x.item, []).append(x)
    for item, pieces in covered.items():  # every byte exactly once
        pieces.sort(key=lambda x: x.start)
        assert pieces[0].start == 0 and pieces[-1].stop == sizes[item]
        assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))


def test_min_and_max_partition_sizes_are_respected() -> None:
    shares = share_bytes([1.0] * 10, 10_000, min_partition_bytes=2_500)
    assert sum(shares) == 10_000 and all(s == 0 or s >= 2_500 for s in shares[:-1])
    shares = share_bytes([1.0, 1.0, 8.0, 1.0], 10_000, max_partition_bytes=3_000)
    assert sum(shares) == 10_000 and all(s <= 3_000 for s in shares[:-1])


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(0.025)
        return grad


class SleepyBlock(torch.nn.Module):
    """Forward takes ~3 ms, backward ~25 ms: windows of known length."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.003)
        return _SlowBackward.apply(self.lin(x))


def test_profiled_plan_gives_forward_windows_smaller_partitions() -> None:
    model = torch.nn.Sequential(*[SleepyBlock() for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters())
    with asymcheck.Checkpointer(model, opt, policy=host_only(2), warmup_iterations=6,
                                min_partition_bytes=0) as ckpt:
        for step in range(8):
            model(torch.randn(2, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
            handle = ckpt.save_sync(step)
        assert ckpt.profiler is not None and ckpt.profiler.profile is not None
        profile = ckpt.profiler.profile
        fwd = [w.duration_s for w in profile.windows if w.kind == FORWARD]
        bwd = [w.duration_s for w in profile.windows if w.kind == BACKWARD]
        # 4 forward windows of ~3 ms; 4 backward windows of ~25 ms, then the short gap
        # between the last gradient and the optimizer step
        assert len(fwd) == 4 and len(bwd) == 5
        assert max(fwd) < min(bwd[:4]) and bwd[4] < min(bwd[:4])
        plan = handle.metrics["plan"]
        sizes = {kind: [n for _, k, _, n in plan["windows"] if k == kind]
                 for kind in (FORWARD, BACKWARD)}
        assert sum(n for *_, n in plan["windows"]) == plan["total_bytes"]
        assert len(sizes[FORWARD]) == 4 and len(sizes[BACKWARD]) >= 4
        assert max(sizes[FORWARD]) < sorted(sizes[BACKWARD])[-4]


def test_ddp_wrapped_model_checkpoints_exactly(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        run_and_check(lambda: _ddp(DistributedDataParallel), iterations=8)
    finally:
        dist.destroy_process_group()


def _ddp(wrapper: Any) -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    inner, _ = unused()
    inner.unused.requires_grad_(False)  # DDP rejects parameters that never get a gradient
    model = wrapper(inner)

    def ddp_loss(i: int) -> torch.Tensor:
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        return model(x).square().mean()
    return model, ddp_loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshot_uses_side_stream_and_is_exact() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).cuda()
    opt = torch.optim.AdamW(model.parameters())
    expected, handles = {}, []
    with asymcheck.Checkpointer(model, opt, policy=host_only(12), warmup_iterations=3) as ckpt:
        for step in range(10):
            model(torch.randn(64, 512, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
            expected[step] = copy.deepcopy(model.state_dict())
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.staged.wait(60)
        assert {h.metrics["mode"] for h in handles[4:]} == {"asym"}
        # partitions copied on the side stream are checksummed by a host thread as they land
        assert all(0 < h.metrics["hashed_while_copying_bytes"] <= h.metrics["overlapped_bytes"]
                   for h in handles[4:-1])
        for step, want in expected.items():
            loaded = ckpt.load_sync(step)  # verifies every chunk against those checksums
            assert loaded is not None
            assert_same(want, loaded.state["model"])


def _pieces(sizes: list[int], cuts: list[int], skip: int | None
            ) -> tuple[list[tuple[int, int, int]], tuple[int, int, int] | None]:
    """Each tensor cut into pieces of the sizes in ``cuts`` (cycled), and the piece ``skip``
    leaves out (None: none)."""
    pieces = []
    for item, n in enumerate(sizes):
        start, k = 0, 0
        while start < n:
            stop = min(n, start + cuts[k % len(cuts)])
            pieces.append((item, start, stop))
            start, k = stop, k + 1
    return pieces, pieces[skip % len(pieces)] if skip is not None else None


def _feed_pieces(digests: ChunkDigests, sizes: list[int], cuts: list[int], skip: int | None,
                 data: list[np.ndarray]) -> None:
    pieces, missing = _pieces(sizes, cuts, skip)
    for item, start, stop in pieces:
        if (item, start, stop) != missing:
            digests.feed(item, start, data[item][start:stop])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 97), min_size=1, max_size=12),
       skip=st.one_of(st.none(), st.integers(0, 30)), threads=st.sampled_from([0, 3]))
def test_chunk_digests_streamed_over_pieces_equal_each_chunks_checksum(
        sizes: list[int], cuts: list[int], skip: int | None, threads: int) -> None:
    """Bytes fed in pieces of any size, in order, give every chunk its xxh64, whether the
    chunks that arrive whole are hashed on the feeding thread or on a pool's threads while
    the feeding goes on; a chunk with a piece missing (left to the commit) gets none, and no
    other chunk is lost."""
    chunk = 32
    rng = np.random.default_rng(len(sizes) * 1000 + sum(cuts))
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    slots = [2 * i + 1 for i in range(len(sizes))]  # deferred tensors sit between others
    with contextlib.ExitStack() as stack:
        pool = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(threads))
                if threads else None)
        digests = ChunkDigests(slots, sizes, chunk, pool=pool)
        _feed_pieces(digests, sizes, cuts, skip, data)
        got = digests.result()  # waits for chunks still being hashed on the pool
    missing = _pieces(sizes, cuts, skip)[1]
    expected = {}
    for item, n in enumerate(sizes):
        for first in range(0, n, chunk):
            last = min(n, first + chunk)
            if missing is not None and missing[0] == item and missing[1] < last \
                    and missing[2] > first:
                continue
            expected[(slots[item], first)] = xxhash.xxh64_intdigest(data[item][first:last])
    assert got == expected
    assert digests.nbytes == sum(min(sizes[(s - 1) // 2], f + chunk) - f for s, f in expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool, torch.complex64])
def test_host_bytes_views_every_dtypes_bytes_in_place(dtype: torch.dtype) -> None:
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)
    for src in (t, t[1], t.sum() if dtype != torch.bool else t[0, 0, 0],
                t.float().requires_grad_().to(dtype) if dtype.is_floating_point else t):
        got = host_bytes(src)
        assert got.dtype == np.uint8 and got.ndim == 1
        assert got.tobytes() == src.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
        if src.numel():  # a view of the tensor's memory, not a copy
            assert got.ctypes.data == src.data_ptr()
