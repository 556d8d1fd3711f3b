"""Helpers shared by the file-backed tiers (host shared memory and local disk)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import TypeVar

from tiers.base import validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``<key>.tmp-<pid>-<hex>``: an uncommitted write; never listed, removed once its pid is dead.
TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")


def tmp_name(path: Path) -> Path:
    """A fresh sibling of ``path`` that marks the writing process."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")


def check_file_key(key: str) -> str:
    """validate_key plus: a key must not look like one of our tmp files."""
    validate_key(key)
    if TMP_RE.search(key.rsplit("/", 1)[-1]):
        raise ValueError(f"tier key {key!r} has the form of an uncommitted tmp file")
    return key


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` may still run. Unsure answers say alive: we never delete a live write."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive but someone else's
        return True
    return True


def remove_stale_tmp(root: Path, skip_top: Collection[str] = ()) -> int:
    """Remove tmp files of dead processes below ``root``; returns how many."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        for fname in filenames:
            m = TMP_RE.search(fname)
            if m is None or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, fname))
                removed += 1
    # directories a dead write created but never filled hold no key: drop them
    for dirpath, _, _ in os.walk(root, topdown=False):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and rel.split(os.sep, 1)[0] not in skip_top:
            with contextlib.suppress(OSError):  # not empty, or gone: keep going
                os.rmdir(dirpath)
    if removed:
        log.info("removed %d stale tmp file(s) of dead processes under %s", removed, root)
    return removed


def list_files(root: Path, prefix: str, skip_top: Collection[str] = ()) -> list[str]:
    """Committed keys below ``root`` starting with ``prefix``, sorted; tmp files skipped."""
    start = root / prefix.rsplit("/", 1)[0] if "/" in prefix else root
    keys = []
    for dirpath, dirnames, filenames in os.walk(start):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        rel_dir = os.path.relpath(dirpath, root)
        for fname in filenames:
            if TMP_RE.search(fname):
                continue
            key = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if key.startswith(prefix) and key.split("/", 1)[0] not in skip_top:
                keys.append(key)
    keys.sort()
    return keys


def makedirs_durable(root: Path, rel_dir: str, *, fsync: bool) -> None:
    """Create ``root/rel_dir`` one level at a time; fsync each parent that gained an entry."""
    if not rel_dir:
        return
    current = root
    for part in rel_dir.split("/"):
        child = current / part
        try:
            os.mkdir(child)
        except FileExistsError:
            pass
        else:
            if fsync:
                fsync_dir(current)
        current = child


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_empty_dirs(root: Path, start: Path) -> None:
    """Remove ``start`` and its parents while empty, never ``root`` itself."""
    current = start
    while current != root and root in current.parents:
        try:
            os.rmdir(current)
        except OSError:  # not empty, or already gone
            return
        current = current.parent


def clamp_range(tier: str, key: str, size: int, offset: int,
                length: int | None) -> tuple[int, int]:
    """[start, end) of a read. Past the end: the bytes that exist; offset > size: ValueError."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"{tier}: negative offset or length reading {key!r}")
    if offset > size:
        raise ValueError(f"{tier}: offset {offset} is past the end of {key!r} ({size} bytes)")
    end = size if length is None else min(size, offset + length)
    return offset, end


def os_error(tier: str, op: str, key: str, exc: OSError) -> OSError:
    """The same OSError subclass (chosen by errno), with the tier name and key in the message."""
    code = exc.errno if exc.errno is not None else errno.EIO
    return OSError(code, f"{tier}: {op} {key!r} failed: {exc.strerror or exc}", exc.filename)


async def finish_even_if_cancelled(aw: Awaitable[T]) -> T:
    """Await ``aw`` to completion even when cancelled, then re-raise the cancellation.

    A file operation that runs in a thread cannot be stopped half-way; waiting for it keeps
    the bookkeeping (budgets, caches, tmp cleanup) in step with what is on disk.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
        else:
            break
    if cancelled:
        raise asyncio.CancelledError
    return result


#: Copies larger than this run in a worker thread, in pieces of this size, so that the GIL is
#: handed back between pieces and the event loop keeps running.
COPY_CHUNK_BYTES = 8 << 20


def flat_bytes(buf: memoryview) -> memoryview:
    """A 1-D unsigned-byte view of a C-contiguous buffer."""
    view = memoryview(buf)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def copy_into(dst: memoryview, src: memoryview) -> None:
    """dst[:] = src, in pieces (both flat byte views of the same length)."""
    for pos in range(0, src.nbytes, COPY_CHUNK_BYTES):
        dst[pos:pos + COPY_CHUNK_BYTES] = src[pos:pos + COPY_CHUNK_BYTES]
