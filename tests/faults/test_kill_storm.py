"""kill -9 storm: a training process saving every step is SIGKILLed at random moments.

Guards the commit protocol as a whole: data before manifest on every tier (host block commit
before its manifest; flush data before the flushed manifest), retention that uncommits (deletes
the manifest) before it deletes data, removal of uncommitted leftovers when tiers are opened,
in asym mode a commit only once the deferred snapshot copy is complete, and with delta
compression a base that outlives every committed delta on it.

Each trial forks a trainer (``_storm_child``) that resumes from the newest committed
checkpoint and saves every step, writing an independent fsynced reference first. The trainer
dies at a random delay, or at the Nth call of a function on the save path (host block commit,
host manifest put, local put, fsync, rename, retention deletes), before or after the call.
After every kill a fresh Checkpointer must restore exactly the newest step that has a manifest
on some tier (found by listing the directories, not through the library), byte-equal to its
reference; every other committed copy on each tier must load, alone, byte-equal as well; and
no tmp file or manifest-less step directory may remain once the tiers were opened again.

Trials are drawn from a seeded RNG: ``ASYMCHECK_FAULT_SEED`` reproduces a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import asymcheck
from tests._util import load_from
from tests.faults._helpers import (
    REPO,
    committed_steps,
    compare,
    file_dir,
    host_dir,
    load_ref,
    loaded_as_snapshot,
    read_manifest_file,
    restore_fresh,
    tmp_files,
    uncommitted_dirs,
)
from tests.faults._stats import FaultStats
from tests.faults._storm_child import storm_policy

SEED = int(os.environ.get("ASYMCHECK_FAULT_SEED", "20260"))
WIDTH = 32

#: (hook, before/after, largest N): each phase of a save, see ``_storm_child.HOOKS``.
NAIVE_HOOKS = [
    ("HostBlock.commit", "before", 4),   # staging: the block never becomes visible
    ("HostTier.put", "before", 4),       # host data committed, its manifest not written
    ("HostTier.put", "after", 4),        # host manifest committed, nothing flushed yet
    ("LocalTier.put", "before", 8),      # flush: before the data or the manifest put
    ("LocalTier.put", "after", 8),       # flush: data committed, manifest not yet
    ("os.fsync", "before", 12),          # inside a local write, before its rename
    ("os.rename", "before", 12),         # any commit: host block, local data or manifest
    ("os.rename", "after", 12),          # right after a commit, before the next step
    ("delete_checkpoint", "before", 4),  # retention starts
    ("LocalTier.delete", "after", 4),    # retention: manifest deleted, data not yet
    ("HostTier.delete", "after", 4),     # retention on the host tier, half done
]
ASYM_HOOKS = [
    ("HostBlock.commit", "before", 3),
    ("HostTier.put", "after", 3),
    ("LocalTier.put", "after", 6),
    ("os.rename", "before", 8),
    ("delete_checkpoint", "before", 3),
]


class Storm:
    """The forking training process and the JSON lines it reports."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults._storm_child"], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", timeout_s=120)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def next(self, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"the trainer said nothing for {timeout_s} s; "
                                 f"log:\n{self.log_tail()}") from None
        if msg is None:
            raise AssertionError(f"the training process ended; log:\n{self.log_tail()}")
        return msg

    def expect(self, key: str, timeout_s: float) -> dict[str, Any]:
        msg = self.next(timeout_s)
        assert key in msg, f"expected {key!r}, got {msg}; log:\n{self.log_tail()}"
        return msg

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def run(self, cfg: dict[str, Any], delay_s: float | None) -> dict[str, Any]:
        """One trial; returns what happened (killed or not, steps saved, save modes).

        The trainer and the forking process share stdout, so "pid" and the trainer's own
        lines may arrive in either order."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        outcome: dict[str, Any] = {"saved": [], "modes": [], "started": None}
        pid = None
        while True:
            msg = self.next(timeout_s=120)
            if "pid" in msg:
                pid = msg["pid"]
            elif "started" in msg:
                outcome["started"] = msg["started"]
            elif "saved" in msg:
                outcome["saved"].append(msg["saved"])
                outcome["modes"].append(msg["mode"])
            elif "exit" in msg:
                exited = msg
                self.proc.stdin.write("reap\n")  # a zombie until now: the pid is not reused
                self.proc.stdin.flush()
                self.expect("reaped", timeout_s=30)
                break
            if delay_s is not None and pid is not None and outcome["started"] is not None:
                time.sleep(delay_s)
                with contextlib.suppress(ProcessLookupError):  # it may have died already
                    os.kill(pid, signal.SIGKILL)
                delay_s = None
        assert exited["signal"] == signal.SIGKILL or exited["code"] == 0, \
            f"trainer failed ({exited}); log:\n{self.log_tail()}"
        outcome["killed"] = exited["signal"] == signal.SIGKILL
        return outcome

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def check_recovery(policy: asymcheck.Policy, shm_root: Path, refs: Path,
                   stats: FaultStats) -> int | None:
    """Everything committed survived the kill, byte for byte; returns the restored step."""
    roots = {"host": host_dir(shm_root, policy), "local": file_dir(policy)}
    committed = {name: committed_steps(root) for name, root in roots.items()}
    print(f"manifests after the kill: {committed}")  # shown with a failure
    newest = max((s for steps in committed.values() for s in steps), default=None)
    restored, state = restore_fresh(policy, width=WIDTH)
    assert restored == newest, f"restored {restored}, newest committed is {newest} " \
                               f"(manifests per tier: {committed})"
    if newest is not None:
        compare(load_ref(refs / f"ref-{newest}.pt"), state, stats)
    for name, root in roots.items():
        url = policy.tier(name).url
        for step in committed[name]:  # every committed copy is whole on its own
            loaded = load_from(url, step, name=name)
            assert loaded is not None and loaded.step == step
            compare(load_ref(refs / f"ref-{step}.pt"), loaded_as_snapshot(loaded), stats,
                    f"{name}:step {step}")
        assert not tmp_files(root), f"tmp files left on {name}: {tmp_files(root)}"
        assert not uncommitted_dirs(root), \
            f"uncommitted step directories left on {name}: {uncommitted_dirs(root)}"
    return restored


def plan_trials(rng: random.Random, mode: str, hooks: list[tuple[str, str, int]],
                rounds: int, delays: int, max_delay_s: float) -> list[dict[str, Any]]:
    trials: list[dict[str, Any]] = []
    for _ in range(rounds):
        for hook, when, most in hooks:
            trials.append({"mode": mode, "hook": hook, "when": when,
                           "nth": rng.randint(1, most), "saves": 14})
    for _ in range(delays):
        trials.append({"mode": mode, "delay_s": round(rng.uniform(0.0, max_delay_s), 4),
                       "saves": 400})
    rng.shuffle(trials)
    return trials


def run_storm(trials: list[dict[str, Any]], tmp_path: Path, shm_root: Path,
              stats: FaultStats, compression: dict[str, Any] | None = None,
              host_keep: int | None = None) -> list[dict[str, Any]]:
    directory = tmp_path / "checkpoints"
    refs = tmp_path / "refs"
    refs.mkdir()
    kept = {} if host_keep is None else {"host_keep": host_keep}
    policy = storm_policy(directory, {"compression": compression, **kept})
    storm = Storm(tmp_path / "trainer.log")
    outcomes = []
    try:
        for i, trial in enumerate(trials):
            cfg = {**trial, "dir": str(directory), "refs": str(refs), "seed": SEED + i,
                   "width": WIDTH, "compression": compression, **kept}
            outcome = storm.run(cfg, trial.get("delay_s"))
            outcome["trial"] = trial
            outcomes.append(outcome)
            where = f"trial {i} {trial} (ASYMCHECK_FAULT_SEED={SEED})"
            try:
                check_recovery(policy, shm_root, refs, stats)
            except Exception as e:
                raise AssertionError(f"{where}: {type(e).__name__}: {e}\n"
                                     f"trainer log:\n{storm.log_tail()}") from e
            if outcome["killed"]:
                stats.kills += 1
    finally:
        storm.close()
    return outcomes


def assert_every_hook_fired(outcomes: list[dict[str, Any]],
                            hooks: list[tuple[str, str, int]]) -> None:
    fired = {(o["trial"]["hook"], o["trial"]["when"]) for o in outcomes
             if o["killed"] and "hook" in o["trial"]}
    missing = [(h, w) for h, w, _ in hooks if (h, w) not in fired]
    assert not missing, f"these kill points never fired, the save path no longer reaches " \
                        f"them: {missing}"


@pytest.mark.slow
def test_kill_storm_naive_mode_loses_nothing_committed(tmp_path: Path, shm_root: Path,
                                                       fault_stats: FaultStats) -> None:
    rng = random.Random(SEED)
    trials = plan_trials(rng, "naive", NAIVE_HOOKS, rounds=3, delays=16, max_delay_s=0.3)
    outcomes = run_storm(trials, tmp_path, shm_root, fault_stats)
    kills = sum(o["killed"] for o in outcomes)
    assert kills >= 30, f"only {kills} of {len(outcomes)} trials were killed"
    assert_every_hook_fired(outcomes, NAIVE_HOOKS)
    assert sum(len(o["saved"]) for o in outcomes) > len(outcomes), "the trainers barely saved"


@pytest.mark.slow
def test_kill_storm_asym_mode_loses_nothing_committed(tmp_path: Path, shm_root: Path,
                                                      fault_stats: FaultStats) -> None:
    rng = random.Random(SEED + 1)
    trials = plan_trials(rng, "asym", ASYM_HOOKS, rounds=2, delays=8, max_delay_s=0.3)
    outcomes = run_storm(trials, tmp_path, shm_root, fault_stats)
    assert sum(o["killed"] for o in outcomes) >= len(outcomes) - 2
    assert_every_hook_fired(outcomes, ASYM_HOOKS)
    modes = [m for o in outcomes for m in o["modes"]]
    assert modes.count("asym") >= 10, f"the asymmetric snapshot was barely used: {modes}"


#: Host keep = 0: a save deletes the newest host copy (the disk holds it) and stages into its
#: block; a kill while it is staged leaves that step on disk only.
REUSE_HOOKS = [
    ("HostTier.delete", "before", 6),    # the next save gives up the newest host copy
    ("HostTier.delete", "after", 6),     # ... its manifest gone, its block pooled
    ("HostBlock.commit", "before", 4),   # staged in the reused block, not yet visible
    ("HostTier.put", "after", 4),
]


@pytest.mark.slow
def test_kill_storm_with_host_keep_0_loses_nothing_committed(
        tmp_path: Path, shm_root: Path, fault_stats: FaultStats) -> None:
    rng = random.Random(SEED + 3)
    trials = plan_trials(rng, "naive", REUSE_HOOKS, rounds=2, delays=6, max_delay_s=0.3)
    for trial in trials:  # each flush done before the next save, which reuses its block
        trial["settle"] = True
    outcomes = run_storm(trials, tmp_path, shm_root, fault_stats, host_keep=0)
    assert sum(o["killed"] for o in outcomes) >= len(outcomes) - 2
    assert_every_hook_fired(outcomes, REUSE_HOOKS)


#: Every tensor delta-coded against the last full checkpoint, a full one every third save.
DELTAS = {"mode": "always", "full_every": 3, "min_bytes": 1}
DELTA_HOOKS = [
    ("LocalTier.put", "after", 8),       # a delta's data written, its manifest not yet
    ("LocalTier.delete", "after", 4),    # retention half done: bases must outlive deltas
    ("delete_checkpoint", "before", 4),
    ("os.rename", "after", 12),
]


@pytest.mark.slow
def test_kill_storm_with_delta_compression_loses_nothing_committed(
        tmp_path: Path, shm_root: Path, fault_stats: FaultStats) -> None:
    """Also guards: a delta's base is never deleted while a committed delta needs it."""
    rng = random.Random(SEED + 2)
    trials = plan_trials(rng, "naive", DELTA_HOOKS, rounds=2, delays=6, max_delay_s=0.3)
    outcomes = run_storm(trials, tmp_path, shm_root, fault_stats, compression=DELTAS)
    assert sum(o["killed"] for o in outcomes) >= len(outcomes) - 2
    assert_every_hook_fired(outcomes, DELTA_HOOKS)
    local = file_dir(storm_policy(tmp_path / "checkpoints", {"compression": DELTAS}))
    codecs = {c.codec for step in committed_steps(local)
              for t in read_manifest_file(local, step).tensors for c in t.chunks}
    assert codecs - {"raw"}, f"nothing was compressed on the local tier: {codecs}"
