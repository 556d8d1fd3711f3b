"""The PyTorch Lightning integration: bit-exact resume after SIGKILL, loop state, gradient
accumulation, the asymmetric snapshot, a fresh start, and the import without lightning."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl

import asymcheck
from tests._lightning_job import TinyModule, loader, make_trainer
from tests._util import assert_same, load_from, opt_state

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "_lightning_job.py"


def _run(*args: str, expect_kill: bool = False) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    expected = -signal.SIGKILL if expect_kill else 0
    assert out.returncode == expected, out.stdout + out.stderr
    return out


def _losses(path: Path) -> dict[str, str]:
    losses: dict[str, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        losses[rec["key"]] = rec["loss"]  # a re-run batch overwrites the lost one
    return losses


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses_and_loop_state(tmp_path: Path) -> None:
    """Gradient accumulation 2, 10 batches per epoch: saves at steps 3, 6, 9, 12 (mid-epoch
    and across epochs); killed after step 8, the same command resumes and finishes."""
    common = [str(JOB), "--steps", "14", "--every", "3", "--accumulate", "2"]
    _run(*common, "--dir", str(tmp_path / "ref"), "--log", str(tmp_path / "ref.jsonl"),
         "--state", str(tmp_path / "ref.state"))
    run = [*common, "--dir", str(tmp_path / "run"), "--log", str(tmp_path / "run.jsonl"),
           "--state", str(tmp_path / "run.state")]
    _run(*run, "--crash-at", "8", expect_kill=True)
    out = _run(*run)

    ref, resumed = _losses(tmp_path / "ref.jsonl"), _losses(tmp_path / "run.jsonl")
    assert len(ref) == 28  # 14 optimizer steps of 2 micro-batches
    assert resumed == ref  # bit for bit (float.hex)

    saved = {r["saved"]: r for r in _records(tmp_path / "ref.state") if "saved" in r}
    assert sorted(saved) == [3, 6, 9, 12]
    restored = [r for r in _records(tmp_path / "run.state") if "restored" in r]
    assert len(restored) == 1
    r = restored[0]
    assert r["restored"] in (3, 6)  # the newest committed checkpoint before the kill
    assert f"AsymCheck: restored step {r['restored']}" in out.stderr
    want = saved[r["restored"]]
    assert (r["global_step"], r["epoch"], r["batch_idx"]) == (
        want["global_step"], want["epoch"], want["batch_idx"])


class _Copies(pl.Callback):
    """A deep copy of the model and optimizer state at every save (after AsymCheck's)."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.copies: dict[int, Any] = {}
        self.handles: dict[int, asymcheck.SaveHandle] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        h = self.ckpt.last_handle
        if h is not None and h.step not in self.handles:
            self.handles[h.step] = h
            self.copies[h.step] = copy.deepcopy({
                "model": pl_module.state_dict(),
                "optimizers": [opt_state(pl_module, trainer.optimizers[0])],
                "lr_scheduler.0": trainer.lr_scheduler_configs[0].scheduler.state_dict()})


def test_asym_snapshot_after_warmup_and_committed_checkpoint_equals_the_state(
        tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    policy = asymcheck.default_policy(tmp_path / "ckpt")
    trainer, ckpt, _ = make_trainer(tmp_path, steps=12, every=2, policy=policy,
                                    warmup_iterations=3)
    copies = _Copies(ckpt)
    trainer.callbacks.append(copies)  # type: ignore[attr-defined]
    trainer.fit(TinyModule(), loader())
    assert ckpt.checkpointer is None  # closed at teardown: every save flushed

    assert sorted(copies.handles) == [2, 4, 6, 8, 10, 12]
    modes = {s: h.metrics["mode"] for s, h in copies.handles.items()}
    assert modes[2] == "naive"  # warm-up: the profile is not ready yet
    asym = [s for s, m in modes.items() if m == "asym"]
    assert asym and asym == [s for s in sorted(modes) if s >= asym[0]]  # asym once profiled
    for s in asym:
        m = copies.handles[s].metrics
        assert "plan" in m and "gate_stall_s" in m  # gated at on_before_optimizer_step
        copies.handles[s].durable("local").wait(timeout=30)

    url = policy.tier("local").url
    for step in asym[-2:]:
        loaded = load_from(url, step)
        assert loaded is not None and loaded.step == step
        state = loaded.state
        want = copies.copies[step]
        assert_same(state["model"], want["model"], "model")
        assert_same(state["optimizers"], want["optimizers"], "optimizers")
        assert_same(state["extras"]["lr_scheduler.0"], want["lr_scheduler.0"], "scheduler")
        loop = state["extras"]["lightning"]
        assert loop["global_step"] == step and "fit_loop" in loop


def test_empty_policy_starts_fresh_and_logs_one_line(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    pl.seed_everything(0, verbose=False)
    caplog.set_level(logging.INFO, logger="asymcheck.integrations.lightning")
    trainer, ckpt, _ = make_trainer(tmp_path, steps=2, every=5,
                                    policy=asymcheck.default_policy(tmp_path / "empty"))
    trainer.fit(TinyModule(), loader())
    lines = [r.getMessage() for r in caplog.records
             if r.name == "asymcheck.integrations.lightning"]
    assert len(lines) == 1 and "no committed checkpoint" in lines[0]
    assert "starting fresh" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert ckpt.restored_step is None and trainer.global_step == 2


def test_import_without_lightning_names_the_extra() -> None:
    code = textwrap.dedent("""
        import importlib.abc, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "lightning" or name.startswith("lightning."):
                    raise ImportError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Hide())
        import asymcheck.integrations  # the package itself imports no framework
        try:
            import asymcheck.integrations.lightning
        except ImportError as e:
            print(str(e))
        else:
            print("imported")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    assert "pip install 'asymcheck[lightning]'" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["lightning_vit.py", "lightning_resnet.py"])
def test_example_killed_and_resumed_matches(example: str) -> None:
    out = _run(str(REPO / "examples" / example), "--demo", "--steps", "8", "--every", "3",
               "--crash-at", "5")
    assert "simulating a crash: SIGKILL" in out.stdout
    assert "restored step 3" in out.stdout + out.stderr
    assert "8 steps compared: losses of the resumed run EQUAL" in out.stdout
