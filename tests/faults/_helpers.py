"""Helpers of the fault suite: where tiers keep files, what is committed, byte-exact checks."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import asymcheck
from asymcheck.layout import manifest_key
from asymcheck.manifest import ChunkMeta, Manifest
from asymcheck.restore import LoadedCheckpoint
from tests._util import make_training, snapshot
from tests.faults._stats import FaultStats

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.msgpack"
TMP_FILE = re.compile(r"\.tmp-\d+-[0-9a-f]+$")
STEP_DIR = re.compile(r"^step-(\d{12})$")


def host_dir(shm_root: Path, policy: asymcheck.Policy) -> Path:
    return shm_root / policy.staging.url.removeprefix("shm://")


def file_dir(policy: asymcheck.Policy, tier: str = "local") -> Path:
    url = policy.tier(tier).url
    return Path(url.split("://", 1)[1])


def committed_steps(root: Path) -> list[int]:
    """Steps with a manifest file under ``root``, listed straight from the file system."""
    steps = []
    for p in root.glob(f"step-*/{MANIFEST}"):
        m = STEP_DIR.match(p.parent.name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if TMP_FILE.search(p.name))


def uncommitted_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if not (p / MANIFEST).exists())


def read_manifest_file(root: Path, step: int) -> Manifest:
    return Manifest.from_bytes((root / manifest_key(step)).read_bytes())


def data_files(root: Path, step: int) -> list[Path]:
    """The files a committed manifest lists (batch files; one per save today)."""
    man = read_manifest_file(root, step)
    return [root / f"step-{step:012d}" / f.key for f in man.files]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` (background work such as retention finishes after the events)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout_s} s: {what}")
        time.sleep(0.01)


def locate(man: Manifest, chunk: ChunkMeta) -> tuple[str, int]:
    """(file, offset) of a chunk's stored bytes on the tier that wrote ``man``: a flushed
    manifest may map the host layout onto its batch files through segments."""
    where = getattr(man, "locate", None)
    return where(chunk) if where is not None else (chunk.file, chunk.offset)


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def compare(expected: Any, actual: Any, stats: FaultStats, path: str = "") -> None:
    """Equal tensor for tensor, byte for byte (counted in ``stats``); other values by ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual)} is not a tensor"
        assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape), \
            f"{path}: {expected.dtype}{tuple(expected.shape)} != " \
            f"{actual.dtype}{tuple(actual.shape)}"
        a = expected.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        b = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"{path}: tensor bytes differ"
        stats.bytes_compared += a.numel()
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {type(actual)} is not a dict"
        assert expected.keys() == actual.keys(), f"{path}: keys differ"
        for k in expected:
            compare(expected[k], actual[k], stats, f"{path}/{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), \
            f"{path}: {expected!r} != {actual!r}"
        for i, (x, y) in enumerate(zip(expected, actual, strict=True)):
            compare(x, y, stats, f"{path}/{i}")
    else:
        assert expected == actual, f"{path}: {expected!r} != {actual!r}"


def loaded_as_snapshot(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """A raw checkpoint in the shape of ``tests._util.snapshot`` (model, opt, sched)."""
    state = loaded.state
    return {"model": state["model"], "opt": state["optimizers"][0],
            "sched": state["extras"]["sched"]}


def restore_fresh(policy: asymcheck.Policy, step: int | None = None, *, width: int = 32,
                  ) -> tuple[int | None, dict[str, Any]]:
    """Restore into freshly built objects (as a restarted job would); returns their state."""
    model, opt, sched = make_training(seed=1234, width=width)
    with asymcheck.Checkpointer(model, opt, policy=policy, extras={"sched": sched},
                                mode="naive") as ckpt:
        restored = ckpt.restore_sync(step)
    return restored, snapshot(model, opt, sched)


def load_ref(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def save_ref(path: Path, state: Any) -> None:
    """torch.save, fsynced and renamed into place: the independent reference of a step."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
