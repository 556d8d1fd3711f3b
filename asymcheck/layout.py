"""Every name asymcheck gives a thing on a tier, made and parsed here and nowhere else.

One tier holds, per checkpoint::

    step-<12 digits>/manifest.msgpack          the commit record, written last
    step-<12 digits>/data-<save id>[-<n>].bin  data files (batches: -<5 digits>)
    step-<12 digits>/piece-<save id>-<n>.bin   host pieces of a state streamed past the budget

With several ranks, a tier the ranks share holds each rank's shard below its own directory,
and rank 0 writes the global manifest of the step last::

    step-<N>/rank-<5 digits>/data-*.bin, step-<N>/rank-<5 digits>/manifest.msgpack

Shared memory is per process: rank r stages in ``shm://NAME-rank<5 digits>``, and rank 0 keeps
the global manifests of that tier in ``shm://NAME``. Host blocks reserved ahead of a save live
under ``staging/``. Jobs are named ``<nodename>-<pid>-<hex>``.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

STEP_PREFIX = "step-"
MANIFEST_NAME = "manifest.msgpack"
MAX_STEP = 10**12
_STEP_DIR = re.compile(r"^step-(\d{12})$")
_RANK_DIR = re.compile(r"^rank-(\d{5})$")


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise ValueError(f"step must be an int in [0, 1e12), got {step!r}")
    return f"{STEP_PREFIX}{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a step directory name, or None if ``name`` is not one."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def step_of(key: str) -> int | None:
    """The step of the directory ``key`` lies in (None outside every step directory)."""
    return parse_step_dir(key.split("/", 1)[0])


def step_key(step: int, name: str) -> str:
    """The key of ``name`` (relative to the step directory) in checkpoint ``step``."""
    return f"{step_dir(step)}/{name}"


def manifest_key(step: int) -> str:
    return step_key(step, MANIFEST_NAME)


def parse_manifest_key(key: str) -> int | None:
    """The step of a manifest key, or None if ``key`` is not one."""
    head, _, tail = key.partition("/")
    return parse_step_dir(head) if tail == MANIFEST_NAME else None


def group_step_dirs(keys: Iterable[str]) -> dict[int, list[str]]:
    """Keys grouped by the step of their step directory (other keys are left out)."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        step = step_of(key)
        if step is not None:
            groups.setdefault(step, []).append(key)
    return groups


def committed_in(keys: Iterable[str]) -> list[int]:
    """The steps among ``keys`` that have a manifest, ascending."""
    return sorted(s for s in map(parse_manifest_key, keys) if s is not None)


# ------------------------------------------------------------------------------- data files

def new_save_id() -> str:
    return secrets.token_hex(4)


def data_name(save_id: str, index: int | None = None) -> str:
    """A data file of one save: the host block (no index) or a numbered piece or batch."""
    return f"data-{save_id}.bin" if index is None else f"data-{save_id}-{index:05d}.bin"


def piece_name(save_id: str, index: int) -> str:
    """A piece of a state streamed through the host tier (never stored downstream: there, its
    bytes live in batch files, mapped by the manifest's segments)."""
    return f"piece-{save_id}-{index:05d}.bin"


def spare_key() -> str:
    """A host block reserved ahead of the next save, before it has a step."""
    return f"staging/spare-{secrets.token_hex(4)}.bin"


# ------------------------------------------------------------------------------------ ranks

def rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


def parse_rank_dir(name: str) -> int | None:
    m = _RANK_DIR.match(name)
    return int(m.group(1)) if m else None


def shard_manifest_key(step: int, rank: int) -> str:
    return step_key(step, f"{rank_dir(rank)}/{MANIFEST_NAME}")


def rank_key(key: str, rank: int) -> str:
    """``step-<N>/KEY`` as rank ``rank`` stores it on a shared tier: ``step-<N>/rank-<r>/KEY``."""
    head, sep, rest = key.partition("/")
    if not sep or parse_step_dir(head) is None:
        raise ValueError(f"a rank's keys live in a step directory, got {key!r}")
    return f"{head}/{rank_dir(rank)}/{rest}"


def unrank_key(key: str, rank: int) -> str | None:
    """The inverse of ``rank_key``: None when ``key`` is not in rank ``rank``'s directory."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[1] == rank_dir(rank) and parse_step_dir(parts[0]) is not None:
        return f"{parts[0]}/{parts[2]}"
    return None


def host_shard_url(url: str, rank: int) -> str:
    """``shm://NAME`` -> ``shm://NAME-rank00001``: each rank stages in a directory of its own."""
    parts = urlsplit(url)
    suffix = f"-rank{rank:05d}"
    if parts.path.strip("/"):
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))
    return urlunsplit(parts._replace(netloc=parts.netloc + suffix, path=""))


# ------------------------------------------------------------------------------------- jobs

def new_job_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"


def job_owner(job: str) -> tuple[str, int] | None:
    """(nodename, pid) of a job id ``<nodename>-<pid>-<hex>``; None if it is not one."""
    parts = job.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0]:
        return None
    try:
        int(parts[2], 16)
    except ValueError:
        return None
    return parts[0], int(parts[1])
