"""Which tiers a command works on, opening them, and finding committed checkpoints there.

Tiers come from ``--policy FILE``, from ``--tier`` (a URL opens that tier, a name picks one of
the policy's), or from the embedded default policy (host shared memory + ``./checkpoints``).
Each command runs its tier I/O in one ``asyncio.run`` on a ``Session``, which also opens the
shard tiers of multi-rank checkpoints on demand and closes everything afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tiers.base import Tier, redact_url
from tiers.registry import open_tier

from ..errors import ManifestError, UsageError
from ..layout import host_shard_url
from ..manifest import Manifest, committed_steps, read_manifest
from ..policy import default_policy, load_policy
from ..rankview import RankScopedTier

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierSpec:
    name: str
    url: str
    keep: int | None = None  # None: not from a policy, retention needs --keep
    options: dict[str, Any] = field(default_factory=dict)


def tier_specs(policy_file: str | None, selectors: Sequence[str]) -> list[TierSpec]:
    """``--tier`` values containing ':' are URLs; others name tiers of the policy."""
    try:
        policy = load_policy(policy_file) if policy_file else default_policy("checkpoints")
    except OSError as e:
        raise UsageError(f"cannot read the policy file {policy_file}: {e}") from None
    by_name = {t.name: TierSpec(t.name, t.url, t.retained, dict(t.options)) for t in policy.tiers}
    if not selectors:
        return list(by_name.values())
    schemes = [urlsplit(s).scheme for s in selectors if ":" in s]
    specs: list[TierSpec] = []
    for sel in selectors:
        if ":" in sel:
            scheme = urlsplit(sel).scheme
            specs.append(TierSpec(scheme if schemes.count(scheme) == 1 else sel, sel))
        elif sel in by_name:
            specs.append(by_name[sel])
        else:
            raise UsageError(f"no tier named {sel!r} in {policy.source} (tiers: "
                             f"{', '.join(by_name)}; a tier URL needs its scheme, e.g. "
                             "file:///path)")
    names = [s.name for s in specs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise UsageError(f"tier {dup!r} is selected twice")
    return specs


def open_url(url: str, name: str, options: dict[str, Any]) -> Tier:
    """Open one tier; a bad URL or a missing optional package is the caller's mistake."""
    try:
        return open_tier(url, name=name, **options)
    except (ValueError, ImportError, TypeError) as e:
        raise UsageError(f"tier {name} ({redact_url(url)}): {e}") from None


def missing_dir(tier: Tier) -> Path | None:
    """The directory of a file-backed tier when it does not exist (opening would create it)."""
    directory = tier.local_dir
    return None if directory is None or directory.exists() else directory


class Session:
    """The selected tiers, opened, and the shard tiers of their ranks, opened on demand."""

    def __init__(self, specs: Sequence[TierSpec]) -> None:
        self.specs = {s.name: s for s in specs}
        self.tiers: list[Tier] = []
        self._shards: dict[tuple[str, int], Tier | None] = {}
        self._owned: list[Tier] = []

    def open(self) -> None:
        for s in self.specs.values():
            tier = open_url(s.url, s.name, s.options)
            self.tiers.append(tier)
            directory = tier.local_dir
            if directory is not None and directory.exists() and not directory.is_dir():
                raise UsageError(f"tier {s.name} ({tier.url}): {directory} is not a directory")

    def shard(self, tier: Tier, rank: int) -> Tier | None:
        """Rank ``rank``'s shards on ``tier``, read as a tier of their own (keys
        ``step-<N>/...``): a view of ``step-<N>/rank-<r>/`` on a tier the ranks share, or the
        rank's own shared-memory directory. None when that directory is not on this host."""
        key = (tier.name, rank)
        if key not in self._shards:
            found: Tier | None
            if tier.capabilities.in_memory:
                spec = self.specs.get(tier.name)
                found = open_url(host_shard_url(tier.url, rank), tier.name,
                                 spec.options if spec else {})
                self._owned.append(found)
                if missing_dir(found) is not None:
                    found = None
            else:
                found = RankScopedTier(tier, rank)
            self._shards[key] = found
        return self._shards[key]

    async def close(self) -> None:
        for t in [*self._owned, *self.tiers]:
            with contextlib.suppress(Exception):
                await t.close()


def run_with_tiers(specs: Sequence[TierSpec], body: Callable[[Session], Awaitable[T]]) -> T:
    """Run ``body`` on the opened tiers in one event loop; the tiers are closed after it."""
    async def go() -> T:
        session = Session(specs)
        try:
            session.open()
            return await body(session)
        finally:
            await session.close()

    return asyncio.run(go())


async def steps_on(tiers: Sequence[Tier]) -> dict[str, list[int]]:
    """Committed steps per tier; tiers whose directory does not exist hold none."""
    out: dict[str, list[int]] = {}
    for tier in tiers:
        out[tier.name] = [] if missing_dir(tier) else await committed_steps(tier)
    return out


def pick_step(step: int | None, found: dict[str, list[int]]) -> int:
    """``step`` (the newest when None) if some tier committed it; else a usage error."""
    everywhere = sorted({s for steps in found.values() for s in steps})
    if not everywhere:
        raise UsageError(f"no committed checkpoint on tier(s) {', '.join(found)}")
    if step is None:
        return everywhere[-1]
    if step not in everywhere:
        raise UsageError(f"step {step} is not committed on tier(s) {', '.join(found)} "
                         f"(committed: {', '.join(map(str, everywhere))})")
    return step


async def first_readable_manifest(holders: Sequence[Tier], step: int) -> tuple[Tier, Manifest]:
    """The manifest of the fastest tier whose copy reads; warns about the ones skipped."""
    errors: list[str] = []
    for tier in holders:
        try:
            manifest = await read_manifest(tier, step)
        except Exception as e:
            errors.append(str(e))
            continue
        for error in errors:
            log.warning("skipped an unreadable manifest: %s", error)
        return tier, manifest
    raise ManifestError(f"step {step}: no readable manifest: {'; '.join(errors)}")
