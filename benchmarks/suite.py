"""The benchmark suite: six model families, every checkpointing method, side by side.

For each model (GPT-2, BERT masked LM, RoBERTa, BLOOM, ViT, ResNet; AdamW; seeded random
data) one process trains the same model once per method and checkpoint frequency:

  no checkpoint          the baseline
  torch.save+fsync       torch.save of the state dicts into one file, fsync
  DCP async_save         torch.distributed.checkpoint.async_save, one save in flight
  DCP-best thread/process  async_save with DefaultStager (shared memory, async staging awaited
                         in an optimizer step pre-hook), thread or process checkpointer
  naive                  AsymCheck, copy at save time, no compression, a file per tensor
  asym                   AsymCheck, copies in the next iteration's idle windows
  asym+S                 asym + selective compression (``[compression] mode = "auto"``)
  asym+S+O               asym+S + batched flushing (local tier ``batch = "auto"``)

``--rounds`` times (default 2), interleaved, the order reversed every other round, each row
pooling its rounds, so that the machine's drift over a run weighs on every method alike; it
records throughput relative to no checkpoint, the training-thread stall of each
checkpoint, the time until each checkpoint is durable on disk, the bytes stored per
checkpoint, the peak host memory, and the restore time from every tier; the last checkpoint
of every run is restored from each tier and compared byte for byte. Results go to
``benchmarks/results/suite-<model>.json``; ``REPORT.md`` and PNG plots are written from them.

    python benchmarks/suite.py                          # all six models, CPU sizes
    python benchmarks/suite.py --models gpt2,vit --every 1
    python benchmarks/suite.py --quick                  # tiny models, a smoke run (tmp dir)
    python benchmarks/suite.py --scale 2 --set gpt2.layers=8
    python benchmarks/suite.py --device cuda --preset gpu-1b --every 10
    python benchmarks/suite.py --report-only            # redo REPORT.md from the JSON files
"""

from __future__ import annotations

import argparse
import ast
import faulthandler
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from costs import DCP_BEST, add_cpu_cost, best_dcp, overhead
from harness import (
    MODELS,
    AsymCheckMethod,
    DcpAsync,
    Method,
    NoCheckpoint,
    RunResult,
    TorchSave,
    Workload,
    interleaved,
    machine_info,
    make_workload,
    method_names,
    model_config,
    run,
)
from peers import best_peers

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["no checkpoint", "torch.save+fsync", "DCP async_save", *DCP_BEST, "naive", "asym",
           "asym+S", "asym+S+O"]
HEADLINE = "asym+S+O"
NA = "-"  # no figure
MIN_WARMUP = 7  # AsymCheck profiles 5 iterations; every method gets the same warm-up


def methods(host_states: float, host_keep: int = 1) -> list[Method]:
    off = {"batch": "off"}
    auto = {"mode": "auto"}

    def asym(name: str, mode: str, local: dict[str, Any],
             compression: dict[str, Any]) -> AsymCheckMethod:
        return AsymCheckMethod(name, mode, local=local, compression=compression,
                               host_capacity_states=host_states, host_keep=host_keep)
    return [
        NoCheckpoint(),
        TorchSave(),
        DcpAsync(),
        *best_peers(),
        asym("naive", "naive", off, {"mode": "off"}),
        asym("asym", "asym", off, {"mode": "off"}),
        asym("asym+S", "asym", off, auto),
        asym("asym+S+O", "asym", {"batch": "auto"}, auto),
    ]


