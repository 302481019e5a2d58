"""Admission of query uploads: ``DecodeLanes``, two bounded lanes, and 503 when one is full.

An upload is decoded and resized to the model's input *before* the micro-batcher, in a
thread pool, so a model batch only ever receives decoded tensors and never waits on one
slow decode.  Which lane an upload takes is decided from its header alone
(``ImageLoader.decoded_pixels``: nothing is decoded to know it):

- **light**: at most ``heavy_pixels`` pixels to decode (16 Mpx by default).  A JPEG,
  however large, is decoded at 1/2, 1/4 or 1/8 scale (``draft``) and usually counts as
  light: an 81-Mpx JPEG decodes 1.3 Mpx.  ``threads`` threads (the core count by default).
- **heavy**: more than that, in a format without reduced-scale decode (PNG screenshots,
  TIFF scans, 16-bit images: about 1.5 s of one core for 81 Mpx).  Its own threads, half
  the light ones (at least one), run at a lower CPU priority (``nice`` +10, Linux), so
  light uploads and the model get the cores first; heavy uploads never hold a light one.

Each lane admits a bounded number of uploads, decoding or waiting for a thread
(``heavy_uploads``, 4 by default; ``light_uploads``, 64).  Beyond that, ``admit`` raises
``Overloaded`` at once, which the service answers with 503 and a ``Retry-After``: never an
unbounded wait, and never more memory than the admitted decodes need.  An upload whose
header cannot be read goes to the light lane: the loader refuses it before decoding.

With ``imgenc serve --workers`` the workers decode (under their watchdog); the service
still admits by the header's pixel count, sends light uploads in micro-batches and each
heavy one alone, holding its heavy-lane place until the worker answers.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_HEAVY_MPX = 16.0  # Mpx to decode above which an upload takes the heavy lane
DEFAULT_HEAVY_UPLOADS = 4  # heavy uploads decoding or waiting, at most
DEFAULT_LIGHT_UPLOADS = 64  # light uploads decoding or waiting, at most
HEAVY_NICE = 10  # added to the heavy threads' nice value (Linux: per thread)
FIRST_HEAVY_SECONDS = 2.0  # the guess of one heavy decode's time before one is measured

LIGHT, HEAVY = "light", "heavy"


class Overloaded(Exception):
    """An upload the service cannot admit now; the client should retry after
    ``retry_after`` seconds (the service answers 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """An upload's place in a lane, held until ``release`` (called once, idempotent)."""

    def __init__(self, lanes: DecodeLanes, lane: str) -> None:
        self.lanes, self.lane = lanes, lane
        self._released = False

    @property
    def heavy(self) -> bool:
        return self.lane == HEAVY

    def release(self, *_: Any) -> None:
        """Give the place back (also usable as a future's done callback)."""
        with self.lanes._lock:
            if self._released:
                return
            self._released = True
            self.lanes._held[self.lane] -= 1


class DecodeLanes:
    """The light and heavy lanes (see the module docstring): their thread pools, their
    limits, and the figures ``/healthz`` shows."""

    def __init__(
        self,
        threads: int | None = None,
        heavy_mpx: float = DEFAULT_HEAVY_MPX,
        heavy_uploads: int = DEFAULT_HEAVY_UPLOADS,
        light_uploads: int = DEFAULT_LIGHT_UPLOADS,
        heavy_threads: int | None = None,
    ) -> None:
        if heavy_uploads < 1 or light_uploads < 1:
            raise ValueError("each lane must admit at least one upload")
        self.threads = threads or os.cpu_count() or 1
        self.heavy_threads = heavy_threads or max(1, self.threads // 2)
        self.heavy_pixels = int(heavy_mpx * 1_000_000)
        self.limits = {LIGHT: light_uploads, HEAVY: heavy_uploads}
        self._pools = {
            LIGHT: ThreadPoolExecutor(self.threads, thread_name_prefix="decode-light"),
            HEAVY: ThreadPoolExecutor(
                self.heavy_threads, thread_name_prefix="decode-heavy", initializer=_lower_priority
            ),
        }
        self._lock = threading.Lock()
        self._held = {LIGHT: 0, HEAVY: 0}
        self.refused = 0  # uploads answered 503
        self.admitted = {LIGHT: 0, HEAVY: 0}
        self._heavy_seconds = FIRST_HEAVY_SECONDS  # moving average of one heavy run

    def lane_for(self, pixels: int | None) -> str:
        """The lane of an upload that decodes to ``pixels`` (None: header unreadable)."""
        return HEAVY if pixels is not None and pixels > self.heavy_pixels else LIGHT

    def admit(self, pixels: int | None) -> Admission:
        """A place in the upload's lane, or ``Overloaded`` at once when the lane is full."""
        lane = self.lane_for(pixels)
        with self._lock:
            held = self._held[lane]
            if held >= self.limits[lane]:
                self.refused += 1
                raise Overloaded(
                    f"too many {lane} uploads in progress ({held}); retry later",
                    self._retry_after(lane, held),
                )
            self._held[lane] = held + 1
            self.admitted[lane] += 1
        return Admission(self, lane)

    def run(self, admission: Admission, work: Callable[[], T]) -> Future[T]:
        """``work`` in the admitted lane's pool; the place is released when it ends (or
        when the future is cancelled before it started)."""
        timed = self._timed(work) if admission.heavy else work
        try:
            future = self._pools[admission.lane].submit(timed)
        except RuntimeError:  # the pool is shut down: the service is stopping
            admission.release()
            raise Overloaded("the service is stopping", 5) from None
        future.add_done_callback(admission.release)
        return future

    def figures(self) -> dict[str, Any]:
        """What ``/healthz`` reports."""
        with self._lock:
            return {
                "uploads_in_progress": self._held[LIGHT] + self._held[HEAVY],
                "heavy_uploads_in_progress": self._held[HEAVY],
                "refused_uploads": self.refused,
                "heavy_uploads_admitted": self.admitted[HEAVY],
                "decode_threads": self.threads,
                "heavy_decode_threads": self.heavy_threads,
                "heavy_mpx": self.heavy_pixels / 1_000_000,
                "heavy_uploads_limit": self.limits[HEAVY],
                "light_uploads_limit": self.limits[LIGHT],
            }

    def shutdown(self) -> None:
        """Stop both pools (what is queued is dropped; running decodes finish)."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _timed(self, work: Callable[[], T]) -> Callable[[], T]:
        def timed() -> T:
            start = time.monotonic()
            try:
                return work()
            finally:
                seconds = time.monotonic() - start
                with self._lock:
                    self._heavy_seconds = 0.7 * self._heavy_seconds + 0.3 * seconds

        return timed

    def _retry_after(self, lane: str, held: int) -> int:
        """Seconds until a place is likely free: the heavy lane's queue drained at the
        measured pace of one heavy run; 1 s for the light lane."""
        if lane == LIGHT:
            return 1
        return max(1, math.ceil(self._heavy_seconds * held / self.heavy_threads))


def _lower_priority() -> None:
    """Run this (heavy-lane) thread at a lower CPU priority: on Linux ``setpriority`` on a
    thread id renices that thread alone.  Elsewhere, or when refused, nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HEAVY_NICE)
    except (AttributeError, OSError):
        pass
