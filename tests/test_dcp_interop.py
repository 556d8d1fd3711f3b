"""Interop with torch Distributed Checkpoint (DCP), bit for bit in both directions.

AsymCheck -> DCP: ``asymcheck restore --format dcp`` writes a folder that ``dcp.load`` (and
DCP's ``dcp_to_torch_save``) reads. DCP -> AsymCheck: ``Checkpointer.restore_dcp`` fills a
model and its optimizers from a DCP checkpoint. Both in one process and with 2 FSDP2 ranks
(gloo on loopback, ranks started as subprocesses running ``_child`` below).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)

import asymcheck
from asymcheck import cli
from asymcheck.errors import RestoreError
from tests import _ranks
from tests._util import assert_same, make_training, model_state, opt_state, snapshot, train_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ------------------------------------------------------------------------------ helpers
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def save_run(policy: asymcheck.Policy, steps: int) -> dict[str, Any]:
    """Train and save steps 1..``steps`` with a single-process Checkpointer; the snapshot of
    the last one."""
    model, opt, sched = make_training(seed=1)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        for step in range(1, steps + 1):
            train_steps(model, opt, sched, 1)
            ckpt.save_sync(step).wait_all_sync(60)
    return snapshot(model, opt, sched)


def export(capsys: pytest.CaptureFixture[str], policy: asymcheck.Policy, target: Path,
           *extra: str) -> str:
    local = policy.tier("local").url
    code, out, err = run(capsys, "restore", "latest", "--to", str(target), "--format", "dcp",
                         "--tier", local, *extra)
    assert code == 0, err
    return out


def fresh_training(seed: int = 5) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """Another model, optimizer and scheduler (the scheduler adds ``initial_lr`` to the
    optimizer's param groups, as in the saved run)."""
    return make_training(seed=seed)


def dcp_target(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def dcp_load_into(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint as DCP's documentation does: into the live state, then set."""
    sd = dcp_target(model, opt)
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# ------------------------------------------------------------------ AsymCheck -> DCP
def test_cli_exports_a_checkpoint_that_dcp_loads_bit_exact(
        capsys: pytest.CaptureFixture[str], policy: asymcheck.Policy, tmp_path: Path) -> None:
    expected = save_run(policy, 3)
    target = tmp_path / "dcp-step3"
    out = export(capsys, policy, target)
    assert out.startswith(f"wrote {target}: step 3, ")
    assert sorted(p.name for p in target.iterdir()) == [".metadata", "__0_0.distcp"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dcp-step3")] == []

    model, opt, _ = fresh_training()
    dcp_load_into(target, model, opt)
    assert_same(expected["model"], model.state_dict(), "model")
    assert_same(expected["opt"], opt_state(model, opt), "optim")

    step = {"step": -1}
    dcp.load(step, checkpoint_id=target)  # non-tensor state comes back as written
    assert step == {"step": 3}

    dcp_to_torch_save(target, tmp_path / "whole.pt")  # DCP's own format utility
    doc = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert set(doc) == {"model", "optim", "step"} and doc["step"] == 3
    assert_same(expected["model"], doc["model"], "dcp_to_torch_save")
    assert_same(expected["opt"]["state"], doc["optim"]["state"], "dcp_to_torch_save")


def test_dcp_export_refuses_a_file_and_replaces_a_folder_with_force(
        capsys: pytest.CaptureFixture[str], policy: asymcheck.Policy, tmp_path: Path) -> None:
    save_run(policy, 2)
    local = policy.tier("local").url
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, "restore", "2", "--to", str(afile), "--format", "dcp", "--force",
                       "--tier", local)
    assert code == 2 and "--format dcp writes a directory" in err and err.count("\n") == 1

    target = tmp_path / "out"
    export(capsys, policy, target)
    code, _, err = run(capsys, "restore", "1", "--to", str(target), "--format", "dcp",
                       "--tier", local)
    assert code == 2 and "exists (use --force" in err
    (target / "__1_0.distcp").write_bytes(b"stale")  # a data file of an earlier export
    (target / "notes.txt").write_text("kept")
    code, out, _ = run(capsys, "restore", "1", "--to", str(target), "--format", "dcp",
                       "--force", "--tier", local)
    assert code == 0 and out.startswith(f"wrote {target}: step 1, ")
    assert sorted(p.name for p in target.iterdir()) == [".metadata", "__0_0.distcp",
                                                         "notes.txt"]
    step = {"step": -1}
    dcp.load(step, checkpoint_id=target)
    assert step == {"step": 1}


def test_several_optimizers_export_as_optim_and_optim_1_and_restore_bit_exact(
        capsys: pytest.CaptureFixture[str], policy: asymcheck.Policy, tmp_path: Path) -> None:
    """Optimizer 0 is ``optim``, optimizer 1 ``optim_1``; one that never stepped has no key
    and stays as constructed when restored."""

    def build(seed: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
        model, _, _ = make_training(seed=seed)
        body = torch.optim.AdamW(model.body.parameters(), lr=1e-2)
        rest = torch.optim.SGD([*model.norm.parameters(), *model.head.parameters()], lr=0.1,
                               momentum=0.9)
        idle = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # never steps
        return model, [body, rest, idle]

    model, opts = build(1)
    with asymcheck.Checkpointer(model, opts, policy=policy) as ckpt:
        for _ in range(2):
            model(torch.randn(8, 32)).square().mean().backward()
            for o in opts[:2]:
                o.step()
                o.zero_grad()
        ckpt.save_sync(2).wait_all_sync(60)
    expected = [model_state(model), opt_state(model, opts[0]), opt_state(model, opts[1])]

    target = tmp_path / "two"
    export(capsys, policy, target)
    meta = FileSystemReader(str(target)).read_metadata()
    assert {k.split(".", 1)[0] for k in meta.state_dict_metadata} == {
        "model", "optim", "optim_1", "step"}

    fresh, fresh_opts = build(9)
    with asymcheck.Checkpointer(fresh, fresh_opts, policy=asymcheck.default_policy(
            tmp_path / "other")) as ckpt:
        ckpt.restore_dcp(target)
    assert_same(expected, [model_state(fresh), opt_state(fresh, fresh_opts[0]),
                           opt_state(fresh, fresh_opts[1])])
    assert not fresh_opts[2].state


# ------------------------------------------------------------------ DCP -> AsymCheck
def test_restore_dcp_fills_model_and_adamw_from_a_dcp_save_bit_exact(tmp_path: Path) -> None:
    model, opt, sched = make_training(seed=1)
    train_steps(model, opt, sched, 3)
    expected = snapshot(model, opt, sched)
    dcp.save(dcp_target(model, opt), storage_writer=FileSystemWriter(tmp_path / "native"),
             no_dist=True)

    fresh, fresh_opt, _ = fresh_training()
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=asymcheck.default_policy(
            tmp_path / "ckpt")) as ckpt:
        ckpt.restore_dcp(tmp_path / "native")
        ckpt.save_sync(3).wait_all_sync(60)  # the run goes on from the DCP state
    assert_same(expected["model"], fresh.state_dict(), "model")
    assert_same(expected["opt"], opt_state(fresh, fresh_opt), "optim")

    again, again_opt, _ = fresh_training(seed=7)
    with asymcheck.Checkpointer(again, again_opt, policy=asymcheck.default_policy(
            tmp_path / "ckpt")) as ckpt:
        assert ckpt.restore_sync() == 3
    assert_same(expected["model"], again.state_dict(), "model after an AsymCheck save")
    assert_same(expected["opt"], opt_state(again, again_opt), "optim after an AsymCheck save")


def test_asymcheck_to_dcp_to_asymcheck_round_trip_is_bit_exact(
        capsys: pytest.CaptureFixture[str], policy: asymcheck.Policy, tmp_path: Path) -> None:
    expected = save_run(policy, 3)
    export(capsys, policy, tmp_path / "dcp")
    model, opt, sched = fresh_training()
    with asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(
            tmp_path / "second"), extras={"sched": sched}) as ckpt:
        ckpt.restore_dcp(str(tmp_path / "dcp"))
    assert_same(expected["model"], model.state_dict(), "model")
    assert_same(expected["opt"], opt_state(model, opt), "optim")


def test_restore_dcp_of_model_weights_alone_keeps_the_optimizer_as_constructed(
        tmp_path: Path) -> None:
    model, opt, sched = make_training(seed=1)
    train_steps(model, opt, sched, 1)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp_path / "weights",
             no_dist=True)
    fresh, fresh_opt, _ = fresh_training()
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=asymcheck.default_policy(
            tmp_path / "ckpt")) as ckpt:
        ckpt.restore_dcp(tmp_path / "weights")
    assert_same(model_state(model), model_state(fresh))
    assert not fresh_opt.state


