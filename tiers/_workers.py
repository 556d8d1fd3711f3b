"""Worker threads for the tiers whose clients block (HDFS, object stores)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerPool:
    """Threads made on first use and never shut down: a call stuck on a hung service must not
    hold up the event loop's executor shutdown (a call that ran out of time cannot be stopped;
    its thread ends on the client's own timeouts)."""

    def __init__(self, threads: int, name: str) -> None:
        self._threads = threads
        self._name = name
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self._threads, thread_name_prefix=self._name)
            executor = self._executor
        return executor.submit(fn, *args)
