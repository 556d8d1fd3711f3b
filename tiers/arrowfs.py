"""ArrowFsTier: blobs in an object store (S3, GCS, Azure) through ``pyarrow.fs``.

URL: a pyarrow file system URI, query parameters included, e.g.
``s3://bucket/prefix?endpoint_override=127.0.0.1:8333&scheme=http&region=us-east-1``; it goes
to ``pyarrow.fs.FileSystem.from_uri`` as it is. Key ``a/b`` is the object ``prefix/a/b`` of the
bucket. ``gs://bucket/prefix`` and ``abfs://container@account.dfs.core.windows.net/prefix``
work the same way with pyarrow's GCS and Azure file systems.

Options (keyword arguments, e.g. the policy's ``options`` table) add arguments of the file
system's constructor to what the URI says: for S3 ``access_key``, ``secret_key``,
``session_token``, ``endpoint_override``, ``scheme``, ``region``, ``connect_timeout``,
``request_timeout``, ``allow_bucket_creation`` and any other ``S3FileSystem`` argument;
``retries`` becomes ``retry_strategy=AwsStandardS3RetryStrategy(max_attempts=retries)``.
Without keys in the URI or the options, pyarrow reads the AWS environment variables and
credential files (``AWS_ACCESS_KEY_ID``, ``~/.aws/credentials``, ...); pyarrow never reads an
endpoint from the environment. The tier's own options:

* ``timeout_s`` (default 60): every call must finish within it (a put gets an extra second per
  ``min_put_bps`` bytes), or it fails with a :class:`TierError` saying "no answer within N s";
* ``min_put_bps`` (default 16e6): the slowest upload rate a put is given time for;
* ``uncommitted_grace_s`` (default 3600): see below;
* ``chunk_bytes`` (default 32 MiB): reads are ranged GETs of at most this many bytes each.

Commit without rename. An object appears whole or not at all: a PUT, or a multipart upload
that was completed (pyarrow switches to multipart for large objects by itself); a failed
upload is never completed, so readers never see a torn object. There is no rename, hence no
tmp key: a checkpoint's data objects become visible one by one, and the manifest, written
last in one PUT, commits the step. Data objects of a step without a manifest are removed only
once older than ``uncommitted_grace_s`` (``Tier.uncommitted_grace_s``): a save that is still
writing looks exactly like one that crashed.

Blocking pyarrow calls run in a pool of worker threads of this module (not the event loop's
default pool), so a call stuck on a hung store never holds up ``asyncio.run``'s shutdown. A
call that ran out of time cannot be stopped: its thread finishes or fails on the client's own
timeouts (``connect_timeout``, ``request_timeout``, retries). A put that ran out of time and
completes afterwards has its object deleted (unless a newer put of the key started): a put
reported as failed leaves nothing behind, least of all a manifest whose data a cleanup
removed. A store that received a request and applies it after the client gave up is beyond
any client's reach; the asymcheck pipeline only commits (writes the manifest) after every data
object was acknowledged. A read that ran out of time never writes into the caller's buffer
afterwards. A read checks that the object did not change under it (size, mtime) and starts
over if it did.

pyarrow keeps a zero-byte "directory" marker where a deleted object was the last one under its
prefix (on S3; SeaweedFS and GCS keep real directories): markers are never listed as keys.

Secrets never appear in ``url``, ``repr`` or any error: ``url`` is the URI with secret query
values and the key part of its user info replaced by ``***``, and every message a pyarrow
error turns into is scrubbed of the secret values the tier was given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tiers._fsutil import clamp_range
from tiers._workers import WorkerPool
from tiers.base import (
    REDACTED,
    Capabilities,
    CapacityError,
    KeyNotFound,
    Payload,
    Tier,
    TierError,
    TierStat,
    is_secret_name,
    payload_parts,
    payload_size,
    redact_url,
    validate_key,
    validate_prefix,
)

try:
    import pyarrow as pa
    import pyarrow.fs as pafs
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the s3:// and gs:// tiers need the 'pyarrow' package: pip install 'asymcheck[s3]'"
    ) from exc

__all__ = ["SCHEMES", "ArrowFsTier"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: URL schemes this module serves, and the pyarrow class each one opens.
SCHEMES = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem",
           "abfs": "AzureFileSystem", "abfss": "AzureFileSystem"}

#: The worker threads of every ArrowFsTier.
_POOL = WorkerPool(32, "asymcheck-objstore")
_PUT_GENERATION = itertools.count(1)
#: A read whose object is replaced while it runs starts over, at most this many times.
_READ_TRIES = 3


class _BadUrl(ValueError):
    """The URL or the options cannot open a file system (found on first use)."""


class _Late:
    """Shared by an async call and its worker thread: once the call gave up (timeout or
    cancellation), the thread must not touch the caller's buffers any more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False


