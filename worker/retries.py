"""``RetryPolicy``: every retry rule of the worker, in one place (in the manner of
dramatiq's ``Retries`` middleware).  The tasks ask it what to do with a failure; they hold
no retry rule of their own.

Parameters (the defaults are ``RETRIES``):

- ``storage``: a ``Backoff`` for a write that fails with ``StorageError`` (S3 down, a
  network blip, a full disk), retried inside the task: ``attempts`` tries in all,
  ``min_backoff`` seconds before the first retry, doubled each time up to ``max_backoff``.
- ``storage_countdown``: seconds before Celery runs again a chunk whose writes still
  failed.  Storage retries are not counted against any budget: an outage ends, and the
  message is acknowledged only once written.
- ``max_error_retries``: an unexpected error (a bug, a model error) is retried this often,
  then every image of the chunk is written as ``failed`` with the error.  These retries are
  counted in the job registry, apart from storage retries, so a chunk that waited out a
  storage outage keeps its whole error budget.
- ``error_countdown``: seconds before the first error retry, doubled each time.
- Registry (Redis) errors requeue the chunk without acknowledging it (``REQUEUE``): it
  comes back when Redis does, and its lease lapses.
- ``max_strikes`` (a setting, ``IMGENC_MAX_STRIKES``): an image in hand when its worker
  died that many times is marked ``failed`` (``worker.tasks`` and the registry count the
  deaths: deliveries beyond the first that were not Celery retries).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.exceptions import RedisError

from encoder.storage import StorageError

T = TypeVar("T")
log = logging.getLogger("imgenc.worker")


@dataclass(frozen=True)
class Backoff:
    attempts: int = 6  # tries in all, the first included
    min_backoff: float = 0.5  # s before the first retry; doubled after each failure
    max_backoff: float = 30.0  # s, the most between two tries

    def delay(self, retry: int) -> float:
        return min(self.max_backoff, self.min_backoff * 2**retry)

    def run(
        self, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep
    ) -> T:
        """``action()``, tried again after a ``StorageError`` as the parameters say."""
        for retry in range(self.attempts):
            try:
                return action()
            except StorageError as exc:
                if retry == self.attempts - 1:
                    raise
                wait = self.delay(retry)
                log.warning(
                    "%s: %s; retrying in %.1f s (%d/%d)", what, exc, wait, retry + 1,
                    self.attempts - 1,
                )  # fmt: skip
                sleep(wait)
        raise AssertionError("unreachable")


class Action(enum.Enum):
    RETRY = "retry"  # a new delivery after the countdown (Celery's retry)
    REQUEUE = "requeue"  # back to the queue unacknowledged (the broker may be down)
    GIVE_UP = "give up"  # write the chunk's images as failed


@dataclass(frozen=True)
class Decision:
    action: Action
    countdown: float = 0.0  # s, for RETRY
    counts_as_error: bool = False  # a retry that uses the error budget


@dataclass(frozen=True)
class RetryPolicy:
    storage: Backoff = field(default_factory=Backoff)
    storage_countdown: float = 30.0  # s
    max_error_retries: int = 3
    error_countdown: float = 30.0  # s, doubled after each error retry

    def retry_when(self, exc: BaseException, error_retries: Callable[[], int]) -> Decision:
        """What to do after ``exc`` ended a chunk; ``error_retries()`` says how often it
        was retried for errors before (asked only for an error that counts)."""
        if isinstance(exc, RedisError):
            return Decision(Action.REQUEUE)
        if isinstance(exc, StorageError):
            return Decision(Action.RETRY, self.storage_countdown)
        done = error_retries()
        if done < self.max_error_retries:
            return Decision(Action.RETRY, self.error_countdown * 2**done, True)
        return Decision(Action.GIVE_UP)


RETRIES = RetryPolicy()
