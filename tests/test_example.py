"""The GPT-2 example: a run killed with SIGKILL and resumed gives the same losses."""

from __future__ import annotations

import os
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
