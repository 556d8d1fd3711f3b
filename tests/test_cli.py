"""The ``asymcheck`` command on real checkpoints: output, exit codes, files it writes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
from asymcheck import cli
from asymcheck.layout import step_dir
from asymcheck.manifest import Manifest, committed_steps, manifest_key
from asymcheck.retention import needed_bases, plan_deletions
from tests._util import assert_same, make_training, snapshot, train_steps
from tests.tiers.tier_cases import hdfs_base_url
from tiers.registry import open_tier


def write_policy(path: Path, shm_name: str, local: Path, keep_host: int = 10,
                 keep_local: int = 10) -> Path:
    path.write_text(f'[[tier]]\nname = "host"\nurl = "shm://{shm_name}"\nkeep = {keep_host}\n\n'
                    f'[[tier]]\nname = "local"\nurl = "{local.as_uri()}"\nkeep = {keep_local}\n')
    return path


def save_steps(policy: str | Path | asymcheck.Policy, steps: list[int],
               job: str | None = None) -> dict[str, Any]:
    """Train and save ``steps``, each durable on every tier; the snapshot of the last one."""
    model, opt, sched = make_training(seed=1)
    expected: dict[str, Any] = {}
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                job=job) as ckpt:
        for step in steps:
            train_steps(model, opt, sched, 1)
            ckpt.save_sync(step).wait_all_sync(60)
            expected = snapshot(model, opt, sched)
    return expected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def local_manifest(local: Path, step: int) -> Manifest:
    return Manifest.from_bytes((local / manifest_key(step)).read_bytes())


@pytest.fixture
def local(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


@pytest.fixture
def policy_file(tmp_path: Path, local: Path) -> Path:
    return write_policy(tmp_path / "tiers.toml", "asymcheck-cli", local)


@pytest.fixture
def saved(policy_file: Path) -> dict[str, Any]:
    """Steps 1, 2 and 3 committed on host and local; the state of step 3."""
    return save_steps(policy_file, [1, 2, 3])


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default policy names ./checkpoints


def test_ls_lists_steps_newest_first_with_uncommitted_dirs(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        local: Path) -> None:
    (local / "step-000000000009").mkdir()
    (local / "step-000000000009" / "data-0000.bin").write_bytes(b"x" * 10)
    code, out, _ = run(capsys, "ls", "--policy", str(policy_file))
    assert code == 0
    host, loc = out.split("\n\n")
    assert host.startswith("host  shm://asymcheck-cli  (3 committed)")
    assert loc.startswith(f"local  {local.as_uri()}  (3 committed)")
    rows = [line.split() for line in loc.splitlines()[2:]]
    assert [r[0] for r in rows] == ["9", "3", "2", "1"]
    assert rows[0][2] == "uncommitted" and rows[0][3:5] == ["10", "B"]
    assert all(r[2] == "committed" and "raw" in r for r in rows[1:])

    code, out, _ = run(capsys, "ls", "--json", "--policy", str(policy_file))
    assert code == 0
    doc = json.loads(out)
    assert [t["name"] for t in doc["tiers"]] == ["host", "local"]
    entries = doc["tiers"][1]["checkpoints"]
    assert [(e["step"], e["committed"]) for e in entries] == [
        (9, False), (3, True), (2, True), (1, True)]
    m = local_manifest(local, 3)
    assert entries[1]["stored_bytes"] == m.stored_bytes and entries[1]["codecs"] == ["raw"]
    assert entries[1]["world_size"] == 1 and entries[1]["job"] == m.job
    assert entries[1]["created_s"] == m.created_s and entries[1]["created"].startswith("20")


def test_ls_of_a_missing_directory_creates_nothing(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    code, out, _ = run(capsys, "ls", "--tier", (tmp_path / "none").as_uri())
    assert code == 0
    assert "no checkpoints (the directory does not exist)" in out
    assert not (tmp_path / "none").exists()
    code, out, _ = run(capsys, "ls")  # the default policy: ./checkpoints and its shm twin
    assert code == 0 and out.count("does not exist") == 2
    assert not (tmp_path / "checkpoints").exists()


def test_inspect_shows_tensors_files_plan_and_codec_decisions(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        local: Path, shm_root: Path) -> None:
    code, out, _ = run(capsys, "inspect", "2", "--tier", "local", "--policy", str(policy_file))
    assert code == 0
    assert out.startswith(f"step 2 on local ({local.as_uri()})")
    weight = next(line for line in out.splitlines() if "model/body.0.weight" in line).split()
    assert weight[1:4] == ["float32", "[32,", "32]"] and weight[-2:] == ["1", "raw"]
    assert "optimizers/0/state/body.0.weight/exp_avg" in out and "rng/torch" in out
    m = local_manifest(local, 2)
    assert f"  {m.files[0].key}" in out and "partitions" not in out

    plan = {"total_bytes": 8192, "windows": [[0, "forward", "body.0", 1024],
                                             [1, "backward", "head", 7168]]}
    decided = m.with_layout(m.tensors, m.files, m.segments, plan=plan,
                            compression={"mode": "auto", "full": True, "base_steps": [],
                                             "raw_bytes": m.nbytes, "stored_bytes": m.nbytes,
                                             "decisions": [["model/body.0.weight", "raw", 1.04,
                                                            1.0]]})

    async def rewrite() -> None:
        tier = open_tier(local.as_uri(), name="local")
        await tier.put(manifest_key(2), decided.to_bytes())
        await tier.close()

    asyncio.run(rewrite())
    code, out, err = run(capsys, "inspect", "2", "--tier", "local", "--policy", str(policy_file))
    assert code == 0, err
    assert "partitions (8.0 KiB planned in 2 windows)" in out
    assert "forward      1 partitions  1.0 KiB" in out and "backward" in out
    assert "compression (auto, full)" in out
    decision = next(line for line in out.splitlines()
                    if line.split()[:2] == ["model/body.0.weight", "raw"])
    assert decision.split()[2:] == ["1.040", "1.000"]

    code, out, _ = run(capsys, "inspect", "latest", "--json", "--policy", str(policy_file))
    doc = json.loads(out)
    assert code == 0 and doc["step"] == 3 and doc["tier"] == "host"
    m3 = local_manifest(shm_root / "asymcheck-cli", 3)  # the host copy: its own file layout
    chunks = [c for t in doc["tensors"] for c in t["chunks"]]
    assert [c["xxh64"] for c in chunks] == [
        f"{c.xxh64:016x}" for t in m3.tensors for c in t.chunks]
    assert doc["files"] == [{"key": f.key, "size": f.size} for f in m3.files]


def test_verify_exits_1_naming_the_tier_and_tensor_of_a_flipped_byte(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        local: Path) -> None:
    code, out, _ = run(capsys, "verify", "--policy", str(policy_file))
    assert code == 0
    assert "ok     host  step 3" in out and "ok     local  step 3" in out
    assert out.rstrip().endswith("verified 1 checkpoint(s), 2 copies: 0 fault(s)")

    man = local_manifest(local, 3)
    meta = next(t for t in man.tensors if t.path == "model/body.0.weight")
    file, offset = man.locate(meta.chunks[0])  # the batch file and offset on this tier
    data = local / "step-000000000003" / file
    raw = bytearray(data.read_bytes())
    raw[offset + 5] ^= 0x10
    data.write_bytes(bytes(raw))

    code, out, _ = run(capsys, "verify", "3", "--policy", str(policy_file))
    assert code == 1
    fault = next(line for line in out.splitlines() if line.startswith("FAULT"))
    assert fault.startswith(f"FAULT  local  step 3  tensor model/body.0.weight  chunk "
                            f"{file}@{offset}")
    assert "checksum mismatch" in fault and "ok     host  step 3" in out
    assert "1 fault(s)" in out

    code, out, _ = run(capsys, "verify", "--all", "--json", "--policy", str(policy_file))
    doc = json.loads(out)
    assert code == 1 and doc["steps"] == [1, 2, 3] and not doc["ok"]
    assert [(f["tier"], f["step"], f["kind"], f["name"], f["offset"]) for f in doc["faults"]] \
        == [("local", 3, "tensor", "model/body.0.weight", offset)]
    assert sum(c["ok"] for c in doc["copies"]) == 5

    code, out, _ = run(capsys, "verify", "--quiet", "--tier", "host", "--policy",
                       str(policy_file))
    assert code == 0 and out == ""


def test_a_corrupt_manifest_is_shown_skipped_and_reported(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        local: Path) -> None:
    path = local / manifest_key(2)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "ls", "--tier", "local", "--policy", str(policy_file))
    assert code == 0 and "(2 committed)" in out
    assert next(line for line in out.splitlines() if line.split()[:1] == ["2"]).split()[2] \
        == "corrupt"
    assert "step 2: local:step-000000000002/manifest.msgpack: " in out
    code, out, _ = run(capsys, "inspect", "2", "--tier", "local", "--policy", str(policy_file))
    assert code == 2
    code, out, _ = run(capsys, "inspect", "2", "--tier", "local", "--tier", "host", "--policy",
                       str(policy_file))
    assert code == 0 and out.startswith("step 2 on host")
    code, out, _ = run(capsys, "verify", "2", "--policy", str(policy_file))
    assert code == 1
    assert "FAULT  local  step 2  manifest: local:step-000000000002/manifest.msgpack:" in out
    assert "ok     host  step 2" in out


def test_restore_to_safetensors_holds_the_models_tensors(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    target = tmp_path / "model.safetensors"
    code, out, _ = run(capsys, "restore", "latest", "--to", str(target), "--policy",
                       str(policy_file))
    assert code == 0 and out.startswith(f"wrote {target}: step 3, ")
    assert_same(saved["model"], load_file(target))
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"step": "3"}


def test_safetensors_export_unties_shared_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"model": {"emb": weight, "head": weight, "t": weight.t()}}
    assert cli.export_safetensors(state, 7, tmp_path / "tied.safetensors") == 3
    loaded = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["head"], weight) and torch.equal(loaded["t"], weight.t())


def test_restore_to_pt_loads_with_weights_only(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    code, _, _ = run(capsys, "restore", "3", "--to", str(target), "--policy", str(policy_file))
    assert code == 0
    doc = torch.load(target, weights_only=True)
    assert set(doc) == {"model", "optimizers", "step"} and doc["step"] == 3
    assert_same(saved["model"], doc["model"])
    assert_same(saved["opt"]["state"], doc["optimizers"][0]["state"])
    assert doc["optimizers"][0]["param_groups"][0]["lr"] == saved["opt"]["param_groups"][0]["lr"]

    code, _, err = run(capsys, "restore", "3", "--to", str(target), "--policy", str(policy_file))
    assert code == 2 and "exists (use --force" in err
    code, _, _ = run(capsys, "restore", "2", "--to", str(target), "--force", "--policy",
                     str(policy_file))
    assert code == 0 and torch.load(target, weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".state.pt")] == []


def test_a_failed_export_write_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        tmp_path: Path) -> None:
    for name in ("state.pt", "model.safetensors"):
        (tmp_path / f".{name}.tmp-{os.getpid()}").mkdir()  # where the export is written first
        code, _, err = run(capsys, "restore", "3", "--to", str(tmp_path / name), "--policy",
                           str(policy_file))
        assert code == 2 and err.startswith("asymcheck: error: cannot write "), err
        assert err.count("\n") == 1 and not (tmp_path / name).exists()


def test_user_errors_exit_2_with_one_line_on_stderr(
        capsys: pytest.CaptureFixture[str], saved: dict[str, Any], policy_file: Path,
        tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tier]]\nname = "host"\nurl = "shm://x"\nkeep = -1\n')
    cases = [
        (["ls", "--policy", str(bad)], "bad.toml: tier[0].keep: must be an integer >= 0"),
        (["verify", "99", "--policy", str(policy_file)],
         "step 99 is not committed on tier(s) host, local (committed: 1, 2, 3)"),
        (["inspect", "latest", "--tier", (tmp_path / "empty").as_uri()],
         "no committed checkpoint on tier(s) file"),
        (["restore", "7", "--to", str(tmp_path / "x.pt"), "--policy", str(policy_file)],
         "step 7 is not committed on any tier"),
        (["restore", "3", "--to", str(tmp_path / "x.bin"), "--policy", str(policy_file)],
         "must end in .pt or .safetensors"),
        (["ls", "--tier", "nosuch"], "no tier named 'nosuch'"),
        (["ls", "--tier", "ftp://host/x"], "unknown tier URL scheme 'ftp'"),
        (["gc", "--tier", (tmp_path / "empty").as_uri()], "pass --keep N"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("asymcheck: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    code, _, err = run(capsys, "verify", "three")
    assert code == 2 and "not a step number or 'latest'" in err
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"asymcheck {asymcheck.__version__}\n"


def committed(local: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in local.glob("step-*/manifest.msgpack"))


@pytest.mark.parametrize("keep_host", [1, 0])  # 0: the newest stays until the next save
def test_gc_applies_keep_and_drops_old_uncommitted_dirs(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, local: Path, shm_root: Path,
        keep_host: int) -> None:
    save_steps(write_policy(tmp_path / "save.toml", "asymcheck-gc", local), [1, 2, 3, 4])
    gc_policy = write_policy(tmp_path / "gc.toml", "asymcheck-gc", local, keep_host=keep_host,
                             keep_local=2)
    for step in (0, 9):  # a crashed save before the newest commit, and one maybe in flight
        (local / f"step-{step:012d}").mkdir()
        (local / f"step-{step:012d}" / "data-0.bin").write_bytes(b"partial")
    host = shm_root / "asymcheck-gc"

    code, out, _ = run(capsys, "gc", "--dry-run", "--policy", str(gc_policy))
    assert code == 0
    assert out.splitlines() == [  # newest first, as live retention deletes
        "would remove host step 3 (beyond keep=1)", "would remove host step 2 (beyond keep=1)",
        "would remove host step 1 (beyond keep=1)", "would remove local step 2 (beyond keep=2)",
        "would remove local step 1 (beyond keep=2)", "would remove local step 0 (uncommitted)",
        "gc: 6 to remove"]
    assert committed(local) == [1, 2, 3, 4] and committed(host) == [1, 2, 3, 4]

    code, out, _ = run(capsys, "gc", "--policy", str(gc_policy))
    assert code == 0 and out.splitlines()[-1] == "gc: 6 removed"
    assert committed(host) == [4] and committed(local) == [3, 4]
    assert sorted(p.name for p in local.iterdir()) == [
        "step-000000000003", "step-000000000004", "step-000000000009"]
    assert sorted(p.name for p in host.iterdir()) in (["step-000000000004"],
                                                      [".free", "step-000000000004"])

    code, out, _ = run(capsys, "gc", "--keep", "1", "--quiet", "--policy", str(gc_policy))
    assert code == 0 and out == "removed local step 3 (beyond keep=1)\n"
    assert committed(local) == [4]


def agreement_policy(host: str, local: Path, keep: int) -> asymcheck.Policy:
    """Deltas on every step but each third (0 and 3 full; 1, 2 on 0; 4, 5 on 3)."""
    return asymcheck.Policy(
        tiers=(asymcheck.TierPolicy(name="host", url=f"shm://{host}", keep=2),
               asymcheck.TierPolicy(name="local", url=local.as_uri(), keep=keep)),
        compression=asymcheck.CompressionPolicy(mode="always", full_every=3, min_bytes=1))


def planned(directory: Path, keep: int) -> list[int]:
    """What ``retention.plan_deletions`` deletes on a local tier in ``directory``."""
    async def plan() -> list[int]:
        tier = open_tier(directory.as_uri(), name="plan")
        try:
            steps = await committed_steps(tier)
            needs = await needed_bases(tier, steps[-keep:])
            return plan_deletions(steps, keep, needs=needs)
        finally:
            await tier.close()

    return asyncio.run(plan())


def test_gc_deletes_what_live_retention_deletes(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, local: Path) -> None:
    save_steps(agreement_policy("asymcheck-agree", local, keep=6), list(range(6)))
    assert committed(local) == [0, 1, 2, 3, 4, 5]
    assert local_manifest(local, 5).info["compression"]["base_steps"] == [3]
    offline = tmp_path / "offline"
    shutil.copytree(local, offline)

    code, out, _ = run(capsys, "gc", "--keep", "2", "--dry-run", "--tier", offline.as_uri())
    assert code == 0
    would = [int(line.split()[4]) for line in out.splitlines()
             if line.startswith("would remove file step ")]
    assert would == planned(offline, 2) == [2, 1, 0]  # newest first; 3 is 4's and 5's base
    assert out.splitlines()[-1] == "gc: 3 to remove" and committed(offline) == list(range(6))

    # the live checkpointer, keep=2, saves step 6 and applies retention to the same state
    save_steps(agreement_policy("asymcheck-agree", local, keep=2), [6])
    shutil.copytree(local / step_dir(6), offline / step_dir(6))
    expected = sorted(set(range(7)) - set(planned(offline, 2)))
    code, out, _ = run(capsys, "gc", "--keep", "2", "--tier", offline.as_uri())
    assert code == 0
    assert committed(offline) == committed(local) == expected == [3, 5, 6]
    assert sorted(p.name for p in offline.iterdir()) == sorted(p.name for p in local.iterdir())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_gc_stale_shm_removes_only_a_dead_local_jobs_blocks(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, shm_root: Path) -> None:
    node, pid = os.uname().nodename, dead_pid()
    jobs = {"dead": f"{node}-{pid}-abc123", "live": None, "remote": f"elsewhere-{pid}-abc123"}
    files = {}
    for name, job in jobs.items():
        files[name] = write_policy(tmp_path / f"{name}.toml", f"asymcheck-{name}",
                                   tmp_path / f"ckpt-{name}")
        save_steps(files[name], [5], job=job)
        assert committed(shm_root / f"asymcheck-{name}") == [5]

    code, out, _ = run(capsys, "gc", "--stale-shm", "--dry-run", "--policy", str(files["live"]))
    assert code == 0
    assert f"would remove shm {shm_root / 'asymcheck-dead'} (job {jobs['dead']} is dead; " \
           "steps 5; " in out
    assert (shm_root / "asymcheck-dead").is_dir()

    code, out, _ = run(capsys, "gc", "--stale-shm", "--policy", str(files["live"]))
    assert code == 0
    assert f"removed shm {shm_root / 'asymcheck-dead'} (job {jobs['dead']} is dead" in out
    assert f"kept shm {shm_root / 'asymcheck-live'} (job {node}-{os.getpid()}-" in out
    assert f"kept shm {shm_root / 'asymcheck-remote'} (job {jobs['remote']} runs on another " \
           "host)" in out
    assert out.splitlines()[-1] == "gc: 1 removed"
    assert not (shm_root / "asymcheck-dead").exists()
    assert committed(shm_root / "asymcheck-live") == [5]
    assert committed(shm_root / "asymcheck-remote") == [5]
    assert committed(tmp_path / "ckpt-dead") == [5]  # the durable copy stays


def test_console_script_reports_a_fault_with_exit_code_1(
        saved: dict[str, Any], local: Path) -> None:
    man = local_manifest(local, 3)
    meta = man.tensors[0]
    file, offset = man.locate(meta.chunks[0])
    data = local / "step-000000000003" / file
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0x01
    data.write_bytes(bytes(raw))
    script = Path(sys.executable).with_name("asymcheck")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "asymcheck.cli"]
    out = subprocess.run([*command, "verify", "--tier", local.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"FAULT  file  step 3  tensor {meta.path}  chunk {file}@{offset}" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.hdfs
def test_ls_lists_a_checkpoint_on_hdfs(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    url = f"{hdfs_base_url()}/cli-{uuid.uuid4().hex[:12]}"
    policy_file = tmp_path / "hdfs.toml"
    policy_file.write_text(f'[[tier]]\nname = "host"\nurl = "shm://asymcheck-hdfs"\n\n'
                           f'[[tier]]\nname = "hdfs"\nurl = "{url}"\n')
    try:
        save_steps(policy_file, [4])
        code, out, _ = run(capsys, "ls", "--json", "--tier", url)
        assert code == 0
        (tier,) = json.loads(out)["tiers"]
        assert tier["name"] == "hdfs" and tier["url"] == url
        assert [(e["step"], e["committed"]) for e in tier["checkpoints"]] == [(4, True)]
    finally:
        async def cleanup() -> None:
            tier = open_tier(url)
            try:
                await tier.delete_prefix("")
            finally:
                await tier.close()

        asyncio.run(cleanup())


def test_tier_urls_are_named_by_scheme_and_policy_tiers_by_their_name(
        policy_file: Path) -> None:
    specs = cli.tier_specs(str(policy_file), ["local", "file:///a", "shm://b"])
    assert [(s.name, s.keep) for s in specs] == [("local", 10), ("file", None), ("shm", None)]
    specs = cli.tier_specs(None, ["file:///a", "file:///b"])
    assert [s.name for s in specs] == ["file:///a", "file:///b"]
    assert [s.url for s in cli.tier_specs(None, [])] == [
        t.url for t in asymcheck.default_policy("checkpoints").tiers]
