"""``asymcheck gc``: apply retention now, and remove the shared memory of dead jobs.

Retention is the live checkpointer's (``asymcheck.retention``): on each tier the ``keep``
newest committed checkpoints stay, and so do the delta bases they need; older ones are deleted
newest first, each uncommitted (its manifest) before its data goes. Step directories without a
manifest that are older than the tier's newest commit go too; on a tier with a grace period
(``uncommitted_grace_s``: object stores) only once their data is older than that. On a tier in
memory, committed steps newer than every durable tier's newest commit stay: a running job may
still be flushing them. A multi-rank checkpoint deleted from shared memory takes its ranks'
shards there (``shm://NAME-rank<r>``) with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tiers.base import Tier
from tiers.host import POOL_DIR, live_writer, pid_alive, shm_root

from ..errors import ManifestError, UsageError
from ..layout import (
    STEP_PREFIX,
    committed_in,
    group_step_dirs,
    job_owner,
    manifest_key,
    parse_step_dir,
)
from ..manifest import Manifest, read_manifest
from ..retention import (
    delete_step,
    needed_bases,
    plan_deletions,
    plan_uncommitted,
    settled_uncommitted,
)
from ._output import EXIT_OK, fmt_bytes
from ._tiers import Session, missing_dir, run_with_tiers


@dataclass(frozen=True)
class Deletion:
    tier: Tier
    step: int
    committed: bool
    why: str


async def retention_plan(tiers: Sequence[Tier], keeps: dict[str, int]) -> list[Deletion]:
    """What retention deletes on each tier, in the order it deletes it."""
    listed: dict[str, dict[int, list[str]]] = {}
    for tier in tiers:
        listed[tier.name] = {} if missing_dir(tier) else group_step_dirs(
            await tier.list(STEP_PREFIX))
    committed = {name: committed_in(k for keys in groups.values() for k in keys)
                 for name, groups in listed.items()}
    durable = [committed[t.name][-1] for t in tiers
               if t.capabilities.durable and committed[t.name]]
    plan: list[Deletion] = []
    for tier in tiers:
        steps, keep = committed[tier.name], keeps[tier.name]
        pinned = {s for s in steps if s > max(durable)} \
            if tier.capabilities.in_memory and durable else set()
        needs = await needed_bases(tier, steps[-keep:]) if len(steps) > keep else {}
        plan.extend(Deletion(tier, s, True, f"beyond keep={keep}")
                    for s in plan_deletions(steps, keep, needs=needs, pinned=pinned))
        uncommitted = plan_uncommitted(listed[tier.name], steps)
        plan.extend(Deletion(tier, s, False, "uncommitted")
                    for s in await settled_uncommitted(tier, uncommitted, listed[tier.name]))
    return plan


async def remove(session: Session, d: Deletion) -> None:
    """Delete one step; from shared memory, a multi-rank checkpoint's shards too."""
    world_size = 1
    if d.committed and d.tier.capabilities.in_memory:
        with contextlib.suppress(Exception):  # unreadable: its own directory still goes
            world_size = (await read_manifest(d.tier, d.step)).world_size
    await delete_step(d.tier, d.step)
    for rank in range(world_size if world_size > 1 else 0):
        shard = session.shard(d.tier, rank)
        if shard is not None:
            await delete_step(shard, d.step)


def tier_keeps(args: argparse.Namespace) -> dict[str, int]:
    keeps: dict[str, int] = {}
    for s in args.specs:
        keep = args.keep if args.keep is not None else s.keep
        if keep is None:
            raise UsageError(f"tier {s.name} comes from a URL and has no keep: pass --keep N "
                             "or use --policy FILE")
        keeps[s.name] = keep
    return keeps