# Short causes for the pyarrow error texts of the usual failures, first match wins.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), cause) for pattern, cause in (
        (r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist|"
         r"bucket '[^']*' (does not exist|not found)",
         "the bucket does not exist"),
        (r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|access key id .* does not exist",
         "access denied: the access key is not known to the server (wrong credentials)"),
        (r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch",
         "access denied: the request signature does not match (wrong secret key)"),
        (r"ACCESS_DENIED|AccessDenied|\b403\b|Forbidden",
         "access denied (wrong or missing credentials, or no permission)"),
        (r"No response body|UNKNOWN .* 400|\b401\b|Unauthorized|credentials",
         "the server refused the credentials"),
        (r"curlCode: 7\b|Couldn't connect|Connection refused|NETWORK_CONNECTION",
         "cannot connect to the endpoint (server down or unreachable)"),
        (r"curlCode: 28\b|Timeout was reached|timed out",
         "the server did not answer in time (connect_timeout / request_timeout)"),
        (r"curlCode: (52|55|56)\b|Connection reset|Empty reply|Send failure|Recv failure",
         "the connection to the server broke"),
        (r"curlCode: 6\b|resolve host",
         "cannot resolve the endpoint's host name"),
    ))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


class ArrowFsTier(Tier):
    """A tier stored under one prefix of an object store bucket, through ``pyarrow.fs``."""

    scheme = "s3"
    capabilities = Capabilities(durable=True, in_memory=False, ranged_reads=True,
                                stale_tmp=False)
    #: Objects upload side by side: each PUT or multipart upload is its own request stream.
    concurrent_puts = 4
    uncommitted_grace_s = 3600.0

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None,
                 timeout_s: float = 60.0,
                 min_put_bps: float = 16e6,
                 uncommitted_grace_s: float = 3600.0,
                 chunk_bytes: int = 32 << 20,
                 retries: int | None = None,
                 **fs_options: Any) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        public = redact_url(url)
        super().__init__(public, name=name or scheme, capacity_bytes=capacity_bytes)
        if scheme not in SCHEMES:
            raise ValueError(f"not an object store URL ({', '.join(s + '://' for s in SCHEMES)}"
                             f"): {public!r}")
        self.scheme = scheme
        if not parts.hostname and not parts.netloc:
            raise ValueError(f"object store URL {public!r} names no bucket "
                             f"({scheme}://bucket/prefix)")
        if parts.fragment:
            raise ValueError(f"object store URL {public!r} must not have a fragment")
        self.timeout_s = float(timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"{self.name}: timeout_s must be > 0, got {timeout_s!r}")
        self.min_put_bps = float(min_put_bps)
        if not self.min_put_bps > 0:
            raise ValueError(f"{self.name}: min_put_bps must be > 0, got {min_put_bps!r}")
        self.uncommitted_grace_s = float(uncommitted_grace_s)
        if not self.uncommitted_grace_s >= 0:
            raise ValueError(f"{self.name}: uncommitted_grace_s must be >= 0, "
                             f"got {uncommitted_grace_s!r}")
        self.chunk_bytes = int(chunk_bytes)
        if self.chunk_bytes <= 0:
            raise ValueError(f"{self.name}: chunk_bytes must be > 0, got {chunk_bytes!r}")
        if retries is not None:
            if scheme != "s3":
                raise ValueError(f"{self.name}: the retries option is for s3:// tiers")
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
                raise ValueError(f"{self.name}: retries must be an integer >= 1, "
                                 f"got {retries!r}")
            fs_options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(
                max_attempts=retries)
        self._raw_url = url
        self._fs_options = dict(fs_options)
        # Every secret value the tier was given, scrubbed from any message it raises.
        secrets = [unquote(v) for k, v in parse_qsl(parts.query) if is_secret_name(k)]
        if parts.password:
            secrets.append(unquote(parts.password))
        if parts.username and scheme in ("s3", "gs", "gcs"):
            secrets.append(unquote(parts.username))
        secrets += [str(v) for k, v in fs_options.items()
                    if is_secret_name(k) and isinstance(v, str)]
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)
        self._bucket = (parts.username or "") if scheme.startswith("abfs") \
            else (parts.hostname or parts.netloc)
        self._fs: Any = None
        self._base = ""
        #: key -> generation of the newest put of it that is running or was given up
        self._latest_put: dict[str, int] = {}
        self._open_lock = asyncio.Lock()
        self._closed = False

    # ---------------------------------------------------------------- helpers

    @property
    def bucket(self) -> str:
        return self._bucket

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _where(self, op: str, key: str) -> str:
        what = f"{op} {key!r}" if key else op
        return f"{self.name} ({self.url}): {what} in bucket {self._bucket!r}"

    def _fail(self, op: str, key: str, exc: BaseException) -> NoReturn:
        """Re-raise ``exc`` as one line: a TierError/KeyNotFound naming the tier (by its
        redacted URL), the bucket, the key and a short cause."""
        if isinstance(exc, TierError):
            raise exc
        if isinstance(exc, FileNotFoundError) and op in ("get", "readinto", "stat", "delete"):
            text = self._scrub(str(exc))
            if not any(p.search(text) for p, c in _CAUSES if "bucket" in c):
                raise KeyNotFound(f"{self._where(op, key)}: no such key") from None
        if not isinstance(exc, (OSError, pa.ArrowException)):
            raise exc  # a bug, not a failure of the store
        text = self._scrub(str(exc))
        cause = next((c for p, c in _CAUSES if p.search(text)), None)
        if cause is None:
            cause = _first_line(text) or type(exc).__name__
        raise TierError(f"{self._where(op, key)}: {cause}") from None

    def _path(self, key: str) -> str:
        return f"{self._base}/{key}" if self._base else key

    async def _open(self, op: str, key: str) -> Any:
        if self._closed:
            raise TierError(f"{self._where(op, key)}: the tier is closed")
        if self._fs is None:
            async with self._open_lock:
                if self._fs is None:
                    self._fs, self._base = await self._call(op, key, self._make_fs)
        return self._fs

    def _make_fs(self, late: _Late) -> tuple[Any, str]:
        try:
            fs, path = pafs.FileSystem.from_uri(self._raw_url)
        except Exception as exc:
            raise _BadUrl(f"{self.name}: cannot open {self.url}: "
                          f"{_first_line(self._scrub(str(exc)))}") from None
        rebuild, args = fs.__reduce__()
        kwargs = dict(args[0])
        if self._fs_options:
            unknown = sorted(set(self._fs_options) - set(kwargs) - {"retry_strategy"})
            if unknown:
                raise _BadUrl(f"{self.name}: unknown option(s) {', '.join(unknown)} for "
                              f"{type(fs).__name__} (known: timeout_s, min_put_bps, "
                              f"uncommitted_grace_s, chunk_bytes, "
                              f"{'retries, ' if self.scheme == 's3' else ''}"
                              f"{', '.join(sorted(kwargs))})")
            kwargs.update(self._fs_options)
            fs = rebuild(kwargs)
        base = path.strip("/")
        if not base:
            raise _BadUrl(f"{self.name}: {self.url} names no bucket")
        # Some servers create a missing bucket on the first PUT, others fail every call: check
        # it once here (it also tells wrong credentials apart from a missing key).
        bucket = base.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            if not kwargs.get("allow_bucket_creation"):
                raise FileNotFoundError(f"bucket {bucket!r} does not exist (the option "
                                        f"allow_bucket_creation = true creates it)")
            fs.create_dir(bucket, recursive=False)
        return fs, base

    async def _call(self, op: str, key: str, fn: Callable[..., T], *args: Any,
                    nbytes: int = 0, finish: bool = False, late: _Late | None = None,
                    on_late: Callable[[concurrent.futures.Future[T]], None] | None = None
                    ) -> T:
        """``fn(late, *args)`` in a worker thread, bounded by ``timeout_s`` (plus ``nbytes``
        at ``min_put_bps``). ``finish``: when the caller is cancelled, wait (within the
        bound) for the thread to finish before re-raising, so a cancelled put is settled.
        ``on_late`` runs (in a worker thread) when a call that was given up finishes."""
        loop = asyncio.get_running_loop()
        late = late or _Late()
        cfut = _POOL.submit(fn, late, *args)
        fut: asyncio.Future[T] = asyncio.wrap_future(cfut, loop=loop)
        fut.add_done_callback(_consume)
        limit = self.timeout_s + nbytes / self.min_put_bps
        deadline = loop.time() + limit
        cancelled = False
        try:
            while not fut.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait((fut,), timeout=remaining)
                except asyncio.CancelledError:
                    if not finish:
                        raise
                    cancelled = True
        finally:
            if not fut.done():
                with late.lock:
                    late.abandoned = True
                if on_late is not None:
                    cfut.add_done_callback(on_late)
        if cancelled:
            raise asyncio.CancelledError
        if not fut.done():
            raise TierError(f"{self._where(op, key)}: no answer within {round(limit, 1):g} s "
                            f"(timeout_s)")
        try:
            return fut.result()
        except _BadUrl:
            raise
        except BaseException as exc:
            self._fail(op, key, exc)

    # ------------------------------------------------------------ tier API

    async def put(self, key: str, data: Payload) -> None:
        validate_key(key)
        parts = payload_parts(data)
        size = payload_size(parts)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            raise CapacityError(f"{self._where('put', key)}: {size} bytes can never fit in a "
                                f"capacity of {self.capacity_bytes} bytes")
        fs = await self._open("put", key)
        path = self._path(key)
        late, gen = _Late(), next(_PUT_GENERATION)
        self._latest_put[key] = gen
        try:
            await self._call("put", key, _write_object, fs, path, parts, nbytes=size,
                             finish=True, late=late,
                             on_late=functools.partial(self._undo_late_put, fs, key, path, gen))
        finally:
            if not late.abandoned:
                # the write is over, but the pool's worker may hold its arguments a moment
                # longer: the views go now (a host block whose views are all gone is reused,
                # still mapped); a worker given up on still reads them
                parts.clear()
                if self._latest_put.get(key) == gen:
                    del self._latest_put[key]

    def _undo_late_put(self, fs: Any, key: str, path: str, gen: int,
                       done: concurrent.futures.Future[None]) -> None:
        """A put reported as failed (it ran out of time) that completed afterwards: delete its
        object, unless a newer put of the key started since. A failed put must not leave an
        object behind, least of all a manifest whose data a cleanup already removed."""
        if self._latest_put.get(key) != gen:
            return
        self._latest_put.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        log.warning("%s (%s): put %r completed after it had failed (no answer within the "
                    "timeout); deleting the object", self.name, self.url, key)
        try:
            fs.delete_file(path)
        except Exception as exc:
            log.warning("%s (%s): could not delete %r: %s", self.name, self.url, key,
                        _first_line(self._scrub(str(exc))))

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        validate_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"{self.name}: negative offset or length reading {key!r}")
        chunks: list[bytes] = []
        await self._read("get", key, offset, length, None, chunks)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        validate_key(key)
        if offset < 0:
            raise ValueError(f"{self.name}: readinto {key!r}: negative offset {offset}")
        if out.ndim != 1 or out.format != "B":
            out = out.cast("B")
        await self._read("readinto", key, offset, out.nbytes, out, [])

    async def _read(self, op: str, key: str, offset: int, length: int | None,
                    out: memoryview | None, chunks: list[bytes]) -> None:
        """Ranged GETs of at most ``chunk_bytes`` into ``out`` (or appended to ``chunks``).

        Each GET returns bytes of one version of the object, but the size comes from an
        earlier HEAD: a read that reaches the end of the object, or takes several GETs, checks
        afterwards that the object was not replaced meanwhile (size and mtime), and starts
        over if it was."""
        fs = await self._open(op, key)
        path = self._path(key)
        for _ in range(_READ_TRIES):
            chunks.clear()
            handle, size = await self._call(op, key, _open_input, fs, path)
            try:
                start, end = clamp_range(self.name, key, size, offset, length)
                if out is not None and end - start != out.nbytes:
                    raise TierError(f"{self._where(op, key)}: short read: {end - start} of "
                                    f"{out.nbytes} bytes at offset {offset}")
                several = end - start > self.chunk_bytes
                before = await self._call(op, key, _version, fs, path) if several else None
                whole = True
                for pos in range(start, end, self.chunk_bytes):
                    n = min(self.chunk_bytes, end - pos)
                    if out is None:
                        chunk = await self._call(op, key, _read_at, handle, pos, n)
                        chunks.append(chunk)
                        got = len(chunk)
                    else:
                        at = pos - start
                        got = await self._call(op, key, _read_into, handle, pos,
                                               out[at:at + n])
                    if got != n:  # replaced by a shorter object meanwhile
                        whole = False
                        break
            finally:
                _close_quietly(handle)
            if whole and (before is None and end < size):
                return
            if whole:
                after = await self._call(op, key, _version, fs, path)
                if after[0] == size and (before is None or after == before):
                    return
        raise TierError(f"{self._where(op, key)}: the object kept changing while it was "
                        f"read ({_READ_TRIES} tries)")

    async def delete(self, key: str) -> None:
        validate_key(key)
        fs = await self._open("delete", key)
        await self._call("delete", key, _delete_object, fs, self._path(key))

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        fs = await self._open("list", prefix)
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        directory = self._path(head) if head else self._base
        found = await self._call("list", prefix, _list_files, fs, directory)
        cut = len(self._base) + 1
        keys = [p[cut:] for p in found if p.startswith(self._base + "/")]
        return sorted(k for k in keys if k.startswith(prefix) and _is_key(k))

    async def stat(self, key: str) -> TierStat:
        validate_key(key)
        fs = await self._open("stat", key)
        size, mtime = await self._call("stat", key, _stat_object, fs, self._path(key))
        return TierStat(key=key, size_bytes=size, mtime_s=mtime)

    async def close(self) -> None:
        """Later calls raise TierError; calls still running in threads finish on their own.
        Idempotent."""
        self._closed = True
        self._fs = None


