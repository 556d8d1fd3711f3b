"""The S3 tier against raw pyarrow writes, and time to durable on S3 with compression off/auto.

Against a running S3 server (``scripts/seaweedfs.sh start``: SeaweedFS on loopback; its
``ASYMCHECK_TEST_S3`` URL and ``AWS_*`` credentials in the environment), in one process run:

1. put throughput: the same bytes written as objects of one size class by ``ArrowFsTier.put``
   and by raw pyarrow (``S3FileSystem.open_output_stream`` + ``write`` + ``close`` on a file
   system opened from the same URI), one put at a time, then ``concurrent_puts`` at a time
   (the flush pipeline's pattern; raw pyarrow from as many threads). Two size classes: 64 MB
   objects, and a mix of small ones (4 KiB to 2 MiB, log-uniform). Rounds alternate which
   writer goes first; the ratio is tier / raw of the median rates (target >= 0.8).
2. time to durable: a GPT-2 sized training state (GPT-2 small, 124M parameters, AdamW: about
   1.5 GB) saved by ``asymcheck.Checkpointer`` with a policy of host + s3, one training step
   between saves, ``[compression] mode = "off"`` against ``"auto"`` (modes alternate by
   round). Time to durable: from the save call until the checkpoint is committed on S3.

Prints the figures; writes benchmarks/results/s3_throughput.json.

    python benchmarks/s3_throughput.py            # ~10 minutes on 2 cores
    python benchmarks/s3_throughput.py --quick    # small objects and a small model: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs as pafs
from harness import make_workload, model_config

import asymcheck
from asymcheck.policy import CompressionPolicy, Policy, TierPolicy
from tiers.arrowfs import ArrowFsTier
from tiers.base import redact_url
from tiers.host import HostTier
from tiers.registry import open_tier

RESULTS = Path(__file__).resolve().parent / "results"
MB = 10**6


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def _summary(nbytes: int, times: list[float]) -> dict[str, Any]:
    rates = [_rate(nbytes, t) for t in times]
    return {"seconds": times, "mb_per_s": rates, "mb_per_s_median": statistics.median(rates)}


# ------------------------------------------------------------------------ put throughput


def _objects(kind: str, quick: bool) -> list[bytes]:
    rng = random.Random(7)
    if kind == "64MB":
        block = os.urandom(1 << 20)
        return [(block * 64)[: 64 * MB] for _ in range(2 if quick else 4)]
    sizes = [int(2 ** rng.uniform(12, 21)) for _ in range(40 if quick else 160)]
    pool = os.urandom(max(sizes))
    return [pool[:n] for n in sizes]


def _raw_fs(url: str) -> tuple[Any, str]:
    fs, path = pafs.FileSystem.from_uri(url)
    return fs, path.strip("/")


def _raw_put(fs: Any, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _raw_round(fs: Any, base: str, objects: list[bytes], width: int) -> float:
    t0 = time.perf_counter()
    if width == 1:
        for i, data in enumerate(objects):
            _raw_put(fs, f"{base}/o-{i:05d}", data)
    else:
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            list(pool.map(lambda a: _raw_put(fs, f"{base}/o-{a[0]:05d}", a[1]),
                          enumerate(objects)))
    return time.perf_counter() - t0


async def _tier_round(tier: ArrowFsTier, prefix: str, objects: list[bytes], width: int) -> float:
    t0 = time.perf_counter()
    if width == 1:
        for i, data in enumerate(objects):
            await tier.put(f"{prefix}/o-{i:05d}", data)
    else:
        gate = asyncio.Semaphore(width)

        async def one(i: int, data: bytes) -> None:
            async with gate:
                await tier.put(f"{prefix}/o-{i:05d}", data)
        await asyncio.gather(*(one(i, d) for i, d in enumerate(objects)))
    return time.perf_counter() - t0


def put_throughput(url: str, rounds: int, quick: bool) -> dict[str, Any]:
    fs, base = _raw_fs(url)
    tier = open_tier(url, name="s3", timeout_s=120)
    assert isinstance(tier, ArrowFsTier)
    out: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(tier.list())  # opens the file system (one HEAD of the bucket)
        for kind in ("64MB", "small-mix"):
            objects = _objects(kind, quick)
            nbytes = sum(map(len, objects))
            for width in (1, tier.concurrent_puts):
                times: dict[str, list[float]] = {"raw": [], "tier": []}
                for r in range(rounds):
                    order = ("raw", "tier") if r % 2 == 0 else ("tier", "raw")
                    for who in order:
                        prefix = f"put-{kind}-{width}-{r}-{who}"
                        if who == "raw":
                            times[who].append(_raw_round(fs, f"{base}/{prefix}", objects,
                                                         width))
                        else:
                            times[who].append(loop.run_until_complete(
                                _tier_round(tier, prefix, objects, width)))
                        loop.run_until_complete(tier.delete_prefix(prefix + "/"))
                row = {who: _summary(nbytes, t) for who, t in times.items()}
                row["ratio_tier_over_raw"] = (row["tier"]["mb_per_s_median"]
                                              / row["raw"]["mb_per_s_median"])
                row.update(objects=len(objects), bytes=nbytes)
                out[f"{kind}, {width} in flight"] = row
                print(f"  {kind:<10} {width} in flight: raw {row['raw']['mb_per_s_median']:7.1f}"
                      f" MB/s, tier {row['tier']['mb_per_s_median']:7.1f} MB/s, ratio "
                      f"{row['ratio_tier_over_raw']:.3f}  ({len(objects)} objects, "
                      f"{nbytes / MB:.0f} MB, {rounds} rounds)", flush=True)
    finally:
        loop.run_until_complete(tier.close())
        loop.close()
    return out


# ---------------------------------------------------------------------- time to durable


def time_to_durable(url: str, rounds: int, saves: int, quick: bool) -> dict[str, Any]:
    cfg = (model_config("gpt2") if quick else
           model_config("gpt2", layers=12, width=768, vocab=50257, seq=128, batch=2))
    w = make_workload("gpt2", seed=0, **cfg)
    for i in range(2):  # AdamW moments exist and moved
        w.loss(i).backward()
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
    state_bytes = w.checkpoint_bytes
    print(f"  GPT-2 {cfg['layers']} layers x {cfg['width']}, vocab {cfg['vocab']}: "
          f"{w.params / 1e6:.0f}M parameters, {state_bytes / MB:.0f} MB of state", flush=True)
    out: dict[str, Any] = {"model": cfg, "params": w.params, "state_bytes": state_bytes}
    times: dict[str, list[list[float]]] = {"off": [], "auto": []}
    stored: dict[str, list[list[int]]] = {"off": [], "auto": []}
    step = 0
    for r in range(rounds):
        for mode in (("off", "auto") if r % 2 == 0 else ("auto", "off")):
            run = uuid.uuid4().hex[:10]
            policy = Policy(tiers=(
                TierPolicy(name="host", url=f"shm://asymcheck-s3bench-{run}",
                           capacity_bytes=3 * state_bytes + (256 << 20), keep=1),
                TierPolicy(name="s3", url=_below(url, f"durable-{run}"), keep=2,
                           options={"timeout_s": 300})),
                compression=CompressionPolicy(mode=mode), source="<s3_throughput>")
            per_save: list[float] = []
            per_stored: list[int] = []
            with asymcheck.Checkpointer(w.model, w.optimizer, policy=policy,
                                        mode="naive") as ckpt:
                for _ in range(saves):
                    w.loss(step).backward()
                    w.optimizer.step()
                    w.optimizer.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    handle = ckpt.save_sync(step)
                    handle.durable("s3").wait(900)
                    per_save.append(time.perf_counter() - t0)
                    per_stored.append(int(handle.metrics.get("s3.stored_bytes", 0)))
                    step += 1
            times[mode].append(per_save)
            stored[mode].append(per_stored)
            print(f"  round {r} mode {mode:<4}: durable " +
                  ", ".join(f"{t:.2f}" for t in per_save) + " s; stored " +
                  ", ".join(f"{b / MB:.0f}" for b in per_stored) + " MB", flush=True)
            asyncio.run(_cleanup(policy))
    for mode in times:
        flat = [t for run in times[mode] for t in run]
        first = [run[0] for run in times[mode]]
        later = [t for run in times[mode] for t in run[1:]]
        out[mode] = {"seconds": times[mode], "stored_bytes": stored[mode],
                     "median_s": statistics.median(flat),
                     "first_save_median_s": statistics.median(first),
                     "later_saves_median_s": statistics.median(later) if later else None,
                     "stored_bytes_median": statistics.median(
                         [b for run in stored[mode] for b in run])}
    out["ratio_auto_over_off"] = out["auto"]["median_s"] / out["off"]["median_s"]
    return out


def _below(url: str, name: str) -> str:
    """``url`` with ``/name`` appended to its path (its query string kept)."""
    head, sep, query = url.partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


async def _cleanup(policy: Policy) -> None:
    host = open_tier(policy.tiers[0].url)
    assert isinstance(host, HostTier)
    await host.destroy()
    async with open_tier(policy.tiers[1].url) as s3:
        await s3.delete_prefix("")


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--s3", default=os.environ.get("ASYMCHECK_TEST_S3"),
                   help="s3://bucket/prefix?endpoint_override=... (default $ASYMCHECK_TEST_S3)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the put comparison")
    p.add_argument("--durable-rounds", type=int, default=2)
    p.add_argument("--saves", type=int, default=2, help="saves per durable round")
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--out", default=str(RESULTS / "s3_throughput.json"))
    args = p.parse_args(argv)
    if not args.s3:
        p.error("no S3: pass --s3 or start scripts/seaweedfs.sh and export its lines")
    if args.quick:
        args.rounds, args.durable_rounds, args.saves = 2, 1, 2
    run_id = uuid.uuid4().hex[:10]
    url = _below(args.s3, f"bench-{run_id}")
    load_at_start = os.getloadavg()
    print(f"S3 {redact_url(url)}; {os.cpu_count()} cores, load {load_at_start[0]:.2f}",
          flush=True)
    t0 = time.perf_counter()
    print("put throughput (MB = 10^6 bytes)", flush=True)
    puts = put_throughput(url, args.rounds, args.quick)
    print("time to durable", flush=True)
    durable = time_to_durable(url, args.durable_rounds, args.saves, args.quick)
    print(f"  median durable: off {durable['off']['median_s']:.2f} s, auto "
          f"{durable['auto']['median_s']:.2f} s (ratio auto/off "
          f"{durable['ratio_auto_over_off']:.3f}); stored per save: off "
          f"{durable['off']['stored_bytes_median'] / MB:.0f} MB, auto "
          f"{durable['auto']['stored_bytes_median'] / MB:.0f} MB", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "pyarrow": importlib.metadata.version("pyarrow"),
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "server": "SeaweedFS (weed server: master + volume + filer + S3), loopback, same machine",
        "s3": redact_url(url), "quick": args.quick, "rounds": args.rounds,
        "minutes": (time.perf_counter() - t0) / 60,
        "put_throughput": puts, "time_to_durable": durable,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
