"""HdfsTier: blobs in HDFS through ``hdfs_native`` (a Rust client; no JVM, no libhdfs).

URL: ``hdfs://host:port/base/path`` (or ``hdfs://nameservice/base/path`` with HA settings in
``config``). Key ``a/b`` is the file ``/base/path/a/b``.

A ``put`` writes ``<path>.tmp-<pid>-<random>`` and then renames it over ``<path>`` with
overwrite, so readers see the old value or the new one, never a torn file. Temporary names are
never listed; a failed or cancelled put deletes its temporary file (best effort; a crashed
process leaves one behind, which :meth:`HdfsTier.remove_stale_tmp` removes).

Every failure becomes a :class:`TierError` (or :class:`KeyNotFound`) that names the tier, the
URL and the key, in bounded time:

* each client call (one RPC, a listing, or the transfer of at most ``chunk_bytes``) must
  finish within ``timeout_s``, so an operation fails about ``timeout_s`` after a hung cluster
  stopped answering, and at once when the cluster is down (connection refused or reset); a
  put that ran out of time deletes its temporary file in the background, not before it
  raises;
* the deadline is ``asyncio.timeout`` in the calling task, not ``asyncio.wait_for``, which
  on Python <= 3.11 can lose a cancellation of the caller when the inner call completes at
  the same moment (a cancelled put would then carry on with its next call);
* the client's own NameNode retry loop is off by default
  (``dfs.client.failover.max.attempts=0``): in hdfs-native 0.14 its retry path panics
  (``pyo3_runtime.PanicException``, a ``BaseException``) when a NameNode is unreachable;
  with no retries it raises ``ConnectionRefusedError`` at once;
* a ``PanicException`` is recognised by its type name and module and wrapped; it never hides
  ``KeyboardInterrupt``, ``SystemExit`` or ``asyncio.CancelledError``.

Client calls run in a pool of worker threads of this module, through hdfs-native's
synchronous ``Client``, which releases the GIL while it waits; each call's deadline is
``asyncio.timeout`` around the thread's future. A call that ran out of time cannot be
stopped: its thread ends on the client's own socket timeout (``dfs.client.socket-timeout``,
set to ``timeout_s``); a call cancelled before a thread took it never runs. So a put that ran
out of time or was cancelled while its rename was under way may still commit (the whole value,
never a torn one). The ``AsyncClient`` is not used: in hdfs-native 0.14.7 its reader thread
holds a connection's table of pending calls while it wakes a Python awaiter, which needs the
GIL, and a call started meanwhile on the event loop's thread holds the GIL while it waits for
that table; when the NameNode connection failed, the whole process froze. The synchronous
client wakes no Python code from its reader.

Clients are shared per (URL authority, config) and live as long as the process (dropping one
shuts its runtime down); ``close()`` releases only the tier. Worker threads are never shut
down either, so a call stuck on a hung cluster never holds up ``asyncio.run``'s shutdown.

Options (keyword arguments, e.g. from the tier policy file): ``timeout_s`` (default 60),
``config`` (``dict[str, str]`` of Hadoop client settings, merged over the defaults below),
``chunk_bytes`` (default 8 MiB; a put copies one chunk at a time into ``bytes`` for the
client), ``replication`` and ``block_size`` for new files.
"""

from __future__ import annotations

import asyncio
import io
import os
import posixpath
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from tiers._fsutil import TMP_RE, check_file_key, clamp_range
from tiers._workers import WorkerPool
from tiers.base import (
    Capabilities,
    CapacityError,
    KeyNotFound,
    Payload,
    Tier,
    TierError,
    TierStat,
    payload_parts,
    payload_size,
    validate_key,
    validate_prefix,
)

try:
    from hdfs_native import Client, FileStatus, WriteOptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the hdfs:// tier needs the 'hdfs-native' package: pip install 'asymcheck[hdfs]'"
    ) from exc

__all__ = ["DEFAULT_CONFIG", "HdfsTier"]

T = TypeVar("T")

#: Hadoop client settings applied unless ``config`` overrides them.
DEFAULT_CONFIG: dict[str, str] = {
    # No client-side NameNode retries: fail fast and let the caller (or a later put) retry.
    # With retries, hdfs-native's client panics on an unreachable NameNode.
    "dfs.client.failover.max.attempts": "0",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "1000",
}

