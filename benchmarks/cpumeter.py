"""CPU seconds and minor page faults of every thread of this process, grouped by thread name;
the garbage collector's passes (``GcMeter``).

Read from ``/proc/self/task/<tid>/stat`` (utime + stime, minflt): training threads, the
checkpointer's loop and I/O threads, a peer's stager and writer threads all count. Python
threads are named through ``threading`` (the kernel's name for them is the process's), so a
thread's group is its Python name without a trailing counter (``asymcheck-...-io_3`` ->
``asymcheck-...-io``); threads that ended between two readings count under ``(ended)``,
from the process totals. Child processes (a peer's checkpoint process) count under
``(child processes)``: those alive from their ``/proc/<pid>/stat``, those ended and reaped
from ``getrusage(RUSAGE_CHILDREN)``, so one moving from the first to the second is counted once.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_COUNTER = re.compile(r"[_-]\d+$")
ENDED = "(ended)"
CHILDREN = "(child processes)"


def _stat(path: str) -> tuple[str, float, int] | None:
    """(kernel name, CPU seconds, minor faults) from a ``stat`` file, None if it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    # after the name: state(0) ppid pgrp session tty tpgid flags minflt(7) ... utime(11) stime(12)
    return name, (int(fields[11]) + int(fields[12])) * _TICK_S, int(fields[7])


def _group(name: str) -> str:
    return _COUNTER.sub("", name)


@dataclass
class Reading:
    cpu_s: Counter[str] = field(default_factory=Counter)
    minflt: Counter[str] = field(default_factory=Counter)
    by_tid: dict[int, str] = field(default_factory=dict)
    total_cpu_s: float = 0.0
    total_minflt: int = 0


def read() -> Reading:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out = Reading()
    for tid in os.listdir("/proc/self/task"):
        got = _stat(f"/proc/self/task/{tid}/stat")
        if got is None:
            continue
        kernel_name, cpu_s, minflt = got
        group = _group(names.get(int(tid), kernel_name))
        out.by_tid[int(tid)] = group
        out.cpu_s[f"{tid}:{group}"] = cpu_s
        out.minflt[f"{tid}:{group}"] = minflt
    total = _stat("/proc/self/stat")
    if total is not None:
        out.total_cpu_s, out.total_minflt = total[1], total[2]
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu_s, child_minflt = reaped.ru_utime + reaped.ru_stime, reaped.ru_minflt
    for pid in _descendants():
        got = _stat(f"/proc/{pid}/stat")
        if got is not None:
            child_cpu_s += got[1]
            child_minflt += got[2]
    out.cpu_s[f"0:{CHILDREN}"] = child_cpu_s
    out.minflt[f"0:{CHILDREN}"] = child_minflt
    out.total_cpu_s += child_cpu_s
    out.total_minflt += child_minflt
    return out


def _descendants() -> list[int]:
    """Every live (or not yet reaped) process below this one."""
    found: list[int] = []
    parents = [os.getpid()]
    while parents:
        pid = parents.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            parents += kids
    return found


@dataclass(frozen=True)
class Usage:
    """What the process spent between two readings."""

    cpu_s: dict[str, float]  # by thread group
    minflt: dict[str, int]

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def total_minflt(self) -> int:
        return sum(self.minflt.values())

    def to_dict(self) -> dict[str, object]:
        return {"cpu_s": {k: round(v, 3) for k, v in sorted(self.cpu_s.items())},
                "minflt": dict(sorted(self.minflt.items())),
                "total_cpu_s": round(self.total_cpu_s, 3), "total_minflt": self.total_minflt}


def between(a: Reading, b: Reading) -> Usage:
    """Per thread group, what was spent from ``a`` to ``b`` (threads alive at ``b``; the
    rest of the process totals under ``(ended)``)."""
    cpu: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for key, value in b.cpu_s.items():
        group = key.split(":", 1)[1]
        cpu[group] += value - a.cpu_s.get(key, 0.0)
        faults[group] += b.minflt[key] - a.minflt.get(key, 0)
    ended_cpu = (b.total_cpu_s - a.total_cpu_s) - sum(cpu.values())
    ended_faults = (b.total_minflt - a.total_minflt) - sum(faults.values())
    if ended_cpu > 0.005 or ended_faults > 0:
        cpu[ENDED] += max(ended_cpu, 0.0)
        faults[ENDED] += max(ended_faults, 0)
    return Usage(dict(cpu), dict(faults))


#: the collector's oldest generation: a pass over it is a full pass
_OLDEST = len(gc.get_count()) - 1


class GcMeter:
    """The garbage collector's passes from ``start()`` to ``stop()``: how many, and their
    seconds, by generation; and the seconds of the full passes by the thread group that ran
    them. A pass holds the interpreter, so every Python thread waits for it:
    a full one over a few hundred thousand objects takes hundreds of ms, and objects a
    checkpointer keeps from one iteration to the next make them come more often."""

    def __init__(self) -> None:
        self.passes: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.full_s_by_thread: Counter[str] = Counter()
        self._started: dict[int, float] = {}

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._started[tid] = time.perf_counter()
            return
        t0 = self._started.pop(tid, None)
        if t0 is None:  # installed while a pass ran
            return
        spent, gen = time.perf_counter() - t0, info["generation"]
        self.passes[str(gen)] += 1
        self.seconds[str(gen)] += spent
        if gen == _OLDEST:  # a full pass
            self.full_s_by_thread[_group(threading.current_thread().name)] += spent

    def start(self) -> None:
        """Count from now on (again from 0 when started before)."""
        self.passes.clear()
        self.seconds.clear()
        self.full_s_by_thread.clear()
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def stop(self) -> None:
        """Stop counting (idempotent); the figures stay."""
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def to_dict(self) -> dict[str, object]:
        return gc_dict(self.passes, self.seconds, self.full_s_by_thread)


def gc_dict(passes: Counter[str], seconds: Counter[str],
            full_s_by_thread: Counter[str]) -> dict[str, object]:
    oldest = str(_OLDEST)
    return {"passes": dict(sorted(passes.items())),
            "seconds": {k: round(v, 4) for k, v in sorted(seconds.items())},
            "full_passes": passes.get(oldest, 0),
            "full_s": round(seconds.get(oldest, 0.0), 4),
            "full_s_by_thread": {k: round(v, 4) for k, v in sorted(full_s_by_thread.items())}}
