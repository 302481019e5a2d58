"""The worker's retry policy (``worker.retries.RETRIES``) as the encode task applies it: run
in this process against a real Redis, with Celery's eager mode standing in for delivery."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from encoder.storage import StorageError
from worker.retries import RETRIES, Action


def test_storage_errors_are_retried_without_end_and_never_count_as_errors():
    budget = lambda: pytest.fail("a storage error must not read the error budget")  # noqa: E731
    for _ in range(10):
        decision = RETRIES.retry_when(StorageError("S3 down"), budget)
        assert decision.action is Action.RETRY and not decision.counts_as_error


def test_registry_errors_requeue_the_chunk_unacknowledged():
    assert RETRIES.retry_when(RedisConnectionError(), lambda: 0).action is Action.REQUEUE


def test_other_errors_are_retried_with_doubling_backoff_then_given_up():
    delays = [RETRIES.retry_when(RuntimeError(), lambda n=n: n) for n in range(4)]
    assert [d.action for d in delays] == [Action.RETRY] * 3 + [Action.GIVE_UP]
    assert [d.countdown for d in delays[:3]] == [30.0, 60.0, 120.0]


def test_a_chunk_that_waited_out_storage_retries_keeps_its_whole_error_budget(
    redis_server, tmp_path, monkeypatch
):
    # Celery counts every retry in request.retries, storage ones too.  A chunk retried
    # three times for storage, then failing with a bug, must still be retried for the bug,
    # not failed at once.
    from encoder import settings as settings_module
    from jobs.registry import JobRegistry
    from worker import state as state_module
    from worker import tasks

    for name, value in {
        "IMGENC_BROKER_URL": redis_server.url, "IMGENC_BACKBONE": "stub", "IMGENC_WEIGHTS": "random",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    settings_module.process_settings.cache_clear()
    monkeypatch.setattr(state_module, "_state", None)
    registry = JobRegistry.from_url(redis_server.url)
    registry.create("job1", str(tmp_path / "out"), "{}", "fp", str(tmp_path), "imgenc")

    calls = []

    def broken(*_args, **_kwargs):
        calls.append(1)
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(tasks, "_encode_chunk", broken)
    message = {"job_id": "job1", "chunk": 0, "dest": str(tmp_path / "out"), "fingerprint": "fp",
               "paths": ["a.jpg"]}  # fmt: skip
    # Eagerly, a retry runs again at once: the chunk is tried until the policy gives up.
    result = tasks.encode_chunk.apply(kwargs=message, retries=3)  # three storage retries before
    assert len(calls) == 1 + RETRIES.max_error_retries  # the whole budget, not none of it
    assert registry.error_retries("job1", 0) == RETRIES.max_error_retries
    assert result.result == {"failed": 1}  # then the image is failed, never dropped
    settings_module.process_settings.cache_clear()
