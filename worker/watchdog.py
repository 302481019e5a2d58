"""``DecodeWatchdog``: a hard time limit per image, enforced by the worker process itself.

An image whose decoding runs past ``limit`` seconds (a decoder stuck in C code, which no
Python signal handler can interrupt) makes the watchdog SIGKILL its own process.  The pool
sees a lost worker and requeues the chunk (``task_reject_on_worker_lost``); the careful
re-run notes each image in hand, so the culprit collects a strike per death and ends
``failed`` after ``max_strikes``.  This complements Celery's chunk-wide ``task_time_limit``,
which in our tests did not stop a prefork child (celery 5.7.0).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from encoder.images import ImageLoader, LoadResult

log = logging.getLogger("imgenc.worker")


class DecodeWatchdog:
    def __init__(self, limit: float, interval: float = 0.2) -> None:
        self.limit = limit  # s per image
        self.interval = interval  # s between checks
        self._started: dict[int, tuple[str, float]] = {}  # thread id -> (image, start)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="decode-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            with self._lock:
                late = [
                    (image, now - t) for image, t in self._started.values() if now - t > self.limit
                ]
            if late:
                image, seconds = late[0]
                log.error(
                    "decoding %r has run %.1f s, over the %.0f s image time limit; "
                    "killing this worker process (the chunk will be retried carefully)",
                    image,
                    seconds,
                    self.limit,
                )
                for handler in logging.getLogger().handlers + log.handlers:
                    handler.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    def load(self, loader: ImageLoader, image_id: str) -> LoadResult:
        return self.watch(image_id, lambda: loader.load(image_id))

    def watch(self, image_id: str, decode: Callable[[], LoadResult]) -> LoadResult:
        """Run ``decode`` (one image's decoding) under the time limit."""
        key = threading.get_ident()
        with self._lock:
            self._started[key] = (image_id, time.monotonic())
        try:
            return decode()
        finally:
            with self._lock:
                self._started.pop(key, None)


class WatchedLoader:
    """An ``ImageLoader`` whose every ``load`` runs under the watchdog."""

    def __init__(self, loader: ImageLoader, watchdog: DecodeWatchdog) -> None:
        self.loader, self.watchdog = loader, watchdog
        self.root = loader.root

    def load(self, image_id: str) -> LoadResult:
        return self.watchdog.load(self.loader, image_id)
