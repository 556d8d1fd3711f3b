"""Moving bytes into host blocks off the training thread.

``Copier`` copies launched partitions of CPU state on one worker thread, hashing what it
copied while it is in cache; ``CudaCopier`` enqueues them on a side stream into page-locked
memory and, once a partition's bytes are in, hands each of its chunks to a few hash
threads; ``pin_memory`` page-locks a block for those copies (cudaHostRegister).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from .snapshot import HOT_BYTES, flat_bytes, host_bytes

log = logging.getLogger(__name__)

#: threads that hash what a device copied into a page-locked block (xxhash drops the GIL):
#: those bytes arrive by DMA, not through a CPU's cache, so one thread would hash a whole
#: state at ~10 GB/s while the next save waits for it
HASH_THREADS = min(4, os.cpu_count() or 1)


class Copier:
    """Runs launched copies off the training thread (CPU: one worker thread)."""

    #: where the chunks it feeds are hashed in parallel (None: on its own thread, while the
    #: bytes it just copied are in cache)
    hash_pool: concurrent.futures.Executor | None = None

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asymcheck-copy")
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()

    def copy(self, dst: np.ndarray, src: torch.Tensor, start: int, stop: int,
             feed: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Copy bytes [start, stop) of ``src`` (contiguous) into ``dst`` (host memory, flat
        uint8); ``feed(offset, bytes)`` is then given what was copied (here: every
        ``HOT_BYTES``, while it is in cache)."""
        if src.device.type != "cpu":
            torch.from_numpy(dst).copy_(flat_bytes(src)[start:stop])
            if feed is not None:
                feed(0, dst)
            return
        # numpy's memcpy: a torch copy here would start an OpenMP pool in this thread, whose
        # spinning workers slow every training iteration, saves or not
        s = host_bytes(src)[start:stop]
        if feed is None:
            np.copyto(dst, s)
            return
        for o in range(0, len(dst), HOT_BYTES):
            np.copyto(dst[o:o + HOT_BYTES], s[o:o + HOT_BYTES])
            feed(o, dst[o:o + HOT_BYTES])

    def launch(self, fn: Callable[[], None], done: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            finally:
                done()
        fut = self._pool.submit(run)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def complete(self, on_done: Callable[[], None]) -> None:
        """Wait for every launched copy (re-raising the first failure), then ``on_done()``."""
        with self._lock:
            futures = list(self._futures)
        for f in futures:
            f.result()
        on_done()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CudaCopier(Copier):
    """Copies on a side stream into pinned host memory; completion tracked by events."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._ready = torch.cuda.Event()
        self.hash_pool: concurrent.futures.ThreadPoolExecutor = (
            concurrent.futures.ThreadPoolExecutor(HASH_THREADS,
                                                  thread_name_prefix="asymcheck-hash"))
        self._feeds: list[Callable[[], None]] = []  # of the copies enqueued by this launch

    def start(self) -> None:
        """Called at save(): the side stream waits for the state the compute stream made."""
        self._ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self._ready)

    def copy(self, dst: np.ndarray, src: torch.Tensor, start: int, stop: int,
             feed: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Enqueue the copy; ``feed`` is given its bytes on a host thread once they are in."""
        with torch.cuda.stream(self.stream):
            torch.from_numpy(dst).copy_(flat_bytes(src)[start:stop], non_blocking=src.is_cuda)
        if feed is not None:
            self._feeds.append(functools.partial(feed, 0, dst))

    def launch(self, fn: Callable[[], None], done: Callable[[], None]) -> None:
        fn()  # enqueues on the side stream: returns at once
        feeds, self._feeds = self._feeds, []
        event = torch.cuda.Event()
        event.record(self.stream)

        def arrived() -> None:  # a host thread learns when the bytes are in, and hands
            event.synchronize()  # them to the hash threads
            for feed in feeds:
                feed()

        super().launch(arrived, done)

    def complete(self, on_done: Callable[[], None]) -> None:
        """The compute stream waits for every copy (no CPU stall); a host thread learns when
        the bytes are in and calls ``on_done``."""
        event = torch.cuda.Event()
        event.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(event)

        def wait_then_done() -> None:
            event.synchronize()
            on_done()

        self._pool.submit(wait_then_done)

    def close(self) -> None:
        super().close()  # the copy thread, which hands chunks to the hash pool
        self.hash_pool.shutdown(wait=True)


#: cudaHostRegisterPortable: the pages count as pinned for every CUDA context of the process.
_HOST_REGISTER_PORTABLE = 1


def pin_memory(view: memoryview) -> Callable[[], None] | None:
    """Page-lock a host block for asynchronous device-to-host copies (cudaHostRegister).

    A copy from the GPU into pageable memory is staged by the driver and blocks the calling
    thread until done; into page-locked memory it runs on the copy engine while the thread
    goes on. Returns an idempotent unregister function, to be called before the memory is
    unmapped, or None when CUDA is absent or registration failed.
    """
    if not torch.cuda.is_available() or view.nbytes == 0:
        return None
    ptr = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, view.nbytes, _HOST_REGISTER_PORTABLE)
    if int(err) != 0:
        log.warning("cudaHostRegister of %d bytes failed (error %d): copies will block",
                    view.nbytes, int(err))
        return None
    lock = threading.Lock()
    registered = [True]

    def unregister() -> None:
        with lock:
            if registered[0]:
                registered[0] = False
                cudart.cudaHostUnregister(ptr)

    return unregister
