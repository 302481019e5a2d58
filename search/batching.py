"""``MicroBatcher``: requests that arrive together are processed in one call.

A model encodes a batch of 8 images in much less than 8 times the time of one, so when
several users query at once, their images are gathered for up to ``max_wait`` seconds
(or until ``max_batch`` items) and handed to ``process`` together, in one thread.  Each
caller gets a ``Future`` for its own item.  A lone request waits at most ``max_wait``.
``start`` and ``stop`` run and end the thread (the service's lifespan calls them).

With ``concurrency`` above 1 (the Celery workers encode, ``--workers``), up to that many
batches are processed at once, in a pool of that many threads: a slow batch does not hold the
next.  While all are busy, new items gather into the next batch.  An item whose future
was cancelled before its batch started (its client gave up) is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger("imgenc.search")

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        process: Callable[[list[Item]], list[Result]],
        max_batch: int = 32,
        max_wait: float = 0.005,  # s
        concurrency: int = 1,  # batches processed at once
    ) -> None:
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.concurrency = max(1, concurrency)
        self._slots = threading.Semaphore(self.concurrency)
        self._lock = threading.Lock()
        self.batches = 0  # calls of `process`
        self.items = 0  # items processed
        self._queue: queue.Queue[tuple[Item, Future[Result]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.concurrency > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="micro-batch")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after the items already submitted."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:  # the batches still being processed
            self._pool.shutdown(wait=True)
            self._pool = None

    def submit(self, item: Item) -> Future[Result]:
        future: Future[Result] = Future()
        self._queue.put((item, future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            # Wait for a free slot before gathering: items arriving meanwhile join this batch.
            self._slots.acquire()
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # stop: answer this batch, then end
                    self._queue.put(None)
                    break
                batch.append(item)
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                self._slots.release()
            elif self._pool is None:
                self._process_in_slot(batch)
            else:
                self._pool.submit(self._process_in_slot, batch)

    def _process_in_slot(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        try:
            self._process(batch)
        finally:
            self._slots.release()

    def _process(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = self.process(items)
        except Exception as exc:  # hand the error to every caller of this batch
            log.exception("a batch of %d queries failed", len(items))
            for _, future in batch:
                future.set_exception(exc)
            return
        with self._lock:
            self.batches += 1
            self.items += len(items)
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
