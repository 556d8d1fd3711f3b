"""AsymCheck as DeepSpeed's checkpoint engine: two ranks of ZeRO-3 on the CPU (gloo).

Each test starts its ranks as subprocesses running ``_child`` below with ``DS_ACCELERATOR=cpu``;
they save with ``engine.save_checkpoint`` and restore with ``engine.load_checkpoint`` in a
fresh job. The data of each step depends on the rank and the global step only, and the model
has no dropout, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._ranks import collect
from tests._util import assert_same

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
WIDTH = 16
SAVE_AT, RUN_TO = 3, 6
CHILD = "import sys; from tests.test_integration_deepspeed import _child; _child(*sys.argv[1:])"

# ---------------------------------------------------------------- the ranks' side
def _engine(seed: int, universal: bool = False) -> Any:
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                torch.nn.Linear(2 * WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                torch.nn.Linear(2 * WIDTH, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3,
                                    "stage3_gather_16bit_weights_on_model_save": True},
              "zero_force_ds_cpu_optimizer": False,
              "scheduler": {"type": "WarmupLR",
                            "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
              "steps_per_print": 10**9}
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _train_step(engine: Any, rank: int) -> float:
    g = torch.Generator().manual_seed(1000 * rank + int(engine.global_steps))
    loss = engine(torch.randn(4, WIDTH, generator=g).to(engine.device)).square().mean()
    engine.backward(loss)
    engine.step()
    return float(loss.item())


def _state(engine: Any) -> dict[str, Any]:
    """What ZeRO-3 holds on this rank: parameter partitions, fp32 master partitions, optimizer
    state, LR scheduler, counters (copied)."""
    import copy

    zero = engine.optimizer
    return copy.deepcopy({
        "params": [p.ds_tensor for p in engine.module.parameters()],
        "fp32": list(zero.fp32_partitioned_groups_flat),
        "optimizer": [zero.optimizer.state[p] for p in zero.fp32_partitioned_groups_flat],
        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                         for g in zero.optimizer.param_groups],
        "lr_scheduler": engine.lr_scheduler.state_dict(),
        "steps": [engine.global_steps, engine.global_samples, engine.skipped_steps],
    })


def _full_state(engine: Any) -> dict[str, Any]:
    """Every parameter's whole fp32 master and AdamW state, put together from the partitions
    of every rank (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {name: {"fp32": safe_get_full_fp32_param(p),
                   **{k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}}
            for name, p in engine.module.named_parameters()}


def _install(engine: Any, work: Path, **args: Any) -> Any:
    import asymcheck
    from asymcheck.integrations.deepspeed import install

    return install(engine, policy=asymcheck.default_policy(work / "checkpoints"), **args)


def _scenario_save(rank: int, work: Path) -> None:
    """Train, save at SAVE_AT, go on to RUN_TO: the uninterrupted reference."""
    engine = _engine(seed=0)
    ckpt = _install(engine, work)
    losses = [_train_step(engine, rank) for _ in range(SAVE_AT)]
    engine.save_checkpoint(str(work / "ds"), client_state={"epoch": 1, "seen": [1, 2]})
    rng = torch.get_rng_state()
    ckpt.handles[-1].wait_all_sync(60)
    torch.save({**_state(engine), "rng": rng}, work / f"expected-{rank}.pt")
    full = _full_state(engine)
    if rank == 0:
        torch.save(full, work / "expected-full.pt")
    assert engine.save_16bit_model(str(work / "export"))  # a plain file, not a checkpoint
    assert len(ckpt.handles) == 1
    losses += [_train_step(engine, rank) for _ in range(RUN_TO - SAVE_AT)]
    ckpt.close()
    (work / f"losses-{rank}.json").write_text(json.dumps(losses))
    print(f"SAVED {rank}", flush=True)


def _scenario_resume(rank: int, work: Path) -> None:
    """A fresh job: load the newest committed checkpoint, check it, train to RUN_TO."""
    engine = _engine(seed=7)
    ckpt = _install(engine, work)
    path, client = engine.load_checkpoint(str(work / "ds"))
    assert path is not None and Path(path).parent.name == f"global_step{SAVE_AT}", path
    assert client["epoch"] == 1 and client["seen"] == [1, 2], client
    if (work / f"expected-{rank}.pt").exists():
        expected = torch.load(work / f"expected-{rank}.pt", weights_only=False)
        assert_same(expected, {**_state(engine), "rng": torch.get_rng_state()})
    losses = [_train_step(engine, rank) for _ in range(RUN_TO - SAVE_AT)]
    ckpt.close()
    (work / f"resumed-{rank}.json").write_text(json.dumps(losses))
    print(f"RESUMED {rank}", flush=True)


def _scenario_crash(rank: int, work: Path) -> None:
    """Save at SAVE_AT, then rank 1 dies (SIGKILL) in the middle of the next save: its shard
    is written, the commit never hears of it."""
    import asymcheck.rankcommit

    original = asymcheck.rankcommit.report_shard

    def report_or_die(group: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
        if rank == 1 and report["step"] > SAVE_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(group, report)

    asymcheck.rankcommit.report_shard = report_or_die
    engine = _engine(seed=0)
    ckpt = _install(engine, work)
    for _ in range(SAVE_AT):
        _train_step(engine, rank)
    engine.save_checkpoint(str(work / "ds"), client_state={"epoch": 1, "seen": [1, 2]})
    ckpt.handles[-1].wait_all_sync(60)
    _train_step(engine, rank)
    try:
        engine.save_checkpoint(str(work / "ds"), client_state={"epoch": 1, "seen": [1, 2]})
        ckpt.handles[-1].durable("local").wait(60)
    except Exception as e:  # the other rank is gone: the commit (or the barrier) fails
        print(f"NOT COMMITTED {rank}: {e!r}", flush=True)
        os._exit(3)
    print(f"COMMITTED {rank}", flush=True)
    os._exit(0)


def _scenario_reshard(rank: int, work: Path) -> None:
    """One rank resumes the 2-rank checkpoint: refused as it is, loaded bit-exact from its
    universal export, and training goes on saving through AsymCheck."""
    engine = _engine(seed=7)
    ckpt = _install(engine, work)
    try:
        engine.load_checkpoint(str(work / "ds"))
        raise AssertionError("a checkpoint of 2 ranks loaded into 1")
    except ValueError as e:
        assert "saved by 2 ranks, this job has 1" in str(e), e
        assert f"asymcheck restore {SAVE_AT} --format deepspeed-universal" in str(e), e
    ckpt.close()
    engine = _engine(seed=7, universal=True)
    ckpt = _install(engine, work)
    path, client = engine.load_checkpoint(str(work / "universal"))
    assert client["epoch"] == 1 and int(engine.global_steps) == SAVE_AT, (client, path)
    assert_same(torch.load(work / "expected-full.pt", weights_only=False), _full_state(engine))
    _train_step(engine, rank)
    engine.save_checkpoint(str(work / "ds"))
    ckpt.handles[-1].durable("local").wait(60)
    ckpt.close()
    print(f"RESHARDED {rank}", flush=True)


ASYM_SAVES = (5, 7, 8)  # after the 3 profiled warm-up iterations


def _scenario_asym(rank: int, work: Path) -> None:
    """Asymmetric snapshots of the ZeRO-3 partitions: every committed checkpoint equals the
    state right after its save, though its partitions were copied during the next iteration."""
    engine = _engine(seed=0)
    ckpt = _install(engine, work, warmup_iterations=3, min_partition_bytes=512)
    expected = {}
    for _ in range(ASYM_SAVES[-1] + 2):
        _train_step(engine, rank)
        step = int(engine.global_steps)
        if step in ASYM_SAVES:
            engine.save_checkpoint(str(work / "ds"))
            expected[step] = _state(engine)
    ckpt.wait()
    for step, handle in zip(ASYM_SAVES, ckpt.handles, strict=True):
        metrics = handle.metrics
        assert metrics["mode"] == "asym" and metrics["overlapped_bytes"] > 0, metrics
        if engine.device.type == "cuda":  # copied on the side stream into page-locked memory
            assert metrics["host_pinned"], metrics
        plan = metrics["plan"]
        print(f"rank {rank} step {step}: overlapped {metrics['overlapped_bytes']} B, "
              f"residual {metrics['residual_bytes']} B, plan {plan}", flush=True)
    for step in ASYM_SAVES:
        path, _ = engine.load_checkpoint(str(work / "ds"), tag=f"global_step{step}")
        assert Path(path).parent.name == f"global_step{step}", path
        assert_same(expected[step], _state(engine))
    ckpt.close()
    print(f"ASYM {rank}", flush=True)


SCENARIOS: dict[str, Callable[[int, Path], None]] = {
    "save": _scenario_save, "resume": _scenario_resume, "crash": _scenario_crash,
    "asym": _scenario_asym, "reshard": _scenario_reshard,
}


def _child(scenario: str, rank: str, work: str) -> None:
    import logging

    import deepspeed

    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if os.environ["DS_ACCELERATOR"] == "cuda":
        torch.cuda.set_device(int(rank))
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        # the shared-memory all-reduce kernel would be compiled at start-up (minutes); gloo does
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    try:
        SCENARIOS[scenario](int(rank), Path(work))
    finally:  # a gloo group left to the interpreter's exit can abort the process
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ the test's side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(scenario: str, work: Path, timeout: float = 150,
           env: dict[str, str] | None = None, world: int = WORLD) -> list[tuple[int, str]]:
    """Run ``scenario`` on ``world`` ranks; (exit code, output) per rank."""
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", CHILD, scenario, str(r), str(work)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
             "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "OMP_NUM_THREADS": "1", **(env or {})})
        for r in range(world)]
    return collect(procs, timeout)


