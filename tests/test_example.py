"""The examples: the GPT-2 run killed with SIGKILL and resumed gives the same losses; the FSDP2
run resumes at another world size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_run() -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "train_gpt2.py"), "--demo",
                          "--steps", "10", "--every", "3", "--crash-at", "7"],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "simulating a crash: SIGKILL" in out.stdout
    assert "restored step 6" in out.stdout  # the newest committed checkpoint before the kill
    assert "10 steps compared: losses of the resumed run EQUAL" in out.stdout


def _torchrun(tmp: Path, nproc: int, script: str, *args: str) -> str:
    """Run an example under torchrun (``--standalone``: a free port of its own; its log
    directories in ``tmp``); its stdout."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={nproc}", str(REPO / "examples" / script), *args],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                              "TMPDIR": str(tmp)})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_fsdp2_example_resumes_at_another_world_size(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "checkpoints")
    first = _torchrun(tmp_path, 2, "fsdp2_gpt2.py", "--dir", ckpt, "--steps", "10", "--every", "5")
    assert "FSDP2 over 2 rank(s) starts from step 1" in first
    saved = re.search(r"step +10 .*saved .*digest ([0-9a-f]+)\)", first)
    assert saved, first
    second = _torchrun(tmp_path, 3, "fsdp2_gpt2.py", "--dir", ckpt, "--steps", "15", "--every", "5")
    assert ("restored step 10 saved by FSDP2 over 2 rank(s) into FSDP2 over 3 rank(s)"
            in second), second
    assert f"state digest {saved.group(1)} matches the saved one" in second, second
    assert re.search(r"step +15 .*saved", second), second
    assert "done: step 15, FSDP2 over 3 rank(s)" in second, second
