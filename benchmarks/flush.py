"""Local-tier flush throughput versus raw sequential write + fsync of the same bytes.

Side by side in one process run, on the same disk:
  raw      a plain loop of large os.write calls + fsync (the disk's own figure);
  raw+sync the same loop with an fsync every 128 MiB, a stronger reference where one final
           fsync lets the page cache fill until writers are throttled;
  shapes   (a) 8 large tensors, (b) 20,000 tensors of 4-64 KiB;
  flush    the local tier's flush of each state, batched (B* from the cost model),
           unbatched (one file per tensor) and, with --batch-sizes, in batches of fixed
           sizes, timed from the host commit to durable.
The kinds of writes alternate for --rounds rounds (the order rotates), since this kind
of disk's bandwidth drifts from minute to minute; the fraction of raw is the median over
rounds of flush / raw measured in the same round (and likewise for raw+sync). Writes
benchmarks/results/flush.json.

    python benchmarks/flush.py                # 1 GiB of state
    python benchmarks/flush.py --size 64MiB   # a quick run
    python benchmarks/flush.py --batch-sizes 4MiB,16MiB,64MiB   # B* beside fixed sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import work_dir

import asymcheck
from asymcheck.policy import parse_size

RESULTS = Path(__file__).resolve().parent / "results"


class TensorBag:
    """A state of plain tensors (anything with state_dict/load_state_dict is checkpointed)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = state