def cmd_gc(args: argparse.Namespace) -> int:
    keeps = tier_keeps(args)
    verb = "would remove" if args.dry_run else "removed"

    async def body(session: Session) -> int:
        plan = await retention_plan(session.tiers, keeps)
        for d in plan:
            if not args.dry_run:
                await remove(session, d)
            print(f"{verb} {d.tier.name} step {d.step} ({d.why})")
        await session.close()  # before the shared-memory sweep below removes directories
        swept = await asyncio.to_thread(sweep_stale_shm, args.dry_run) if args.stale_shm else []
        for line in swept:
            print(line)
        if not args.quiet:
            removed = len(plan) + sum(line.startswith(verb) for line in swept)
            print(f"gc: {removed} {'to remove' if args.dry_run else 'removed'}")
        return EXIT_OK

    return run_with_tiers(args.specs, body)


# -------------------------------------------------------------------- shared memory of dead jobs

def step_dirs(directory: Path) -> list[int]:
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return []
    return sorted(s for s in map(parse_step_dir, names) if s is not None)


def tier_dirs(top: Path, depth: int = 6) -> Iterator[Path]:
    """Directories below ``top`` that hold step directories or a free pool (tier roots)."""
    try:
        children = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    names = {p.name for p in children}
    if POOL_DIR in names or any(parse_step_dir(n) is not None for n in names):
        yield top
        return
    if depth:
        for child in children:
            yield from tier_dirs(child, depth - 1)


def stale_reason(directory: Path) -> tuple[bool, str, list[int]]:
    """(remove?, why, committed steps) for one shared-memory tier directory."""
    jobs: set[str] = set()
    steps: list[int] = []
    for step in step_dirs(directory):
        path = directory / manifest_key(step)
        if not path.exists():
            continue
        try:
            m = Manifest.from_bytes(path.read_bytes(), source=str(path))
        except (OSError, ManifestError):
            return False, f"unreadable manifest {path.parent.name}", steps
        jobs.add(m.job)
        steps.append(m.step)
    pid = live_writer(directory)
    if pid is not None:
        return False, f"a write of live pid {pid} is in progress", steps
    if not jobs:
        return False, "no manifest names its job", steps
    return (*job_verdict(jobs), steps)


def job_verdict(jobs: set[str]) -> tuple[bool, str]:
    """Whether every job of ``jobs`` ran on this host and its process is gone."""
    node = os.uname().nodename
    for job in sorted(jobs):
        owner = job_owner(job)
        if owner is None:
            return False, f"job {job!r} is not <nodename>-<pid>-<hex>"
        if owner[0] != node:
            return False, f"job {job} runs on another host"
        if pid_alive(owner[1]):
            return False, f"job {job} is alive"
    return True, f"job {', '.join(sorted(jobs))} is dead"


def dir_bytes(directory: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_tree(directory: Path, root: Path) -> None:
    """Remove ``directory``, then its parents below ``root`` that it leaves empty."""
    try:
        shutil.rmtree(directory)
    except OSError as e:
        raise UsageError(f"cannot remove {directory}: {e}") from None
    parent = directory.parent
    while parent != root and parent.is_relative_to(root):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def sweep_stale_shm(dry_run: bool) -> list[str]:
    """Remove shared-memory tier directories (``asymcheck*`` under the root) of dead jobs."""
    root = shm_root()
    lines = []
    try:
        tops = sorted(p for p in root.iterdir() if p.name.startswith("asymcheck")
                      and p.is_dir() and not p.is_symlink())
    except OSError as e:
        raise UsageError(f"cannot read the shared-memory root {root}: {e}") from None
    for top in tops:
        for directory in list(tier_dirs(top)):
            remove, why, steps = stale_reason(directory)
            listed = f"steps {', '.join(map(str, steps))}" if steps else "no steps"
            if not remove:
                lines.append(f"kept shm {directory} ({why})")
                continue
            size = dir_bytes(directory)
            if not dry_run:
                remove_tree(directory, root)
            lines.append(f"{'would remove' if dry_run else 'removed'} shm {directory} "
                         f"({why}; {listed}; {fmt_bytes(size)})")
    return lines