def _ok(results: list[tuple[int, str]], word: str) -> None:
    for rank, (code, text) in enumerate(results):
        assert code == 0 and f"{word} {rank}" in text, f"rank {rank} exited {code}:\n{text}"


def _losses(work: Path, name: str, rank: int) -> list[float]:
    return list(json.loads((work / f"{name}-{rank}.json").read_text()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An uninterrupted run that saves at SAVE_AT (its own shared-memory root, removed after)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed: pip install 'asymcheck[deepspeed]'")
    work = tmp_path_factory.mktemp("reference")
    shm = Path("/dev/shm") / f"asymcheck-test-{uuid.uuid4().hex[:10]}"
    shm.mkdir()
    try:
        _ok(_spawn("save", work, env={"ASYMCHECK_SHM_ROOT": str(shm)}), "SAVED")
        yield work
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.slow
def test_zero3_save_and_load_through_asymcheck_is_bit_exact(reference: Path) -> None:
    exported = torch.load(reference / "export" / "pytorch_model.bin", weights_only=True)
    assert sorted(exported) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    ds_dir = reference / "ds" / f"global_step{SAVE_AT}"
    assert not any(f.stat().st_size for f in ds_dir.iterdir()), "no DeepSpeed file is written"
    # a fresh job with its own (empty) shared memory: restores from the local tier
    _ok(_spawn("resume", reference), "RESUMED")
    for rank in range(WORLD):
        assert _losses(reference, "resumed", rank) == _losses(reference, "losses", rank)[SAVE_AT:]


@pytest.mark.slow
def test_a_rank_killed_mid_save_resumes_from_the_last_committed_checkpoint(
        tmp_path: Path, reference: Path) -> None:
    crashed = _spawn("crash", tmp_path)
    assert crashed[1][0] == -signal.SIGKILL, crashed[1][1]
    assert "COMMITTED 0" not in crashed[0][1] or "NOT COMMITTED 0" in crashed[0][1]
    _ok(_spawn("resume", tmp_path), "RESUMED")  # from shared memory
    for rank in range(WORLD):
        assert _losses(tmp_path, "resumed", rank) == _losses(reference, "losses", rank)[SAVE_AT:]


@pytest.mark.slow
def test_zero3_checkpoint_restores_at_another_world_size_through_a_universal_export(
        reference: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "asymcheck.cli", "restore", str(SAVE_AT), "--tier",
         f"file://{reference / 'checkpoints'}", "--format", "deepspeed-universal", "--to",
         str(reference / "universal")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr
    assert f"step {SAVE_AT}, DeepSpeed universal checkpoint" in out.stdout, out.stdout
    assert (reference / "universal" / "latest_universal").read_text() == f"global_step{SAVE_AT}"
    results = _spawn("reshard", reference, world=1)
    _ok(results, "RESHARDED")


@pytest.mark.slow
def test_zero3_partitions_copied_in_the_next_iteration_equal_the_state_at_each_save(
        tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    results = _spawn("asym", tmp_path)
    _ok(results, "ASYM")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zero3_on_the_device_over_nccl_copies_partitions_on_the_side_stream(
        tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    results = _spawn("asym", tmp_path, env={"DS_ACCELERATOR": "cuda"}, world=1)
    _ok(results, "ASYM")


def test_importing_without_deepspeed_names_the_extra() -> None:
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "try:\n    import asymcheck.integrations.deepspeed\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.stdout.strip() == ("asymcheck.integrations.deepspeed needs DeepSpeed: "
                                  "pip install 'asymcheck[deepspeed]'"), out


def test_deepspeed_values_round_trip_and_other_objects_are_refused() -> None:
    pytest.importorskip("deepspeed")
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from asymcheck.integrations.deepspeed import decode, encode
    from asymcheck.state import flatten, pack_skeleton, unflatten, unpack_skeleton

    scaler = DynamicLossScaler(init_scale=2.0**8, scale_window=10, min_scale=1.0,
                               delayed_shift=2, consecutive_hysteresis=False,
                               dtype=torch.bfloat16)
    value = {"stage": ZeroStageEnum.weights, "scaler": scaler, "ids": {3, 1},
             "shapes": collections.OrderedDict([("b", torch.Size([2, 3])), ("a", torch.Size())]),
             "t": torch.arange(3), 0: (1, "x")}
    flat = flatten(encode(value, "file"))
    back = decode(unflatten(unpack_skeleton(pack_skeleton(flat.skeleton)), flat.tensors))
    assert back["stage"] is ZeroStageEnum.weights and back["ids"] == {1, 3}
    assert type(back["scaler"]) is DynamicLossScaler and vars(back["scaler"]) == vars(scaler)
    assert type(back["shapes"]) is collections.OrderedDict
    assert list(back["shapes"].items()) == [("b", torch.Size([2, 3])), ("a", torch.Size())]
    assert torch.equal(back["t"], value["t"]) and back[0] == (1, "x")
    with pytest.raises(TypeError, match=r"file/client/obj: a value of type object cannot"):
        encode({"client": {"obj": object()}}, "file")


def test_install_refuses_zero_stages_below_3() -> None:
    pytest.importorskip("deepspeed")
    import types

    from asymcheck.integrations.deepspeed import install

    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 2)
    with pytest.raises(NotImplementedError, match="supports ZeRO stage 3, this engine runs "
                                                  "stage 2"):
        install(engine)


def test_deepspeed_export_of_a_checkpoint_saved_without_deepspeed_says_so(
        tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from asymcheck import Checkpointer, default_policy

    local = tmp_path / "checkpoints"
    model = torch.nn.Linear(4, 4)
    with Checkpointer(model, policy=default_policy(local), mode="naive") as ckpt:
        ckpt.save_sync(1).wait_all_sync(60)
    out = subprocess.run(
        [sys.executable, "-m", "asymcheck.cli", "restore", "1", "--tier", f"file://{local}",
         "--format", "deepspeed", "--to", str(tmp_path / "ds")], cwd=REPO, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO),
                                     "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 2, out
    assert out.stderr.strip().endswith("step 1 was not saved through a DeepSpeed engine "
                                       "(asymcheck.integrations.deepspeed)"), out.stderr
    assert not (tmp_path / "ds").exists()
