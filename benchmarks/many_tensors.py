"""Per-save work that grows with the number of tensors: a model of many small tensors,
checkpointed every iteration, AsymCheck against DCP at its best.

A stack of ``--params / 2`` small Linear layers (AdamW): with the optimizer's two moments and
step counters, four tensors per parameter, a few KB each, so every per-tensor cost of a save
(walking the state, laying it out, copying and checksumming piece by piece, building the
manifest, Python objects for the garbage collector) shows, where the bytes do not. Rows: no
checkpoint, AsymCheck (asym, the embedded default tiers) and DCP-best (``peers.DcpBest``) on
the thread checkpointer; ``--peers thread,process`` adds the process checkpointer, which
hands each staged tensor to its process as a file descriptor: at 8,000 tensors it ran out of
them under a limit of 20,000 open files, and the benchmark's process ended with it. Each row runs
``--rounds`` times, interleaved, the order reversed every other round, and pools its rounds.
Prints the iteration time, the stall per save and the background CPU, as ratios to DCP-best;
writes ``benchmarks/results/many_tensors.json``.

    python benchmarks/many_tensors.py              # 2,000 parameters (8,000 tensors), ~5 min
    python benchmarks/many_tensors.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from costs import add_cpu_cost, best_dcp
from harness import (
    AsymCheckMethod,
    Method,
    NoCheckpoint,
    RunResult,
    Workload,
    interleaved,
    machine_info,
    run,
    work_dir,
)
from peers import DcpBest

RESULTS = Path(__file__).resolve().parent / "results"


def many_tensors(params: int, width: int, batch: int = 8) -> Workload:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(params // 2)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))

    def loss(step: int) -> torch.Tensor:
        return model(x).square().mean()
    return Workload("many-tensors", model, opt, loss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=int, default=2000, help="parameters (two per layer)")
    p.add_argument("--width", type=int, default=32, help="features per layer")
    p.add_argument("--iterations", type=int, default=8, help="timed iterations per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--peers", default="thread", help="DCP-best checkpointers: thread,process")
    p.add_argument("--quick", action="store_true", help="a few hundred tensors, one round")
    p.add_argument("--out", default=str(RESULTS / "many_tensors.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.iterations, args.rounds = 100, 3, 1
    if args.params < 2 or args.rounds < 1:
        p.error("--params must be at least 2 and --rounds at least 1")
    warmup = 7  # the asym profile needs 5 warm-up iterations; every method gets the same

    def make() -> Workload:
        return many_tensors(args.params, args.width)

    with work_dir("asymcheck-many-") as base:
        info = machine_info(base)
        w = make()
        state_bytes = w.state_bytes
        tensors = len(w.model.state_dict()) + 3 * len(list(w.model.parameters()))
        del w
        print(f"{args.params} parameters of {args.width} x {args.width} or {args.width} "
              f"({tensors} tensors with AdamW, {state_bytes / 1e6:.1f} MB); a checkpoint every "
              f"iteration; {args.rounds} x {args.iterations} timed iterations; "
              f"{info['cpu']} x{info['cores']}", flush=True)
        methods: list[Method] = [NoCheckpoint(), AsymCheckMethod("asymcheck", "asym"),
                                 *(DcpBest(kind.strip()) for kind in args.peers.split(","))]
        done: dict[str, list[RunResult]] = {m.name: [] for m in methods}
        failed: dict[str, str] = {}
        for k, m in interleaved(methods, args.rounds):
            if m.name in failed:
                continue
            try:
                r = run(m, make, warmup=warmup, iterations=args.iterations, every=1,
                        workdir=base / f"{m.name.replace(' ', '_')}-{k}")
            except Exception as e:  # a peer that cannot save this state is a result too
                failed[m.name] = f"{type(e).__name__}: {e}"
                print(f"  round {k + 1}: {m.name:17s} FAILED: {failed[m.name]}", flush=True)
                continue
            done[m.name].append(r)
            print(f"  round {k + 1}: {m.name:17s} iteration {statistics.fmean(r.iteration_s):.3f}"
                  f" s  stall median {statistics.median(r.stall_s or [0.0]) * 1e3:7.1f} ms  "
                  f"verified={r.verified}", flush=True)
        if methods[0].name in failed or methods[1].name in failed:
            print(f"\nfailed: {failed}")
            return 1
        rows: list[dict[str, Any]] = [RunResult.pooled(done[m.name]).summary() for m in methods
                                      if m.name not in failed]
        baseline = rows[0]
        for r in rows[1:]:
            add_cpu_cost(r, baseline, state_bytes)
            r["overhead"] = r["iteration_s_mean"] / baseline["iteration_s_mean"] - 1
        dcp = best_dcp(rows[1:])
        print(f"\npooled; ratios to {dcp['method']}")
        print(f"{'method':17s} {'iteration':>10s} {'overhead':>9s} {'stall med':>10s} "
              f"{'stall/DCP':>10s} {'overhead/DCP':>13s} {'bg CPU-s/GB':>12s} {'/DCP':>6s}")
        print(f"{'no checkpoint':17s} {baseline['iteration_s_mean'] * 1e3:8.1f}ms")
        for r in rows[1:]:
            r["stall_ratio_to_dcp_best"] = r["stall_s_median"] / dcp["stall_s_median"]
            r["overhead_ratio_to_dcp_best"] = (r["overhead"] / dcp["overhead"]
                                               if dcp["overhead"] > 0 else None)
            r["cpu_background_ratio_to_dcp_best"] = (r["cpu_s_per_gb_background"]
                                                     / dcp["cpu_s_per_gb_background"])
            print(f"{r['method']:17s} {r['iteration_s_mean'] * 1e3:8.1f}ms "
                  f"{r['overhead'] * 100:8.1f}% {r['stall_s_median'] * 1e3:8.1f}ms "
                  f"{r['stall_ratio_to_dcp_best']:10.3f} "
                  f"{(r['overhead_ratio_to_dcp_best'] or float('nan')):13.3f} "
                  f"{r['cpu_s_per_gb_background']:12.2f} "
                  f"{r['cpu_background_ratio_to_dcp_best']:6.2f}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for name, error in failed.items():
            print(f"{name:17s} FAILED: {error}")
        out.write_text(json.dumps({"machine": info, "params": args.params, "width": args.width,
                                   "tensors": tensors, "state_bytes": state_bytes,
                                   "rounds": args.rounds, "iterations": args.iterations,
                                   "dcp_reference": dcp["method"], "methods": rows,
                                   "failed": failed}, indent=2))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
