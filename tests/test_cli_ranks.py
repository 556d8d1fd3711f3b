"""The ``asymcheck`` command on a real checkpoint of two ranks (gloo on loopback, see
``tests/test_dist.py``): shard sizes, the shards of ``inspect``, ``verify`` descending into
every rank's shard, ``restore`` of rank 0's shard, and ``gc`` of shared memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asymcheck import cli
from asymcheck.layout import MANIFEST_NAME, host_shard_url, rank_dir, shard_manifest_key, step_dir
from asymcheck.manifest import Manifest
from tests._util import assert_same
from tests.test_cli import committed, run
from tests.test_dist import WORLD, _local, _ok, _policy, _spawn


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Steps 2, 3 and 4 of two DDP ranks committed on local, 3 and 4 in shared memory; the
    command runs there, so its default policy is the one the ranks saved with."""
    _ok(_spawn("ddp-save", tmp_path), "SAVED")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shm_dir(work: Path, shm_root: Path, rank: int | None = None) -> Path:
    url = _policy(work).staging.url
    return shm_root / (url if rank is None else host_shard_url(url, rank)).removeprefix("shm://")


def shard(work: Path, step: int, rank: int) -> Manifest:
    return Manifest.from_bytes((_local(work) / shard_manifest_key(step, rank)).read_bytes())


def data_bytes(directory: Path) -> int:
    """The size of the data files below ``directory`` (manifests left out)."""
    return sum(p.stat().st_size for p in directory.rglob("*")
               if p.is_file() and p.name != MANIFEST_NAME)


def test_ls_and_inspect_show_the_shards_and_their_sizes(
        capsys: pytest.CaptureFixture[str], work: Path, shm_root: Path) -> None:
    local = _local(work)
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0
    host, loc = json.loads(out)["tiers"]
    assert [e["step"] for e in loc["checkpoints"]] == [4, 3, 2]
    for e in loc["checkpoints"]:
        shards = [shard(work, e["step"], r) for r in range(WORLD)]
        assert e["world_size"] == WORLD and e["status"] == "committed" and e["error"] is None
        assert e["stored_bytes"] == sum(s.stored_bytes for s in shards) \
            == data_bytes(local / step_dir(e["step"])) > 0
        assert e["tensor_bytes"] == sum(s.nbytes for s in shards) > 0
        assert [r["stored_bytes"] for r in e["ranks"]] == [s.stored_bytes for s in shards]
        assert e["codecs"] == ["raw"]
    assert [e["step"] for e in host["checkpoints"]] == [4, 3]
    for e in host["checkpoints"]:
        assert e["stored_bytes"] == sum(
            data_bytes(shm_dir(work, shm_root, r) / step_dir(e["step"]))
            for r in range(WORLD)) > 0

    code, out, _ = run(capsys, "ls", "--tier", "local")
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["4"])
    assert row[2] == "committed" and row[-1] == str(WORLD) and row[3:5] != ["0", "B"]

    code, out, _ = run(capsys, "inspect", "4", "--tier", "local")
    assert code == 0 and out.startswith("step 4 on local")
    lines = out.splitlines()
    rows = [line.split() for line in lines[lines.index("shards") + 2:][:WORLD]]
    assert [(r[0], r[1]) for r in rows] == [(str(i), str(len(shard(work, 4, i).tensors)))
                                           for i in range(WORLD)]
    assert "  replicated  model (saved by rank 0 only)" in lines

    code, out, _ = run(capsys, "inspect", "4", "--tier", "local", "--json")
    doc = json.loads(out)
    assert [(s["rank"], s["tensors"], s["stored_bytes"]) for s in doc["shards"]] == [
        (i, len(shard(work, 4, i).tensors), shard(work, 4, i).stored_bytes)
        for i in range(WORLD)]
    assert doc["stored_bytes"] == data_bytes(local / step_dir(4)) and doc["tensors"] == []

    code, out, _ = run(capsys, "inspect", "4", "--tier", "local", "--rank", "1")
    assert code == 0 and out.startswith(f"step 4 on local ({local.as_uri()}), rank 1's shard")
    assert all(f"  {f.key}" in out for f in shard(work, 4, 1).files)
    code, _, err = run(capsys, "inspect", "4", "--rank", "2")
    assert code == 2 and "there is no rank 2" in err