_CLIENTS: dict[tuple[str, tuple[tuple[str, str], ...]], Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared(fs_url: str, config: Mapping[str, str]) -> Client:
    """One client per (authority, config) for the whole process; never dropped."""
    key = (fs_url, tuple(sorted(config.items())))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = Client(fs_url, dict(config))
        return client


#: The worker threads of every HdfsTier.
_POOL = WorkerPool(16, "asymcheck-hdfs")


def _in_thread(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    """``fn(*args)`` on a worker thread; cancelling the awaitable before a thread took the
    call means it never runs."""
    return asyncio.wrap_future(_POOL.submit(fn, *args))


_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


if sys.version_info >= (3, 11):
    async def _bounded(aw: Awaitable[T], timeout_s: float) -> T:
        """``await aw`` in this task, raising TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            return await aw
else:  # pragma: no cover - Python 3.10
    async def _bounded(aw: Awaitable[T], timeout_s: float) -> T:
        """``await aw`` in this task, raising TimeoutError after ``timeout_s``."""
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            return await aw
        except asyncio.CancelledError:
            if fired:
                raise asyncio.TimeoutError from None
            raise
        finally:
            handle.cancel()


def _is_tmp(path: str) -> bool:
    """Whether the last component of ``path`` is an uncommitted ``<name>.tmp-<pid>-<hex>``."""
    return TMP_RE.search(path.rsplit("/", 1)[-1]) is not None


def _is_panic(exc: BaseException) -> bool:
    """True for pyo3's ``PanicException`` (a Rust panic surfacing as a BaseException)."""
    return any(cls.__name__ == "PanicException" and cls.__module__ == "pyo3_runtime"
               for cls in type(exc).__mro__)


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a call that ran past ``timeout_s`` (see ``HdfsTier._fail``)."""
    return isinstance(exc, TierError) and isinstance(exc.__cause__, asyncio.TimeoutError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class HdfsTier(Tier):
    """A tier stored under one HDFS directory."""

    scheme = "hdfs"
    capabilities = Capabilities(stale_tmp=True)

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None,
                 timeout_s: float = 60.0,
                 config: Mapping[str, Any] | None = None,
                 chunk_bytes: int = 8 << 20,
                 replication: int | None = None,
                 block_size: int | None = None) -> None:
        super().__init__(url, name=name, capacity_bytes=capacity_bytes)
        parts = urlsplit(url)
        if parts.scheme != self.scheme or not parts.netloc:
            raise ValueError(f"HDFS tier URL must look like hdfs://host:port/path, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"HDFS tier URL {url!r} must not have a query or fragment")
        self.timeout_s = float(timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"{self.name}: timeout_s must be > 0, got {timeout_s!r}")
        self.chunk_bytes = int(chunk_bytes)
        if self.chunk_bytes <= 0:
            raise ValueError(f"{self.name}: chunk_bytes must be > 0, got {chunk_bytes!r}")
        self.replication = None if replication is None else int(replication)
        self.block_size = None if block_size is None else int(block_size)
        self._fs_url = f"{parts.scheme}://{parts.netloc}"
        base = posixpath.normpath("/" + parts.path.strip("/"))
        self._base = "" if base == "/" else base
        self.config: dict[str, str] = {
            **DEFAULT_CONFIG,
            "dfs.client.socket-timeout": str(int(self.timeout_s * 1000)),
            **{str(k): str(v) for k, v in (config or {}).items()},
        }
        self._client: Client | None = None
        self._closed = False
        self._cleanups: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- helpers

    def _path(self, key: str) -> str:
        return f"{self._base}/{key}"

    def _key_of(self, path: str) -> str | None:
        prefix = self._base + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    def _get_client(self, op: str, key: str) -> Client:
        if self._closed:
            raise TierError(f"{self.name}: {op} {key!r} on {self.url}: the tier is closed")
        if self._client is None:
            try:
                self._client = _shared(self._fs_url, self.config)
            except BaseException as exc:
                self._fail(op, key, exc)
        return self._client

    def _fail(self, op: str, key: str, exc: BaseException, *,
              missing_is_not_found: bool = False) -> NoReturn:
        """Re-raise ``exc`` as a TierError/KeyNotFound, or untouched when it must pass through."""
        where = f"{self.name}: {op} {key!r} on {self.url}"
        if isinstance(exc, TierError):
            raise exc
        if isinstance(exc, asyncio.TimeoutError):
            raise TierError(f"{where}: no answer within {self.timeout_s:g} s "
                            f"(timeout_s)") from exc
        if isinstance(exc, _PASS_THROUGH):
            raise exc
        if missing_is_not_found and isinstance(exc, FileNotFoundError):
            raise KeyNotFound(f"{where}: no such key") from exc
        if isinstance(exc, Exception):
            raise TierError(f"{where}: {_first_line(exc)}") from exc
        if _is_panic(exc):
            raise TierError(f"{where}: HDFS client panicked: {_first_line(exc)}") from exc
        raise exc

    async def _call(self, op: str, key: str, fn: Callable[..., T], *args: Any,
                    missing_is_not_found: bool = False) -> T:
        """``fn(*args)`` (a client call) on a worker thread, bounded by ``timeout_s``."""
        try:
            return await _bounded(_in_thread(fn, *args), self.timeout_s)
        except BaseException as exc:
            self._fail(op, key, exc, missing_is_not_found=missing_is_not_found)

    async def _file_status(self, op: str, key: str) -> FileStatus:
        client = self._get_client(op, key)
        st = await self._call(op, key, client.get_file_info, self._path(key),
                              missing_is_not_found=True)
        if st.isdir:
            raise KeyNotFound(f"{self.name}: {op} {key!r} on {self.url}: no such key "
                              f"(it is a directory)")
        return st

    async def _walk(self, op: str, key: str, directory: str) -> list[FileStatus]:
        """All entries under ``directory`` (recursively); [] when it does not exist."""
        for _ in range(5):
            try:
                return await self._walk_once(op, key, directory)
            except FileNotFoundError as exc:
                # The directory itself is missing, or a subdirectory vanished mid-walk (a
                # concurrent delete): tell the two apart and walk again in the second case.
                client = self._get_client(op, key)
                try:
                    await self._call(op, key, client.get_file_info, directory,
                                     missing_is_not_found=True)
                except KeyNotFound:
                    return []
                last = exc
        raise TierError(f"{self.name}: {op} {key!r} on {self.url}: the tree under "
                        f"{directory!r} kept changing during the listing") from last

    async def _walk_once(self, op: str, key: str, directory: str) -> list[FileStatus]:
        client = self._get_client(op, key)

        def walk() -> list[FileStatus]:
            return list(client.list_status(directory, recursive=True))
        try:
            return await _bounded(_in_thread(walk), self.timeout_s)
        except FileNotFoundError:
            raise
        except BaseException as exc:
            self._fail(op, key, exc)

    async def _discard(self, path: str, key: str, *, wait: bool = True) -> None:
        """Best-effort delete of a temporary file; survives a second cancellation. With
        ``wait=False`` it only starts the delete (``close()`` waits for it)."""
        async def remove() -> None:
            try:
                client = self._get_client("discard", key)
                await _bounded(_in_thread(client.delete, path, False), self.timeout_s)
            except _PASS_THROUGH:
                raise
            except BaseException as exc:
                if not (isinstance(exc, Exception) or _is_panic(exc)):
                    raise

        task = asyncio.ensure_future(remove())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        if not wait:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise  # the delete goes on in the background; close() waits for it
        except Exception:
            pass

    # ------------------------------------------------------------ tier API

    async def put(self, key: str, data: Payload) -> None:
        check_file_key(key)
        parts = payload_parts(data)
        size = payload_size(parts)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            raise CapacityError(f"{self.name}: put {key!r} on {self.url}: {size} bytes can "
                                f"never fit in a capacity of {self.capacity_bytes} bytes")
        client = self._get_client("put", key)
        path = self._path(key)
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
        options = WriteOptions(overwrite=False, create_parent=True,
                               replication=self.replication, block_size=self.block_size)
        writer = await self._call("put", key, client.create, tmp, options)
        try:
            step = self.chunk_bytes
            for part in parts:
                for start in range(0, part.nbytes, step):
                    # bytes, not a memoryview: hdfs-native takes bytes/bytearray in one copy
                    # but walks any other buffer byte by byte (~10x slower, all CPU).
                    chunk = bytes(part[start:start + step])
                    await self._call("put", key, writer.write, chunk)
            await self._call("put", key, writer.close)
            await self._call("put", key, client.rename, tmp, path, True)
        except BaseException as exc:
            # After a call ran out of time the cluster is not answering: report that now and
            # delete the temporary file in the background, or the caller would wait a second
            # ``timeout_s`` for a delete that most likely fails too.
            await self._discard(tmp, key, wait=not _timed_out(exc))
            raise
        finally:
            # io's finalizer would call the writer's close (an RPC) again on whichever thread
            # drops it, the event loop's included: the file is complete or being discarded.
            io.RawIOBase.close(writer)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        validate_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"{self.name}: negative offset or length reading {key!r}")
        client = self._get_client("get", key)
        reader = await self._call("get", key, client.read, self._path(key),
                                  missing_is_not_found=True)
        # Past the end: the bytes that exist; offset > size: ValueError (as the other tiers).
        start, end = clamp_range(self.name, key, len(reader), offset, length)
        chunks: list[bytes] = []
        # Never ask for bytes past the end: hdfs-native panics on such a read.
        for pos in range(start, end, self.chunk_bytes):
            n = min(self.chunk_bytes, end - pos)
            chunks.append(await self._call("get", key, reader.read_range, pos, n))
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        validate_key(key)
        if offset < 0:
            raise ValueError(f"{self.name}: readinto {key!r}: negative offset {offset}")
        if out.ndim != 1 or out.format != "B":
            out = out.cast("B")
        client = self._get_client("get", key)
        reader = await self._call("get", key, client.read, self._path(key),
                                  missing_is_not_found=True)
        want = out.nbytes
        start, end = clamp_range(self.name, key, len(reader), offset, want)
        have = end - start
        if have != want:
            raise TierError(f"{self.name}: short read of {key!r} on {self.url}: "
                            f"{have} of {want} bytes at offset {offset}")
        for pos in range(0, want, self.chunk_bytes):
            n = min(self.chunk_bytes, want - pos)
            out[pos:pos + n] = await self._call("get", key, reader.read_range, offset + pos, n)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._file_status("delete", key)  # KeyNotFound for a missing key or a directory
        client = self._get_client("delete", key)
        removed = await self._call("delete", key, client.delete, self._path(key), False,
                                   missing_is_not_found=True)
        if not removed:
            raise KeyNotFound(f"{self.name}: delete {key!r} on {self.url}: no such key")

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        directory = self._path(head) if head else (self._base or "/")
        keys = []
        for st in await self._walk("list", prefix, directory):
            if st.isdir:
                continue
            key = self._key_of(st.path)
            if key is None or _is_tmp(key) or not key.startswith(prefix):
                continue
            keys.append(key)
        keys.sort()
        return keys

    async def stat(self, key: str) -> TierStat:
        validate_key(key)
        st = await self._file_status("stat", key)
        return TierStat(key=key, size_bytes=st.length, mtime_s=st.modification_time / 1000.0)

    async def remove_stale_tmp(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by crashed writers; returns how many were removed."""
        cutoff_ms = (time.time() - older_than_s) * 1000.0
        stale = []
        for st in await self._walk("remove_stale_tmp", "", self._base or "/"):
            if not st.isdir and _is_tmp(st.path) and st.modification_time < cutoff_ms:
                stale.append(st.path)
        client = self._get_client("remove_stale_tmp", "")
        for path in stale:
            await self._call("remove_stale_tmp", path, client.delete, path, False)
        return len(stale)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cleanups:
            # Each delete ends within timeout_s; cancel any straggler rather than leave a
            # call pending on a loop that may stop.
            cleanups = list(self._cleanups)
            await asyncio.wait(cleanups, timeout=self.timeout_s + 1.0)
            for task in cleanups:
                task.cancel()
            await asyncio.gather(*cleanups, return_exceptions=True)
        self._client = None
