"""Bit flips and truncations of data chunks, batch files and manifests, on each tier.

Guards: the per-chunk xxh64 checked on every read (restore), the tier's short-read check
(a truncated batch file), the manifest's own xxh64 and its validation (a flipped or truncated
manifest), and restore's fallback to the next tier on any of these. A corrupt copy is
detected and the other tier's copy is used; with no good copy restore raises RestoreError;
it never returns wrong tensors (every restore is compared byte for byte with a reference).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import asymcheck
from asymcheck.layout import manifest_key
from tests._util import load_from, make_training, snapshot, train_steps
from tests.faults._helpers import (
    compare,
    file_dir,
    flip_byte,
    host_dir,
    locate,
    read_manifest_file,
    restore_fresh,
)
from tests.faults._stats import FaultStats

STEP = 3
TIERS = ["host", "local"]


@dataclass
class Saved:
    policy: asymcheck.Policy
    roots: dict[str, Path]
    expected: dict[str, Any]

    def other(self, tier: str) -> str:
        return next(t for t in TIERS if t != tier)

    def url(self, tier: str) -> str:
        return self.policy.tier(tier).url


@pytest.fixture
def saved(ckpt_dir: Path, shm_root: Path) -> Iterator[Saved]:
    """Step 3 committed on the host and the local tier; small chunks, several per tensor."""
    policy = asymcheck.default_policy(ckpt_dir)
    model, opt, sched = make_training(seed=3, width=48)
    train_steps(model, opt, sched, STEP)
    expected = snapshot(model, opt, sched)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive", chunk_bytes=2048) as ckpt:
        ckpt.save_sync(STEP).wait_all_sync(60)
    yield Saved(policy, {"host": host_dir(shm_root, policy), "local": file_dir(policy)},
                expected)


def chunk_spots(root: Path, rng: random.Random, n: int) -> list[tuple[Path, int]]:
    """``n`` (file, offset) pairs inside stored chunk bytes, as the tier's manifest lists them."""
    man = read_manifest_file(root, STEP)
    chunks = [c for t in man.tensors for c in t.chunks if c.stored_len]
    spots = []
    for c in rng.sample(chunks, n):
        file, offset = locate(man, c)
        spots.append((root / f"step-{STEP:012d}" / file, offset + rng.randrange(c.stored_len)))
    return spots


def restore_uses(saved: Saved, stats: FaultStats, tier: str, *, only: bool) -> None:
    """A fresh restore gives the reference, reading tensors from ``tier`` (``only``: all)."""
    loaded = load_from_policy(saved)
    if only:
        assert loaded.sources.keys() == {tier}, f"tensors were read from {loaded.sources}"
    else:
        assert loaded.sources.get(tier), f"tensors were read from {loaded.sources}"
    step, state = restore_fresh(saved.policy, width=48)
    assert step == STEP
    compare(saved.expected, state, stats)


