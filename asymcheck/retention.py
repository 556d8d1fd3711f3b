"""Which checkpoints go, decided by one pure planner, and the one deleter that removes them.

The live checkpointer, every rank, and ``asymcheck gc`` all ask ``plan_deletions`` and delete
with ``delete_step``, so they always agree. The rules:

- the ``keep`` newest committed checkpoints stay, so the newest committed one always stays
  (a checkpoint goes only after a newer one committed);
- a delta base that a kept checkpoint needs stays;
- a pinned step stays (a flush or a delta still reads its host copy);
- deletions run newest first, so a delta always goes before its base;
- a step is uncommitted first (its manifest), then its data is removed: never a manifest
  whose data is gone;
- on a tier with a grace period (``Tier.uncommitted_grace_s``: object stores, where data
  objects become visible one by one while a save writes them), a step directory without a
  manifest goes only once its newest key is older than that period (``settled_uncommitted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from tiers.base import KeyNotFound, Tier

from .layout import manifest_key, step_dir
from .manifest import Manifest, read_manifest


def plan_deletions(committed: Iterable[int], keep: int, *,
                   needs: Mapping[int, Iterable[int]] | None = None,
                   pinned: Collection[int] = ()) -> list[int]:
    """The committed steps to delete, newest first.

    ``needs`` maps a committed step to the delta bases it needs (only the kept steps' needs
    count); ``pinned`` steps are never deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    steps = sorted(set(committed))
    kept = steps[-keep:]
    needed: set[int] = set()
    for s in kept:
        needed.update((needs or {}).get(s, ()))
    return [s for s in reversed(steps[:-keep]) if s not in needed and s not in pinned]


def plan_uncommitted(dirs: Iterable[int], committed: Iterable[int], *,
                     busy: Collection[int] = (), newer_too: bool = False) -> list[int]:
    """Step directories without a commit to remove, newest first: those older than the newest
    commit (newer ones may still be written by a running save), or all of them with
    ``newer_too`` (at start-up, before this process writes anything). ``busy`` steps stay."""
    done = set(committed)
    newest = max(done, default=None)
    return sorted((s for s in set(dirs) - done if s not in busy
                   and (newer_too or (newest is not None and s < newest))), reverse=True)


async def settled_uncommitted(tier: Tier, steps: Iterable[int],
                              keys: Mapping[int, Sequence[str]], *,
                              now: float | None = None) -> list[int]:
    """Those of ``steps`` (step directories without a manifest, in the caller's order) whose
    keys ``keys[step]`` are all older than the tier's ``uncommitted_grace_s``: a save may still
    be writing a younger one. Every step when the tier has no grace period (no key is read);
    a step whose keys cannot be checked stays."""
    steps = list(steps)
    grace = tier.uncommitted_grace_s
    if grace <= 0:
        return steps
    cutoff = (time.time() if now is None else now) - grace
    old = []
    for step in steps:
        stats = await asyncio.gather(*(tier.stat(k) for k in keys.get(step, ())),
                                     return_exceptions=True)
        if any(isinstance(st, BaseException) and not isinstance(st, KeyNotFound)
               for st in stats):
            continue
        mtimes = [st.mtime_s for st in stats if not isinstance(st, BaseException)]
        if max(mtimes, default=float("-inf")) < cutoff:
            old.append(step)
    return old


def kept_bases(compression: Mapping[str, Any]) -> list[int]:
    """The delta bases retention keeps while it keeps a checkpoint, from the checkpoint's
    compression record: those its delta chunks need, and the base the tier's next deltas are
    coded against, which the checkpoint itself may not name (its tensors may all have gone
    raw)."""
    found = {int(s) for s in compression.get("base_steps", [])}
    if compression.get("next_base") is not None:
        found.add(int(compression["next_base"]))
    return sorted(found)


def bases_in(manifest: Manifest) -> list[int]:
    """The delta bases retention keeps with a committed checkpoint (``kept_bases``), or for a
    global manifest of several ranks, with every rank's shard."""
    info: dict[str, Any] = manifest.info
    found = set(kept_bases(info.get("compression", {})))
    for shard in info.get("ranks", []):
        found.update(shard.get("base_steps", []))
    return sorted(int(s) for s in found)


async def needed_bases(tier: Tier, steps: Iterable[int],
                       cache: MutableMapping[int, list[int]] | None = None
                       ) -> dict[int, list[int]]:
    """The delta bases each of ``steps`` needs on ``tier``; ``cache`` spares manifest reads."""
    out: dict[int, list[int]] = {}
    for s in steps:
        if cache is not None and s in cache:
            out[s] = cache[s]
            continue
        out[s] = bases_in(await read_manifest(tier, s))
        if cache is not None:
            cache[s] = out[s]
    return out


async def delete_step(tier: Tier, step: int) -> None:
    """Uncommit ``step`` on ``tier`` (its manifest first), then remove its data. Keys that
    another process removed meanwhile are no error."""
    with contextlib.suppress(KeyNotFound, FileNotFoundError):
        await tier.delete(manifest_key(step))
    for key in await tier.list(step_dir(step) + "/"):
        with contextlib.suppress(KeyNotFound, FileNotFoundError):
            await tier.delete(key)
