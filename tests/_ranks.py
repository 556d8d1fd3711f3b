"""Multi-rank test plumbing: each rank is a process that joins a gloo group on loopback (file
rendezvous) and runs one scenario of a test module; the test collects each rank's exit code and
output."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
Scenario = Callable[[int, Path], None]


def run(scenarios: Mapping[str, Scenario], scenario: str, rank: str, world: str, work: str,
        init: str) -> None:
    """The rank's side: join the group, run ``scenarios[scenario]``, leave the group."""
    import logging

    import torch.distributed as dist

    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(name)s: %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=int(rank),
                            world_size=int(world))
    try:
        scenarios[scenario](int(rank), Path(work))
    finally:
        dist.destroy_process_group()


def exit_on_commit(handle: Any, rank: int, tier: str = "local") -> None:
    """End the rank with what became of ``handle`` on ``tier``: exit 0 and ``COMMITTED``, or
    exit 3 and ``NOT COMMITTED`` when the ranks did not commit it."""
    import asymcheck

    try:
        handle.durable(tier).wait(60)
    except asymcheck.errors.CommitError as e:
        print(f"NOT COMMITTED {rank}: {e}", flush=True)
        os._exit(3)
    print(f"COMMITTED {rank}", flush=True)
    os._exit(0)


def spawn(module: str, scenario: str, work: Path, world: int, *,
          env: dict[str, str] | None = None, timeout: float = 90) -> list[tuple[int, str]]:
    """The test's side: run ``scenario`` on ``world`` ranks, each a subprocess calling
    ``module._child``; (exit code, output) per rank."""
    init = work / f"pg-{uuid.uuid4().hex[:8]}"
    code = f"import sys; from {module} import _child; _child(*sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, scenario, str(r), str(world),
                               str(work), str(init)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
             for r in range(world)]
    return collect(procs, timeout)


def collect(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    """Wait for each rank's process (killed past ``timeout``); (exit code, output) per rank."""
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n<killed after the timeout>"
        out.append((p.returncode, text))
    return out
