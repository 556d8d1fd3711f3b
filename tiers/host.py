"""HostTier: checkpoint bytes in shared memory (files on tmpfs, written through mmap).

``shm://asymcheck/job1`` is the directory ``<root>/asymcheck/job1/`` where root is
``$ASYMCHECK_SHM_ROOT`` or ``/dev/shm``. Committed keys outlive the writing process (a new
process opening the same URL reads them), and are gone at reboot: this is the fast tier.

The checkpoint engine stages into :meth:`HostTier.reserve` blocks and copies tensors straight
into their memory. Deleted keys, and blocks freed uncommitted once done with
(:meth:`HostBlock.free`), go to a free pool (``.free/``) and are renamed back into use by a
later reservation of the same size, so steady-state checkpoints touch no fresh pages.

One instance is expected to be the only writer of its directory: the byte budget and the
mapping cache are per instance. An overwrite holds the old and the new value until its
commit, so it needs room for both. Readers in other processes must copy a key's bytes before it
is deleted, since its pages may be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import secrets
import shutil
import stat as stat_mod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from tiers._fsutil import (
    TMP_RE,
    check_file_key,
    clamp_range,
    copy_into,
    finish_even_if_cancelled,
    flat_bytes,
    list_files,
    makedirs_durable,
    os_error,
    pid_alive,
    prune_empty_dirs,
    remove_stale_tmp,
    tmp_name,
)
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

log = logging.getLogger(__name__)

ENV_ROOT = "ASYMCHECK_SHM_ROOT"
DEFAULT_ROOT = "/dev/shm"
POOL_DIR = ".free"


def shm_root() -> Path:
    """Where ``shm://NAME`` directories live: ``$ASYMCHECK_SHM_ROOT`` or ``/dev/shm``."""
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


def live_writer(directory: Path) -> int | None:
    """The pid of a live process whose write is in progress below ``directory``, if any."""
    for _, _, files in os.walk(directory):
        for name in files:
            tmp = TMP_RE.search(name)
            if tmp and pid_alive(int(tmp.group(1))):
                return int(tmp.group(1))
    return None


#: A pooled block not reused while this many later blocks joined the pool is of a size no
#: longer asked for (a manifest that grew a byte, a changed model): it is unlinked.
POOL_STALE_AFTER = 16
#: Reads smaller than this copy on the event loop; a thread hop would cost more.
_THREAD_COPY_BYTES = 1 << 20
_CREATE_TRIES = 3
_Pooled = tuple[Path, "mmap.mmap | None"]  # a free block's file and the mapping it kept
# Map every page at mmap time (Linux): one call fills the page tables, where touching each page
# would take a minor fault per 4 KiB. A 280 MiB block is copied into at 5-10 GB/s instead of
# 0.5 GB/s, and the mapping is made where the block is reserved, off the copying thread.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class HostBlock:
    """A reserved, writable shared-memory block; invisible until :meth:`commit`.

    ``view`` is a writable flat uint8 view over the block's mapping. ``async with`` commits on a
    clean exit and aborts on an exception.
    """

    def __init__(self, tier: HostTier, key: str, nbytes: int, tmp_path: Path,
                 mapping: mmap.mmap | None) -> None:
        self.key = key
        self.nbytes = nbytes
        self.view: memoryview = (memoryview(mapping) if mapping is not None
                                 else memoryview(bytearray()))
        self._tier = tier
        self._tmp_path = tmp_path
        self._mapping = mapping
        self._state = "open"
        self._on_close: list[Callable[[], None]] = []

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    async def commit(self, key: str | None = None) -> None:
        """Publish the block (atomic rename) under its key, or under ``key`` when given (a block
        reserved ahead of time before its final name was known); no-op when already committed."""
        await self._tier._commit_block(self, key)

    async def abort(self) -> None:
        """Drop the block and release its bytes; no-op once committed or aborted."""
        await self._tier._abort_block(self)

    async def free(self) -> None:
        """Drop the block's bytes, done with, into the free pool (still mapped, unless a view
        of it is alive), where a later block of the same size is staged through its pages;
        no-op once committed or aborted."""
        await self._tier._abort_block(self, pool=True)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once when the block is committed or aborted, before its view is released
        (to undo what was done to its memory, such as page-locking it for a device)."""
        if self._state != "open":
            raise TierError(f"{self._tier.name}: block for {self.key!r} is already {self._state}")
        self._on_close.append(fn)

    def on_unmap(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once when the tier lets go of this block's memory mapping, before it is
        unmapped (to undo what was done to the memory, such as page-locking it for a device).
        The mapping outlives the block when the block is freed to the pool: a later block of
        the same size is staged through it, with ``fn`` still pending."""
        if self._mapping is not None:
            self._tier._unmap_hooks.setdefault(id(self._mapping), []).append(fn)

    def _run_on_close(self) -> None:
        fns, self._on_close = self._on_close, []
        _call_all(fns, f"{self._tier.name}: a close callback of {self.key!r}")

    async def __aenter__(self) -> HostBlock:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            await self.commit()
        else:
            await self.abort()

    def _release_view(self) -> None:
        with contextlib.suppress(BufferError):  # the caller still exports it: theirs to drop
            self.view.release()

    def __repr__(self) -> str:
        return f"HostBlock(key={self.key!r}, nbytes={self.nbytes}, state={self._state})"