def test_restore_dcp_of_bad_input_is_one_restore_error_naming_path_and_what_is_missing(
        tmp_path: Path) -> None:
    model, opt, sched = make_training(seed=1)
    train_steps(model, opt, sched, 1)
    optim_only = tmp_path / "optim-only"
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=optim_only,
             no_dist=True)
    other = torch.nn.Linear(3, 2)
    other_model = tmp_path / "other-model"
    dcp.save({"model": get_model_state_dict(other)}, checkpoint_id=other_model, no_dist=True)
    two_opts = tmp_path / "two-opts"
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "optim_1": get_optimizer_state_dict(model, opt)}, checkpoint_id=two_opts,
             no_dist=True)
    fewer, more = tmp_path / "fewer", tmp_path / "more"
    sd = get_model_state_dict(model)
    dcp.save({"model": {**sd, "head.extra": torch.zeros(2)}}, checkpoint_id=more, no_dist=True)
    sd.pop("head.bias")
    dcp.save({"model": sd}, checkpoint_id=fewer, no_dist=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / ".metadata").write_bytes(b"not a pickle")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / ".metadata").write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    (tmp_path / "file").write_text("x")

    cases = [
        (tmp_path / "missing", "is not a DCP checkpoint: no such directory"),
        (tmp_path / "file", "is not a DCP checkpoint: not a directory"),
        (tmp_path / "empty", "is not a DCP checkpoint: it has no .metadata file"),
        (tmp_path / "garbage", "is not a DCP checkpoint: its .metadata cannot be read"),
        (tmp_path / "foreign", "is not a DCP checkpoint: its .metadata holds a SimpleNamespace"),
        (optim_only, "holds no model state (key 'model'); it holds 'optim'"),
        (other_model, "lacks model state for 12 entries of the model: counter, body.0.weight"),
        (fewer, "lacks model state for 1 entry of the model: head.bias"),
        (more, "holds model state for 1 entry the model does not have: head.extra"),
        (two_opts, "holds optimizer state optim_1: more optimizers than the 1 given"),
    ]
    fresh, fresh_opt, fresh_sched = fresh_training()
    before = snapshot(fresh, fresh_opt, fresh_sched)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=asymcheck.default_policy(
            tmp_path / "ckpt")) as ckpt:
        for path, message in cases:
            with pytest.raises(RestoreError) as info:
                ckpt.restore_dcp(path)
            text = str(info.value)
            assert str(path) in text and message in text, (path, text)
            assert "\n" not in text and isinstance(info.value, asymcheck.AsymCheckError)
    assert_same(before, snapshot(fresh, fresh_opt, fresh_sched), "nothing was changed")

    shapes = torch.nn.Linear(3, 4)  # the same names, other shapes: DCP's error, one line
    with pytest.raises(RestoreError, match=rf"cannot load DCP checkpoint {other_model}: rank 0"):
        asymcheck.dcpinterop.restore_dcp(other_model, shapes, [])


