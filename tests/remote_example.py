"""End-to-end pieces the remote tiers' tests (HDFS, S3) share: the GPT-2 example restored from
the remote tier alone, and a server failing in the middle of a flush.

The example trains with host + local + the remote tier (every second save); then the host copy
and the local disk are lost, and a new Checkpointer must restore from the remote tier alone,
bit for bit equal to the same training replayed here without checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import asymcheck
from asymcheck.layout import manifest_key, step_dir
from asymcheck.policy import TierPolicy
from tests._util import assert_same, make_training, snapshot, train_steps
from tiers.base import Payload, Tier

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_gpt2.py"
EXAMPLE_ARGS = {"steps": 6, "every": 1, "layers": 2, "width": 128, "vocab": 2048,
                "seq_len": 64, "batch": 8, "seed": 1234}


def toml_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asymcheck_example_train_gpt2", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replay(example: ModuleType, last: int) -> tuple[dict[str, Any], torch.Tensor,
                                                     dict[int, str]]:
    """The example's training loop, in this process and without checkpoints, up to step
    ``last``: a deep copy of the state after that step, the torch RNG state, and the losses."""
    args = argparse.Namespace(**EXAMPLE_ARGS)
    model, optimizer, scheduler = example.build(args)
    losses = {}
    for step in range(last + 1):
        batch = example.batch_for(step, args)
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses[step] = loss.item().hex()
    return snapshot(model, optimizer, scheduler), torch.get_rng_state(), losses


def restores_from_remote_alone(tmp_path: Path, shm_root: Path, remote: str, url: str,
                               committed: Callable[[], list[int]]
                               ) -> subprocess.CompletedProcess[str]:
    """Run the example with the tier ``remote`` at ``url`` (``committed()`` lists its committed
    steps), then restore from it alone; returns the example's run for further checks."""
    host_name = f"e2e-{uuid.uuid4().hex[:12]}"
    local = tmp_path / "local"
    policy_file = tmp_path / "tiers.toml"
    policy_file.write_text(f"""\
[[tier]]
name = "host"
url = "shm://{host_name}"
capacity = "256MiB"
keep = 2

[[tier]]
name = "local"
url = "{local.as_uri()}"
keep = 3

[[tier]]
name = "{remote}"
url = "{toml_string(url)}"
keep = 3
every = 2
options = {{ timeout_s = 30 }}
""")
    log = tmp_path / "losses.jsonl"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in EXAMPLE_ARGS.items()]
    out = subprocess.run([sys.executable, str(EXAMPLE), *argv, "--policy", str(policy_file),
                          "--log", str(log)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr

    # Steps 0..5 were saved; every second save went to the remote tier: steps 0, 2 and 4.
    assert committed() == [0, 2, 4]
    assert (local / step_dir(5) / "manifest.msgpack").is_file()
    host_dir = shm_root / host_name
    assert (host_dir / step_dir(5) / "manifest.msgpack").is_file()

    # The reference: the same training replayed here, checked against the example's losses.
    example = load_example()
    expected, rng, losses = replay(example, 4)
    logged = example.read_losses(log)
    assert {s: logged[s] for s in losses} == losses, "the replay diverged from the example"

    # Lose the host copy and the local disk: only the remote tier is left.
    shutil.rmtree(host_dir)
    shutil.rmtree(local)
    model, optimizer, scheduler = example.build(argparse.Namespace(**EXAMPLE_ARGS))
    torch.manual_seed(99)  # the restore must bring the RNG back, not the seed of build()
    with asymcheck.Checkpointer(model, optimizer, policy=policy_file,
                                extras={"scheduler": scheduler}) as ckpt:
        loaded = ckpt.load_sync()
        assert loaded is not None and loaded.step == 4
        assert loaded.sources == {remote: len(loaded.manifest.tensors)}
        assert ckpt.restore_sync() == 4
    assert_same(expected, snapshot(model, optimizer, scheduler))
    assert torch.equal(torch.get_rng_state(), rng)
    return out


# ----------------------------------------------- a remote tier's server failing mid-flush


class FaultDuringFlush:
    """Wraps ``tier_class.put``: reports when the data of ``step`` starts to flow, and holds the
    commit (its manifest) until the fault was injected, so the fault always lands mid-flush.
    ``service(command, timeout=...)`` runs the server's script (kill, freeze, ...)."""

    def __init__(self, tier_class: type[Tier], step: int,
                 service: Callable[..., subprocess.CompletedProcess[str]]) -> None:
        self.step = step
        self.data_started = threading.Event()
        self.injected = threading.Event()
        self.data_puts = {"ok": 0, "failed": 0}
        self.manifest_put = "not tried"
        self._class = tier_class
        self._put = tier_class.put
        self._service = service

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        async def put(tier: Tier, key: str, data: Payload) -> None:
            await self.put(tier, key, data)
        monkeypatch.setattr(self._class, "put", put)

    async def put(self, tier: Tier, key: str, data: Payload) -> None:
        if not key.startswith(step_dir(self.step) + "/"):
            return await self._put(tier, key, data)
        if key == manifest_key(self.step):
            await asyncio.to_thread(self.injected.wait, 60)
            try:
                await self._put(tier, key, data)
            except BaseException:
                self.manifest_put = "failed"
                raise
            self.manifest_put = "ok"
            return
        self.data_started.set()
        try:
            await self._put(tier, key, data)
        except BaseException:
            self.data_puts["failed"] += 1
            raise
        self.data_puts["ok"] += 1

    def inject(self, command: str) -> float:
        """Wait for the flush, run the service script's ``command``; when it was started."""
        try:
            assert self.data_started.wait(60), f"the flush of step {self.step} never started"
            t0 = time.monotonic()
            out = self._service(command, timeout=30)
            assert out.returncode == 0, out.stderr
        finally:
            self.injected.set()  # never leave the commit waiting
        return t0


def fault_policy_file(tmp_path: Path, remote: str, url: str, options: str) -> Path:
    """Host + local + the remote tier ``remote`` at ``url`` with ``options`` (TOML inline)."""
    path = tmp_path / "tiers.toml"
    path.write_text(f"""\
[[tier]]
name = "host"
url = "shm://fault-{uuid.uuid4().hex[:12]}"
capacity = "1GiB"
keep = 2

[[tier]]
name = "local"
url = "{(tmp_path / 'local').as_uri()}"
keep = 5

[[tier]]
name = "{remote}"
url = "{toml_string(url)}"
keep = 5
batch = "8MiB"
options = {{ {options} }}
""")
    return path


def commit_again_then_close(ckpt: asymcheck.Checkpointer, model: torch.nn.Module,
                            opt: torch.optim.Optimizer, sched: Any, *, remote: str, step: int,
                            failures: int) -> dict[str, Any]:
    """After a fault: the same Checkpointer commits ``step`` on the remote and the local tier,
    and closing it reports the earlier failures once. Returns the state saved at ``step``."""
    train_steps(model, opt, sched, 1)
    expected = snapshot(model, opt, sched)
    handle = ckpt.save_sync(step)
    handle.durable(remote).wait(60)
    handle.durable("local").wait(60)
    with pytest.raises(asymcheck.CheckpointError, match=f"{failures} checkpoint operation"):
        ckpt.close_sync()
    return expected


def restore_from_alone(remote: str, url: str, step: int, expected: dict[str, Any], seed: int,
                       timeout_s: float) -> None:
    """A new job whose only durable tier is ``remote`` restores ``step``, every tensor from
    it, bit-exactly."""
    policy = asymcheck.Policy(tiers=(
        TierPolicy(name="host", url=f"shm://{remote}-alone-{uuid.uuid4().hex[:12]}"),
        TierPolicy(name=remote, url=url, options={"timeout_s": timeout_s})))
    model, opt, sched = make_training(seed=seed, width=1536)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched}) as ckpt:
        loaded = ckpt.load_sync()
        assert loaded is not None and loaded.step == step
        assert loaded.sources == {remote: len(loaded.manifest.tensors)}
        assert ckpt.restore_sync() == step
    assert_same(expected, snapshot(model, opt, sched))
