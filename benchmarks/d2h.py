"""Device-to-host copies into a shared-memory host block: pageable versus page-locked.

Measures, for one block of ``--mib`` MiB on /dev/shm (the host tier's memory):
how long the calling thread is blocked by a ``non_blocking`` copy (the training thread, when a
snapshot partition is launched in a forward or backward window), the copy's own time, and the
cost of cudaHostRegister / cudaHostUnregister, which the checkpointer pays on a spare block
off the training thread; a buffer from cudaHostAlloc is the bandwidth reference.
Writes benchmarks/results/d2h.json.

    python benchmarks/d2h.py --mib 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from asymcheck.copier import pin_memory
from tiers.host import HostTier

RESULTS = Path(__file__).resolve().parent / "results"


def _copy_times(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median (thread blocked, copy done) seconds of ``dst.copy_(src, non_blocking=True)``."""
    blocked, total = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        blocked.append(t1 - t0)
        total.append(t2 - t0)
    return statistics.median(blocked), statistics.median(total)


async def measure(nbytes: int, repeats: int) -> dict[str, float]:
    host = HostTier(f"shm://d2h-{os.getpid()}", capacity_bytes=2 * nbytes)
    try:
        block = await host.reserve("block.bin", nbytes)
        dst = torch.frombuffer(block.view, dtype=torch.uint8)
        dst.fill_(0)  # fault the pages in, as a reused pooled block has them
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        res: dict[str, float] = {"bytes": nbytes}
        res["pageable_blocked_s"], res["pageable_copy_s"] = _copy_times(dst, src, repeats)
        t0 = time.perf_counter()
        unregister = pin_memory(block.view)
        res["register_s"] = time.perf_counter() - t0
        if unregister is None:
            raise SystemExit("cudaHostRegister failed on a shared-memory block")
        res["pinned_blocked_s"], res["pinned_copy_s"] = _copy_times(dst, src, repeats)
        # the reference: a buffer from the CUDA host allocator (cudaHostAlloc)
        ref = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        res["hostalloc_blocked_s"], res["hostalloc_copy_s"] = _copy_times(ref, src, repeats)
        del ref
        if not torch.equal(dst[: 1 << 20], src[: 1 << 20].cpu()):
            raise SystemExit("the pinned copy's bytes differ")
        t0 = time.perf_counter()
        unregister()
        res["unregister_s"] = time.perf_counter() - t0
        del dst
        await block.abort()
        return res
    finally:
        await host.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "d2h.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("d2h.py needs a CUDA device", file=sys.stderr)
        return 2
    res = asyncio.run(measure(args.mib << 20, args.repeats))
    gb = res["bytes"] / 1e9
    print(f"{torch.cuda.get_device_name()}: {args.mib} MiB into /dev/shm, median of "
          f"{args.repeats}")
    for kind in ("pageable", "pinned", "hostalloc"):
        print(f"  {kind:9s} thread blocked {res[f'{kind}_blocked_s'] * 1e3:8.2f} ms   copy "
              f"{res[f'{kind}_copy_s'] * 1e3:8.2f} ms = {gb / res[f'{kind}_copy_s']:6.2f} GB/s")
    print(f"  page-locked shared memory / cudaHostAlloc bandwidth = "
          f"{res['hostalloc_copy_s'] / res['pinned_copy_s']:.2f}")
    print(f"  cudaHostRegister {res['register_s'] * 1e3:.1f} ms, "
          f"cudaHostUnregister {res['unregister_s'] * 1e3:.1f} ms")
    res["device"] = torch.cuda.get_device_name()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
