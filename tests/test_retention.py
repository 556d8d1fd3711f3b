"""Retention: the pure planners (property-tested) and the deleter, manifest first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asymcheck.layout import manifest_key, step_dir, step_key, step_of
from asymcheck.manifest import Manifest
from asymcheck.retention import bases_in, delete_step, kept_bases, plan_deletions, plan_uncommitted
from tiers.base import KeyNotFound
from tiers.local import LocalTier

History = tuple[list[int], int, dict[int, list[int]], set[int]]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Committed steps (in any order, some repeated), ``keep``, the delta bases each step
    needs among older committed steps, and pinned steps (committed here or not)."""
    steps = sorted(draw(st.sets(st.integers(0, 10**6), max_size=25)))
    needs: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        if i and draw(st.booleans()):
            needs[s] = draw(st.lists(st.sampled_from(steps[:i]), min_size=1, max_size=3))
    pinned: set[int] = set(draw(st.sets(st.integers(0, 10**6), max_size=3)))
    if steps:
        pinned |= draw(st.sets(st.sampled_from(steps), max_size=4))
    keep = draw(st.integers(1, len(steps) + 2))
    order = draw(st.permutations(steps + steps[: draw(st.integers(0, 3))]))
    return list(order), keep, needs, pinned


def _kept_and_needed(steps: list[int], keep: int,
                     needs: Mapping[int, list[int]]) -> tuple[set[int], set[int]]:
    kept = set(sorted(set(steps))[-keep:])
    needed = {b for s in kept for b in needs.get(s, ())}
    return kept, needed


@settings(max_examples=300, deadline=None)
@given(histories())
def test_the_deletion_plan_keeps_the_newest_bases_and_pins_and_deletes_the_rest(
        history: History) -> None:
    committed, keep, needs, pinned = history
    plan = plan_deletions(committed, keep, needs=needs, pinned=pinned)
    steps = set(committed)
    kept, needed = _kept_and_needed(committed, keep, needs)

    assert set(plan) <= steps, "deletes only committed steps"
    assert len(plan) == len(set(plan))
    assert plan == sorted(plan, reverse=True), "newest first: a delta goes before its base"
    if steps:
        assert max(steps) not in plan, "never the newest committed step"
    assert not set(plan) & kept, "the keep newest stay"
    assert not set(plan) & needed, "a base a kept step needs stays"
    assert not set(plan) & pinned, "a pinned step stays"
    assert steps - set(plan) == kept | needed | (pinned & steps), "everything else goes"


@settings(deadline=None)
@given(histories())
def test_the_deletion_plan_ignores_the_needs_of_steps_it_deletes(history: History) -> None:
    committed, keep, needs, pinned = history
    kept, _ = _kept_and_needed(committed, keep, needs)
    only_kept = {s: b for s, b in needs.items() if s in kept}
    assert plan_deletions(committed, keep, needs=needs, pinned=pinned) == plan_deletions(
        committed, keep, needs=only_kept, pinned=pinned)


def test_a_deletion_plan_by_example() -> None:
    committed = [1, 2, 3, 4, 5, 6]
    assert plan_deletions(committed, 2) == [4, 3, 2, 1]
    assert plan_deletions(committed, 2, needs={6: [4], 5: [4], 3: [1]}, pinned={2}) == [3, 1]
    assert plan_deletions(committed, 10) == []
    assert plan_deletions([], 1) == []


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(keep: int) -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        plan_deletions([1, 2], keep)


# ------------------------------------------------------------------------ uncommitted dirs


def test_uncommitted_dirs_older_than_the_newest_commit_go_newest_first() -> None:
    dirs = [1, 2, 3, 4, 5, 7, 9]
    committed = [2, 5, 7]
    assert plan_uncommitted(dirs, committed) == [4, 3, 1]  # 9 may be a save in progress
    assert plan_uncommitted(dirs, committed, busy={3}) == [4, 1]
    assert plan_uncommitted(dirs, committed, newer_too=True) == [9, 4, 3, 1]
    assert plan_uncommitted(dirs, committed, busy={9}, newer_too=True) == [4, 3, 1]


def test_without_a_commit_only_start_up_removes_uncommitted_dirs() -> None:
    assert plan_uncommitted([3, 1, 2], []) == []
    assert plan_uncommitted([3, 1, 2], [], newer_too=True) == [3, 2, 1]
    assert plan_uncommitted([], [4, 5]) == []
    assert plan_uncommitted([4, 5], [4, 5], newer_too=True) == []  # committed dirs never


