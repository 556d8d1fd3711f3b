"""The GPT-2 example end to end with a remote tier (HDFS, S3), shared by their test files.

The example trains with host + local + the remote tier (every second save); then the host copy
and the local disk are lost, and a new Checkpointer must restore from the remote tier alone,
bit for bit equal to the same training replayed here without checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import asymcheck
from asymcheck.layout import step_dir
from tests._util import assert_same, snapshot

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