def load_from_policy(saved: Saved) -> Any:
    model, opt, sched = make_training(seed=9, width=48)
    with asymcheck.Checkpointer(model, opt, policy=saved.policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        loaded = ckpt.load_sync(None)
    assert loaded is not None
    return loaded


@pytest.mark.parametrize("tier", TIERS)
def test_flipped_data_bytes_are_detected_and_the_other_tier_is_used(
        saved: Saved, tier: str, fault_stats: FaultStats) -> None:
    rng = random.Random(f"flip-{tier}")
    spots = chunk_spots(saved.roots[tier], rng, 3)
    for path, offset in spots:
        flip_byte(path, offset, mask=1 << rng.randrange(8))
    fault_stats.fault("bitflip", len(spots))
    restore_uses(saved, fault_stats, saved.other(tier), only=False)
    with pytest.raises(asymcheck.RestoreError, match="checksum mismatch"):
        load_from(saved.url(tier), STEP, name=tier)
    loaded = load_from(saved.url(saved.other(tier)), STEP, name=saved.other(tier))
    assert loaded is not None


@pytest.mark.parametrize("tier", TIERS)
def test_a_truncated_batch_file_is_detected_and_the_other_tier_is_used(
        saved: Saved, tier: str, fault_stats: FaultStats) -> None:
    man = read_manifest_file(saved.roots[tier], STEP)
    for f in man.files:
        path = saved.roots[tier] / f"step-{STEP:012d}" / f.key
        with open(path, "r+b") as fh:
            fh.truncate(f.size // 2)
        fault_stats.fault("truncate")
    restore_uses(saved, fault_stats, saved.other(tier), only=False)
    with pytest.raises(asymcheck.RestoreError) as err:  # a short read, a checksum, a size
        load_from(saved.url(tier), STEP, name=tier)
    assert any(f.key in str(err.value) for f in man.files), str(err.value)


@pytest.mark.parametrize("tier", TIERS)
def test_a_truncated_manifest_is_detected_and_the_other_tier_is_used(
        saved: Saved, tier: str, fault_stats: FaultStats) -> None:
    path = saved.roots[tier] / manifest_key(STEP)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    fault_stats.fault("truncate")
    restore_uses(saved, fault_stats, saved.other(tier), only=True)
    with pytest.raises(asymcheck.RestoreError, match="no tier holds a readable manifest"):
        load_from(saved.url(tier), STEP, name=tier)


@pytest.mark.parametrize("tier", TIERS)
def test_a_flipped_manifest_byte_that_keeps_it_well_formed_is_detected(
        saved: Saved, tier: str, fault_stats: FaultStats) -> None:
    """The optimizer's eps (a msgpack float64 inside the manifest) loses its last bit: the
    manifest still parses, and only its checksum tells that it is not what was written."""
    path = saved.roots[tier] / manifest_key(STEP)
    data = path.read_bytes()
    eps = b"\xcb" + struct.pack(">d", saved.expected["opt"]["param_groups"][0]["eps"])
    assert data.count(eps) == 1, "the optimizer's eps is not stored as one msgpack float64"
    flip_byte(path, data.index(eps) + len(eps) - 1, mask=1)
    fault_stats.fault("bitflip")
    restore_uses(saved, fault_stats, saved.other(tier), only=True)
    with pytest.raises(asymcheck.RestoreError, match="checksum mismatch"):
        load_from(saved.url(tier), STEP, name=tier)


@pytest.mark.parametrize("tier", TIERS)
def test_any_flipped_manifest_byte_never_yields_wrong_tensors(
        saved: Saved, tier: str, fault_stats: FaultStats) -> None:
    path = saved.roots[tier] / manifest_key(STEP)
    size = path.stat().st_size
    rng = random.Random(f"manifest-{tier}")
    for offset in rng.sample(range(size), 6):
        mask = 1 << rng.randrange(8)
        flip_byte(path, offset, mask)
        fault_stats.fault("bitflip")
        step, state = restore_fresh(saved.policy, width=48)
        assert step == STEP
        compare(saved.expected, state, fault_stats)
        with pytest.raises((asymcheck.RestoreError, asymcheck.ManifestError)):
            load_from(saved.url(tier), STEP, name=tier)
        flip_byte(path, offset, mask)  # undo


def tensor_spot(root: Path, tensor: str, rng: random.Random) -> tuple[Path, int]:
    """A byte inside one stored chunk of ``tensor``, as the tier's manifest places it."""
    man = read_manifest_file(root, STEP)
    [meta] = [t for t in man.tensors if t.path == tensor]
    chunk = rng.choice([c for c in meta.chunks if c.stored_len])
    file, offset = locate(man, chunk)
    return root / f"step-{STEP:012d}" / file, offset + rng.randrange(chunk.stored_len)


@pytest.mark.parametrize("damage", ["data+data", "data+manifest", "manifest+manifest"])
def test_no_good_copy_anywhere_fails_with_restore_error_and_changes_nothing(
        saved: Saved, damage: str, fault_stats: FaultStats) -> None:
    rng = random.Random(damage)
    host, local = saved.roots["host"], saved.roots["local"]
    tensor = "optimizers/0/state/body.0.weight/exp_avg"  # the same tensor on both tiers
    if damage == "manifest+manifest":
        (local / manifest_key(STEP)).write_bytes(b"")
        (host / manifest_key(STEP)).write_bytes((host / manifest_key(STEP)).read_bytes()[:7])
        fault_stats.fault("truncate", 2)
    else:
        flip_byte(*tensor_spot(host, tensor, rng))
        fault_stats.fault("bitflip")
        if damage == "data+data":
            flip_byte(*tensor_spot(local, tensor, rng))
        else:
            flip_byte(local / manifest_key(STEP), 20)
        fault_stats.fault("bitflip")
    model, opt, sched = make_training(seed=5, width=48)
    before = snapshot(model, opt, sched)
    with asymcheck.Checkpointer(model, opt, policy=saved.policy, extras={"sched": sched},
                                mode="naive") as ckpt, \
            pytest.raises(asymcheck.RestoreError, match=f"step {STEP}"):
        ckpt.restore_sync()
    compare(before, snapshot(model, opt, sched), fault_stats)  # nothing half-applied