@settings(deadline=None)
@given(dirs=st.sets(st.integers(0, 100), max_size=20),
       committed=st.sets(st.integers(0, 100), max_size=10),
       busy=st.sets(st.integers(0, 100), max_size=5), newer_too=st.booleans())
def test_the_uncommitted_plan_never_touches_a_commit_or_a_busy_step(
        dirs: set[int], committed: set[int], busy: set[int], newer_too: bool) -> None:
    plan = plan_uncommitted(dirs, committed, busy=busy, newer_too=newer_too)
    assert plan == sorted(set(plan), reverse=True)
    assert set(plan) <= dirs and not set(plan) & (committed | busy)
    newest = max(committed, default=None)
    expected = {d for d in dirs - committed - busy
                if newer_too or (newest is not None and d < newest)}
    assert set(plan) == expected


# ------------------------------------------------------------------------------ the deleter


class RecordingTier(LocalTier):
    """A real local tier that records each delete and whether a manifest was left then."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.deletes: list[tuple[str, bool]] = []

    async def delete(self, key: str) -> None:
        await super().delete(key)
        step = step_of(key)
        assert step is not None, key
        self.deletes.append((key, await self.exists(manifest_key(step))))


async def _fill(tier: LocalTier, step: int, names: list[str]) -> list[str]:
    keys = [step_key(step, n) for n in names]
    for key in keys:
        await tier.put(key, b"x" * 10)
    await tier.put(manifest_key(step), b"manifest")
    return keys


async def test_delete_step_uncommits_first_then_removes_the_data(tmp_path: Path) -> None:
    tier = RecordingTier(tmp_path.as_uri(), name="disk", fsync=False)
    try:
        data = await _fill(tier, 7, ["data-aa-00000.bin", "data-aa-00001.bin", "rank-00001/x.bin"])
        other = await _fill(tier, 8, ["data-bb.bin"])
        await delete_step(tier, 7)
        deleted = [key for key, _ in tier.deletes]
        assert deleted[0] == manifest_key(7), "the manifest goes first"
        assert sorted(deleted[1:]) == sorted(data)
        assert not any(manifest_left for _, manifest_left in tier.deletes), \
            "no data file is removed while the step is still committed"
        assert await tier.list(step_dir(7) + "/") == []
        assert await tier.list(step_dir(8) + "/") == sorted([*other, manifest_key(8)])
    finally:
        await tier.close()


async def test_delete_step_is_no_error_for_keys_already_gone(tmp_path: Path) -> None:
    class LateListing(RecordingTier):
        """Lists a key that another process removes before this one deletes it."""

        async def list(self, prefix: str = "") -> list[str]:
            keys = await super().list(prefix)
            if keys:
                await LocalTier.delete(self, keys[0])
            return keys

    tier = LateListing(tmp_path.as_uri(), name="disk", fsync=False)
    try:
        await _fill(tier, 3, ["data-a.bin", "data-b.bin"])
        await tier.delete(manifest_key(3))  # uncommitted already, e.g. by another rank
        tier.deletes.clear()
        await delete_step(tier, 3)
        assert await tier.list(step_dir(3) + "/") == []
        with pytest.raises(KeyNotFound):
            await tier.delete(manifest_key(3))
    finally:
        await tier.close()


def test_the_bases_kept_with_a_checkpoint_include_the_tiers_next_base_on_every_rank() -> None:
    """A checkpoint stored raw names no base, yet the tier's next deltas are coded against
    one: retention keeps that base with it; a global manifest keeps every rank's."""
    assert kept_bases({"base_steps": [], "next_base": 5}) == [5]
    assert kept_bases({"base_steps": [5], "next_base": 9}) == [5, 9]
    assert kept_bases({"base_steps": [3], "next_base": None}) == [3]
    assert kept_bases({}) == []
    single = Manifest(step=12, created_s=0.0, job="j", objects=b"", tensors=(), files=(),
                      info={"compression": {"base_steps": [], "next_base": 10}})
    assert bases_in(single) == [10]
    ranks = Manifest(step=12, created_s=0.0, job="j", objects=b"", tensors=(), files=(),
                     world_size=2, info={"ranks": [{"base_steps": [10]},
                                                   {"base_steps": [4, 8]}]})
    assert bases_in(ranks) == [4, 8, 10]
    assert plan_deletions([4, 8, 10, 11, 12], 1, needs={12: bases_in(ranks)}) == [11]
