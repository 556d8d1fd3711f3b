"""A checkpointer's own peak host memory, side by side: saves of a fixed state, no training.

In a training run, the peak host memory of the process moves by tens of MB from one run of
the same method to the next (activations, the allocator's caches), as much as a small
state's size, so the suite's whole-process peaks cannot tell whether a checkpointer holds one
copy of the state more than another. Here each method saves the same model's state (weights
and AdamW moments) ``--saves`` times, ``--gap`` seconds apart, changing every tensor in place
between saves (no allocation), and a sampler reads, every 5 ms, the resident memory of this
process and its children plus the shared memory in use on the machine. Rounds interleave the
methods, the order reversed every other round; a method's figure is its highest round.
AsymCheck's rows also show the peak of its own host tier (its blocks, committed, being saved,
spare and pooled), which counts nothing else that holds shared memory on the machine.

The target: AsymCheck's peak at most the lower DCP-best peak plus one copy of the state.
*asym+S+O keep 0* is asym+S+O with the host tier at ``keep = 0`` (a save takes over the block
of the newest host copy once the disk holds it, waiting for that flush if need be).

    python benchmarks/memory.py                  # GPT-2 6x512 (0.28 GB of state), a few minutes
    python benchmarks/memory.py --quick          # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from costs import DCP_BEST
from harness import (
    AsymCheckMethod,
    MemorySampler,
    Method,
    Workload,
    gpt2_workload,
    interleaved,
    machine_info,
    train_state,
    trim_heap,
    work_dir,
)
from peers import best_peers

RESULTS = Path(__file__).resolve().parent / "results"


def methods() -> list[Method]:
    return [*best_peers(),
            AsymCheckMethod("asym+S+O", "asym", local={"batch": "auto"},
                            compression={"mode": "auto"}),
            AsymCheckMethod("asym+S+O keep 0", "asym", local={"batch": "auto"},
                            compression={"mode": "auto"}, host_keep=0),
            AsymCheckMethod("asym", "asym", local={"batch": "off"},
                            compression={"mode": "off"}),
            AsymCheckMethod("naive", "naive", local={"batch": "off"},
                            compression={"mode": "off"})]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def measure(method: Method, make: Callable[[], Workload], *, saves: int, gap: float, workdir: Path
            ) -> dict[str, Any]:
    """Peak host memory of ``saves`` saves of one state by ``method``, to its last durable
    copy; the state is trained 3 steps first, so that the optimizer's moments exist."""
    w = make()
    for step in range(3):
        w.loss(step).backward()
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
    tensors = _tensors(train_state(w))
    workdir.mkdir(parents=True, exist_ok=True)
    method.setup(w, workdir)
    trim_heap()
    memory = MemorySampler(0.005, children=method.child_processes)
    memory.own_shm = method.own_shm_bytes()
    memory.start()
    t0 = time.perf_counter()
    try:
        for step in range(10, 10 + saves):
            with torch.no_grad():
                for t in tensors:
                    t.add_(1e-3)
            method.checkpoint(step)
            time.sleep(gap)
            method.stall_after_step()
        method.finish()
        wall = time.perf_counter() - t0
        peak = memory.stop()
    finally:
        memory.stop()
        method.cleanup()
        method.release()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"method": method.name, "wall_s": wall, **peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, few saves")
    p.add_argument("--layers", type=int, default=6, help="GPT-2 blocks (default 6)")
    p.add_argument("--width", type=int, default=512, help="GPT-2 width (default 512)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--saves", type=int, default=12, help="saves per run (default 12)")
    p.add_argument("--gaps", default="0.05,0.5,2",
                   help="seconds between saves, one set of runs each (default 0.05,0.5,2: "
                        "saves faster than the disk takes them, slower, and further apart "
                        "than a flush)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of every method, interleaved; the highest is shown (default 2)")
    p.add_argument("--out", default=str(RESULTS / "memory.json"), help="JSON written here")
    args = p.parse_args(argv)
    if min(args.layers, args.width, args.vocab, args.saves, args.rounds) < 1:
        p.error("--layers, --width, --vocab, --saves and --rounds must be at least 1")
    try:
        gaps = [float(g) for g in args.gaps.split(",")]
    except ValueError:
        p.error(f"--gaps takes comma-separated seconds, got {args.gaps!r}")
    if any(g < 0 for g in gaps):
        p.error("--gaps must not be negative")
    if args.quick:
        args.layers, args.width, args.vocab, args.saves, args.rounds = 2, 128, 1024, 4, 1

    def make() -> Workload:
        return gpt2_workload(layers=args.layers, width=args.width, vocab=args.vocab)

    with work_dir("asymcheck-memory-") as base:
        info = machine_info(base)
        state_bytes = make().state_bytes
        print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}: {state_bytes / 1e6:.0f} MB "
              f"of state; {args.saves} saves per run; {info['cpu']} x{info['cores']}")
        out: dict[str, Any] = {"machine": info, "state_bytes": state_bytes, "saves": args.saves,
                               "rounds": args.rounds, "gaps": []}
        for gap in gaps:
            runs: dict[str, list[dict[str, Any]]] = {}
            for k, m in interleaved(methods(), args.rounds):
                r = measure(m, make, saves=args.saves, gap=gap,
                            workdir=base / f"{m.name.replace(' ', '_')}-{k}")
                runs.setdefault(m.name, []).append(r)
                trim_heap()
            rows = [{"method": name,
                     **{key: max(r[key] for r in rs)
                        for key in ("peak_host_bytes", "peak_shm_bytes", "peak_resident_bytes",
                                    "peak_own_shm_bytes") if key in rs[0]},
                     "by_round": rs} for name, rs in runs.items()]
            ref = min((r for r in rows if r["method"] in DCP_BEST),
                      key=lambda r: r["peak_host_bytes"])
            bound = ref["peak_host_bytes"] + state_bytes
            print(f"\nsaves {gap:g} s apart; the bound: {ref['method']} + one copy = "
                  f"{bound / 1e6:.1f} MB")
            print(f"{'method':18s} {'peak':>9s} {'shared':>9s} {'own tier':>9s} {'resident':>9s} "
                  f"{'to bound':>9s}")
            for r in rows:
                r["to_bound_bytes"] = r["peak_host_bytes"] - bound
                own = (f"{r['peak_own_shm_bytes'] / 1e6:7.1f}MB" if "peak_own_shm_bytes" in r
                       else f"{'-':>9s}")
                print(f"{r['method']:18s} {r['peak_host_bytes'] / 1e6:7.1f}MB "
                      f"{r['peak_shm_bytes'] / 1e6:7.1f}MB {own} "
                      f"{r['peak_resident_bytes'] / 1e6:7.1f}MB "
                      f"{r['to_bound_bytes'] / 1e6:+8.1f}MB", flush=True)
            out["gaps"].append({"gap_s": gap, "reference": ref["method"], "bound_bytes": bound,
                                "methods": rows})
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
