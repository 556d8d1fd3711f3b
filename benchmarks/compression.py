"""Time to durable with compression ``auto`` versus ``off``, on the real disk and a slow tier.

One process run: a small GPT-2 is trained with AdamW; after each step the same state
is saved through five checkpointers, one at a time, so all see identical states:
  local / off, local / auto      the local disk as it is;
  local / off2                   a second ``off``: its ratio to ``off`` is the noise;
  slow / off, slow / auto        a tier throttled to --slow-mbps (default 40 MB/s).
Each save is timed from save() until durable on the disk tier; then the checkpointer is
left to finish its retention (untimed) so that the next one starts on a quiet machine, and
the order of the checkpointers rotates every step. Prints the median time to durable, the
auto/off ratio per tier beside the off2/off noise, what the cost model decided and the
achieved ratio; writes benchmarks/results/compression.json.

    python benchmarks/compression.py            # ~2 minutes on 2 cores
    python benchmarks/compression.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asymcheck
from tests import fault_tiers

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=12,
                   help="checkpointed steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=40, help="training before measuring")
    p.add_argument("--slow-mbps", type=float, default=40.0)
    p.add_argument("--out", default=str(RESULTS / "compression.json"))
    args = p.parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()
    layers, width = (2, 128) if args.quick else (4, 256)
    if args.quick:
        args.steps, args.warmup_steps = 3, 5
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=8192, n_positions=128,
        bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> None:
        ids = torch.randint(0, 8192, (8, 128), generator=torch.Generator().manual_seed(i))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup_steps):
        step(i)
    fault_tiers.register()
    work = Path(tempfile.mkdtemp(prefix="asymcheck-compression-", dir=".")).absolute()
    configs: dict[str, asymcheck.Checkpointer] = {}
    shm_dirs: list[Path] = []
    try:
        for tier_kind, modes in (("local", ("off", "auto", "off2")), ("slow", ("off", "auto"))):
            for mode in modes:
                name = f"{tier_kind}/{mode}"
                d = work / name.replace("/", "-")
                url = (f"file://{d}" if tier_kind == "local" else f"slowfile://{d}")
                options = {} if tier_kind == "local" else {"bandwidth_bps": args.slow_mbps * 1e6}
                pol = asymcheck.Policy(
                    tiers=(asymcheck.TierPolicy(name="host", url=f"shm://asymcheck-cbench-"
                                                f"{d.name}", keep=1),
                           asymcheck.TierPolicy(name="disk", url=url, keep=2, options=options)),
                    compression=asymcheck.CompressionPolicy(mode=mode.rstrip("2"),
                                                            full_every=10))
                configs[name] = asymcheck.Checkpointer(model, opt, policy=pol, mode="naive")
                shm_dirs.append(Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm"))
                                / pol.staging.url.removeprefix("shm://"))
        times: dict[str, list[float]] = {k: [] for k in configs}
        stalls: dict[str, list[float]] = {k: [] for k in configs}
        last: dict[str, asymcheck.SaveHandle] = {}
        for i in range(args.steps + 1):  # the first save (a full one everywhere) is warm-up
            step(args.warmup_steps + i)
            names = list(configs)
            for name in names[i % len(names):] + names[:i % len(names)]:
                ckpt = configs[name]
                t0 = time.perf_counter()
                h = ckpt.save_sync(i)
                t1 = time.perf_counter()
                h.durable("disk").wait(600)
                if i:
                    times[name].append(time.perf_counter() - t0)
                    stalls[name].append(t1 - t0)
                last[name] = h
                ckpt.wait_idle_sync()
        rows: dict[str, dict[str, Any]] = {}
        for name, ckpt in configs.items():
            m = last[name].metrics
            rows[name] = {"time_to_durable_s": statistics.median(times[name]),
                          "save_s": statistics.median(stalls[name]),
                          "times_s": times[name],
                          "stored_bytes": m["disk.stored_bytes"], "state_bytes": m["state_bytes"],
                          "fit": m["disk.fit"], "compression": m["disk.compression"]}
            loaded = ckpt.load_sync(args.steps)  # the measured checkpoints must read back
            assert loaded is not None and loaded.step == args.steps
            ckpt.close_sync()
        configs.clear()
    finally:
        for ckpt in configs.values():
            ckpt.close_sync()
        shutil.rmtree(work, ignore_errors=True)
        for shm in shm_dirs:  # the host tiers' shared memory
            shutil.rmtree(shm, ignore_errors=True)
        fault_tiers.unregister()
    print(f"GPT-2 {layers}x{width}: {rows['local/off']['state_bytes'] / 1e6:.0f} MB of state; "
          f"slow tier at {args.slow_mbps:.0f} MB/s; median of {args.steps} saves")
    print(f"{'config':12s} {'to durable':>11s} {'save()':>8s} {'stored MB':>10s} {'ratio':>6s} "
          f"{'compressed tensors':>19s}")
    for name, r in rows.items():
        comp = r["compression"]
        n_coded = sum(1 for d in comp["decisions"] if d[1] != "raw")
        print(f"{name:12s} {r['time_to_durable_s']:10.3f}s {r['save_s']:7.3f}s "
              f"{r['stored_bytes'] / 1e6:10.1f} "
              f"{r['state_bytes'] / r['stored_bytes']:6.3f} {n_coded:>8d} of "
              f"{len(comp['decisions']):<4d}")
    def paired(a: str, b: str) -> dict[str, float]:
        """Per-step ratios a/b (the same state, saved back to back): median and quartiles."""
        r = [x / y for x, y in zip(rows[a]["times_s"], rows[b]["times_s"], strict=True)]
        q1, median, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0],) * 3
        return {"median": median, "q1": q1, "q3": q3}

    summary = {"local": paired("local/auto", "local/off"),
               "local_noise": paired("local/off2", "local/off"),
               "slow": paired("slow/auto", "slow/off")}
    print("time to durable, per-step ratios (median [quartiles]):")
    for label, key in (("local  auto / off ", "local"), ("local  off2 / off ", "local_noise"),
                       ("slow   auto / off ", "slow")):
        r = summary[key]
        print(f"  {label} {r['median']:.3f} [{r['q1']:.3f} - {r['q3']:.3f}]"
              + ("   <- the noise: two identical configurations" if key == "local_noise"
                 else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "auto_over_off": summary}, indent=2,
                              default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
