"""LocalTier: one file per key on a local disk, committed by tmp + fsync + rename.

``file:///abs/path`` or ``file:relative/path`` (relative to the working directory at
construction). The bulk write path runs in a worker thread (``os.writev`` + ``os.fsync``
release the GIL), so the event loop keeps running during large puts.

Durable writes bypass the page cache (``O_DIRECT``, option ``direct``, on by default with
``fsync``): a page-aligned run of a payload (a tensor in a host block, whose large slots are
page-aligned) goes from its buffer to the disk without a copy, the rest through a page-aligned
bounce buffer, and the file is cut to its size. That saves the kernel's copy into the page
cache and its write-back, and leaves no dirty pages whose throttling would land on other
threads. A filesystem that refuses ``O_DIRECT`` gets buffered ``writev`` + ``fsync``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat as stat_mod
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles.os
import numpy as np

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

log = logging.getLogger(__name__)

_IOV_MAX = 1024
_CREATE_TRIES = 3
#: O_DIRECT: buffer addresses, file offsets and lengths are multiples of this
DIRECT_ALIGN = 4096
_BOUNCE_BYTES = 4 << 20


class LocalTier(Tier):
    """Files under a root directory; every put is durable when it returns."""

    scheme = "file"
    # The next file goes into the page cache while the disk syncs the previous one.
    concurrent_puts = 2

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None, fsync: bool = True,
                 direct: bool = True) -> None:
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
        if not isinstance(direct, bool):
            raise ValueError(f"local tier {url!r}: option direct must be true or false, got "
                             f"{direct!r}")
        #: write with O_DIRECT (off once the filesystem refuses it)
        self.direct = direct and fsync and hasattr(os, "O_DIRECT")
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
        finally:
            # the write is over, but the pool's worker may hold its arguments a moment longer:
            # the views go now (a host block whose views are all gone is reused, still mapped)
            parts.clear()

    def _write(self, key: str, path: Path, parts: Sequence[memoryview]) -> None:
        tmp = tmp_name(path)
        direct = self.direct
        fd = self._create_tmp(key, tmp, direct)
        try:
            try:
                if direct and not _write_direct(fd, parts):
                    log.info("%s: the filesystem of %s refuses O_DIRECT writes: buffered "
                             "writes from now on", self.name, self._root)
                    self.direct = False
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    direct = False
                if not direct:
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

    def _create_tmp(self, key: str, tmp: Path, direct: bool = False) -> int:
        rel_dir = key.rpartition("/")[0]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in range(_CREATE_TRIES):
            try:
                makedirs_durable(self._root, rel_dir, fsync=self.fsync)
                fd = os.open(tmp, flags, 0o644)
                if direct:
                    try:
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL)
                                    | os.O_DIRECT)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            os.close(fd)
                            raise
                return fd
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


class _Bounces:
    """Page-aligned buffers, one per write in progress: mapped when more writes than ever
    before run at once, then kept for the next writes, their pages faulted in (one per
    thread would map one for every thread of the pool that ever wrote)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[memoryview] = []

    @contextlib.contextmanager
    def held(self) -> Iterator[memoryview]:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = memoryview(mmap.mmap(-1, _BOUNCE_BYTES))
        try:
            yield buf
        finally:
            with self._lock:
                self._free.append(buf)


_bounces = _Bounces()


def buffer_address(view: memoryview) -> int:
    """Where ``view``'s bytes start in memory (0 for an empty view)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def _write_direct(fd: int, parts: Sequence[memoryview]) -> bool:
    """Write ``parts`` back to back on ``fd`` (set to O_DIRECT): a run that starts page-aligned
    in memory and in the file goes straight from its buffer, the rest through the bounce
    buffer, the last block padded and the file cut to its size. False (nothing to keep) when
    the filesystem refuses O_DIRECT."""
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        return False
    with _bounces.held() as bounce:
        held = 0  # bytes in the bounce buffer, not yet written
        size = 0
        try:
            for part in parts:
                view = flat_bytes(part)
                while view.nbytes:
                    if held == 0 and view.nbytes >= DIRECT_ALIGN and \
                            buffer_address(view) % DIRECT_ALIGN == 0:
                        n = view.nbytes - view.nbytes % DIRECT_ALIGN
                        _write_all(fd, [view[:n]])
                        view = view[n:]
                        size += n
                        continue
                    n = min(view.nbytes, bounce.nbytes - held)
                    # numpy's copy releases the GIL (the event loop runs on while it copies)
                    np.copyto(np.frombuffer(bounce, np.uint8)[held:held + n],
                              np.frombuffer(view, np.uint8)[:n])
                    view, held, size = view[n:], held + n, size + n
                    if held == bounce.nbytes:
                        _write_all(fd, [bounce])
                        held = 0
            if held:
                padded = -(-held // DIRECT_ALIGN) * DIRECT_ALIGN
                bounce[held:padded] = bytes(padded - held)
                _write_all(fd, [bounce[:padded]])
                os.ftruncate(fd, size)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False  # the filesystem takes no O_DIRECT writes (or not at this alignment)
            raise
        return True


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