def flip_a_byte(work: Path, step: int, rank: int) -> tuple[str, str, int]:
    """Flip one byte of a raw tensor of ``rank``'s shard on local: (tensor, file, offset)."""
    man = shard(work, step, rank)
    meta = next(t for t in man.tensors if t.nbytes and t.chunks[0].codec == "raw")
    file, offset = man.locate(meta.chunks[0])
    path = _local(work) / step_dir(step) / rank_dir(rank) / file
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x20
    path.write_bytes(bytes(raw))
    return meta.path, file, offset


def test_verify_checks_every_rank_and_names_the_rank_of_a_fault(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    code, out, _ = run(capsys, "verify", "--all")
    assert code == 0, out
    lines = out.splitlines()
    for tier, step in [("local", 2), ("local", 3), ("host", 3), ("local", 4), ("host", 4)]:
        ok = next(line for line in lines if line.startswith(f"ok     {tier}  step {step}  "))
        assert f"  {WORLD} ranks: " in ok
    shards = [shard(work, 4, r) for r in range(WORLD)]
    tensors, files = sum(len(s.tensors) for s in shards), sum(len(s.files) for s in shards)
    ok = next(line for line in lines if line.startswith("ok     local  step 4"))
    assert ok.startswith(f"ok     local  step 4  {WORLD} ranks: {tensors} tensors, ")
    assert ok.endswith(f" in {files} file(s)")
    assert out.splitlines()[-1] == "verified 3 checkpoint(s), 5 copies: 0 fault(s)"

    path, file, offset = flip_a_byte(work, 4, 1)
    code, out, _ = run(capsys, "verify")
    assert code == 1
    (fault,) = [line for line in out.splitlines() if line.startswith("FAULT")]
    assert fault.startswith(f"FAULT  local  step 4  rank 1  tensor {path}  chunk {file}@{offset}")
    assert "checksum mismatch" in fault and any(line.startswith("ok     host  step 4")
                                                for line in out.splitlines())
    code, out, _ = run(capsys, "verify", "--json", "--tier", "local")
    assert code == 1
    assert [(f["step"], f["rank"], f["kind"], f["name"]) for f in json.loads(out)["faults"]] \
        == [(4, 1, "tensor", path)]

    (_local(work) / shard_manifest_key(2, 0)).unlink()  # rank 0's shard of step 2 uncommitted
    code, out, _ = run(capsys, "verify", "2")
    assert code == 1 and out.splitlines()[0].startswith("FAULT  local  step 2  rank 0  shard: ")


def test_restore_exports_rank_0s_shard(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    code, out, _ = run(capsys, "restore", "latest", "--to", "state.pt")
    assert code == 0
    assert out.splitlines()[1] == (f"step 4 was saved by {WORLD} ranks: state.pt holds rank 0's "
                                   "shard (model: whole (replicated); optimizers: rank 0 only)")
    doc = torch.load(work / "state.pt", weights_only=True)
    assert (doc["step"], doc["rank"], doc["world_size"]) == (4, 0, WORLD)
    expected = torch.load(work / "expected-0.pt", weights_only=True)["state"]
    assert_same(expected["model"], doc["model"])
    assert_same(expected["opts"], doc["optimizers"])

    code, out, _ = run(capsys, "restore", "4", "--to", "model.safetensors")
    assert code == 0 and "(tensors read from host: " in out
    assert out.splitlines()[1].endswith("holds rank 0's shard (model: whole (replicated))")


def test_gc_of_shared_memory_removes_the_ranks_shards_too(
        capsys: pytest.CaptureFixture[str], work: Path, shm_root: Path) -> None:
    code, out, _ = run(capsys, "gc", "--keep", "1", "--tier", "host")
    assert code == 0 and out.splitlines() == ["removed host step 3 (beyond keep=1)",
                                              "gc: 1 removed"]
    assert committed(shm_dir(work, shm_root)) == [4]
    for r in range(WORLD):
        assert sorted(p.name for p in shm_dir(work, shm_root, r).glob("step-*")) == [step_dir(4)]
    assert cli.main(["verify", "--quiet"]) == 0
