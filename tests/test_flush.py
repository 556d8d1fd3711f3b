"""Batched flushing: per-tier queues, B* from the cost model, backpressure, tier failures."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
import asymcheck.checkpointer
from asymcheck.errors import TierSkipped
from asymcheck.manifest import Manifest
from tests import fault_tiers
from tests._util import assert_same, host_peak, load_from, pooled_inodes, record_page_locks


@pytest.fixture(autouse=True)
def _fault_schemes() -> Iterator[None]:
    fault_tiers.register()
    yield
    fault_tiers.unregister()


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(textwrap.dedent(body))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # a str, int or float as TOML writes it


def _tiers(tmp_path: Path, *tables: dict[str, Any], extra: str = "") -> Path:
    """A policy file of these ``[[tier]]`` tables, then ``extra`` (TOML text)."""
    return _write(tmp_path, "".join(
        "[[tier]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
        for table in tables) + textwrap.dedent(extra))


def _assert_restores(model: torch.nn.Module, policy: Path, step: int,
                     expected: dict[str, torch.Tensor]) -> None:
    """A fresh checkpointer restores ``step`` into ``model`` (zeroed first), bit for bit."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        assert ckpt.restore_sync() == step
    assert_same(expected, model.state_dict())


def _stream_policy(tmp_path: Path, name: str, capacity: int, extra: str = "") -> Path:
    """A host tier of ``capacity`` bytes (smaller than two states: saves stream) + a disk."""
    return _tiers(tmp_path, {"name": "host", "url": f"shm://{name}", "capacity": capacity},
                  {"name": "disk", "url": "file:disk"}, extra=extra)


def _many_tensors(n: int = 64, width: int = 256) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n // 2)])


def _manifests(directory: Path) -> dict[int, Manifest]:
    return {int(p.parent.name[5:]): Manifest.from_bytes(p.read_bytes())
            for p in directory.glob("step-*/manifest.msgpack")}


def test_small_tensors_are_coalesced_into_batch_files(tmp_path: Path) -> None:
    model = _many_tensors(64, 64)
    policy = _write(tmp_path, """
        [[tier]]
        name = "host"
        url = "shm://batch"
        [[tier]]
        name = "disk"
        url = "file:disk"
        batch = "64KiB"
        [[tier]]
        name = "loose"
        url = "file:loose"
        batch = "off"
    """)
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        h = ckpt.save_sync(0)
        h.wait_all_sync(60)
    batched = _manifests(tmp_path / "disk")[0]
    loose = _manifests(tmp_path / "loose")[0]
    assert len(loose.files) == len(loose.tensors)  # one file per tensor
    assert len(batched.files) < len(batched.tensors) // 4
    assert all(f.size >= 64 << 10 for f in batched.files[:-1])
    assert h.metrics["disk.batch_bytes"] == 64 << 10 and h.metrics["loose.batch_bytes"] is None


def test_batch_size_and_fit_are_visible_and_follow_a_throttled_tier(tmp_path: Path) -> None:
    model = _many_tensors(32, 512)
    policy = _write(tmp_path, f"""
        [[tier]]
        name = "host"
        url = "shm://fit"
        [[tier]]
        name = "disk"
        url = "file:disk"
        [[tier]]
        name = "slow"
        url = "slowfile://{tmp_path / 'slow'}"
        options = {{ bandwidth_bps = 40e6, latency_s = 0.05 }}
    """)
    with asymcheck.Checkpointer(model, None, policy=policy, mode="naive") as ckpt:
        handles = [ckpt.save_sync(s) for s in range(4)]
        for h in handles:
            h.wait_all_sync(120)
    m = handles[-1].metrics
    disk, slow = m["disk.fit"], m["slow.fit"]
    assert disk["samples"] > 0 and slow["samples"] > 0
    assert slow["throughput_bps"] < 60e6 < disk["throughput_bps"]
    assert slow["latency_s"] > disk["latency_s"]
    assert m["slow.batch_bytes"] != m["disk.batch_bytes"]  # B* follows each tier's own fit