# --------------------------------------------------------------- 2 FSDP2 ranks <-> DCP
IN, HIDDEN, OUT = 7, 5, 3


class Net(torch.nn.Module):
    """Sizes that split unevenly over 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(IN, HIDDEN),
                                           torch.nn.Linear(HIDDEN, HIDDEN),
                                           torch.nn.Linear(HIDDEN, OUT)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        out: torch.Tensor = self.layers[-1](x)
        return out


def _build(seed: int, fsdp: bool) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _full(obj: Any) -> Any:
    """A copy with every DTensor gathered whole (collective) and every tensor cloned."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_full(v) for v in obj]  # betas may come back as a list: values are compared
    return obj


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return _full(dcp_target(model, opt))


def _scenario_round_trip(rank: int, work: Path) -> None:
    """3 training steps, each saved by AsymCheck; the last one also with ``dcp.save`` (every
    rank its shards) into ``work/native``; the full state in ``work/expected.pt``. Then rank 0
    alone exports the AsymCheck checkpoint with ``asymcheck restore --format dcp`` to
    ``work/export``, and fresh FSDP2 models ``restore_dcp`` it: their full state equals the
    saved one."""
    model, opt = _build(0, fsdp=True)
    with asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(
            work / "checkpoints"), dist_timeout_s=60) as ckpt:
        for step in range(1, 4):
            gen = torch.Generator().manual_seed(1000 * rank + step)
            model(torch.randn(4, IN, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ckpt.save_sync(step).wait_all_sync(60)
    dcp.save(dcp_target(model, opt), checkpoint_id=work / "native")
    expected = _full_state(model, opt)
    if rank == 0:
        torch.save(expected, work / "expected.pt")
        code = cli.main(["restore", "latest", "--to", str(work / "export"), "--format", "dcp",
                         "--tier", (work / "checkpoints").as_uri()])
        assert code == 0, f"asymcheck restore exited {code}"
    dist.barrier()
    model, opt = _build(7, fsdp=True)
    with asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(
            work / "restored"), dist_timeout_s=60) as ckpt:
        ckpt.restore_dcp(work / "export")
    assert_same(expected, _full_state(model, opt), f"rank {rank}")
    print(f"RESTORED {rank}", flush=True)


SCENARIOS = {"round-trip": _scenario_round_trip}


def _child(scenario: str, rank: str, world: str, work: str, init: str) -> None:
    _ranks.run(SCENARIOS, scenario, rank, world, work, init)


def _spawn(scenario: str, work: Path, world: int = 2, timeout: float = 180) -> str:
    """Run ``scenario`` on ``world`` ranks; rank 0's output."""
    results = _ranks.spawn("tests.test_dcp_interop", scenario, work, world, timeout=timeout)
    for rank, (code, text) in enumerate(results):
        assert code == 0 and f"RESTORED {rank}" in text, f"rank {rank} exited {code}:\n{text}"
    return results[0][1]


def test_a_2_rank_fsdp2_checkpoint_round_trips_through_dcp_bit_exact(tmp_path: Path) -> None:
    """2 FSDP2 ranks save with AsymCheck -> the CLI exports the checkpoint whole as DCP ->
    2 fresh FSDP2 ranks ``restore_dcp`` it, and ``dcp.load`` reads it in one plain process;
    a DCP checkpoint the 2 ranks saved themselves restores into one plain process. Every
    full tensor (model and AdamW state) equals the saved one, bit for bit."""
    out = _spawn("round-trip", tmp_path)
    assert "step 3 was saved by 2 ranks: export holds its sharded tensors whole" in out
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)

    model, opt = _build(5, fsdp=False)
    dcp_load_into(tmp_path / "export", model, opt)
    assert_same(expected, _full_state(model, opt), "dcp.load of the export")
    meta: dict[str, Any] = {"rank": -1, "world_size": -1}
    dcp.load(meta, checkpoint_id=tmp_path / "export")
    assert meta == {"rank": 0, "world_size": 2}

    model, opt = _build(6, fsdp=False)
    with asymcheck.Checkpointer(model, opt, policy=asymcheck.default_policy(
            tmp_path / "single")) as ckpt:
        ckpt.restore_dcp(tmp_path / "native")
    assert_same(expected, _full_state(model, opt), "restore_dcp of a 2-rank dcp.save")
