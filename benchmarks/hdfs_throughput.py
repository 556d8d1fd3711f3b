"""Write throughput of the HDFS tier next to the local tier's, for one checkpoint of --size bytes.

Against a running HDFS (``export "$(bash scripts/minidfs.sh start)"``: MiniDFS, one DataNode,
loopback), in one process run:

1. tier puts: the checkpoint's bytes as batch files of --batch bytes, one put in flight (the
   flush scheduler's pattern), to ``LocalTier`` (tmp + fsync + rename: what local commits
   cost), to ``LocalTier`` without fsync, and to ``HdfsTier``. A put to HDFS returns when the
   DataNode acknowledged the bytes (in its memory, no fsync), so the no-fsync local figure is
   the like-for-like one; the fsync one is what the local tier really pays.
2. checkpoint flush: ``asymcheck.Checkpointer`` (naive mode, compression off) with a policy of
   host + local + hdfs; the time from "staged" (in shared memory) to "durable" on each tier.
   Both tiers flush at once, as in training, and share the CPU and the disk (the DataNode
   stores its blocks on this machine's disk), so each tier also runs alone (host + that tier).

Prints GB/s (10^9 bytes per second) per target and the HDFS/local ratios; writes
benchmarks/results/hdfs_throughput.json. Dirty pages are synced between runs.

    python benchmarks/hdfs_throughput.py            # 1 GiB: 8 tensors of 128 MiB, ~2 minutes
    python benchmarks/hdfs_throughput.py --quick    # 64 MiB, one repeat: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asymcheck
from asymcheck.policy import Policy, TierPolicy, parse_size
from tiers.base import Tier
from tiers.host import HostTier
from tiers.registry import open_tier

RESULTS = Path(__file__).resolve().parent / "results"
TENSOR_BYTES = 128 << 20


def _settle() -> None:
    """Write back dirty pages of the previous run, so it does not slow the next one."""
    os.sync()
    time.sleep(0.5)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _summary(nbytes: int, times: list[float]) -> dict[str, Any]:
    rates = [_gbps(nbytes, t) for t in times]
    return {"seconds": times, "gbps": rates, "gbps_median": statistics.median(rates),
            "gbps_best": max(rates)}


# ------------------------------------------------------------------------- tier puts


async def _put_all(tier: Tier, prefix: str, payload: memoryview, batch: int) -> float:
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, payload.nbytes, batch)):
        await tier.put(f"{prefix}/data-{i:05d}.bin", payload[start:start + batch])
    return time.perf_counter() - t0


async def _tier_puts(targets: dict[str, Tier], payload: memoryview, batch: int,
                     repeats: int) -> dict[str, dict[str, Any]]:
    times: dict[str, list[float]] = {name: [] for name in targets}
    for r in range(repeats):
        for name, tier in targets.items():  # interleaved, so drift hits every target alike
            _settle()
            times[name].append(await _put_all(tier, f"put-{r}", payload, batch))
            await tier.delete_prefix(f"put-{r}/")
            print(f"  tier put   {name:<14} {_gbps(payload.nbytes, times[name][-1]):6.3f} GB/s",
                  flush=True)
    return {name: _summary(payload.nbytes, t) for name, t in times.items()}


# ------------------------------------------------------------------ checkpoint flush


class _State(torch.nn.Module):
    """``size`` bytes of float32 buffers of at most 128 MiB each."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        left, i = size, 0
        while left > 0:
            n = min(TENSOR_BYTES, left)
            self.register_buffer(f"t{i}", torch.rand(n // 4, generator=g))
            left, i = left - n, i + 1


def _flush_times(policy: Policy, model: torch.nn.Module, tiers: list[str],
                 repeats: int) -> dict[str, list[float]]:
    """Seconds from staged to durable on each tier, per save."""
    out: dict[str, list[float]] = {t: [] for t in tiers}
    with asymcheck.Checkpointer(model, None, policy=policy, mode="naive") as ckpt:
        for step in range(repeats):
            _settle()
            handle = ckpt.save_sync(step)
            handle.staged.wait(600)
            staged = time.perf_counter()
            done: dict[str, float] = {}

            def wait(tier: str, handle: asymcheck.SaveHandle = handle,
                     done: dict[str, float] = done) -> None:
                handle.durable(tier).wait(600)
                done[tier] = time.perf_counter()
            threads = [threading.Thread(target=wait, args=(t,)) for t in tiers]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            missing = [t for t in tiers if t not in done]
            if missing:
                handle.wait_all_sync(1)  # raises the tier's error
                raise RuntimeError(f"step {step} never became durable on {missing}")
            for t in tiers:
                out[t].append(done[t] - staged)
            batches = {t: handle.metrics.get(f"{t}.batch_bytes") for t in tiers}
            print(f"  checkpoint {'+'.join(tiers):<14} " + "  ".join(
                f"{t} {_gbps(model_bytes(model), out[t][-1]):6.3f} GB/s "
                f"(batch {batches[t] or 0:,} B)" for t in tiers), flush=True)
    return out


def model_bytes(model: torch.nn.Module) -> int:
    return sum(b.nbytes for b in model.buffers())


def _policy(tiers: dict[str, TierPolicy], names: list[str], host_url: str,
            capacity: int) -> Policy:
    host = TierPolicy(name="host", url=host_url, capacity_bytes=capacity, keep=1)
    return Policy(tiers=(host, *(tiers[n] for n in names)), source="<hdfs_throughput>")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1GiB", help="checkpoint size (default 1GiB)")
    p.add_argument("--batch", default="128MiB", help="file size of the tier puts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hdfs", default=os.environ.get("ASYMCHECK_TEST_HDFS"),
                   help="hdfs://host:port of the cluster (default $ASYMCHECK_TEST_HDFS)")
    p.add_argument("--chunk", default="8MiB", help="HdfsTier chunk_bytes (bytes per call)")
    p.add_argument("--workdir", default=None, help="local tier directory (default: a tmp dir)")
    p.add_argument("--quick", action="store_true", help="64 MiB, one repeat: a smoke run")
    p.add_argument("--out", default=str(RESULTS / "hdfs_throughput.json"))
    args = p.parse_args(argv)
    if not args.hdfs:
        p.error('no HDFS: pass --hdfs or export "$(bash scripts/minidfs.sh start)"')
    if args.quick:
        args.size, args.repeats = "64MiB", 1
    size, batch, chunk = parse_size(args.size), parse_size(args.batch), parse_size(args.chunk)
    run_id = uuid.uuid4().hex[:10]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="asymcheck-hdfs-bench-"))
    hdfs_url = f"{args.hdfs.rstrip('/')}/bench-{run_id}"
    host_url = f"shm://asymcheck-bench-{run_id}"
    print(f"{size / 2**30:.2f} GiB checkpoint; tier puts of {batch / 2**20:.0f} MiB files; "
          f"{args.repeats} repeat(s); HDFS {hdfs_url} (chunk {chunk >> 20} MiB); "
          f"local {work}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)

    load_at_start = os.getloadavg()
    payload = memoryview(bytearray(size))
    block = os.urandom(1 << 20)  # incompressible; nothing compresses here anyway
    for start in range(0, size, len(block)):
        payload[start:start + len(block)] = block[:size - start]
    targets: dict[str, Tier] = {
        "local": open_tier((work / "put-fsync").as_uri(), name="local"),
        "local-nofsync": open_tier((work / "put-nofsync").as_uri(), name="local-nofsync",
                                   fsync=False),
        "hdfs": open_tier(f"{hdfs_url}/put", name="hdfs", chunk_bytes=chunk),
    }
    tier_policies = {
        "local": TierPolicy(name="local", url=(work / "ckpt").as_uri(), keep=1),
        "hdfs": TierPolicy(name="hdfs", url=f"{hdfs_url}/ckpt", keep=1,
                           options={"chunk_bytes": chunk}),
    }
    results: dict[str, Any] = {}
    try:
        print("tier puts", flush=True)
        results["tier_put"] = asyncio.run(_tier_puts(targets, payload, batch, args.repeats))
        del payload
        print("checkpoint flush", flush=True)
        model = _State(size)
        capacity = 4 * size + (64 << 20)  # the staged copy, a spare block, headroom
        flush: dict[str, dict[str, Any]] = {}
        for names in (["local", "hdfs"], ["local"], ["hdfs"]):
            times = _flush_times(_policy(tier_policies, names, host_url, capacity), model,
                                 names, args.repeats)
            for t in names:
                key = f"{t} ({'with ' + '+'.join(n for n in names if n != t)})" \
                    if len(names) > 1 else f"{t} (alone)"
                flush[key] = _summary(size, times[t])
        results["checkpoint_flush"] = flush
    finally:
        async def cleanup() -> None:
            for tier in targets.values():
                await tier.close()
            async with open_tier(hdfs_url) as hdfs:
                await hdfs.delete_prefix("")
            host = open_tier(host_url)
            assert isinstance(host, HostTier)
            await host.destroy()
        asyncio.run(cleanup())
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    puts, fl = results["tier_put"], results["checkpoint_flush"]
    ratios = {
        "tier_put hdfs / local": puts["hdfs"]["gbps_median"] / puts["local"]["gbps_median"],
        "tier_put hdfs / local-nofsync":
            puts["hdfs"]["gbps_median"] / puts["local-nofsync"]["gbps_median"],
        "flush hdfs / local (together)":
            fl["hdfs (with local)"]["gbps_median"] / fl["local (with hdfs)"]["gbps_median"],
        "flush hdfs / local (alone)":
            fl["hdfs (alone)"]["gbps_median"] / fl["local (alone)"]["gbps_median"],
    }
    print(f"\n{'':<34}{'median GB/s':>12}{'best GB/s':>11}")
    for section, rows in (("tier put", puts), ("checkpoint flush", fl)):
        for name, row in rows.items():
            print(f"{section + ' ' + name:<34}{row['gbps_median']:>12.3f}"
                  f"{row['gbps_best']:>11.3f}")
    for name, ratio in ratios.items():
        print(f"ratio {name:<34}{ratio:>6.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "hdfs_native": importlib.metadata.version("hdfs-native"),
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "hdfs": "MiniDFSCluster, 1 DataNode, replication 1, loopback",
        "size_bytes": size, "put_batch_bytes": batch, "hdfs_chunk_bytes": chunk,
        "repeats": args.repeats, "quick": args.quick, **results, "ratios": ratios,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