def shapes(total: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    large = {f"large{i}": torch.randn(total // 8 // 4, generator=g) for i in range(8)}
    small: dict[str, torch.Tensor] = {}
    sizes = torch.randint(4 << 10, (64 << 10) + 1, (20_000,), generator=g)
    scale = min(1.0, total / float(sizes.sum()))
    for i, n in enumerate(sizes.tolist()):
        small[f"small{i:05d}"] = torch.randn(max(1, int(n * scale) // 4), generator=g)
    return {"8 large tensors": large, "20k small tensors": small}


def raw_write_gbps(directory: Path, nbytes: int, block: int = 8 << 20,
                   sync_every: int | None = None) -> float:
    buf = os.urandom(block)
    path = directory / f"raw-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = synced = 0
        while written < nbytes:
            written += os.write(fd, buf[:min(block, nbytes - written)])
            if sync_every is not None and written - synced >= sync_every:
                os.fsync(fd)
                synced = written
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds / 1e9


class Flusher:
    """A checkpointer whose local tier flushes ``state`` (batched or not); one save per call."""

    def __init__(self, directory: Path, state: dict[str, torch.Tensor],
                 batch: str | int) -> None:
        """``batch``: the local tier's batch size, "auto", "off" or bytes."""
        self.nbytes = sum(t.nbytes for t in state.values())
        self.work = directory / f"flush-{uuid.uuid4().hex[:8]}"
        policy = asymcheck.Policy(tiers=(
            asymcheck.TierPolicy(name="host", url=f"shm://asymcheck-bench-{self.work.name}",
                                 keep=1, capacity_bytes=4 * self.nbytes),
            asymcheck.TierPolicy(name="local", url=f"file://{self.work}", keep=1,
                                 batch_bytes=batch),
        ))
        self.ckpt = asymcheck.Checkpointer(None, None, policy=policy,
                                           extras={"state": TensorBag(state)}, mode="naive")
        self.step = 0
        self.last: asymcheck.SaveHandle | None = None
        self.flush()  # warm-up: pages faulted in, fits seeded

    def flush(self) -> float:
        """Seconds from the host commit until durable on the local tier."""
        h = self.ckpt.save_sync(self.step)
        self.step += 1
        h.staged.wait(600)
        t0 = time.perf_counter()
        h.durable("local").wait(600)
        seconds = time.perf_counter() - t0
        self.ckpt.wait_idle_sync()  # retention of the previous step, untimed
        self.last = h
        return seconds

    def close(self) -> dict[str, Any]:
        files = sum(1 for _ in self.work.rglob("*.bin"))
        host_dir = self.ckpt.host.directory
        self.ckpt.close_sync()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(host_dir, ignore_errors=True)
        m = self.last.metrics if self.last is not None else {}
        return {"files": files, "batch_bytes": m.get("local.batch_bytes"),
                "fit": m.get("local.fit")}


def _size(value: str) -> int:
    """An argparse type: a positive size with a unit ("64MiB")."""
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes(value: str) -> dict[str, int]:
    """An argparse type: comma-separated sizes, in bytes, by the size as written (row names)."""
    return {v.strip(): _size(v.strip()) for v in value.split(",") if v.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=_size, default="1GiB", help="bytes of state per shape")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of the kinds of writes per shape (order rotates)")
    p.add_argument("--dir", default=None,
                   help="a directory on the disk to measure (kept; default: a temporary one)")
    p.add_argument("--batch-sizes", type=_sizes, default={},
                   help="fixed batch sizes flushed beside B*, comma-separated (e.g. "
                        "4MiB,64MiB): rows that show how well B* picks")
    p.add_argument("--out", default=str(RESULTS / "flush.json"))
    args = p.parse_args(argv)
    fixed, total = args.batch_sizes, args.size
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    rows = []
    with work_dir("asymcheck-flush-", args.dir, parent=".") as base:
        for name, state in shapes(total).items():
            nbytes = sum(t.nbytes for t in state.values())
            flushers = {"batched": Flusher(base, state, "auto"),
                        "unbatched": Flusher(base, state, "off"),
                        **{f"batch {name}": Flusher(base, state, nbytes)
                           for name, nbytes in fixed.items()}}
            gbps: dict[str, list[float]] = {"raw": [], "raw+sync": [],
                                             **{kind: [] for kind in flushers}}
            try:
                kinds = list(gbps)
                for rnd in range(args.rounds):
                    k = rnd % len(kinds)
                    for kind in kinds[k:] + kinds[:k]:
                        if kind == "raw":
                            gbps[kind].append(raw_write_gbps(base, nbytes))
                        elif kind == "raw+sync":
                            gbps[kind].append(raw_write_gbps(base, nbytes, sync_every=128 << 20))
                        else:
                            gbps[kind].append(nbytes / flushers[kind].flush() / 1e9)
            finally:
                info = {kind: f.close() for kind, f in flushers.items()}
            for kind in flushers:
                fractions = [f / raw for f, raw in zip(gbps[kind], gbps["raw"], strict=True)]
                synced = [f / raw for f, raw in zip(gbps[kind], gbps["raw+sync"], strict=True)]
                r = {"shape": name, "batching": kind, "bytes": nbytes,
                     "gbps": statistics.median(gbps[kind]),
                     "raw_gbps": statistics.median(gbps["raw"]),
                     "raw_sync_gbps": statistics.median(gbps["raw+sync"]),
                     "fraction_of_raw": statistics.median(fractions),
                     "fraction_of_raw_sync": statistics.median(synced),
                     "rounds": {"gbps": gbps[kind], "raw_gbps": gbps["raw"],
                                "raw_sync_gbps": gbps["raw+sync"],
                                "fraction_of_raw": fractions,
                                "fraction_of_raw_sync": synced},
                     **info[kind]}
                rows.append(r)
                print(f"{name:18s} {kind:14s} {nbytes / 2**20:5.0f} MiB  "
                      f"raw {r['raw_gbps']:5.2f} GB/s  flush {r['gbps']:5.2f} GB/s  "
                      f"= {r['fraction_of_raw']:.2f} of raw "
                      f"(rounds: {', '.join(f'{x:.2f}' for x in fractions)}); "
                      f"{r['fraction_of_raw_sync']:.2f} of raw+sync "
                      f"({r['raw_sync_gbps']:.2f} GB/s; rounds: "
                      f"{', '.join(f'{x:.2f}' for x in synced)})  "
                      f"{r['files']} files, B* {r['batch_bytes']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": total, "rounds": args.rounds, "rows": rows}, indent=2,
                              default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
