"""The kill-and-resume demonstration the framework examples share: an uninterrupted run, then
a run killed with SIGKILL mid-way and started again with the same command; the per-step losses
of the two must match bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import asymcheck


def read_losses(path: Path) -> dict[int, str]:
    """Per-step losses of a JSON-lines log (a step run again after a resume overwrites)."""
    losses: dict[int, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]
    return losses


def demo(command: Sequence[str], *, steps: int, crash_at: int, log_flag: str,
         env: dict[str, str] | None = None,
         inspect: Callable[[Path], None] | None = None) -> int:
    """Run ``command`` (with ``--dir``, ``log_flag`` and ``--crash-at`` added) uninterrupted,
    then killed after step ``crash_at`` (-1: half way) and again; 0 when the losses match.
    ``inspect`` looks at the resumed run's checkpoint directory before the comparison."""
    work = Path(tempfile.mkdtemp(prefix="asymcheck-demo-"))
    crash_at = crash_at if crash_at >= 0 else steps // 2 + 1
    try:
        print(f"== uninterrupted run of {steps} steps", flush=True)
        subprocess.run([*command, "--dir", str(work / "ref"), log_flag, str(work / "ref.jsonl")],
                       check=True, env=env)
        print(f"== run killed with SIGKILL after step {crash_at}", flush=True)
        run = [*command, "--dir", str(work / "run"), log_flag, str(work / "run.jsonl")]
        if subprocess.run([*run, "--crash-at", str(crash_at)], env=env).returncode == 0:
            print("expected the run to be killed, it exited normally")
            return 1
        print("== the same command again: resumes", flush=True)
        subprocess.run(run, check=True, env=env)
        if inspect is not None:
            inspect(work / "run")
        ref, resumed = read_losses(work / "ref.jsonl"), read_losses(work / "run.jsonl")
        same = ref == resumed and len(ref) == steps
        print(f"== {len(ref)} steps compared: losses of the resumed run "
              f"{'EQUAL' if same else 'DIFFER FROM'} the uninterrupted run's (bit for bit)")
        return 0 if same else 1
    finally:
        root = Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm"))
        for d in ("ref", "run"):
            name = asymcheck.default_policy(work / d).staging.url.removeprefix("shm://")
            for shm in root.glob(f"{name}*"):  # with several ranks, NAME-rank<r> too
                shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
