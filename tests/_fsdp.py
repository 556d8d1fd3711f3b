"""The ranks' side of the sharded-state tests (``test_sharded.py``).

A tiny model whose sizes (7 -> 5 -> 5 -> 3) split unevenly over 2, 3 and 4 ranks, built plain,
under DistributedDataParallel, or under FSDP2 (``fully_shard`` per layer and on the root, on a
CPU device mesh); its state as ``torch.distributed.checkpoint.state_dict`` sees it (fully
qualified names), as local shards or as full tensors; and the scenarios a rank runs.

``child`` is the entry point of a rank: it joins a gloo group (file rendezvous on loopback),
runs a scenario and prints a word the test looks for. Scenario arguments come as JSON in
``ASYMCHECK_TEST_ARGS``. ``run_rank`` wraps it for ranks forked from a server process that
imported this module once (torch's import is most of a rank's CPU time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import asymcheck
from asymcheck.layout import manifest_key
from asymcheck.policy import TierPolicy
from tests._ranks import exit_on_commit, run
from tests._util import assert_same

IN, HIDDEN, OUT = 7, 5, 3
VOCAB, EMBED = 11, 6


# ------------------------------------------------------------------------------ models
class Net(torch.nn.Module):
    """Three linear layers and a buffer; ``hidden`` changes the global shapes of the first
    two layers, ``name`` the parameter names (``layers.0.weight`` -> ``blocks.0.weight``)."""

    def __init__(self, hidden: int = HIDDEN, name: str = "layers") -> None:
        super().__init__()
        self.stack = name
        setattr(self, name, torch.nn.ModuleList([
            torch.nn.Linear(IN, hidden), torch.nn.Linear(hidden, hidden),
            torch.nn.Linear(hidden, OUT)]))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, OUT))

    @property
    def layer_list(self) -> torch.nn.ModuleList:
        layers: torch.nn.ModuleList = getattr(self, self.stack)
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layer_list
        for layer in hidden:
            x = torch.tanh(layer(x))
        out: torch.Tensor = last(x) * self.scale
        return out


class TiedNet(torch.nn.Module):
    """GPT-2 style: the output projection shares its weight with the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, EMBED)
        self.mix = torch.nn.Linear(EMBED, EMBED)
        self.lm_head = torch.nn.Linear(EMBED, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(torch.tanh(self.mix(self.wte(idx))))
        return out


def build(kind: str, seed: int, *, hidden: int = HIDDEN, name: str = "layers"
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``kind``: "plain" (no torch.distributed needed), "ddp" or "fsdp" (FSDP2 over every rank).
    The same seed gives every rank the same initial full parameters."""
    torch.manual_seed(seed)
    net = Net(hidden, name)
    model: torch.nn.Module = net
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in net.layer_list:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    elif kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    elif kind != "plain":
        raise ValueError(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return model, opt


def build_tied(seed: int, *, fsdp: bool = False) -> tuple[TiedNet, torch.optim.Optimizer]:
    """``fsdp``: FSDP2 on the root over every rank (the tied pair shards as one parameter)."""
    torch.manual_seed(seed)
    model = TiedNet()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """One step on this rank's own batch (a generator of its own: the global RNG is left
    alone, so a checkpoint's RNG state can be compared)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(1000 * rank + step)
    model(torch.randn(4, IN, generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def train_tied_step(model: TiedNet, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    model(torch.randint(0, VOCAB, (8,), generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


# ------------------------------------------------------------------------------- state
def as_full(obj: Any) -> Any:
    """A copy with every DTensor gathered into its full tensor (collective: every rank calls
    it, in the same order) and every other tensor cloned."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return _walk(obj, as_full)


def as_local(obj: Any) -> Any:
    """A copy with every DTensor replaced by (a clone of) this rank's local shard."""
    if isinstance(obj, DTensor):
        return obj.to_local().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return _walk(obj, as_local)


def _walk(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Containers copied with ``fn`` applied to each value; tuples become lists (loading an
    optimizer state may turn ``betas`` into a list: the values are what is compared)."""
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [fn(v) for v in obj]
    return obj


def placements(obj: Any, path: str = "") -> dict[str, Any]:
    """path -> DTensor placements (None for a plain tensor), for every tensor in ``obj``."""
    out: dict[str, Any] = {}
    if isinstance(obj, DTensor):
        out[path] = tuple(obj.placements)
    elif isinstance(obj, torch.Tensor):
        out[path] = None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(placements(v, f"{path}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(placements(v, f"{path}/{i}"))
    return out


def dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by fully qualified parameter names."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return as_full(dcp_state(model, opt))


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return as_local(dcp_state(model, opt))


# ----------------------------------------------------------------------------- policy
def policy(work: Path, spec: dict[str, Any] | None = None) -> asymcheck.Policy:
    """The default policy under ``work/checkpoints`` (host shared memory + local files); with
    ``spec = {"keep": N}`` the local tier keeps N checkpoints; with ``spec = {"host": NAME,
    "tier": NAME, "url": URL}``, a host tier and that one durable tier (e.g. HDFS) alone.
    Every rank of a job must get the same spec."""
    default = asymcheck.default_policy(work / "checkpoints")
    if not spec:
        return default
    if "url" not in spec:
        host, local = default.tiers
        return asymcheck.Policy(tiers=(host, dataclasses.replace(local, keep=spec["keep"])))
    return asymcheck.Policy(tiers=(
        TierPolicy(name="host", url=f"shm://{spec['host']}", keep=2),
        TierPolicy(name=spec["tier"], url=spec["url"], keep=3, options={"timeout_s": 30})))


def save_run(kind: str, work: Path, steps: int, spec: dict[str, Any] | None = None) -> None:
    """Train ``steps`` steps and save after each; the state of the last one, as full tensors,
    goes to ``work/expected.pt`` (written by rank 0 alone)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, opt = build(kind, seed=0)
    replicated = ("model",) if kind == "ddp" else ()
    ck = asymcheck.Checkpointer(model, opt, policy=policy(work, spec), warmup_iterations=2,
                                replicated=replicated, dist_timeout_s=60)
    try:
        for step in range(1, steps + 1):
            train_step(model, opt, step)
            ck.save_sync(step)
        expected = full_state(model, opt)
        ck.wait_idle_sync()
    finally:
        ck.close_sync()
    if rank == 0:
        torch.save({"step": steps, "state": expected}, work / "expected.pt")


def restore_run(kind: str, work: Path, spec: dict[str, Any] | None = None,
                tier: str | None = None) -> dict[str, int]:
    """A fresh model (another seed) restores the newest checkpoint; its full state must equal
    ``work/expected.pt`` bit for bit. Returns the tensors read per tier (this rank)."""
    expected = torch.load(work / "expected.pt", weights_only=True)
    model, opt = build(kind, seed=7)
    with asymcheck.Checkpointer(model, opt, policy=policy(work, spec),
                                dist_timeout_s=60) as ck:
        assert ck.restore_sync() == expected["step"]
        loaded = ck.load_sync()
        assert loaded is not None and loaded.step == expected["step"]
        sources = dict(loaded.sources)
    got = full_state(model, opt)
    assert_same(expected["state"], got, "restored")
    if tier is not None:
        assert set(sources) <= {tier}, f"read from {sources}, expected {tier!r} alone"
    return sources


# --------------------------------------------------------------------------- scenarios
def _args() -> dict[str, Any]:
    args: dict[str, Any] = json.loads(os.environ.get("ASYMCHECK_TEST_ARGS", "{}"))
    return args


def _scenario_train(rank: int, work: Path) -> None:
    """Save every ``every`` steps in asym mode, record the local shards right after each save,
    then check every committed checkpoint against that record: loaded, and restored."""
    args = _args()
    steps, every = args["steps"], args["every"]
    model, opt = build("fsdp", seed=0)
    ck = asymcheck.Checkpointer(model, opt, policy=policy(work, {"keep": steps // every}),
                                warmup_iterations=2, dist_timeout_s=60)
    records: dict[int, dict[str, Any]] = {}
    rngs: dict[int, torch.Tensor] = {}
    modes: dict[int, str] = {}
    handles = []
    try:
        for step in range(1, steps + 1):
            train_step(model, opt, step)
            if step % every == 0:
                handles.append(ck.save_sync(step))
                records[step] = local_state(model, opt)
                rngs[step] = torch.get_rng_state()
        for h in handles:
            h.wait_all_sync(60)
            modes[h.step] = h.metrics.get("mode", "?")
        ck.wait_idle_sync()
        print(f"MODES {rank} {modes}", flush=True)
        saved = sorted(records)
        assert all(modes[s] == "asym" for s in saved[-2:]), \
            f"the saves after the warm-up copy during the next iteration: {modes}"
        committed = [s for s in saved
                     if (work / "checkpoints" / manifest_key(s)).exists()]
        assert committed == saved, f"the local tier keeps every save: {committed}"
        live = placements(dcp_state(model, opt))
        for step in committed:
            loaded = ck.load_sync(step)
            assert loaded is not None and loaded.step == step and loaded.state["step"] == step
            assert len(loaded.state["optimizers"]) == 1
            got = {"model": loaded.state["model"], "optim": loaded.state["optimizers"][0]}
            assert placements(got) == live, "loaded state is placed like the live state"
            assert_same(records[step], as_local(got), f"load {step}")
        for step in committed:
            assert ck.restore_sync(step) == step
            assert_same(records[step], local_state(model, opt), f"restore {step}")
            assert torch.equal(torch.get_rng_state(), rngs[step]), f"RNG of step {step}"
    finally:
        ck.close_sync()
    print(f"VERIFIED {rank} {committed}", flush=True)


def _scenario_save(rank: int, work: Path) -> None:
    args = _args()
    save_run(args.get("kind", "fsdp"), work, args.get("steps", 3), args.get("policy"))
    print(f"SAVED {rank}", flush=True)


def _scenario_restore(rank: int, work: Path) -> None:
    args = _args()
    sources = restore_run(args.get("kind", "fsdp"), work, args.get("policy"), args.get("tier"))
    print(f"SOURCES {rank} {sources}", flush=True)
    print(f"RESTORED {rank}", flush=True)


def _scenario_restore_fails(rank: int, work: Path) -> None:
    """Restoring must fail on this rank; the error is printed as JSON for the test to check."""
    args = _args()
    model, opt = build("fsdp", seed=7, hidden=args.get("hidden", HIDDEN))
    ck = asymcheck.Checkpointer(model, opt, policy=policy(work, args.get("policy")),
                                dist_timeout_s=args.get("timeout", 20))
    try:
        step = ck.restore_sync(args.get("step"))
    except Exception as e:
        report = {"type": type(e).__name__, "message": str(e),
                  "asymcheck": isinstance(e, asymcheck.AsymCheckError)}
        print(f"FAILED {rank} {json.dumps(report)}", flush=True)
    else:
        print(f"NO ERROR {rank}: restored step {step}", flush=True)
    try:
        ck.close_sync()
    except asymcheck.CheckpointError as e:  # background errors of the failed restore
        print(f"CLOSE {rank}: {e!r}", flush=True)


def _scenario_crash(rank: int, work: Path) -> None:
    """Rank ``kill_rank`` SIGKILLs itself once its shard of ``kill_step`` is written but before
    it reports it; the other ranks must not commit that step."""
    import asymcheck.rankcommit

    kill_rank, kill_step = _args()["kill"]
    real_report = asymcheck.rankcommit.report_shard

    def report_or_die(group: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
        if rank == kill_rank and report["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_report(group, report)

    asymcheck.rankcommit.report_shard = report_or_die
    model, opt = build("fsdp", seed=0)
    ck = asymcheck.Checkpointer(model, opt, policy=policy(work), dist_timeout_s=30)
    train_step(model, opt, 1)
    ck.save_sync(1).wait_all_sync(60)
    torch.save({"state": local_state(model, opt), "rng": torch.get_rng_state()},
               work / f"expected-{rank}.pt")
    train_step(model, opt, 2)
    handle = ck.save_sync(2)
    ck.finish_snapshot()
    exit_on_commit(handle, rank)


def _scenario_crash_restore(rank: int, work: Path) -> None:
    expected = torch.load(work / f"expected-{rank}.pt", weights_only=True)
    model, opt = build("fsdp", seed=7)
    with asymcheck.Checkpointer(model, opt, policy=policy(work), dist_timeout_s=60) as ck:
        assert ck.restore_sync() == 1
    assert_same(expected["state"], local_state(model, opt), "restored")
    assert torch.equal(torch.get_rng_state(), expected["rng"]), "each rank's RNG goes on"
    print(f"RESTORED {rank}", flush=True)


def _scenario_tied(rank: int, work: Path) -> None:
    """GPT-2 style tied weights under FSDP2: saved, then restored into a fresh model."""
    model, opt = build_tied(0, fsdp=True)
    with asymcheck.Checkpointer(model, opt, policy=policy(work), dist_timeout_s=60) as ck:
        for step in (1, 2):
            train_tied_step(model, opt, step)
        ck.save_sync(2).wait_all_sync(60)
        expected = full_state(model, opt)
    fresh, fresh_opt = build_tied(5, fsdp=True)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=policy(work),
                                dist_timeout_s=60) as ck:
        assert ck.restore_sync() == 2
    assert fresh.lm_head.weight is fresh.wte.weight, "the restore keeps the weights tied"
    got = full_state(fresh, fresh_opt)
    assert_same(expected, got, "restored")
    assert_same(got["model"]["wte.weight"], got["model"]["lm_head.weight"])
    print(f"TIED {rank}", flush=True)


# ------------------------------------------------------------- other placements (DTensor)
#: parameter -> placements per layout: "tp" (1-D mesh: a column split, a row split, a replica),
#: "rows" (1-D: everything split by rows), "hsdp" (2-D mesh 2 x (world / 2): replicated over
#: the first dimension, split over the second; every replica group holds the whole state)
LAYOUTS: dict[str, dict[str, str]] = {
    "tp": {"a": "shard1", "b": "replicate", "c": "shard0"},
    "rows": {"a": "shard0", "b": "shard0", "c": "shard0"},
    "hsdp": {"a": "hsdp", "b": "hsdp", "c": "hsdp"},
}
SHAPES = {"a": (5, 7), "b": (3, 4), "c": (9,)}


class Placed(torch.nn.Module):
    """Three parameters placed by hand as DTensors (``layout`` in LAYOUTS)."""

    def __init__(self, layout: str, seed: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        super().__init__()
        world = dist.get_world_size()
        mesh = init_device_mesh("cpu", (2, world // 2)) if layout == "hsdp" \
            else init_device_mesh("cpu", (world,))
        kinds = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()],
                 "hsdp": [Replicate(), Shard(0)]}
        gen = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            full = torch.randn(shape, generator=gen)
            setattr(self, name, torch.nn.Parameter(
                distribute_tensor(full, mesh, kinds[LAYOUTS[layout][name]])))


def placed_step(model: Placed, opt: torch.optim.Optimizer, step: int) -> None:
    """An AdamW step with the same full gradient on every rank."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), p.device_mesh,
                                   p.placements)
    opt.step()
    opt.zero_grad()


def _scenario_placed_save(rank: int, work: Path) -> None:
    model = Placed(_args()["layout"], seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with asymcheck.Checkpointer(model, opt, policy=policy(work), dist_timeout_s=60) as ck:
        for step in (1, 2):
            placed_step(model, opt, step)
            ck.save_sync(step)
        expected = full_state(model, opt)
        ck.wait_idle_sync()
    if rank == 0:
        torch.save({"step": 2, "state": expected}, work / "expected.pt")
    print(f"SAVED {rank}", flush=True)


def _scenario_placed_restore(rank: int, work: Path) -> None:
    expected = torch.load(work / "expected.pt", weights_only=True)
    model = Placed(_args()["layout"], seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with asymcheck.Checkpointer(model, opt, policy=policy(work), dist_timeout_s=60) as ck:
        assert ck.restore_sync() == expected["step"]
    assert_same(expected["state"], full_state(model, opt), "restored")
    print(f"RESTORED {rank}", flush=True)


SCENARIOS: dict[str, Callable[[int, Path], None]] = {
    "placed-save": _scenario_placed_save, "placed-restore": _scenario_placed_restore,
    "train": _scenario_train, "save": _scenario_save, "restore": _scenario_restore,
    "restore-fails": _scenario_restore_fails, "crash": _scenario_crash,
    "crash-restore": _scenario_crash_restore, "tied": _scenario_tied,
}


def run_rank(scenario: str, rank: int, world: int, work: str, init: str, env: dict[str, str],
             log: str) -> None:
    """A rank started by the test (a process forked from a server that has imported this
    module once): its output goes to ``log``, ``env`` is added to its environment."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    child(scenario, str(rank), str(world), work, init)


def child(scenario: str, rank: str, world: str, work: str, init: str) -> None:
    run(SCENARIOS, scenario, rank, world, work, init)
