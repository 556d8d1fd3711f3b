"""Hostile input: crafted manifests and policy files are rejected with clear errors.

Guards: manifest validation (file keys without '..', absolute paths or NUL; sizes, offsets and
shapes within bounds; a known format and version; the step it claims), the tier's own key
validation, restore's refusal to trust a manifest's sizes over what is stored, the policy's
rejection of '..' in tier URLs, and the absence of any unpickling in the library (manifests
and skeletons are msgpack; torch.load only with weights_only=True).

A crafted manifest carries a correct checksum (an attacker can compute one), so every check
here is the validation itself, not the checksum.
"""

from __future__ import annotations

import ast
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import asymcheck
from asymcheck.layout import manifest_key
from asymcheck.manifest import VERSION, checksum
from tests._util import load_from, make_training, train_steps
from tests.faults._helpers import REPO, host_dir
from tests.faults._stats import FaultStats

STEP = 5
Body = dict[str, Any]


def save_one(tmp_path: Path) -> asymcheck.Policy:
    policy = asymcheck.Policy(tiers=(
        asymcheck.TierPolicy(name="host", url="shm://hostile"),
        asymcheck.TierPolicy(name="local", url=f"file://{tmp_path}/flushed"),
    ))
    model, opt, sched = make_training(seed=1, width=8)
    train_steps(model, opt, sched, 1)
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt:
        ckpt.save_sync(STEP).wait_all_sync(60)
    return policy


@pytest.fixture
def disk(tmp_path: Path, shm_root: Path) -> Iterator[Path]:
    """A directory (served as a local tier) holding one real checkpoint, step 5, in the host
    layout: one data file, chunks addressed directly. Crafting starts from its manifest."""
    policy = save_one(tmp_path)
    shutil.copytree(host_dir(shm_root, policy), tmp_path / "disk")
    yield tmp_path / "disk"


@pytest.fixture
def flushed(tmp_path: Path, shm_root: Path) -> Iterator[Path]:
    """The local tier's own copy of step 5 (batch files, possibly a segment map)."""
    save_one(tmp_path)
    yield tmp_path / "flushed"