def schedule(every: int, iterations: int) -> tuple[int, int]:
    """(warm-up, timed iterations): the timed window holds whole checkpoint periods and ends
    on a checkpoint step, so it holds exactly iterations / every checkpoints."""
    warmup = MIN_WARMUP + (-(MIN_WARMUP - 1)) % every
    timed = every * max(1, math.ceil(iterations / every))
    return warmup, timed


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, field = key.partition(".")
        if not sep or not dot or model not in MODELS:
            raise SystemExit(f"suite.py: --set {item!r}: expected MODEL.KEY=VALUE with MODEL "
                             f"one of {', '.join(MODELS)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(model, {})[field] = parsed
    return out


# ------------------------------------------------------------------- one model, one process

def quiet_iteration_s(row: dict[str, Any], every: int) -> float | None:
    """Median time of the iterations far from any save (the second half of each checkpoint
    period, the save's own iteration left out): what a method costs between checkpoints."""
    its = row.get("iteration_s_all") or []
    if every < 4 or len(its) < every:
        return None
    quiet = [t for i, t in enumerate(its) if every // 2 <= i % every < every - 1]
    return statistics.median(quiet) if quiet else None


def relative(rows: list[dict[str, Any]], every: int = 1, state_bytes: int | None = None
             ) -> None:
    """Add ratios to the baseline and to the peers, and CPU cost per GB, in place."""
    rows = [r for r in rows if "error" not in r]
    by = {r["method"]: r for r in rows}
    base = by.get("no checkpoint")
    for r in rows:
        r["quiet_iteration_s"] = quiet_iteration_s(r, every)
        if (base is not None and r is not base and state_bytes and "cpu" in r
                and "cpu" in base):
            add_cpu_cost(r, base, state_bytes)
    for r in rows:
        if base is not None:
            r["quiet_iteration_rel"] = _ratio(r["quiet_iteration_s"], base["quiet_iteration_s"])
            r["throughput_rel"] = r["throughput_it_s"] / base["throughput_it_s"]
            r["overhead"] = overhead(r, base)
            for key in ("peak_host_bytes", "peak_resident_bytes"):
                if key in r and key in base:
                    r[f"{key}_over_baseline"] = r[key] - base[key]
    best = [r for r in rows if r["method"] in DCP_BEST]
    if best:  # the better DCP-best row (higher throughput): the headline's reference
        by["DCP best"] = best_dcp(best)
    for r in rows:
        for peer, tag in (("DCP async_save", "dcp"), ("DCP best", "dcp_best"),
                          ("torch.save+fsync", "torch_save")):
            p = by.get(peer)
            if p is None or r["method"] == "no checkpoint":
                continue
            r[f"stall_ratio_to_{tag}"] = _ratio(r["stall_s_median"], p["stall_s_median"])
            r[f"throughput_ratio_to_{tag}"] = _ratio(r["throughput_it_s"], p["throughput_it_s"])
            if base is not None:
                r[f"overhead_ratio_to_{tag}"] = _ratio(r["overhead"], p["overhead"])
            r[f"cpu_background_ratio_to_{tag}"] = _ratio(r.get("cpu_s_per_gb_background"),
                                                         p.get("cpu_s_per_gb_background"))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def run_model(args: argparse.Namespace, model: str) -> Path:
    import torch
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(model, args.scale, args.preset, **parse_sets(args.set).get(model, {}))

    def make() -> Workload:
        return make_workload(model, device=args.device, **cfg)

    own_workdir = args.workdir is None
    base = Path(args.workdir or tempfile.mkdtemp(prefix="asymcheck-suite-")) / model
    info = machine_info(base, probe_bytes=128 << 20)
    w = make()
    params, state_bytes = w.params, w.state_bytes
    del w
    print(f"== {model}: {params / 1e6:.1f} M parameters, {state_bytes / 1e6:.0f} MB of state "
          f"(weights + AdamW moments); {cfg}; disk {info['disk_write_gbps']:.2f} GB/s; "
          f"{info['cpu']} x{info['cores']}; load {info['load_average']}", flush=True)
    out: dict[str, Any] = {"model": model, "config": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in cfg.items()},
                           "params": params, "state_bytes": state_bytes, "device": args.device,
                           "machine": info, "runs": []}
    t_model = time.perf_counter()
    path = Path(args.out_dir) / f"suite-{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(status: str) -> None:  # after every method: a hung or killed run leaves the rest
        out["status"] = status
        out["seconds"] = time.perf_counter() - t_model
        path.write_text(json.dumps(out, indent=1, default=str))

    for every, iterations in zip(args.every, args.iterations, strict=True):
        warmup, timed = schedule(every, iterations)
        print(f"  every {every}: {warmup} warm-up + {timed} timed iterations "
              f"({timed // every} timed checkpoints)", flush=True)
        rows: list[dict[str, Any]] = []
        out["runs"].append({"every": every, "warmup": warmup, "iterations": timed,
                            "rounds": args.rounds, "methods": rows})
        chosen = [m for m in methods(args.host_states, args.host_keep)
                  if not args.methods or m.name in args.methods]
        done: dict[str, list[RunResult]] = {m.name: [] for m in chosen}
        failed: dict[str, dict[str, Any]] = {}
        for k, m in interleaved(chosen, args.rounds):
            if m.name in failed:
                continue
            save(f"running {m.name}, every {every}, round {k + 1}")
            # a hang prints every thread's stack and ends this process; the parent goes on
            faulthandler.dump_traceback_later(args.run_timeout, exit=True)
            try:
                r = run(m, make, warmup=warmup, iterations=timed, every=every,
                        workdir=base / f"every{every}" / m.name.replace(" ", "_"))
                done[m.name].append(r)
                print(f"  {k + 1}/{args.rounds}" + _line(r.summary())[2:], flush=True)
            except Exception as e:
                traceback.print_exc()
                failed[m.name] = {"method": m.name, "error": f"{type(e).__name__}: {e}"}
            finally:
                faulthandler.cancel_dump_traceback_later()
            # every round so far, pooled per method
            rows[:] = [failed.get(c.name) or RunResult.pooled(done[c.name]).summary()
                       for c in chosen if c.name in failed or done[c.name]]
            relative(rows, every, state_bytes)
        if args.rounds > 1:
            print(f"  pooled over {args.rounds} rounds:", flush=True)
            for row in rows:
                print(_line(row), flush=True)
    save("done")
    if own_workdir:
        shutil.rmtree(base.parent, ignore_errors=True)
    print(f"  wrote {path} ({out['seconds']:.0f} s)", flush=True)
    return path


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"    {row['method']:17s} FAILED: {row['error']}"
    dur = row.get("durable_s_median")
    mem = row.get("peak_host_bytes")
    stored = row.get("stored_bytes_median")
    restore = " ".join(f"{k} {v:.2f}s" for k, v in row.get("restore_s", {}).items())
    return (f"    {row['method']:17s} {row['throughput_it_s']:6.2f} it/s  stall med "
            f"{row['stall_s_median'] * 1e3:8.1f} ms p90 {row['stall_s_p90'] * 1e3:8.1f} ms  "
            f"durable {NA if dur is None else f'{dur:6.2f} s'}  "
            f"stored {NA if stored is None else f'{stored / 1e6:6.1f} MB'}  "
            f"peak +{NA if mem is None else f'{mem / 1e6:.0f} MB'}  restore {restore or NA}  "
            f"verified={row['verified_bit_exact']}")


# ------------------------------------------------------------------------------ the report

def _fmt(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    return f"{v:{spec}}{unit}"


def _mb(v: float | None) -> str:
    return NA if v is None else f"{v / 1e6:.1f}"


def load_results(out_dir: Path, models: list[str]) -> list[dict[str, Any]]:
    found = []
    for m in models:
        p = out_dir / f"suite-{m}.json"
        if p.exists():
            res = json.loads(p.read_text())
            for rn in res["runs"]:
                relative(rn["methods"], rn["every"], res.get("state_bytes"))  # after the run
            found.append(res)
    return found


def plot(results: list[dict[str, Any]], out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    palette = ["#4477aa", "#ee7733", "#228833", "#aa3377"]
    for res in results:
        fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
        runs = res["runs"]
        width = 0.8 / max(1, len(runs))
        panels = [
            ("throughput relative to no checkpoint", lambda r: r.get("throughput_rel"), False),
            ("stall per checkpoint, ms (median; line: p90)",
             lambda r: r["stall_s_median"] * 1e3, True),
            ("time to durable on disk, s (median)", lambda r: r.get("durable_s_median"), False),
            ("MB stored per checkpoint", lambda r: (r.get("stored_bytes_median") or 0) / 1e6
             if r.get("stored_bytes_median") else None, False),
            ("peak host memory over no checkpoint, MB",
             lambda r: r.get("peak_host_bytes_over_baseline", 0) / 1e6
             if r.get("peak_host_bytes_over_baseline") is not None else None, False),
        ]
        for ax, (title, get, log) in zip(axes.flat, panels, strict=False):
            for k, rn in enumerate(runs):
                rows = [r for r in rn["methods"]]
                xs = [METHODS.index(r["method"]) + (k - (len(runs) - 1) / 2) * width
                      for r in rows]
                ys = [get(r) for r in rows]
                keep = [(x, y, r) for x, y, r in zip(xs, ys, rows, strict=True)
                        if y is not None]
                if not keep:
                    continue
                ax.bar([x for x, _, _ in keep], [y for _, y, _ in keep], width,
                       color=palette[k % len(palette)], label=f"every {rn['every']}")
                if log:
                    for x, _, r in keep:
                        ax.plot([x, x], [r["stall_s_median"] * 1e3, r["stall_s_p90"] * 1e3],
                                color="black", lw=1)
            if log:
                ax.set_yscale("log")
            if "relative" in title:
                ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_title(title, fontsize=10)
            ax.set_xticks(range(len(METHODS)))
            ax.set_xticklabels(METHODS, rotation=30, ha="right", fontsize=8)
            ax.legend(fontsize=8)
        ax = axes.flat[5]  # restore time per tier, from the last frequency's runs
        rows = [r for r in runs[-1]["methods"] if r.get("restore_s")]
        tiers = ["host", "local"]
        for k, tier in enumerate(tiers):
            pts = [(METHODS.index(r["method"]) + (k - 0.5) * 0.4, r["restore_s"][tier])
                   for r in rows if tier in r["restore_s"]]
            if pts:
                ax.bar([x for x, _ in pts], [y for _, y in pts], 0.4,
                       label=f"from {tier}", color=["#228833", "#aa3377"][k])
        ax.set_title("restore time, s (local: page cache dropped)", fontsize=10)
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels(METHODS, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        fig.suptitle(f"{res['model']}: {res['params'] / 1e6:.1f} M parameters, "
                     f"{res['state_bytes'] / 1e6:.0f} MB of state, {res['device']}")
        fig.tight_layout()
        name = f"suite-{res['model']}.png"
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        names.append(name)

    # across models: relative throughput and stall of every method, per frequency
    everys = sorted({rn["every"] for res in results for rn in res["runs"]})
    if results and everys:
        fig, axes = plt.subplots(2, len(everys), figsize=(7 * len(everys), 8), squeeze=False)
        models = [res["model"] for res in results]
        shown = METHODS[1:]
        bw = 0.8 / len(shown)
        cmap = plt.get_cmap("tab10")
        for col, every in enumerate(everys):
            for row, (title, get, log) in enumerate([
                    ("throughput relative to no checkpoint", lambda r: r.get("throughput_rel"),
                     False),
                    ("stall per checkpoint, ms (median)", lambda r: r["stall_s_median"] * 1e3,
                     True)]):
                ax = axes[row][col]
                for j, meth in enumerate(shown):
                    xs, ys = [], []
                    for i, res in enumerate(results):
                        for rn in res["runs"]:
                            if rn["every"] != every:
                                continue
                            for r in rn["methods"]:
                                if r["method"] == meth and get(r) is not None:
                                    xs.append(i + (j - (len(shown) - 1) / 2) * bw)
                                    ys.append(max(get(r), 1e-3) if log else get(r))
                    ax.bar(xs, ys, bw, label=meth, color=cmap(j))
                if log:
                    ax.set_yscale("log")
                else:
                    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.set_xticks(range(len(models)))
                ax.set_xticklabels(models)
                ax.set_title(f"{title}, checkpoint every {every}", fontsize=10)
                ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / "suite-summary.png", dpi=80)
        plt.close(fig)
        names.insert(0, "suite-summary.png")
    return names


def _find(rn: dict[str, Any], method: str) -> dict[str, Any] | None:
    return next((r for r in rn["methods"] if r["method"] == method), None)


def memory_lines(results: list[dict[str, Any]]) -> list[str]:
    """The host-memory target per model and frequency: the headline's peak above the
    no-checkpoint run against the lower of the DCP-best rows' plus one copy of the state,
    each split into its shared memory (host blocks, staging; AsymCheck's own host tier's
    peak beside the machine's) and its resident memory above the no-checkpoint run's (which
    moves by tens of MB between identical runs)."""
    lines = ["| model | every | state | " + HEADLINE + " peak over none: shared + resident "
             "| DCP-best (lower) peak over none: shared + resident | bound: DCP-best + one copy "
             "| within |",
             "|---|---|---|---|---|---|---|"]

    def split(row: dict[str, Any]) -> str:
        resident = row.get("peak_resident_bytes_over_baseline")
        own = row.get("peak_own_shm_bytes")
        return (f"{row['peak_host_bytes_over_baseline'] / 1e6:.0f} MB: "
                f"{row.get('peak_shm_bytes', 0) / 1e6:.0f}"
                f"{'' if own is None else f' (its host tier {own / 1e6:.0f})'} "
                f"{f'+ {NA}' if resident is None else f'{resident / 1e6:+.0f}'} MB")

    for res in results:
        state = res["state_bytes"]
        for rn in res["runs"]:
            r = _find(rn, HEADLINE)
            peers = [p for p in rn["methods"] if p["method"] in DCP_BEST and "error" not in p
                     and p.get("peak_host_bytes_over_baseline") is not None]
            if r is None or "error" in r or not peers:
                continue
            ref = min(peers, key=lambda p: p["peak_host_bytes_over_baseline"])
            mine = r.get("peak_host_bytes_over_baseline")
            if mine is None:
                continue
            bound = ref["peak_host_bytes_over_baseline"] + state
            lines.append(
                f"| {res['model']} | {rn['every']} | {state / 1e6:.0f} MB | {split(r)} "
                f"| {ref['method'].removeprefix('DCP-best ')}: {split(ref)} "
                f"| {bound / 1e6:.0f} MB "
                f"| {'yes' if mine <= bound else f'no, +{(mine - bound) / 1e6:.0f} MB'} |")
    return lines


def losses(results: list[dict[str, Any]]) -> list[str]:
    """Where the headline configuration does worse than a peer (by more than the noise
    allowance: 5% for throughput, 10% otherwise), one line per model and frequency."""
    checks = [
        ("throughput", "throughput_it_s", True, 1, "{:.2f} it/s"),
        ("stall", "stall_s_median", False, 1e3, "{:.1f} ms"),
        ("time to durable", "durable_s_median", False, 1, "{:.2f} s"),
        ("MB per checkpoint", "stored_bytes_median", False, 1e-6, "{:.1f}"),
        ("peak host MB", "peak_host_bytes", False, 1e-6, "{:.0f}"),
    ]
    peers = (("DCP async_save", "DCP"), *((n, n) for n in DCP_BEST),
             ("torch.save+fsync", "torch.save"))
    notes = []
    for res in results:
        for rn in res["runs"]:
            ours = _find(rn, HEADLINE)
            if ours is None:
                continue
            parts = []
            for label, key, higher_better, mult, spec in checks:
                a = ours.get(key)
                worse = []
                for peer, short in peers:
                    p = _find(rn, peer)
                    b = None if p is None else p.get(key)
                    if a is None or b is None:
                        continue
                    if (a < b * 0.95) if higher_better else (a > b * 1.1 + 1e-9):
                        worse.append(f"{short} {spec.format(b * mult)}")
                if worse and a is not None:
                    parts.append(f"{label} {spec.format(a * mult)} ({', '.join(worse)})")
            a = ours.get("restore_s", {}).get("local")
            worse = []
            for peer, short in peers:
                p = _find(rn, peer)
                b = None if p is None else p.get("restore_s", {}).get("local")
                if a is not None and b is not None and a > b * 1.1:
                    worse.append(f"{short} {b:.2f} s")
            if worse:
                parts.append(f"restore from disk {a:.2f} s ({', '.join(worse)})")
            if parts:
                notes.append(f"{res['model']}, every {rn['every']}: " + "; ".join(parts))
    return notes


def observations(results: list[dict[str, Any]]) -> list[str]:
    """Figures that explain the headline, computed from the runs."""
    out = []
    ratios = [r["local_ratio"] for res in results for rn in res["runs"] for r in rn["methods"]
              if r["method"] in ("asym+S", "asym+S+O") and r.get("local_ratio")]
    if ratios:
        out.append(f"Selective compression (+S) stored raw/stored = {min(ratios):.3f}-"
                   f"{max(ratios):.3f}x on the local tier: on these states the cost model "
                   "found little or nothing worth compressing.")
    quiet = []
    for res in results:
        for rn in res["runs"]:
            row = {r["method"]: r.get("quiet_iteration_rel") for r in rn["methods"]}
            if row.get("asym") is not None:
                quiet.append(f"{res['model']} " + ", ".join(
                    f"{m} {row[m]:.2f}" for m in METHODS[1:] if row.get(m) is not None))
    if quiet:
        out.append("Iterations far from any save (second half of each period of "
                   "`every` iterations), median time relative to no checkpoint: "
                   + "; ".join(quiet) + ".")
    backlog = [(res["model"], r["method"], r["stall_s_median"], r.get("durable_s_median"))
               for res in results for rn in res["runs"] if rn["every"] == 1
               for r in rn["methods"] if r["method"] in ("naive", "asym", "asym+S")]
    if backlog:
        worst = max(backlog, key=lambda b: b[2])
        out.append("With a file per tensor (naive, asym, asym+S) a checkpoint takes "
                   f"up to {max(b[3] or 0 for b in backlog):.1f} s to become durable; at "
                   "every iteration the flush queue fills and saves wait for room "
                   f"(backpressure), which is their stall (up to {worst[2] * 1e3:.0f} ms, "
                   f"{worst[0]} {worst[1]}).")
    return out


def failures(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for res in results:
        if res.get("status") != "done":
            out.append(f"{res['model']}: stopped while {res.get('status')} (see its log)")
        for rn in res["runs"]:
            out += [f"{res['model']}, every {rn['every']}, {r['method']}: {r['error']}"
                    for r in rn["methods"] if "error" in r]
    return out


def write_report(results: list[dict[str, Any]], out_dir: Path, total_s: float | None,
                 argv: list[str]) -> Path:
    failed = failures(results)
    results = [{**res, "runs": [{**rn, "methods": [r for r in rn["methods"] if "error" not in r]}
                                for rn in res["runs"]]} for res in results]
    figs = plot(results, out_dir)
    m0 = results[0]["machine"] if results else {}
    disks = [r["machine"]["disk_write_gbps"] for r in results]
    loads = [r["machine"].get("load_average") for r in results]
    lines = [
        "# AsymCheck benchmark suite",
        "",
        f"Command: `python benchmarks/suite.py{' ' + ' '.join(argv) if argv else ''}`"
        + (f", {total_s / 60:.1f} minutes in all." if total_s else "."),
        "",
        f"Machine: {m0.get('cpu')}, {m0.get('cores')} cores, "
        f"{(m0.get('memory_bytes') or 0) / 2**30:.0f} GiB memory"
        + (f", GPU {m0['cuda']}" if m0.get("cuda") else "")
        + f"; torch {m0.get('torch')}, Python {m0.get('python')}. "
        f"Disk write + fsync bandwidth, measured at the start of each model's run: "
        f"{min(disks, default=0):.2f}-{max(disks, default=0):.2f} GB/s; host memcpy "
        f"{m0.get('memcpy_gbps', 0):.1f} GB/s; 1/5/15-minute load average at the start of "
        f"each model: {', '.join(str(tuple(round(x, 2) for x in ld)) for ld in loads if ld)}.",
        "",
        "**All figures are relative.** Every method trains the same model from the same seed "
        "on the same data, checkpoints at the same steps, and runs in the same process, one "
        "after the other; only ratios between methods of one run carry over to another "
        "machine. The machine may be shared, so a few percent of throughput is noise. Every "
        "run's last checkpoint was restored from each of its tiers and compared byte for "
        "byte with the state it was taken from (column *exact*).",
        "",
        "Methods: *torch.save+fsync* writes one file per checkpoint; *DCP async_save* keeps "
        "one save in flight (the next save waits for it); AsymCheck has a shared-memory host "
        "tier and a local-disk tier: *naive* copies the state at save time, *asym* copies "
        "parameters and optimizer moments during the next iteration's forward and backward "
        "passes; both write a file per tensor, uncompressed; *+S* adds selective compression "
        "(`[compression] mode = \"auto\"`), *+O* batched flushing (`batch = \"auto\"`). "
        "*DCP-best thread/process*: DCP `async_save` at its best configuration (see the "
        "headline). CPU-s/GB: CPU seconds of every thread of the process and of its child "
        "processes (a process checkpointer's) beyond the no-checkpoint run, per GB "
        "checkpointed; faults/save: minor page faults beyond it, per checkpoint. Training's "
        "own CPU and faults move more between two identical runs than a checkpointer spends, "
        "so these two can come out negative; *bg*: the same for the threads and processes "
        "the no-checkpoint run does not have (the checkpointer's own), the steadier figures, "
        "which leave out the training thread's share (its stall).",
        "",
        "Every method ran in each of the rounds, interleaved with the others, the order "
        "reversed every other round; its row pools the rounds' iterations, saves and CPU, so "
        "the machine's drift during a run weighs on every method alike.",
        "",
        "Stall: seconds the training thread waited per checkpoint (for asym: the save call "
        "plus the wait at the next optimizer step). Throughput: iterations per second over "
        "the median checkpoint period (`every` iterations ending with a save, checkpoint "
        "included), robust to a burst of load from elsewhere; the mean over all timed "
        "iterations is listed too. Time to durable: from the save call until the checkpoint is "
        "committed on local disk (torch.save: when it returns). Peak host memory: resident "
        "anonymous + file memory plus the shared memory in use on the machine (every method's "
        "host blocks or shared-memory staging), sampled every 10 ms, "
        "above the run's start and above the no-checkpoint run. Restore: into a fresh model, "
        "from shared memory (host) and from disk (local, with the host copy removed and the "
        "files' page cache dropped).",
        "",
        f"## Headline: {HEADLINE} against the peers",
        "",
        "Ratios below 1 favour AsymCheck for stall and overhead, above 1 for throughput. "
        "*DCP best* is the better (lower median iteration time) of DCP `async_save` with "
        "`DefaultStager` (shared-memory, asynchronous staging; staging awaited in an optimizer "
        "step pre-hook) on the thread and on the process checkpointer; *DCP* its default "
        "configuration.",
        "",
        "| model | state | every | stall | ÷ DCP best | ÷ DCP | ÷ torch.save "
        "| throughput vs none | ÷ DCP best | ÷ DCP | overhead | overhead ÷ DCP best's "
        "| bg CPU-s/GB | ÷ DCP best's | bg faults/save |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for rn in res["runs"]:
            r = _find(rn, HEADLINE)
            if r is None:
                continue
            lines.append(
                f"| {res['model']} | {res['state_bytes'] / 1e6:.0f} MB | {rn['every']} | "
                f"{r['stall_s_median'] * 1e3:.1f} ms | "
                f"{_fmt(r.get('stall_ratio_to_dcp_best'), '.3f')} | "
                f"{_fmt(r.get('stall_ratio_to_dcp'), '.3f')} | "
                f"{_fmt(r.get('stall_ratio_to_torch_save'), '.3f')} | "
                f"{_fmt(r.get('throughput_rel'), '.3f')} | "
                f"{_fmt(r.get('throughput_ratio_to_dcp_best'), '.2f')} | "
                f"{_fmt(r.get('throughput_ratio_to_dcp'), '.2f')} | "
                f"{_fmt((r.get('overhead') or 0) * 100, '+.1f', '%')} | "
                f"{_fmt(r.get('overhead_ratio_to_dcp_best'), '.2f')} | "
                f"{_fmt(r.get('cpu_s_per_gb_background'), '.2f')} | "
                f"{_fmt(r.get('cpu_background_ratio_to_dcp_best'), '.2f')} | "
                f"{_fmt(r.get('minflt_per_save_background'), '.0f')} |")
    lines += ["", "## Host memory", "",
              f"Peak host memory above the no-checkpoint run, {HEADLINE} against the lower of "
              "the DCP-best rows plus one copy of the state (the target), each as its peak of "
              "shared memory (the machine's shared memory in use above the run's start: host "
              "blocks, shared-memory staging; in parentheses, the peak of AsymCheck's own host "
              "tier, which counts no other method's segments) + its peak of resident "
              "memory above the no-checkpoint run's. A process checkpointer's "
              "worker process counts in its resident memory. A row's figure is the highest "
              "of its rounds (each round's is in the JSON, `peak_host_bytes_by_round`). The "
              "resident part moves by 10-30 MB between two runs of the same method "
              "(training's own allocations), up to half a state here; "
              "`benchmarks/memory.py` measures the checkpointers' own memory without "
              "training (its section below).", ""]
    lines += memory_lines(results)
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failed]
    lines += ["", "## Where AsymCheck (asym+S+O) does worse", "",
              "Against the DCP rows and torch.save+fsync in the same run, beyond a noise "
              "allowance of 5% (throughput) or 10% (the rest); the peers' figures in "
              "parentheses. Peak host memory varies by a few tens of MB from run to run.", ""]
    notes = losses(results)
    lines += [f"- {n}" for n in notes] or ["- nowhere, in this run."]
    obs = observations(results)
    if obs:
        lines += ["", "## Observations", ""] + [f"- {o}" for o in obs]
    lines += ["", "## Per model", ""]
    for res in results:
        lines += [f"### {res['model']}", "",
                  f"{res['params'] / 1e6:.1f} M parameters, {res['state_bytes'] / 1e6:.0f} MB "
                  f"of state, config `{json.dumps(res['config'])}`, {res['device']}, "
                  f"{res['seconds']:.0f} s. ![{res['model']}](suite-{res['model']}.png)", ""]
        for rn in res["runs"]:
            rounds = rn.get("rounds", 1)
            lines += [f"Checkpoint every {rn['every']} iteration(s): {rn['warmup']} warm-up + "
                      f"{rn['iterations']} timed iterations"
                      + (f", {rounds} rounds interleaved (pooled)." if rounds > 1 else ".")
                      + "", "",
                      "| method | it/s | vs none | it/s (mean) | stall med | stall p90 "
                      "| durable med | MB/ckpt | peak MB over none | CPU-s/GB | faults/save "
                      "| bg CPU-s/GB | bg faults/save "
                      "| restore host | restore local | notes | exact |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rn["methods"]:
                rs = r.get("restore_s", {})
                notes_ = []
                if r.get("local_ratio"):
                    notes_.append(f"ratio {r['local_ratio']:.2f}x")
                if r.get("local_batch_bytes_median"):
                    notes_.append(f"batch {r['local_batch_bytes_median'] / 1e6:.1f} MB")
                if "residual_bytes_median" in r and r["method"] != "naive":
                    notes_.append(f"residual {r['residual_bytes_median'] / 1e6:.1f} MB")
                if r.get("drain_s") is not None:
                    notes_.append(f"drain {r['drain_s']:.2f} s")
                none = r["method"] == "no checkpoint"
                lines.append(
                    f"| {r['method']} | {r['throughput_it_s']:.2f} | "
                    f"{_fmt(r.get('throughput_rel'), '.3f')} | "
                    f"{_fmt(r.get('throughput_mean_it_s'), '.2f')} | "
                    f"{NA if none else _fmt(r['stall_s_median'] * 1e3, '.1f', ' ms')} | "
                    f"{NA if none else _fmt(r['stall_s_p90'] * 1e3, '.1f', ' ms')} | "
                    f"{_fmt(r.get('durable_s_median'), '.2f', ' s')} | "
                    f"{_mb(r.get('stored_bytes_median'))} | "
                    f"{NA if none else _mb(r.get('peak_host_bytes_over_baseline'))} | "
                    f"{NA if none else _fmt(r.get('cpu_s_per_gb'), '.2f')} | "
                    f"{NA if none else _fmt(r.get('minflt_per_save'), '.0f')} | "
                    f"{NA if none else _fmt(r.get('cpu_s_per_gb_background'), '.2f')} | "
                    f"{NA if none else _fmt(r.get('minflt_per_save_background'), '.0f')} | "
                    f"{_fmt(rs.get('host'), '.2f', ' s')} | {_fmt(rs.get('local'), '.2f', ' s')}"
                    f" | {', '.join(notes_) or NA} | "
                    f"{NA if none else ('yes' if r['verified_bit_exact'] else 'NO')} |")
            lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines + appended_sections(path)) + "\n")
    return path


def appended_sections(path: Path) -> list[str]:
    """The sections other benchmarks added after the suite's own (they follow its figures),
    kept when the suite rewrites the report."""
    if not path.exists():
        return []
    old = path.read_text().splitlines()
    figures = next((i for i, line in enumerate(old) if line == "## Figures"), None)
    if figures is None:
        return []
    start = next((i for i in range(figures + 1, len(old)) if old[i].startswith("## ")), None)
    return [] if start is None else old[start:]


# ------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--every", default="1,10", help="checkpoint frequencies (default 1,10)")
    p.add_argument("--iterations", default=None,
                   help="timed iterations per frequency (default 8 for every 1, 3 checkpoint "
                        "periods otherwise)")
    p.add_argument("--methods", default=None, help=f"a subset of: {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of every method, interleaved, the order reversed every other "
                        "round; a row pools its rounds (default 2)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply model widths (parameters grow about as its square)")
    p.add_argument("--preset", choices=["cpu", "gpu-1b"], default="cpu",
                   help="model sizes: cpu (tens of MB of state) or gpu-1b (~1 B parameters)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="override one size, e.g. gpt2.layers=24 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--host-states", type=float, default=None,
                   help="AsymCheck host tier budget in checkpoints (default 5; 3 with gpu-1b)")
    p.add_argument("--host-keep", type=int, choices=[0, 1], default=1,
                   help="AsymCheck host tier keep: 1 holds the newest checkpoint beside the "
                        "save being staged, 0 lets the next save take its block (default 1)")
    p.add_argument("--run-timeout", type=float, default=600,
                   help="seconds one method's run may take before the model's process is "
                        "ended with every thread's stack printed (default 600)")
    p.add_argument("--quick", action="store_true", help="tiny models and few iterations")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON files, REPORT.md and plots go (default: "
                        "benchmarks/results; with --quick a tmp dir)")
    p.add_argument("--report-only", action="store_true",
                   help="write REPORT.md and the plots from existing JSON files")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one model in-process
    args = p.parse_args(argv)
    args.every = [int(x) for x in str(args.every).split(",")]
    if args.iterations is None:
        args.iterations = [8 if e == 1 else 3 * e for e in args.every]
    else:
        args.iterations = [int(x) for x in str(args.iterations).split(",")]
    if len(args.iterations) != len(args.every):
        p.error("--iterations needs one count per --every frequency")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.quick:
        args.scale = min(args.scale, 0.25)
        args.rounds = 1
        args.iterations = [min(n, 2 * e) for n, e in zip(args.iterations, args.every,
                                                          strict=True)]
    if args.host_states is None:
        args.host_states = 3.0 if args.preset == "gpu-1b" else 5.0
    if args.methods:
        args.methods = method_names(p, args.methods, METHODS)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    parse_sets(args.set)
    if args.out_dir is None:  # a smoke run never replaces the real results
        args.out_dir = (tempfile.mkdtemp(prefix="asymcheck-suite-quick-") if args.quick
                        else str(RESULTS))
    out_dir = Path(args.out_dir)

    if args.one:
        run_model(args, args.one)
        return 0
    if args.report_only:
        results = load_results(out_dir, models)
        if not results:
            p.error(f"no suite-<model>.json in {out_dir}")
        meta_path = out_dir / "suite-run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        print(f"wrote {write_report(results, out_dir, meta.get('total_s'), meta.get('argv', []))}")
        return 0

    t0 = time.perf_counter()
    child_args = [a for a in argv if a != "--report-only"] + ["--out-dir", str(out_dir)]
    failed = []
    for model in models:
        # one process per model: a clean heap, so peak-memory figures do not carry over
        cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, "--one", model]
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if rc != 0:
            failed.append(model)
            print(f"== {model}: FAILED (exit {rc})", flush=True)
    total = time.perf_counter() - t0
    results = load_results(out_dir, [m for m in models if m not in failed])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite-run.json").write_text(json.dumps(
        {"argv": argv, "total_s": total, "models": models, "failed": failed}, indent=1))
    if results:
        report = write_report(results, out_dir, total, argv)
        print(f"wrote {report}")
    print(f"total time: {total:.0f} s ({total / 60:.1f} min) for {len(models)} model(s)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