# ------------------------------------------------------------- worker-thread functions


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a call nobody waits for any more (no 'never retrieved' logs)."""
    if not fut.cancelled():
        fut.exception()


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _write_object(late: _Late, fs: Any, path: str, parts: Sequence[memoryview]) -> None:
    """One object from ``parts``: a PUT, or a multipart upload completed on close.

    pyarrow has no abort: a stream that is dropped or closed completes its upload with what
    it got. A write fails only when an upload part failed, and that failure fails ``close``
    too, so such an upload is never completed. Should ``close`` succeed after a failed write
    all the same, the object it completed lacks bytes: it is deleted at once."""
    out = fs.open_output_stream(path)
    try:
        for part in parts:
            if part.nbytes:
                out.write(part)
    except BaseException:
        try:
            out.close()
        except Exception:
            pass  # the upload failed: nothing was completed
        else:
            with contextlib.suppress(Exception):
                fs.delete_file(path)
        raise
    out.close()


def _open_input(late: _Late, fs: Any, path: str) -> tuple[Any, int]:
    handle = fs.open_input_file(path)  # a HEAD: FileNotFoundError for a missing object
    return handle, int(handle.size())


def _version(late: _Late, fs: Any, path: str) -> tuple[int, int | None]:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no object {path!r}")
    return int(info.size), info.mtime_ns


def _read_at(late: _Late, handle: Any, offset: int, n: int) -> bytes:
    return bytes(handle.read_at(n, offset)) if n else b""


def _read_into(late: _Late, handle: Any, offset: int, dst: memoryview) -> int:
    data = handle.read_at(dst.nbytes, offset)
    n = min(len(data), dst.nbytes)
    with late.lock:
        if not late.abandoned:  # never write into the buffer of a call that gave up
            dst[:n] = memoryview(data)[:n]
    return len(data)


def _close_quietly(handle: Any) -> None:
    with contextlib.suppress(Exception):  # a read handle holds nothing to flush
        handle.close()


def _delete_object(late: _Late, fs: Any, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no object {path!r}")
    fs.delete_file(path)


def _list_files(late: _Late, fs: Any, directory: str) -> list[str]:
    selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
    return [info.path for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File]


def _stat_object(late: _Late, fs: Any, path: str) -> tuple[int, float]:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no object {path!r}")
    mtime_ns = info.mtime_ns
    return int(info.size), (mtime_ns / 1e9 if mtime_ns is not None else time.time())