def craft(original: bytes, mutate: Callable[[Body], None], **envelope: Any) -> bytes:
    """``original`` with its body changed by ``mutate`` and a matching checksum."""
    env = msgpack.unpackb(original, raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    mutate(body)
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["xxh64"] = checksum(env["body"])
    env.update(envelope)
    return bytes(msgpack.packb(env, use_bin_type=True))


def rename_file(new: str) -> Callable[[Body], None]:
    def mutate(body: Body) -> None:
        old = body["files"][0][0]
        body["files"][0][0] = new
        for tensor in body["tensors"]:
            for chunk in tensor[4]:
                if chunk[0] == old:
                    chunk[0] = new
    return mutate


def set_first(where: str, value: Any) -> Callable[[Body], None]:
    def mutate(body: Body) -> None:
        tensor = body["tensors"][0]
        if where == "file size":
            body["files"][0][1] = value
        elif where == "tensor path":
            tensor[0] = value
        elif where == "dtype":
            tensor[1] = value
        elif where == "shape":
            tensor[2] = value
        elif where == "chunk offset":
            tensor[4][0][1] = value
        elif where == "chunk file":
            tensor[4][0][0] = value
        elif where == "chunk raw offset":
            tensor[4][0][3] = value
        elif where == "step":
            body["step"] = value
        else:
            raise AssertionError(where)
    return mutate


HOSTILE: list[tuple[str, Callable[[Body], None], str]] = [
    ("dotdot-file", rename_file("../../../etc/passwd"), r"\.\."),
    ("dotdot-inside", rename_file("a/../../b.bin"), r"\.\."),
    ("absolute-file", rename_file("/etc/passwd"), "absolute"),
    ("nul-file", rename_file("data\x00.bin"), "NUL"),
    ("backslash-file", rename_file("..\\..\\x.bin"), "backslash"),
    ("unknown-chunk-file", set_first("chunk file", "other.bin"), "unknown file"),
    ("huge-file-size", set_first("file size", 1 << 62), "size"),
    ("negative-offset", set_first("chunk offset", -1), "offset"),
    ("chunk-outside-file", set_first("chunk offset", 1 << 40), "outside"),
    ("huge-shape", set_first("shape", [1 << 40, 1 << 40]), "dimension|bytes"),
    ("shape-size-mismatch", set_first("shape", [3, 7, 11]), "bytes"),
    ("untiled-chunks", set_first("chunk raw offset", 8), "tile"),
    ("nul-tensor-path", set_first("tensor path", "model/w\x00"), "tensor path"),
    ("object-dtype", set_first("dtype", "object"), "dtype"),
    ("negative-step", set_first("step", -1), "step"),
]


@pytest.mark.parametrize("mutate,message", [pytest.param(m, msg, id=name)
                                            for name, m, msg in HOSTILE])
def test_a_crafted_manifest_is_rejected_with_a_manifest_error(
        disk: Path, mutate: Callable[[Body], None], message: str,
        fault_stats: FaultStats) -> None:
    path = disk / manifest_key(STEP)
    bad = craft(path.read_bytes(), mutate)
    with pytest.raises(asymcheck.ManifestError, match=message):
        asymcheck.Manifest.from_bytes(bad, source="crafted")
    path.write_bytes(bad)  # and restore from that tier refuses it as a whole
    with pytest.raises(asymcheck.RestoreError, match="no tier holds a readable manifest"):
        load_from(disk.as_uri(), STEP, name="disk")
    fault_stats.fault("hostile")


@pytest.mark.parametrize("envelope,message", [
    pytest.param({"version": 99}, "version 99 is not supported", id="future-version"),
    pytest.param({"version": 0}, "version 0 is not supported", id="old-version"),
    pytest.param({"format": "pickle"}, "not an asymcheck manifest", id="other-format"),
])
def test_a_manifest_of_another_format_or_version_is_rejected(
        disk: Path, envelope: dict[str, Any], message: str, fault_stats: FaultStats) -> None:
    bad = craft((disk / manifest_key(STEP)).read_bytes(), lambda body: None, **envelope)
    with pytest.raises(asymcheck.ManifestError, match=message):
        asymcheck.Manifest.from_bytes(bad)
    fault_stats.fault("hostile")


def test_a_manifest_of_a_newer_version_is_refused_in_one_line_naming_both_versions(
        tmp_path: Path, shm_root: Path, fault_stats: FaultStats) -> None:
    """A checkpoint written by a newer build: restore says so and leaves it in place."""
    policy = save_one(tmp_path)
    path = tmp_path / "flushed" / manifest_key(STEP)
    newer = craft(path.read_bytes(), lambda body: None, version=VERSION + 1)
    both = rf"version {VERSION + 1}\b.*version {VERSION}\b"
    with pytest.raises(asymcheck.ManifestError) as err:
        asymcheck.Manifest.from_bytes(newer, source="newer")
    assert "\n" not in str(err.value) and re.search(both, str(err.value)), str(err.value)

    path.write_bytes(newer)
    shutil.rmtree(host_dir(shm_root, policy))  # the disk holds the only copy
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "flushed").rglob("*"))
    model, opt, _ = make_training(seed=2, width=8)
    with asymcheck.Checkpointer(model, opt, policy=policy, mode="naive") as ckpt, \
            pytest.raises(asymcheck.RestoreError) as failed:
        ckpt.restore_sync()
    msg = str(failed.value)
    assert "\n" not in msg and re.search(both, msg), msg
    assert msg.startswith(f"step {STEP}: no tier holds a readable manifest"), msg
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "flushed").rglob("*")) == files
    fault_stats.fault("hostile")


def set_segment(field: int, value: Any) -> Callable[[Body], None]:
    def mutate(body: Body) -> None:
        body["segments"][0][field] = value
    return mutate


@pytest.mark.parametrize("mutate,message", [
    pytest.param(set_segment(0, "../../etc/passwd"), r"\.\.", id="segment-source-dotdot"),
    pytest.param(set_segment(3, "/etc/passwd"), "does not fit", id="segment-absolute-file"),
    pytest.param(set_segment(4, 1 << 40), "does not fit", id="segment-outside-file"),
    pytest.param(set_segment(2, 1 << 45), "does not fit", id="segment-huge"),
])
def test_a_crafted_segment_map_is_rejected(flushed: Path, mutate: Callable[[Body], None],
                                           message: str, fault_stats: FaultStats) -> None:
    path = flushed / manifest_key(STEP)
    body = msgpack.unpackb(msgpack.unpackb(path.read_bytes(), raw=False)["body"], raw=False,
                           strict_map_key=False)
    if not body.get("segments"):
        pytest.skip("this build's flushed manifests carry no segment map")
    bad = craft(path.read_bytes(), mutate)
    with pytest.raises(asymcheck.ManifestError, match=message):
        asymcheck.Manifest.from_bytes(bad, source="crafted")
    path.write_bytes(bad)
    with pytest.raises(asymcheck.RestoreError, match="no tier holds a readable manifest"):
        load_from(flushed.as_uri(), STEP, name="flushed")
    fault_stats.fault("hostile")


def test_a_manifest_claiming_another_step_is_rejected(disk: Path,
                                                      fault_stats: FaultStats) -> None:
    path = disk / manifest_key(STEP)
    path.write_bytes(craft(path.read_bytes(), set_first("step", STEP + 1)))
    with pytest.raises(asymcheck.RestoreError, match=f"is for step {STEP + 1}"):
        load_from(disk.as_uri(), STEP, name="disk")
    fault_stats.fault("hostile")