@pytest.mark.parametrize("states", [1.5, 2.5])
def test_asym_saves_every_step_under_a_tight_host_budget_complete_and_restore(
        tmp_path: Path, states: float) -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt_bytes = 3 * sum(p.nbytes for p in model.parameters()) + (1 << 16)
    policy = _write(tmp_path, f"""
        [[tier]]
        name = "host"
        url = "shm://tight"
        capacity = {int(states * ckpt_bytes)}
        [[tier]]
        name = "disk"
        url = "file:disk"
    """)
    with asymcheck.Checkpointer(model, opt, policy=policy, warmup_iterations=2,
                                min_partition_bytes=1024) as ckpt:
        handles = []
        for step in range(10):
            model(torch.randn(8, 256, generator=torch.Generator().manual_seed(step))
                  ).square().mean().backward()
            opt.step()
            opt.zero_grad()
            handles.append(ckpt.save_sync(step))
        expected = copy.deepcopy(model.state_dict())
        for h in handles:
            h.durable("disk").wait(60)  # a save waiting on the budget would hang here
        assert ckpt.host.used_bytes <= int(states * ckpt_bytes)
        loaded = ckpt.load_sync(9)
        assert loaded is not None
        assert_same(expected, loaded.state["model"])


def test_a_state_four_times_the_host_budget_streams_through(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])  # 8.4 MB
    state_bytes = sum(p.nbytes for p in model.parameters())
    budget = state_bytes // 4
    policy = _stream_policy(tmp_path, "stream", budget)
    expected = copy.deepcopy(model.state_dict())
    peak = 0
    stop = threading.Event()
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        ckpt.restore_sync()  # opens the tiers
        host = ckpt.host

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, host.used_bytes)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            h = ckpt.save_sync(5)
            h.durable("disk").wait(120)
        finally:
            stop.set()
            sampler.join()
        assert h.tiers == ("disk",) and h.metrics["mode"] == "streaming"
        assert h.metrics["pieces"] >= 4
    assert 0 < peak <= budget
    _assert_restores(model, policy, 5, expected)


def _save_twice(ckpt: asymcheck.Checkpointer, model: torch.nn.Module,
                after_first: Callable[[asymcheck.SaveHandle], None] = lambda h: None
                ) -> tuple[asymcheck.SaveHandle, asymcheck.SaveHandle, dict[str, torch.Tensor]]:
    """Save steps 1 and 2 of ``model`` (changed in between), each durable on the disk; the
    handles and the state of step 2."""
    first = ckpt.save_sync(1)
    first.durable("disk").wait(60)
    after_first(first)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = copy.deepcopy(model.state_dict())
    second = ckpt.save_sync(2)
    second.durable("disk").wait(60)
    return first, second, expected