class HostTier(Tier):
    """Shared-memory tier with an awaitable byte budget and a free pool of blocks."""

    scheme = "shm"
    capabilities = Capabilities(durable=False, in_memory=True)

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None, root: str | os.PathLike[str] | None = None,
                 pool_max_bytes: int | None = None) -> None:
        super().__init__(url, name=name, capacity_bytes=capacity_bytes)
        parts = urlsplit(url)
        if parts.scheme != self.scheme or parts.query or parts.fragment:
            raise ValueError(f"not a host tier URL (shm://NAME[/SUBPATH]): {url!r}")
        rel = unquote(parts.netloc + parts.path).strip("/")
        if not rel:
            raise ValueError(f"host tier URL {url!r} needs a name: shm://NAME[/SUBPATH]")
        validate_key(rel)
        for value, what in ((capacity_bytes, "capacity_bytes"), (pool_max_bytes, "pool_max_bytes")):
            if value is not None and value < 0:
                raise ValueError(f"{what} must be >= 0 or None, got {value}")
        self.pool_max_bytes = pool_max_bytes
        self._root = Path(root) if root else shm_root()
        self._dir = self._root / rel
        self._pool_dir = self._dir / POOL_DIR
        self._opened = False
        self._closed = False
        self._writer = False  # set by the first reserve/put/delete
        self._open_lock = asyncio.Lock()
        self._meta_lock = asyncio.Lock()  # orders renames with the size/mapping bookkeeping
        self._waiters: list[asyncio.Future[None]] = []
        self._sizes: dict[str, int] = {}
        self._committed = 0
        self._reserved = 0
        self._pooled = 0
        # (size, path, arrival, mapping), oldest first: a freed block keeps the writable
        # mapping it was staged through, so its pages stay mapped for the next reserve
        self._pool: list[tuple[int, Path, int, mmap.mmap | None]] = []
        self._pool_arrivals = 0
        self._maps: dict[str, mmap.mmap] = {}
        self._unmap_hooks: dict[int, list[Callable[[], None]]] = {}  # by id() of a mapping
        self._blocks: set[HostBlock] = set()
        self._epoch = 0  # bumped by every commit and delete

    # ---- accounting -------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def local_dir(self) -> Path:
        return self._dir

    @property
    def used_bytes(self) -> int:
        """Committed keys + outstanding reservations + pooled free blocks."""
        return self._committed + self._reserved + self._pooled

    @property
    def committed_bytes(self) -> int:
        return self._committed

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def pooled_bytes(self) -> int:
        return self._pooled

    def _notify(self) -> None:
        """Wake every task waiting for budget; each re-checks whether it fits now."""
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def _wait_for_budget(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def has_pooled(self, nbytes: int) -> bool:
        """Whether a freed block of exactly ``nbytes`` waits in the pool for reuse."""
        return any(entry[0] == nbytes for entry in self._pool)

    def _take_pooled(self, nbytes: int) -> _Pooled | None:
        for i in range(len(self._pool) - 1, -1, -1):
            if self._pool[i][0] == nbytes:
                self._pooled -= nbytes
                _, path, _, mapping = self._pool.pop(i)
                return path, mapping
        return None

    async def drop_pool(self) -> None:
        """Unlink every pooled free block (its memory goes back to the machine)."""
        await self._ensure_open()
        await self._evict_pool(None)
        self._notify()

    async def _evict_pool(self, need_bytes: int | None) -> None:
        """Unlink pooled blocks, oldest first, until ``need_bytes`` are freed (None: all)."""
        victims: list[Path] = []
        mappings: list[mmap.mmap] = []
        freed = 0
        while self._pool and (need_bytes is None or freed < need_bytes):
            size, path, _, mapping = self._pool.pop(0)
            self._pooled -= size
            freed += size
            victims.append(path)
            if mapping is not None:
                mappings.append(mapping)
        if victims:
            unmap = [(self._unmap_hooks.pop(id(m), []), m) for m in mappings]
            await finish_even_if_cancelled(
                asyncio.to_thread(_free_all, self.name, victims, unmap))

    async def _acquire(self, key: str, nbytes: int) -> _Pooled | None:
        """Reserve ``nbytes``, waiting while they do not fit; returns a pooled file to reuse."""
        cap = self.capacity_bytes
        if cap is not None and nbytes > cap:
            raise CapacityError(f"{self.name}: {key!r} needs {nbytes} bytes, more than the "
                                f"tier's whole capacity of {cap} bytes")
        while True:
            self._check_open()
            reuse = self._take_pooled(nbytes) if nbytes else None
            if reuse is not None or cap is None or self.used_bytes + nbytes <= cap:
                self._reserved += nbytes
                return reuse
            if self._pool:
                await self._evict_pool(self.used_bytes + nbytes - cap)
            else:
                await self._wait_for_budget()

    def _release(self, nbytes: int) -> None:
        self._reserved -= nbytes
        self._notify()

    # ---- lifecycle --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"{self.name}: tier is closed")

    async def open(self) -> HostTier:
        """Scan the directory (sizes, pool, stale tmp files). Every operation does this first."""
        await self._ensure_open()
        return self

    async def _ensure_open(self) -> None:
        self._check_open()
        if self._opened:
            return
        async with self._open_lock:
            if self._opened:
                return
            sizes, pool = await asyncio.to_thread(self._scan)
            self._sizes = sizes
            self._committed = sum(sizes.values())
            self._pool = pool
            self._pooled = sum(entry[0] for entry in pool)
            self._opened = True

    def _scan(self) -> tuple[dict[str, int], list[tuple[int, Path, int, mmap.mmap | None]]]:
        os.makedirs(self._dir, exist_ok=True)
        remove_stale_tmp(self._dir, skip_top={POOL_DIR})
        sizes = {}
        for key in list_files(self._dir, "", skip_top={POOL_DIR}):
            with contextlib.suppress(FileNotFoundError):
                sizes[key] = os.stat(self._dir / key).st_size
        pool = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._pool_dir) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    pool.append((entry.stat().st_mtime_ns, entry.stat().st_size,
                                 Path(entry.path)))
        pool.sort()
        return sizes, [(size, path, 0, None) for _, size, path in pool]

    async def close(self) -> None:
        """Abort open blocks, unmap, and drop the free pool if this instance wrote here (a
        reader, such as an inspecting tool, leaves a running job's pool alone). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for block in list(self._blocks):
            await self._abort_block(block)
        for mapping in self._maps.values():
            self._let_go(mapping)
        self._maps.clear()
        if self._writer:
            await self._evict_pool(None)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.rmdir, self._pool_dir)
        self._notify()

    async def destroy(self) -> None:
        """Close and remove the tier's whole directory (and parents left empty)."""
        await self.close()
        await asyncio.to_thread(_remove_tree, self._dir, self._root)

    # ---- keys -------------------------------------------------------------------------------

    def _check_key(self, key: str) -> Path:
        check_file_key(key)
        if key.split("/", 1)[0] == POOL_DIR:
            raise ValueError(f"tier key {key!r} is inside the reserved {POOL_DIR!r} directory")
        return self._dir / key

    def _fail(self, op: str, key: str, exc: OSError) -> OSError:
        if isinstance(exc, TierError):
            return exc
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return KeyNotFound(f"{self.name}: no key {key!r}")
        return os_error(self.name, op, key, exc)

    # ---- staging ----------------------------------------------------------------------------

    async def reserve(self, key: str, nbytes: int) -> HostBlock:
        """A writable block of ``nbytes`` that becomes ``key`` on commit; waits for budget."""
        path = self._check_key(key)
        if nbytes < 0:
            raise ValueError(f"{self.name}: cannot reserve {nbytes} bytes for {key!r}")
        await self._ensure_open()
        self._writer = True
        reuse = await self._acquire(key, nbytes)  # from here on, the bytes are ours
        task = asyncio.ensure_future(self._make_block(key, path, nbytes, reuse))
        try:
            return await finish_even_if_cancelled(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                await finish_even_if_cancelled(task.result().abort())
            raise

    async def _make_block(self, key: str, path: Path, nbytes: int,
                          reuse: _Pooled | None) -> HostBlock:
        """Create the block's tmp file; any failure releases the reservation."""
        tmp = tmp_name(path)
        try:
            try:
                mapping = await asyncio.to_thread(self._create, key, tmp, nbytes, reuse)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not self._pool:
                    raise
                log.info("%s: shared memory is full; dropping the free pool", self.name)
                await self._evict_pool(None)
                mapping = await asyncio.to_thread(self._create, key, tmp, nbytes, None)
        except BaseException as exc:
            self._release(nbytes)
            if isinstance(exc, OSError):
                raise os_error(self.name, "reserve", key, exc) from exc
            raise
        block = HostBlock(self, key, nbytes, tmp, mapping)
        self._blocks.add(block)
        return block

    def _create(self, key: str, tmp: Path, nbytes: int,
                reuse: _Pooled | None) -> mmap.mmap | None:
        """Make the tmp file (reusing a pooled one if possible) and map it writable: a pooled
        block that kept its mapping is used through it, its pages still mapped."""
        pooled, kept = reuse if reuse is not None else (None, None)
        try:
            reused = self._claim_pooled(key, tmp, pooled) if pooled is not None else False
        except BaseException:
            if kept is not None:
                self._let_go(kept)
            raise
        if reused and kept is not None:
            return kept
        if kept is not None:  # taken by another instance: its pages are no longer ours
            self._let_go(kept)
        fd = self._open_tmp(key, tmp, reused)
        try:
            if not reused or os.fstat(fd).st_size != nbytes:
                os.ftruncate(fd, nbytes)
                if nbytes:
                    # Allocate the pages now: a full tmpfs then fails here with ENOSPC
                    # instead of killing the process with SIGBUS on first write.
                    os.posix_fallocate(fd, 0, nbytes)
            return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE) if nbytes else None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)

    def _claim_pooled(self, key: str, tmp: Path, pooled: Path) -> bool:
        """Rename the pooled file ``pooled`` to ``tmp``; False when another instance took it."""
        rel_dir = key.rpartition("/")[0]
        for attempt in range(_CREATE_TRIES):
            try:
                makedirs_durable(self._dir, rel_dir, fsync=False)
                os.rename(pooled, tmp)
                return True
            except FileNotFoundError:
                if not os.path.exists(pooled):
                    return False
                if attempt == _CREATE_TRIES - 1:  # a concurrent delete pruned the directory
                    raise
        raise AssertionError("unreachable")

    def _open_tmp(self, key: str, tmp: Path, reused: bool) -> int:
        """Open ``tmp`` read-write: the pooled file renamed there, or a new one."""
        if reused:
            return os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        rel_dir = key.rpartition("/")[0]
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in range(_CREATE_TRIES):
            try:
                makedirs_durable(self._dir, rel_dir, fsync=False)
                return os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # a concurrent delete pruned the directory: retry
                if attempt == _CREATE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def _commit_block(self, block: HostBlock, key: str | None = None) -> None:
        if key is not None and block._state == "open" and key != block.key:
            self._check_key(key)
            block.key = key
        if block._state == "open":
            # Shielded: once the rename ran, the bookkeeping below must run too.
            await finish_even_if_cancelled(self._commit_locked(block))
        if block._state == "aborted":
            raise TierError(f"{self.name}: block for {block.key!r} was aborted")

    async def _commit_locked(self, block: HostBlock) -> None:
        async with self._meta_lock:
            if block._state != "open":  # a concurrent commit, or close() aborted it
                return
            try:
                await asyncio.to_thread(self._rename_into_place, block._tmp_path, block.key)
            except OSError as exc:
                await self._abort_block(block)
                raise os_error(self.name, "commit", block.key, exc) from exc
            block._state = "committed"
            self._blocks.discard(block)
            block._run_on_close()
            block._release_view()
            old = self._sizes.get(block.key, 0)
            self._sizes[block.key] = block.nbytes
            # reservation out before committed bytes in: a reader on another thread may see
            # the block in neither count for a moment, never in both
            self._release(block.nbytes)
            self._committed += block.nbytes - old
            self._drop_mapping(block.key)
            if block._mapping is not None:
                self._maps[block.key] = block._mapping
            self._epoch += 1

    def _rename_into_place(self, tmp: Path, key: str) -> None:
        makedirs_durable(self._dir, key.rpartition("/")[0], fsync=False)
        os.rename(tmp, self._dir / key)

    async def _abort_block(self, block: HostBlock, pool: bool = False) -> None:
        if block._state != "open":
            return
        block._state = "aborted"
        self._blocks.discard(block)
        block._run_on_close()
        block._release_view()
        mapping = block._mapping
        kept = mapping if pool and mapping is not None and _unexported(mapping) else None
        if mapping is not None and kept is None:
            self._let_go(mapping)
        # pooled only with its mapping: pages a live view still shows are not handed on
        pool_path = (self._pool_dir / secrets.token_hex(8)
                     if kept is not None and not self._closed else None)
        pooled = False
        try:
            _, pooled = await finish_even_if_cancelled(asyncio.to_thread(
                self._remove, block._tmp_path, pool_path))
        except FileNotFoundError:
            pass
        finally:
            if kept is not None and not pooled:
                self._let_go(kept)
            self._reserved -= block.nbytes
            if pooled and pool_path is not None:
                self._to_pool(block.nbytes, pool_path, kept)
            self._notify()
        if pooled:
            await self._trim_pool()

    def _to_pool(self, size: int, path: Path, mapping: mmap.mmap | None) -> None:
        self._pool.append((size, path, self._pool_arrivals, mapping))
        self._pool_arrivals += 1
        self._pooled += size

    async def _trim_pool(self) -> None:
        """After a block joined the pool: unlink what is over ``pool_max_bytes`` and blocks of
        sizes no longer asked for; then wake the reservations waiting for budget."""
        if self.pool_max_bytes is not None and self._pooled > self.pool_max_bytes:
            await self._evict_pool(self._pooled - self.pool_max_bytes)
        stale = 0
        for size, _, arrival, _ in self._pool:
            if self._pool_arrivals - arrival <= POOL_STALE_AFTER:
                break
            stale += size
        if stale:
            await self._evict_pool(stale)
        self._notify()

    def _drop_mapping(self, key: str) -> bool:
        """Forget the cached mapping of ``key``; True when it was unmapped (no views remain)."""
        mapping = self._maps.pop(key, None)
        return True if mapping is None else self._let_go(mapping)

    def _let_go(self, mapping: mmap.mmap) -> bool:
        """Run the mapping's unmap hooks and unmap it; False when a view of it is still alive
        (the memory then stays mapped for that view until it is dropped)."""
        return _unmap(self.name, self._unmap_hooks.pop(id(mapping), []), mapping)

    # ---- reads ------------------------------------------------------------------------------

    async def _mapping(self, key: str) -> mmap.mmap | None:
        """The cached read mapping of ``key`` (None for an empty value)."""
        path = self._check_key(key)
        await self._ensure_open()
        cached = self._maps.get(key)
        if cached is not None:
            return cached
        epoch = self._epoch
        try:
            mapping = await asyncio.to_thread(_map_readonly, path)
        except OSError as exc:
            raise self._fail("read", key, exc) from exc
        if mapping is not None and epoch == self._epoch:  # no commit/delete raced with us
            return self._maps.setdefault(key, mapping)
        return mapping

    async def view(self, key: str) -> memoryview:
        """A read-only zero-copy view of a committed key.

        While the view is alive, deleting the key only unlinks it: its pages are not reused.
        """
        mapping = await self._mapping(key)
        if mapping is None:
            return memoryview(b"")
        return memoryview(mapping).toreadonly()

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        mapping = await self._mapping(key)
        size = len(mapping) if mapping is not None else 0
        start, end = clamp_range(self.name, key, size, offset, length)
        if mapping is None or start == end:
            return b""
        # exports while they live (the mapping cannot be closed under us); released on exit so
        # a later delete can recycle the block
        with memoryview(mapping) as src, src[start:end] as part:
            if end - start < _THREAD_COPY_BYTES:
                return bytes(part)
            return await finish_even_if_cancelled(asyncio.to_thread(bytes, part))

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        dst = flat_bytes(out)
        mapping = await self._mapping(key)
        size = len(mapping) if mapping is not None else 0
        if offset < 0:
            raise ValueError(f"{self.name}: negative offset reading {key!r}")
        start, end = offset, offset + dst.nbytes
        if end > size:
            raise TierError(f"{self.name}: short read of {key!r}: {max(0, size - start)} of "
                            f"{dst.nbytes} bytes at offset {offset}")
        if mapping is None or start == end:
            return
        with memoryview(mapping) as src, src[start:end] as part:
            if end - start < _THREAD_COPY_BYTES:
                dst[:] = part
            else:
                await finish_even_if_cancelled(asyncio.to_thread(copy_into, dst, part))

    # ---- Tier API ---------------------------------------------------------------------------

    async def put(self, key: str, data: Payload) -> None:
        parts = payload_parts(data)
        async with await self.reserve(key, payload_size(parts)) as block:
            if block.nbytes:
                await finish_even_if_cancelled(
                    asyncio.to_thread(_copy_parts, block.view, parts))

    async def delete(self, key: str) -> None:
        """Remove ``key``; its pages go to the free pool unless a view of them is alive."""
        path = self._check_key(key)
        await self._ensure_open()
        self._writer = True
        # Shielded: once the file moved, the bookkeeping below must run too.
        await finish_even_if_cancelled(self._delete_locked(key, path))

    async def _delete_locked(self, key: str, path: Path) -> None:
        async with self._meta_lock:
            kept = self._maps.get(key)
            if kept is not None and _unexported(kept):
                del self._maps[key]  # goes to the pool with its file
                unmapped = True
            else:
                kept = None
                unmapped = self._drop_mapping(key)
            pool_path = self._pool_dir / secrets.token_hex(8) if unmapped else None
            try:
                size, pooled = await asyncio.to_thread(self._remove, path, pool_path)
            except BaseException as exc:
                if kept is not None:
                    self._let_go(kept)
                if isinstance(exc, OSError):
                    raise self._fail("delete", key, exc) from exc
                raise
            old = self._sizes.pop(key, None)
            if old is not None:
                self._committed -= old
            if pooled and pool_path is not None:
                self._to_pool(size, pool_path, kept)
            elif kept is not None:
                self._let_go(kept)
            self._epoch += 1
        await self._trim_pool()

    def _remove(self, path: Path, pool_path: Path | None) -> tuple[int, bool]:
        """Move ``path`` into the free pool (or unlink it); returns (size, pooled)."""
        st = os.stat(path)
        if not stat_mod.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a key", str(path))
        pooled = False
        if pool_path is not None and st.st_size > 0:
            os.makedirs(self._pool_dir, exist_ok=True)
            os.rename(path, pool_path)
            pooled = True
        else:
            os.unlink(path)
        prune_empty_dirs(self._dir, path.parent)
        return st.st_size, pooled

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        await self._ensure_open()
        return await asyncio.to_thread(list_files, self._dir, prefix, {POOL_DIR})

    async def stat(self, key: str) -> TierStat:
        path = self._check_key(key)
        await self._ensure_open()
        try:
            st = await asyncio.to_thread(os.stat, path)
        except OSError as exc:
            raise self._fail("stat", key, exc) from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise KeyNotFound(f"{self.name}: no key {key!r}")
        return TierStat(key=key, size_bytes=st.st_size, mtime_s=st.st_mtime)