def test_a_chunk_pointing_outside_the_step_never_reads_that_file(
        disk: Path, fault_stats: FaultStats) -> None:
    """The file outside holds exactly the bytes the chunk's checksum expects: only key
    validation stands between the manifest and reading it."""
    path = disk / manifest_key(STEP)
    original = path.read_bytes()
    man = asymcheck.Manifest.from_bytes(original)
    [data] = man.files
    (disk / "outside.bin").write_bytes((disk / f"step-{STEP:012d}" / data.key).read_bytes())
    path.write_bytes(craft(original, rename_file("../outside.bin")))
    with pytest.raises(asymcheck.RestoreError, match=r"\.\."):
        load_from(disk.as_uri(), STEP, name="disk")
    fault_stats.fault("hostile")


@pytest.mark.parametrize("claim", ["file-size", "decoded-size"])
def test_a_manifest_claiming_huge_sizes_fails_with_a_restore_error(
        disk: Path, claim: str, fault_stats: FaultStats) -> None:
    """Sizes within the manifest's bounds (< 1 PiB) but far beyond what the tier stores and
    what memory holds: a 512 TiB tensor in a file said to be that large (it is not), or
    decoded from a few stored bytes. Restore must refuse, not try to allocate them."""
    huge = 1 << 47  # float32 elements: 512 TiB

    def mutate(body: Body) -> None:
        name, real_size = body["files"][0]
        chunk = list(body["tensors"][0][4][0])
        chunk[0] = name
        if claim == "file-size":  # [file, offset, stored_len, raw_offset, raw_len, ...]
            body["files"] = [[name, huge * 4]]
            chunk[1:5] = [0, huge * 4, 0, huge * 4]
        else:  # a coded chunk: a few stored bytes said to decode to 512 TiB
            body["files"] = [[name, real_size]]
            chunk[1:5] = [0, min(real_size, 64), 0, huge * 4]
            chunk[6:8] = ["shuffle", 4]
            chunk[9] = chunk[5]
        body["tensors"] = [["model/huge", "float32", [huge], huge * 4, [chunk]]]

    path = disk / manifest_key(STEP)
    path.write_bytes(craft(path.read_bytes(), mutate))
    with pytest.raises((asymcheck.RestoreError, asymcheck.ManifestError)):
        load_from(disk.as_uri(), STEP, name="disk")
    fault_stats.fault("hostile")


def write_policy(tmp_path: Path, url: str, first: str = "shm://ok") -> Path:
    policy = tmp_path / "tiers.toml"
    policy.write_text(textwrap.dedent(f"""
        [[tier]]
        name = "host"
        url = "{first}"
        [[tier]]
        name = "local"
        url = "{url}"
    """))
    return policy


@pytest.mark.parametrize("url", [
    "file:///srv/ckpt/../../etc",
    "file:ckpt/../../../etc",
    "file:///srv/ckpt/%2E%2E/%2E%2E/etc",
])
def test_a_policy_file_url_with_dotdot_is_rejected(tmp_path: Path, url: str,
                                                   fault_stats: FaultStats) -> None:
    policy = write_policy(tmp_path, url)
    with pytest.raises(asymcheck.PolicyError, match=r"tiers\.toml: tier\[1\]\.url: .*'\.\.'"):
        asymcheck.load_policy(policy)
    fault_stats.fault("hostile")


@pytest.mark.parametrize("url", ["shm://../../etc", "shm://job/%2e%2e/%2e%2e/etc"])
def test_a_policy_shm_url_with_dotdot_is_rejected_when_loaded(
        tmp_path: Path, url: str, fault_stats: FaultStats) -> None:
    policy = write_policy(tmp_path, "file:ckpt", first=url)
    with pytest.raises(asymcheck.PolicyError, match=r"tiers\.toml: tier\[0\]\.url: .*'\.\.'"):
        asymcheck.load_policy(policy)
    fault_stats.fault("hostile")


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
              "marshal", "jsonpickle"}


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _kw(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "?"
    return None


def test_the_library_never_unpickles() -> None:
    sources = sorted([*(REPO / "asymcheck").rglob("*.py"), *(REPO / "tiers").rglob("*.py")])
    assert len(sources) > 10
    problems = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            problems += [f"{where}:{getattr(node, 'lineno', '?')}: imports {n}"
                         for n in names if n in UNPICKLERS]
        for func, call in _calls(tree):
            if func.endswith(("torch.load", "serialization.load")) and \
                    _kw(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno}: {func} without weights_only=True")
            if func.endswith(("np.load", "numpy.load")) and _kw(call, "allow_pickle"):
                problems.append(f"{where}:{call.lineno}: {func} with allow_pickle")
            if func in ("eval", "exec"):
                problems.append(f"{where}:{call.lineno}: {func}()")
    assert not problems, "\n".join(problems)