def test_streamed_saves_stage_each_piece_through_the_blocks_the_last_save_freed(
        tmp_path: Path) -> None:
    """Pieces go to the host tier's pool once every tier wrote them, and the next save's
    pieces are staged in the same shared memory rather than in fresh pages."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # 2.1 MB
    state_bytes = sum(p.nbytes for p in model.parameters())
    policy = _stream_policy(tmp_path, "stream-reuse", state_bytes // 2)

    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        files: set[int] = set()

        def after_first(first: asymcheck.SaveHandle) -> None:
            assert first.metrics["mode"] == "streaming" and first.metrics["pieces"] >= 4
            files.update(pooled_inodes(ckpt.host))
            assert files and ckpt.host.pooled_bytes == ckpt.host.used_bytes
        _, second, expected = _save_twice(ckpt, model, after_first)
        assert second.metrics["mode"] == "streaming"
        # the same blocks again; one more only if more pieces were in flight at once than
        # in the first save (a slower flush), within the budget of four pieces
        reused = pooled_inodes(ckpt.host)
        assert files <= reused and len(reused) <= 4, (files, reused)
        assert ckpt.host.used_bytes <= ckpt.host.capacity_bytes
    _assert_restores(model, policy, 2, expected)


def test_streamed_device_state_page_locks_each_piece_block_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device state streams into page-locked pieces: each block is locked once, off the
    training thread, and stays locked in the pool, so the next save's pieces register nothing
    new; every block is unlocked once the host tier unmaps it. There is no device here:
    ``pin_memory`` (cudaHostRegister) is a recorder and the state is flagged as on a device;
    ``tests/test_cuda.py`` registers real memory."""
    locked, unlocked = record_page_locks(monkeypatch)
    stream = asymcheck.checkpointer.save_in_pieces
    monkeypatch.setattr(asymcheck.checkpointer, "save_in_pieces", lambda committer, prep: (
        stream(committer, dataclasses.replace(prep, on_device=True))))
    torch.manual_seed(4)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # 2.1 MB
    state_bytes = sum(p.nbytes for p in model.parameters())
    policy = _stream_policy(tmp_path, "stream-locked", state_bytes // 2)
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        first, second, expected = _save_twice(ckpt, model)
        blocks = ckpt.host.used_bytes // (ckpt.host.capacity_bytes // 4)
    assert first.metrics["mode"] == second.metrics["mode"] == "streaming"
    assert first.metrics["host_pinned"] and second.metrics["host_pinned"]
    assert first.metrics["host_pin_s"] > 0
    # one lock per block ever mapped; the second save only locks a block the pool gained
    assert len(locked) == len(set(locked)) == blocks <= 4, (locked, blocks)
    assert sorted(unlocked) == sorted(locked)
    _assert_restores(model, policy, 2, expected)


def test_a_tier_failing_every_write_stops_nothing_else(tmp_path: Path) -> None:
    model = _many_tensors(8)
    policy = _write(tmp_path, f"""
        [[tier]]
        name = "host"
        url = "shm://failing"
        [[tier]]
        name = "disk"
        url = "file:disk"
        [[tier]]
        name = "broken"
        url = "failfile://{tmp_path / 'broken'}"
    """)
    ckpt = asymcheck.Checkpointer(model, None, policy=policy)
    handles = [ckpt.save_sync(s) for s in range(3)]
    for h in handles:
        h.durable("disk").wait(60)
        with pytest.raises(OSError, match="injected write failure"):
            h.durable("broken").wait(60)
    with pytest.raises(asymcheck.CheckpointError):
        ckpt.close_sync()
    assert sorted(_manifests(tmp_path / "disk")) == [2]
    broken = tmp_path / "broken"
    assert not list(broken.rglob("manifest.msgpack")) and not [
        p for p in broken.rglob("*") if p.is_file()]


def _overlap_policy(tmp_path: Path, options: str) -> Path:
    fault_tiers.OverlapTier.instances.clear()
    return _write(tmp_path, f"""
        [[tier]]
        name = "host"
        url = "shm://overlap"
        [[tier]]
        name = "disk"
        url = "overlapfile://{tmp_path / 'disk'}"
        batch = "64KiB"
        options = {{ {options} }}
    """)


@pytest.mark.parametrize("concurrent_puts", [1, 2, 3])
def test_a_flush_keeps_the_tiers_number_of_puts_in_flight(tmp_path: Path,
                                                          concurrent_puts: int) -> None:
    model = _many_tensors(32, 128)
    expected = copy.deepcopy(model.state_dict())
    policy = _overlap_policy(tmp_path, f"concurrent_puts = {concurrent_puts}")
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        h = ckpt.save_sync(0)
        h.durable("disk").wait(60)
        (tier,) = fault_tiers.OverlapTier.instances
        assert tier.puts > 2 * concurrent_puts  # batch files plus the manifest
        assert tier.max_concurrent == concurrent_puts
    loaded = load_from(f"file://{tmp_path / 'disk'}", 0)
    assert loaded is not None
    assert_same(expected, loaded.state["model"])


def test_a_put_failing_while_others_are_in_flight_commits_nothing(tmp_path: Path) -> None:
    model = _many_tensors(32, 128)
    policy = _overlap_policy(tmp_path, "fail_at = 3, delay_s = 0.05")
    ckpt = asymcheck.Checkpointer(model, None, policy=policy)
    h = ckpt.save_sync(0)
    with pytest.raises(OSError, match="injected failure of put 3"):
        h.durable("disk").wait(60)
    (tier,) = fault_tiers.OverlapTier.instances
    assert tier.max_concurrent == 2 and tier.running == 0  # nothing left behind running
    ckpt.save_sync(1).durable("disk").wait(60)  # the tier works again
    with pytest.raises(asymcheck.CheckpointError, match="injected failure of put 3"):
        ckpt.close_sync()
    assert sorted(_manifests(tmp_path / "disk")) == [1]
    assert not list((tmp_path / "disk").rglob("*.tmp-*"))


def _throttled_policy(tmp_path: Path, on_full: str, keep: int = 1) -> Path:
    return _tiers(tmp_path, {"name": "host", "url": "shm://backpressure", "keep": keep},
                  {"name": "slow", "url": f"slowfile://{tmp_path / 'slow'}", "keep": 20,
                   "on_full": on_full, "options": {"bandwidth_bps": 1e9, "latency_s": 0.3}})


def test_on_full_skip_drops_checkpoints_the_slow_tier_cannot_take(tmp_path: Path) -> None:
    model = _many_tensors(4)
    with asymcheck.Checkpointer(model, None, policy=_throttled_policy(tmp_path, "skip")) as ck:
        handles = [ck.save_sync(s) for s in range(8)]
        skipped, durable = [], []
        for h in handles:
            try:
                h.durable("slow").wait(60)
                durable.append(h.step)
            except TierSkipped:
                skipped.append(h.step)
    assert skipped and durable
    assert sorted(_manifests(tmp_path / "slow")) == durable
    assert not any("backpressure_s" in h.metrics for h in handles)  # no save waited


def test_on_full_wait_persists_every_checkpoint_and_reports_the_stall(tmp_path: Path) -> None:
    model = _many_tensors(4)
    with asymcheck.Checkpointer(model, None, policy=_throttled_policy(tmp_path, "wait")) as ck:
        handles = [ck.save_sync(s) for s in range(6)]
        for h in handles:
            h.durable("slow").wait(60)
    assert sorted(_manifests(tmp_path / "slow")) == list(range(6))
    waited = [h for h in handles if h.metrics.get("backpressure_s", 0) > 0]
    assert waited, "a save must wait for the full queue"
    assert all(h.stall_s >= h.metrics["backpressure_s"] for h in waited)  # counted as stall


@pytest.mark.parametrize("keep", [1, 0])
def test_a_save_waits_for_a_flush_rather_than_map_more_than_one_block_beyond_the_kept(
        tmp_path: Path, keep: int) -> None:
    """Host keep = 1 (or 0) and a tier that takes 0.6 s a checkpoint (on_full = wait): a save
    that finds the older copy still being flushed waits for it, so shared memory never holds
    more than the kept copy and the block being saved (before, the queue let it map five);
    with keep = 0 the save waits for the newest copy's flush and takes over its block: one."""
    model = _many_tensors(4)
    policy = _throttled_policy(tmp_path, "wait", keep)
    with asymcheck.Checkpointer(model, None, policy=policy) as ck, host_peak(ck) as peak:
        handles = [ck.save_sync(s) for s in range(6)]
        for h in handles:
            h.durable("slow").wait(60)
        block = ck._commit.host.committed_bytes  # the newest copy: its block and manifest
    assert sorted(_manifests(tmp_path / "slow")) == list(range(6))
    assert block <= peak[0] <= (keep + 1) * block
    assert sum(h.metrics.get("backpressure_s", 0) > 0 for h in handles) >= 3 + 2 * (1 - keep)
    # the save's wait for its block holds the wait for that flush, and counts in its stall
    # beside the capture of the state
    assert all(h.stall_s >= h.metrics["capture_s"] + h.metrics["block_wait_s"]
               and h.metrics["block_wait_s"] >= h.metrics.get("backpressure_s", 0)
               and h.metrics["capture_s"] > 0 for h in handles)


def _host_keep_policy(tmp_path: Path, keep: int, below: str, url: str) -> Path:
    """A host tier keeping ``keep`` copies in front of one tier ``below`` at ``url``."""
    return _tiers(tmp_path, {"name": "host", "url": f"shm://keep-{keep}-{below}", "keep": keep},
                  {"name": below, "url": url, "keep": 5})


@pytest.mark.parametrize("keep", [0, 1])
def test_with_host_keep_0_a_save_takes_the_block_of_the_copy_the_disk_holds(
        tmp_path: Path, keep: int) -> None:
    """Saves further apart than a flush: with host keep = 0 each save is staged in the block of
    the newest host copy, which the disk holds by then, so shared memory holds one copy of
    the state where keep = 1 holds two (the kept copy and the block reserved for the next
    save). Every step stays whole on disk, and the newest in shared memory."""
    model = _many_tensors(16, 256)
    policy = _host_keep_policy(tmp_path, keep, "disk", "file:disk")
    expected = {}
    with asymcheck.Checkpointer(model, None, policy=policy, mode="naive") as ckpt, \
            host_peak(ckpt) as peak:
        for step in range(4):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            expected[step] = copy.deepcopy(model.state_dict())
            ckpt.save_sync(step).durable("disk").wait(60)
            ckpt.wait_idle_sync()
        block = ckpt.host.committed_bytes  # the newest copy: its block and manifest
        assert sorted(_manifests(ckpt.host.directory)) == [3]
    if keep == 0:
        assert block <= peak[0] <= block  # the pool's block, mapped once, staged every save
    else:
        assert peak[0] >= 2 * block - 4096  # a spare beside the kept copy
    for step in range(4):
        loaded = load_from(f"file://{tmp_path / 'disk'}", step)
        assert loaded is not None
        assert_same(expected[step], loaded.state["model"], f"step {step}")
    _assert_restores(model, policy, 3, expected[3])


def test_with_host_keep_0_a_copy_no_tier_below_holds_keeps_its_block(tmp_path: Path) -> None:
    """The only tier below fails every write: the next save maps a block of its own beside
    the newest host copy, which stays readable while that save is staged."""
    model = _many_tensors(16, 256)
    policy = _host_keep_policy(tmp_path, 0, "broken", f"failfile://{tmp_path / 'broken'}")
    ckpt = asymcheck.Checkpointer(model, None, policy=policy, mode="naive")
    with host_peak(ckpt) as peak:
        for step in range(3):
            with pytest.raises(OSError, match="injected write failure"):
                ckpt.save_sync(step).durable("broken").wait(60)
            ckpt.wait_idle_sync()
        block = ckpt.host.committed_bytes
    with pytest.raises(asymcheck.CheckpointError):
        ckpt.close_sync()
    assert peak[0] >= 2 * block - 4096


def test_wait_idle_returns_once_every_flush_and_its_retention_is_done(tmp_path: Path) -> None:
    model = _many_tensors(8, 256)
    policy = _write(tmp_path, f"""
        [[tier]]
        name = "host"
        url = "shm://idle"
        keep = 1
        [[tier]]
        name = "slow"
        url = "slowfile://{tmp_path / 'slow'}"
        keep = 2
        options = {{ bandwidth_bps = 8e6 }}
    """)
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        handles = [ckpt.save_sync(step) for step in range(4)]
        assert not handles[-1].durable("slow").done()  # ~1 MB at 8 MB/s each: still queued
        ckpt.wait_idle_sync()
        assert all(h.durable("slow").done() for h in handles)
        assert sorted(_manifests(tmp_path / "slow")) == [2, 3]  # retention ran too
        handles[-1].durable("slow").wait(0)  # succeeded, not failed
        ckpt.save_sync(4).wait_all_sync(60)  # saving goes on afterwards
    assert sorted(_manifests(tmp_path / "slow")) == [3, 4]


def test_a_newer_commit_never_deletes_a_host_copy_whose_flush_is_not_queued_yet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits overlap: step 1's manifest is visible on the host tier while its commit has
    not yet queued the flush; step 2's retention (host keep = 1) must leave step 1 alone."""
    model = _many_tensors(8, 256)
    policy = _write(tmp_path, """
        [[tier]]
        name = "host"
        url = "shm://overlap"
        keep = 1
        [[tier]]
        name = "disk"
        url = "file:disk"
        keep = 5
    """)
    with asymcheck.Checkpointer(model, None, policy=policy, mode="naive") as ckpt:
        ckpt.save_sync(0).wait_all_sync(60)
        host = ckpt.host
        put = host.put

        async def slow_after_manifest_1(key: str, data: Any) -> None:
            await put(key, data)
            if key == "step-000000000001/manifest.msgpack":
                await asyncio.sleep(0.5)  # the loop resumes this commit late
        monkeypatch.setattr(host, "put", slow_after_manifest_1)
        expected = {}
        handles = []
        for step in (1, 2, 3):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            expected[step] = copy.deepcopy(model.state_dict())
            handles.append(ckpt.save_sync(step))
        for h in handles:
            h.wait_all_sync(60)  # raises if a flush found its host copy gone
    for step in (1, 2, 3):
        loaded = load_from(f"file://{tmp_path / 'disk'}", step)
        assert loaded is not None
        assert_same(expected[step], loaded.state["model"], f"step {step}")



def test_a_streamed_state_is_compressed_and_batched_like_any_other(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = _many_tensors(64, 128)  # 64 tensors of 64 KiB and 512 B: ~2.1 MB
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # low mantissa bytes zero: compressible
    state_bytes = sum(p.nbytes for p in model.parameters())
    policy = _stream_policy(tmp_path, "stream-coded", state_bytes // 3, """
        [compression]
        mode = "always"
        min_bytes = "32KiB"
    """)
    expected = copy.deepcopy(model.state_dict())
    with asymcheck.Checkpointer(model, None, policy=policy) as ckpt:
        h = ckpt.save_sync(2)
        h.durable("disk").wait(120)
        assert h.metrics["mode"] == "streaming" and h.metrics["pieces"] >= 3
    man = _manifests(tmp_path / "disk")[2]
    codecs = {c.codec for t in man.tensors for c in t.chunks}
    assert "shuffle" in codecs and "raw" in codecs  # large tensors coded, small ones raw
    assert man.stored_bytes < state_bytes
    assert len(man.files) < len(man.tensors)  # small tensors share batch files
    assert man.info["streamed"] is True and man.info["compression"]["stored_bytes"] > 0
    _assert_restores(model, policy, 2, expected)
