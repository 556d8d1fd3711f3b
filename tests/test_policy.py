"""Policy files: valid ones parse; bad ones fail in one line naming the file and the key."""

from __future__ import annotations

import copy
import logging
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import asymcheck
from asymcheck.policy import PolicyError, default_policy, load_policy, parse_size
from tests._util import assert_same

GOOD = """
[[tier]]
name = "host"
url = "shm://asymcheck-test"
capacity = "8GiB"
keep = 2
[[tier]]
name = "local"
url = "file:ckpt"
keep = 3
[[tier]]
name = "hdfs"
url = "hdfs://127.0.0.1:9000/ckpt"
keep = 5
every = 10
on_full = "skip"
[compression]
mode = "auto"
full_every = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_policy_parses(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, GOOD))
    assert [t.name for t in policy.tiers] == ["host", "local", "hdfs"]
    assert policy.tier("host").capacity_bytes == 8 * 2**30
    assert policy.tier("local").url == f"file://{tmp_path / 'ckpt'}"  # relative to the file
    assert policy.tier("hdfs").every == 10 and policy.tier("hdfs").on_full == "skip"
    assert policy.compression.mode == "auto" and policy.compression.full_every == 10


def test_default_policy_is_host_plus_local(tmp_path: Path) -> None:
    policy = default_policy(tmp_path / "c")
    assert [t.scheme for t in policy.tiers] == ["shm", "file"]
    assert default_policy(tmp_path / "c").staging.url == policy.staging.url
    assert default_policy(tmp_path / "d").staging.url != policy.staging.url


@pytest.mark.parametrize(("value", "expected"), [
    ("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)), (4096, 4096),
    ("10k", 10_000)])
def test_sizes_parse(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(("patch", "key", "words"), [
    (("keep = 3", "keep = 3\ncolour = 1"), "tier[1].colour", "unknown key"),
    (('capacity = "8GiB"', 'capacity = "8 gigs"'), "tier[0].capacity", "size"),
    (('"hdfs://127.0.0.1:9000/ckpt"', '"ftp://host/ckpt"'), "tier[2].url", "unknown scheme"),
    (("keep = 3", "keep = 0"), "tier[1].keep", ">= 1 (0 only on the shm:// host tier)"),
    (("keep = 2", "keep = -1"), "tier[0].keep", ">= 0"),
    (("every = 10", "every = -2"), "tier[2].every", ">= 1"),
    (('mode = "auto"', 'mode = "fast"'), "compression.mode", "off, auto or always"),
    (('on_full = "skip"', 'on_full = "drop"'), "tier[2].on_full", "wait"),
    (('name = "local"', 'name = "host"'), "tier[1].name", "duplicate"),
    (('"file:ckpt"', '"shm://second"'), "tier", "only the first tier may be a shm://"),
    (('"file:ckpt"', '"file:../../etc"'), "tier[1].url", ".."),
    (("[compression]", "[compresion]"), "compresion", "unknown key"),
])
def test_bad_policies_fail_in_one_line_naming_file_and_key(
        tmp_path: Path, patch: tuple[str, str], key: str, words: str) -> None:
    assert patch[0] in GOOD
    path = _write(tmp_path, GOOD.replace(*patch, 1))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}:"), msg
    assert words in msg


def test_the_host_tier_may_keep_no_copy_beyond_the_next_save(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, GOOD.replace("keep = 2", "keep = 0", 1)))
    host = policy.tier("host")
    assert host.keep == 0 and host.retained == 1  # the newest stays until the next save
    assert policy.tier("local").retained == 3


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.toml")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(_write(tmp_path, "[[tier]\nname="))
    with pytest.raises(PolicyError, match=r"tier: at least one"):
        load_policy(_write(tmp_path, "[compression]\nmode = 'off'\n"))


DISK_ONLY = """
[[tier]]
name = "local"
url = "file:ckpt"
keep = 2
"""


def test_a_first_tier_outside_shared_memory_gets_a_host_stage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="asymcheck.policy"):
        policy = load_policy(_write(tmp_path, DISK_ONLY))
    assert [t.name for t in policy.tiers] == ["host", "local"]
    stage = policy.staging
    assert stage.scheme == "shm" and stage.url.startswith("shm://asymcheck-")
    assert stage.capacity_bytes is None and stage.keep == 1  # the checkpointer's default budget
    assert policy.tier("local").keep == 2
    notes = [r for r in caplog.records if r.name == "asymcheck.policy"]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "host stage" in notes[0].getMessage() and stage.url in notes[0].getMessage()

    again = load_policy(_write(tmp_path, DISK_ONLY))  # a restarted process: same memory
    assert again.staging.url == stage.url
    other = tmp_path / "other"
    other.mkdir()
    assert load_policy(_write(other, DISK_ONLY)).staging.url != stage.url


def test_the_added_host_stage_takes_a_name_no_tier_has(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, GOOD.replace('"shm://asymcheck-test"', '"file:x"')))
    assert [t.name for t in policy.tiers] == ["host-stage", "host", "local", "hdfs"]
    assert [t.scheme for t in policy.tiers] == ["shm", "file", "file", "hdfs"]


def test_one_file_tier_saves_and_restores_bit_exactly(tmp_path: Path, shm_root: Path) -> None:
    path = _write(tmp_path, DISK_ONLY)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    expected = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    with asymcheck.Checkpointer(model, opt, policy=path) as ckpt:
        ckpt.save_sync(1).wait_all_sync(60)
    assert (tmp_path / "ckpt" / "step-000000000001" / "manifest.msgpack").is_file()
    stage = shm_root / load_policy(path).staging.url.removeprefix("shm://")
    assert (stage / "step-000000000001" / "manifest.msgpack").is_file()
    shutil.rmtree(stage)  # memory lost: the copy on disk must do

    torch.manual_seed(1)
    fresh = torch.nn.Linear(16, 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with asymcheck.Checkpointer(fresh, fresh_opt, policy=path) as ckpt:
        assert ckpt.restore_sync() == 1
    assert_same(expected, {"model": fresh.state_dict(), "opt": fresh_opt.state_dict()})