def _unexported(mapping: mmap.mmap) -> bool:
    """Whether no buffer of ``mapping`` (a block's writable one) is alive, so that it may stage
    another block: CPython refuses to resize a map while a buffer is exported, and resizing it
    to its own size changes nothing. A read-only map cannot be resized: False."""
    try:
        mapping.resize(len(mapping))
    except (BufferError, TypeError):
        return False
    return True


def _map_readonly(path: Path) -> mmap.mmap | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a key", str(path))
        if st.st_size == 0:
            return None
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _copy_parts(dst: memoryview, parts: list[memoryview]) -> None:
    pos = 0
    for part in parts:
        copy_into(dst[pos:pos + part.nbytes], part)
        pos += part.nbytes


def _call_all(fns: list[Callable[[], None]], what: str) -> None:
    """Call each of ``fns``; a failure is logged (as ``what`` failed), and the rest still run."""
    for fn in fns:
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)


def _unmap(tier: str, hooks: list[Callable[[], None]], mapping: mmap.mmap) -> bool:
    """Run ``hooks``, then unmap ``mapping``; False when a view of it is still alive (the
    memory then stays mapped for that view until it is dropped)."""
    _call_all(hooks, f"{tier}: an unmap callback")
    try:
        mapping.close()
    except BufferError:  # someone still holds a view; it stays valid for them
        return False
    return True


def _free_all(tier: str, paths: list[Path],
              unmap: list[tuple[list[Callable[[], None]], mmap.mmap]]) -> None:
    """Unmap ``unmap``'s mappings (each after its hooks) and unlink ``paths``."""
    for hooks, mapping in unmap:
        _unmap(tier, hooks, mapping)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _remove_tree(path: Path, root: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    prune_empty_dirs(root, path.parent)
