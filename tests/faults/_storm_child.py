"""The training process of the kill storm, run as ``python -m tests.faults._storm_child``.

Importing torch costs seconds, so this process imports once and forks one trainer per trial
(a fresh process with its own pid, threads and Checkpointer). It reads one JSON trial per
line on stdin; the trainer and this process report JSON lines on stdout:
``{"pid": P}``, ``{"started": STEP}`` (restored, training from STEP), ``{"saved": STEP,
"mode": M}``, ``{"done": true}`` (not killed), ``{"exit": P, "signal": S, "code": C}``, and,
once the parent sent a line back, ``{"reaped": P}``.

A trainer resumes from the newest committed checkpoint, then trains and saves every step.
Before each save it writes ``ref-<step>.pt``: torch.save of a deep copy of the model,
optimizer and scheduler state, fsynced, so the parent can compare restores byte for byte.
A trial may arm a hook that SIGKILLs the trainer on the Nth call of a function of the save
path (before or after the call runs), or the parent kills it after a random delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import asymcheck
import asymcheck.commit
import asymcheck.hoststage
import asymcheck.retention
import asymcheck.topology
import tiers.host
import tiers.local
from tests._util import make_training, snapshot, train_steps, with_host_keep

_real_fsync = os.fsync
_real_rename = os.rename


def emit(**msg: Any) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def save_ref(path: Path, state: Any) -> None:
    """The reference of a step: written, fsynced and renamed with the unhooked functions."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        _real_fsync(f.fileno())
    _real_rename(tmp, path)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


#: hook name -> (owner, attribute) pairs patched together (a function imported by name into
#: another module is patched there too, so every caller goes through the hook).
HOOKS: dict[str, list[tuple[Any, str]]] = {
    "os.fsync": [(os, "fsync")],
    "os.rename": [(os, "rename")],
    "HostBlock.commit": [(tiers.host.HostBlock, "commit")],
    "HostTier.put": [(tiers.host.HostTier, "put")],
    "HostTier.delete": [(tiers.host.HostTier, "delete")],
    "LocalTier.put": [(tiers.local.LocalTier, "put")],
    "LocalTier.delete": [(tiers.local.LocalTier, "delete")],
    "delete_checkpoint": [(module, "delete_step") for module in (
        asymcheck.retention, asymcheck.topology, asymcheck.hoststage, asymcheck.commit)],
}


def arm(hook: str, nth: int, when: str) -> None:
    """SIGKILL this process on the ``nth`` call of ``hook``, ``before`` or ``after`` it runs."""
    lock = threading.Lock()
    calls = [0]

    def count() -> bool:
        with lock:
            calls[0] += 1
            return calls[0] == nth

    for owner, attr in HOOKS[hook]:
        real = getattr(owner, attr)
        setattr(owner, attr, _wrap(real, count, when))


def _wrap(real: Callable[..., Any], count: Callable[[], bool], when: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(real):
        @functools.wraps(real)
        async def async_hook(*args: Any, **kwargs: Any) -> Any:
            fire = count()
            if fire and when == "before":
                die()
            result = await real(*args, **kwargs)
            if fire:
                die()
            return result
        return async_hook

    @functools.wraps(real)
    def hook(*args: Any, **kwargs: Any) -> Any:
        fire = count()
        if fire and when == "before":
            die()
        result = real(*args, **kwargs)
        if fire:
            die()
        return result
    return hook


def storm_policy(directory: Path, cfg: dict[str, Any]) -> asymcheck.Policy:
    """The default policy under ``directory``, with the trial's compression settings and
    host tier ``keep``."""
    policy = asymcheck.default_policy(directory)
    if "host_keep" in cfg:
        policy = with_host_keep(policy, cfg["host_keep"])
    if cfg.get("compression"):
        policy = dataclasses.replace(
            policy, compression=asymcheck.CompressionPolicy(**cfg["compression"]))
    return policy


def trial(cfg: dict[str, Any]) -> None:
    directory = Path(cfg["dir"])
    refs = Path(cfg["refs"])
    model, opt, sched = make_training(seed=cfg["seed"], width=cfg["width"])
    options: dict[str, Any] = {"mode": "naive"}
    if cfg["mode"] == "asym":  # the default mode, with a short warm-up and small partitions
        options = {"warmup_iterations": 3, "min_partition_bytes": 1024}
    ckpt = asymcheck.Checkpointer(model, opt, policy=storm_policy(directory, cfg),
                                  extras={"sched": sched}, **options)
    restored = ckpt.restore_sync()
    step = 0 if restored is None else restored + 1
    if cfg["mode"] == "asym":
        train_steps(model, opt, sched, 4)  # warm-up: the profiler learns the windows
    if cfg.get("hook"):
        arm(cfg["hook"], cfg["nth"], cfg["when"])
    emit(started=step)
    for _ in range(cfg["saves"]):
        train_steps(model, opt, sched, 1)
        save_ref(refs / f"ref-{step}.pt", snapshot(model, opt, sched))
        handle = ckpt.save_sync(step)
        emit(saved=step, mode=handle.metrics.get("mode"))
        if cfg.get("settle"):  # every flush and its retention done before the next save
            ckpt.wait_idle_sync()
        step += 1
    ckpt.close_sync()
    emit(done=True)


def warm_up() -> None:
    """Pay once for what torch imports lazily on first use (optimizers pull in dynamo)."""
    model, opt, sched = make_training(seed=0, width=8)
    train_steps(model, opt, sched, 2)
    torch.save(snapshot(model, opt, sched), io.BytesIO())


def main() -> None:
    torch.set_num_threads(1)
    warm_up()
    assert threading.active_count() == 1, "no Python thread may run while this process forks"
    emit(ready=True)
    for line in sys.stdin:
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                trial(cfg)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        emit(pid=pid)
        # Wait without reaping: until the parent acknowledges the exit, the pid stays a
        # zombie, so a late SIGKILL from the parent can never reach a process reusing it.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        assert info is not None
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        emit(exit=pid, signal=info.si_status if killed else 0,
             code=None if killed else info.si_status)
        sys.stdin.readline()  # the parent is done signalling
        os.waitpid(pid, 0)
        emit(reaped=pid)


if __name__ == "__main__":
    main()
