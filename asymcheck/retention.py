"""Which checkpoints go, decided by one pure planner, and the one deleter that removes them.

The live checkpointer, every rank, and ``asymcheck gc`` all ask ``plan_deletions`` and delete
with ``delete_step``, so they always agree. The rules:

- the ``keep`` newest committed checkpoints stay, so the newest committed one always stays
  (a checkpoint goes only after a newer one committed);
- a delta base that a kept checkpoint needs stays;
- a pinned step stays (a flush or a delta still reads its host copy);
- deletions run newest first, so a delta always goes before its base;
- a step is uncommitted first (its manifest), then its data is removed: never a manifest
  whose data is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping, MutableMapping
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


def bases_in(manifest: Manifest) -> list[int]:
    """The delta bases a committed checkpoint needs: from its compression record, or for a
    global manifest of several ranks, from every rank's shard."""
    info: dict[str, Any] = manifest.info
    found = set(info.get("compression", {}).get("base_steps", []))
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
