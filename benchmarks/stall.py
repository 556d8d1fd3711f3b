"""Training-thread stall and iteration overhead of checkpointing every iteration, side by side.

Methods, in one process run on the same model (GPT-2, AdamW): no checkpoint,
AsymCheck asym (copies in the next iteration's windows), AsymCheck naive (copy
at save time), torch.distributed.checkpoint.async_save, torch.save + fsync.
Prints per-checkpoint stall (median, p90) and overhead versus no checkpointing (the
median checkpoint period of ``--every`` iterations, as in suite.py), as ratios to the better
DCP-best row's, and the garbage collector's full passes over the timed iterations (each holds
every thread); writes benchmarks/results/stall.json.

    python benchmarks/stall.py                 # ~0.28 GB of state, a few minutes on 2 cores
    python benchmarks/stall.py --quick         # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from costs import add_cpu_cost, best_dcp, overhead
from harness import (
    AsymCheckMethod,
    DcpAsync,
    Method,
    NoCheckpoint,
    TorchSave,
    gpt2_workload,
    machine_info,
    method_names,
    run,
    work_dir,
)
from peers import best_peers

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--local-every", type=int, default=1,
                   help="AsymCheck flushes every Nth save to the local disk (the rest stay in "
                        "shared memory): measures the snapshot stall when the disk cannot keep "
                        "up with a save every iteration")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names to run (default: all; no checkpoint "
                        "and one DCP-best row are needed for the ratios)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    p.add_argument("--out", default=str(RESULTS / "stall.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.vocab, args.iterations = 2, 128, 1024, 4
    warmup = 7  # the asym profile needs 5 warm-up iterations; every method gets the same

    def make():  # type: ignore[no-untyped-def]
        return gpt2_workload(layers=args.layers, width=args.width, vocab=args.vocab,
                             batch=args.batch, device=args.device)

    with work_dir("asymcheck-stall-", args.workdir) as base:
        info = machine_info(base)
        state_bytes = make().state_bytes
        print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}: {state_bytes / 1e6:.0f} MB "
              f"of state; checkpoint every {args.every}; {args.iterations} timed iterations; "
              f"disk {info['disk_write_gbps']:.2f} GB/s; {info['cpu']} x{info['cores']}; "
              f"device {args.device}{' ' + str(info['cuda']) if info.get('cuda') else ''}")
        local = {"every": args.local_every} if args.local_every != 1 else {}
        methods: list[Method] = [
            NoCheckpoint(), AsymCheckMethod("asymcheck asym", "asym", local=local),
            AsymCheckMethod("asymcheck naive", "naive", local=local),
            *best_peers(), DcpAsync(), TorchSave()]
        if args.methods:
            wanted = method_names(p, args.methods, [m.name for m in methods])
            methods = [m for m in methods if m.name in wanted]
        rows = []
        for m in methods:
            r = run(m, make, warmup=warmup, iterations=args.iterations, every=args.every,
                    workdir=base / m.name.replace(" ", "_"))
            rows.append(r.summary())
            row = rows[-1]
            print(f"  {m.name:18s} iteration {row['iteration_s_median']:.3f} s  stall median "
                  f"{row['stall_s_median'] * 1e3:8.1f} ms  p90 {row['stall_s_p90'] * 1e3:8.1f} ms  "
                  f"GC full passes {row['gc']['full_passes']} "
                  f"({row['gc']['full_s'] * 1e3:.0f} ms)  "
                  f"verified={row['verified_bit_exact']}", flush=True)
    baseline = rows[0]
    for r in rows[1:]:
        add_cpu_cost(r, baseline, state_bytes)
    dcp = best_dcp(rows)
    dcp_overhead = overhead(dcp, baseline)
    print(f"\nagainst {dcp['method']} (the better DCP-best row)")
    print(f"{'method':18s} {'stall med':>10s} {'stall p90':>10s} {'overhead':>9s} "
          f"{'stall/DCP':>10s} {'overhead/DCP':>13s} {'CPU-s/GB':>9s} {'faults/save':>12s} "
          f"{'bg CPU-s/GB':>12s} {'bg faults/save':>15s}")
    for r in rows[1:]:
        r["overhead"] = overhead(r, baseline)
        r["stall_ratio_to_dcp"] = r["stall_s_median"] / dcp["stall_s_median"]
        r["overhead_ratio_to_dcp"] = (r["overhead"] / dcp_overhead if dcp_overhead > 0
                                      else None)
        print(f"{r['method']:18s} {r['stall_s_median'] * 1e3:8.1f}ms "
              f"{r['stall_s_p90'] * 1e3:8.1f}ms {r['overhead'] * 100:8.1f}% "
              f"{r['stall_ratio_to_dcp']:10.3f} "
              f"{(r['overhead_ratio_to_dcp'] or float('nan')):13.3f} "
              f"{r['cpu_s_per_gb']:9.2f} {r['minflt_per_save']:12.0f} "
              f"{r['cpu_s_per_gb_background']:12.2f} {r['minflt_per_save_background']:15.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "state_bytes": state_bytes, "every": args.every,
                               "iterations": args.iterations, "dcp_reference": dcp["method"],
                               "methods": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
