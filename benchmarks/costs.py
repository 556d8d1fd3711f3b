"""What a method costs beyond training, from one run's rows: CPU seconds per GB checkpointed
and minor page faults per save, over every thread of the process and its child processes net
of the no-checkpoint row measured in the same process run; and the background part alone, the
threads and processes that the no-checkpoint row does not have (a checkpointer's threads,
a peer's checkpoint process). Training's own CPU and faults move by more between two
identical runs than a checkpointer spends, so the background figures are the steadier ones;
they leave out what a method does on the training thread (its stall)."""

from __future__ import annotations

from typing import Any

from cpumeter import CHILDREN, ENDED

DCP_BEST = ("DCP-best thread", "DCP-best process")


def add_cpu_cost(row: dict[str, Any], baseline: dict[str, Any], state_bytes: int) -> None:
    """Add ``cpu_s_per_gb``, ``minflt_per_save``, ``cpu_s_by_thread`` and the background
    ``cpu_s_per_gb_background`` and ``minflt_per_save_background`` to ``row``."""
    saves = max(1, int(row.get("timed_checkpoints", 0)))
    gb = saves * state_bytes / 1e9
    cpu, base = row["cpu"], baseline["cpu"]
    # the no-checkpoint row ran the same iterations: per iteration, scaled to this row's count
    scale = len(row["iteration_s_all"]) / max(1, len(baseline["iteration_s_all"]))
    extra_cpu_s = cpu["total_cpu_s"] - base["total_cpu_s"] * scale
    extra_faults = cpu["total_minflt"] - base["total_minflt"] * scale
    row["cpu_s_per_gb"] = extra_cpu_s / gb
    row["minflt_per_save"] = extra_faults / saves
    row["cpu_s_by_thread"] = row["cpu_training"]["cpu_s"]  # the timed iterations, by thread
    training = set(base["cpu_s"]) - {ENDED, CHILDREN}
    row["cpu_s_per_gb_background"] = sum(
        v for g, v in cpu["cpu_s"].items() if g not in training) / gb
    row["minflt_per_save_background"] = sum(
        v for g, v in cpu["minflt"].items() if g not in training) / saves


def overhead(row: dict[str, Any], baseline: dict[str, Any]) -> float:
    """A row's overhead over the no-checkpoint row: its median checkpoint period (throughput)
    against the baseline's, which holds the saving iteration at any ``every``."""
    return float(baseline["throughput_it_s"] / row["throughput_it_s"] - 1)


def best_dcp(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The better of the DCP-best rows (the higher throughput: the shorter median checkpoint
    period, which holds the saving iteration; a median iteration would leave it out at every
    10), the headline's reference."""
    found = [r for r in rows if r["method"] in DCP_BEST]
    if not found:
        raise ValueError(f"no DCP-best row among {[r['method'] for r in rows]}")
    return max(found, key=lambda r: r["throughput_it_s"])
