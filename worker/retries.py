"""``Backoff``: the retry policy for storage writes, in one place.

A write that fails with ``StorageError`` (S3 down, a network blip, a full disk) is retried
in the task with exponential backoff; when the attempts run out the task itself is retried
later by Celery (a new message, acknowledged only when written), so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from encoder.storage import StorageError

T = TypeVar("T")
log = logging.getLogger("imgenc.worker")


@dataclass(frozen=True)
class Backoff:
    """Parameters:

    - ``attempts``: tries in all, the first included.
    - ``min_backoff``: seconds before the first retry; doubled after each failure.
    - ``max_backoff``: the most seconds between two tries.
    """

    attempts: int = 6
    min_backoff: float = 0.5  # s
    max_backoff: float = 30.0  # s

    def delay(self, retry: int) -> float:
        return min(self.max_backoff, self.min_backoff * 2**retry)

    def run(
        self, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep
    ) -> T:
        for retry in range(self.attempts):
            try:
                return action()
            except StorageError as exc:
                if retry == self.attempts - 1:
                    raise
                wait = self.delay(retry)
                log.warning(
                    "%s: %s; retrying in %.1f s (%d/%d)",
                    what,
                    exc,
                    wait,
                    retry + 1,
                    self.attempts - 1,
                )
                sleep(wait)
        raise AssertionError("unreachable")


STORAGE_BACKOFF = Backoff()
TASK_RETRY_COUNTDOWN = 30.0  # s before Celery redelivers a chunk whose writes kept failing
