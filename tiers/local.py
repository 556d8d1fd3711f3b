"""LocalTier: one file per key on a local disk, committed by tmp + fsync + rename.

``file:///abs/path`` or ``file:relative/path`` (relative to the working directory at
construction). The bulk write path runs in a worker thread (``os.writev`` + ``os.fsync``
release the GIL), so the event loop keeps running during large puts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import stat as stat_mod
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles.os

from tiers._fsutil import (
    check_file_key,
    clamp_range,
    finish_even_if_cancelled,
    flat_bytes,
    fsync_dir,
    list_files,
    makedirs_durable,
    os_error,
    prune_empty_dirs,
    remove_stale_tmp,
    tmp_name,
)
from tiers.base import (
    KeyNotFound,
    Payload,
    Tier,
    TierError,
    TierStat,
    payload_parts,
    validate_prefix,
)

_IOV_MAX = 1024
_CREATE_TRIES = 3


class LocalTier(Tier):
    """Files under a root directory; every put is durable when it returns."""

    scheme = "file"
    # The next file goes into the page cache while the disk syncs the previous one.
    concurrent_puts = 2

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None, fsync: bool = True) -> None:
        if capacity_bytes is not None:
            raise ValueError("LocalTier has no byte budget; capacity_bytes must be None "
                             f"(got {capacity_bytes} for {url!r})")
        super().__init__(url, name=name)
        parts = urlsplit(url)
        if parts.scheme != self.scheme or parts.query or parts.fragment:
            raise ValueError(f"not a local tier URL (file:///abs/path or file:rel/path): {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"local tier URL {url!r} names host {parts.netloc!r}; use "
                             "file:///abs/path or file:relative/path")
        path = unquote(parts.path)
        if not path:
            raise ValueError(f"local tier URL {url!r} has no path")
        self.fsync = fsync
        self._root = Path(os.path.abspath(path))  # relative: against the CWD now
        self._opened = False
        self._closed = False
        self._open_lock = asyncio.Lock()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def local_dir(self) -> Path:
        return self._root

    async def _ensure_open(self) -> None:
        if self._closed:
            raise TierError(f"{self.name}: tier is closed")
        if self._opened:
            return
        async with self._open_lock:
            if not self._opened:
                await asyncio.to_thread(self._prepare_root)
                self._opened = True

    def _prepare_root(self) -> None:
        os.makedirs(self._root, exist_ok=True)
        remove_stale_tmp(self._root)

    async def close(self) -> None:
        """Nothing is held open between calls; later calls raise TierError. Idempotent."""
        self._closed = True

    def _path(self, key: str) -> Path:
        return self._root / check_file_key(key)

    def _fail(self, op: str, key: str, exc: OSError) -> OSError:
        if isinstance(exc, TierError):
            return exc
        if op != "put" and isinstance(
                exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return KeyNotFound(f"{self.name}: no key {key!r}")
        return os_error(self.name, op, key, exc)

    # ---- writes -----------------------------------------------------------------------------

    async def put(self, key: str, data: Payload) -> None:
        path = self._path(key)
        parts = payload_parts(data)
        await self._ensure_open()
        try:
            await finish_even_if_cancelled(asyncio.to_thread(self._write, key, path, parts))
        except OSError as exc:
            raise self._fail("put", key, exc) from exc

    def _write(self, key: str, path: Path, parts: Sequence[memoryview]) -> None:
        tmp = tmp_name(path)
        fd = self._create_tmp(key, tmp)
        try:
            try:
                _write_all(fd, parts)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            fsync_dir(path.parent)

    def _create_tmp(self, key: str, tmp: Path) -> int:
        rel_dir = key.rpartition("/")[0]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in range(_CREATE_TRIES):
            try:
                makedirs_durable(self._root, rel_dir, fsync=self.fsync)
                return os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # a concurrent delete (or another process opening the
                # tier) pruned a directory on the path as it was made: make it again
                if attempt == _CREATE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._ensure_open()
        try:
            st = await aiofiles.os.stat(path)
            if not stat_mod.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a key", str(path))
            await aiofiles.os.remove(path)
        except OSError as exc:
            raise self._fail("delete", key, exc) from exc
        await asyncio.to_thread(prune_empty_dirs, self._root, path.parent)

    # ---- reads ------------------------------------------------------------------------------

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        await self._ensure_open()
        try:
            return await asyncio.to_thread(self._read, key, path, offset, length)
        except OSError as exc:
            raise self._fail("get", key, exc) from exc

    def _read(self, key: str, path: Path, offset: int, length: int | None) -> bytes:
        fd = _open_regular(path)
        try:
            start, end = clamp_range(self.name, key, os.fstat(fd).st_size, offset, length)
            chunks = []
            pos = start
            while pos < end:
                chunk = os.pread(fd, end - pos, pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        path = self._path(key)
        dst = flat_bytes(out)
        await self._ensure_open()
        try:
            await finish_even_if_cancelled(
                asyncio.to_thread(self._readinto, key, path, dst, offset))
        except OSError as exc:
            raise self._fail("readinto", key, exc) from exc

    def _readinto(self, key: str, path: Path, dst: memoryview, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"{self.name}: negative offset reading {key!r}")
        fd = _open_regular(path)
        pos = 0
        try:
            if offset + dst.nbytes <= os.fstat(fd).st_size:
                while pos < dst.nbytes:
                    got = os.preadv(fd, [dst[pos:]], offset + pos)
                    if got == 0:
                        break
                    pos += got
        finally:
            os.close(fd)
        if pos != dst.nbytes:
            raise TierError(f"{self.name}: short read of {key!r}: {pos} of "
                            f"{dst.nbytes} bytes at offset {offset}")

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        await self._ensure_open()
        return await asyncio.to_thread(list_files, self._root, prefix)

    async def stat(self, key: str) -> TierStat:
        path = self._path(key)
        await self._ensure_open()
        try:
            st = await aiofiles.os.stat(path)
        except OSError as exc:
            raise self._fail("stat", key, exc) from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise KeyNotFound(f"{self.name}: no key {key!r}")
        return TierStat(key=key, size_bytes=st.st_size, mtime_s=st.st_mtime)


def _open_regular(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a key", str(path))
    return fd


def _write_all(fd: int, parts: Sequence[memoryview]) -> None:
    """Write ``parts`` back to back with writev, resuming after partial writes."""
    pending = collections.deque(p for p in parts if p.nbytes)
    while pending:
        batch = [pending[i] for i in range(min(len(pending), _IOV_MAX))]
        written = os.writev(fd, batch)
        if written == 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while written:
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[written:]
                written = 0
