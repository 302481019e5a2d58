"""The Celery tasks: ``imgenc.encode_chunk`` (a chunk of image paths to one shard) and
``imgenc.finalize_job`` (merge the manifest once every chunk is in).

A chunk message names its job, its number, the destination, the spec fingerprint the job
expects and up to ``MAX_PATHS_PER_TASK`` paths relative to the image root.  The worker:

1. refuses malformed messages (logged, dropped);
2. counts the delivery; the first one runs the fast path (decode-ahead thread pool, batched
   model calls); a later delivery of a chunk that was not recorded means a worker died on
   it, so it runs *carefully*: one image at a time, noting in Redis which image is in hand.
   An image in hand when a worker died ``max_strikes`` times is marked ``failed`` instead
   of killing workers forever;
3. refuses, with status ``spec_mismatch`` for every image, a job made for another spec;
4. writes one shard and its manifest part under keys derived from job and chunk (a
   redelivered chunk overwrites them), retrying storage errors with backoff;
5. records the chunk's counts in the registry, and merges the manifest when it is the last.

Registry (Redis) errors are retried.  Any other unexpected error is retried
``MAX_ERROR_RETRIES`` times with backoff, then every image of the chunk is written as
``failed`` with the error, so that no image is ever left without a manifest row.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import numpy as np
from celery.exceptions import Reject, Retry
from celery.utils.log import get_task_logger
from redis.exceptions import RedisError

from encoder.images import ImageLoader, ImageStatus, LoadResult
from encoder.manifest import merge_manifest
from encoder.pipeline import encode_stream
from encoder.spec import CodeSpec
from encoder.storage import StorageError
from encoder.writer import ShardWriter
from worker.app import app
from worker.retries import STORAGE_BACKOFF, TASK_RETRY_COUNTDOWN
from worker.state import WorkerState, get_state
from worker.watchdog import WatchedLoader

log: logging.Logger = get_task_logger("imgenc.worker")
MAX_PATHS_PER_TASK = 10_000
MAX_PATH_LENGTH = 4096
MAX_ERROR_RETRIES = 3  # unexpected errors: retried this often, then the images are `failed`


def _chunk_writer(state: WorkerState, job_id: str, dest: str) -> ShardWriter:
    """A writer that flushes only when told: one shard per chunk."""
    return ShardWriter(
        state.storage(dest), state.encoder.spec, job_id, shard_size=0, host=socket.gethostname()
    )


def shard_name(job_id: str, chunk: int) -> str:
    return f"{job_id}-{chunk:06d}"


def _validate(job_id: Any, chunk: Any, dest: Any, fingerprint: Any, paths: Any) -> None:
    problems = []
    if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 64:
        problems.append("bad job id")
    if not isinstance(chunk, int) or chunk < 0:
        problems.append("bad chunk number")
    if not isinstance(dest, str) or not dest:
        problems.append("bad destination")
    if not isinstance(fingerprint, str):
        problems.append("bad fingerprint")
    if not isinstance(paths, list):
        problems.append("paths is not a list")
    elif len(paths) > MAX_PATHS_PER_TASK:
        problems.append(f"{len(paths)} paths is over the {MAX_PATHS_PER_TASK} limit")
    elif not all(isinstance(p, str) and 0 < len(p) <= MAX_PATH_LENGTH for p in paths):
        problems.append("a path is not a non-empty string")
    if problems:
        log.error(
            "refusing malformed chunk message (job %r chunk %r): %s",
            str(job_id)[:64],
            chunk,
            "; ".join(problems),
        )
        raise Reject("; ".join(problems), requeue=False)


def _refuse_mismatched_spec(
    state: WorkerState,
    job_id: str,
    chunk: int,
    fingerprint: str,
    paths: list[str],
    writer: ShardWriter,
) -> None:
    mine = state.encoder.spec
    detail = ""
    try:
        expected = CodeSpec.from_json(state.registry.job(job_id)["spec"])
        detail = "; ".join(
            f"{k}: job {b!r}, worker {a!r}" for k, (a, b) in mine.differences(expected).items()
        )
    except (KeyError, ValueError):
        pass
    reason = f"worker spec {mine.fingerprint} differs from the job's {fingerprint}"
    log.error(
        "job %s chunk %d: refusing %d images: %s%s",
        job_id,
        chunk,
        len(paths),
        reason,
        f" ({detail})" if detail else "",
    )
    results = [
        LoadResult(id=p, path="", status=ImageStatus.SPEC_MISMATCH, error=reason) for p in paths
    ]
    writer.add(results, np.zeros((0, mine.bytes_per_code), np.uint8))


def _encode_fast(
    state: WorkerState, loader: ImageLoader, paths: list[str], writer: ShardWriter
) -> None:
    settings = state.settings
    for results, codes in encode_stream(
        paths,
        loader,
        state.encoder.encode,
        settings.batch,
        settings.decode_threads,
        bytes_per_code=state.encoder.spec.bytes_per_code,
    ):
        writer.add(results, codes)


def _encode_carefully(
    state: WorkerState,
    loader: ImageLoader,
    job_id: str,
    chunk: int,
    paths: list[str],
    writer: ShardWriter,
) -> None:
    registry, limit = state.registry, state.settings.max_strikes
    left = registry.strike_left_behind(job_id, chunk)
    if left:
        log.warning(
            "job %s chunk %d: a worker died while on %r (strike %d of %d)",
            job_id,
            chunk,
            left[0],
            left[1],
            limit,
        )
    strikes = registry.strikes(job_id, paths)
    empty = np.zeros((0, state.encoder.spec.bytes_per_code), np.uint8)
    for image_id in paths:
        if strikes.get(image_id, 0) >= limit:
            reason = (
                f"the worker died {strikes[image_id]} times while this image was in hand "
                "(crash, memory or time limit); given up"
            )
            log.error("job %s chunk %d: %r failed: %s", job_id, chunk, image_id, reason)
            failed = LoadResult(
                id=image_id,
                path=str(loader.root / image_id),
                status=ImageStatus.FAILED,
                error=reason,
            )
            writer.add([failed], empty)
            continue
        registry.set_current(job_id, chunk, image_id)
        result = loader.load(image_id)
        codes = state.encoder.encode(result.pixels[None]) if result.ok else empty
        result.pixels = None
        writer.add([result], codes)
    registry.set_current(job_id, chunk, None)


@app.task(name="imgenc.encode_chunk", bind=True, max_retries=None)
def encode_chunk(
    self: Any, job_id: str, chunk: int, dest: str, fingerprint: str, paths: list[str]
) -> dict[str, int]:
    _validate(job_id, chunk, dest, fingerprint, paths)
    try:
        return _encode_chunk(self, job_id, chunk, dest, fingerprint, paths)
    except (Reject, Retry):
        raise
    except RedisError as exc:
        # Redis stayed down through the client's retries. Publishing a Celery retry would
        # need Redis too, and Celery drops a message whose retry it cannot publish; so
        # reject with requeue, which is never an ack: the message stays unacked in Redis
        # and comes back after the visibility timeout (or at once, if the requeue goes through).
        log.warning(
            "job %s chunk %d: registry unreachable (%s); requeueing the chunk", job_id, chunk, exc
        )
        raise Reject(str(exc), requeue=True) from None
    except Exception as exc:  # a bug or a model error: retry, then fail the images, never drop
        retries = self.request.retries or 0
        if retries < MAX_ERROR_RETRIES:
            log.exception(
                "job %s chunk %d: %s; retry %d of %d",
                job_id,
                chunk,
                exc,
                retries + 1,
                MAX_ERROR_RETRIES,
            )
            raise self.retry(exc=exc, countdown=TASK_RETRY_COUNTDOWN * 2**retries) from None
        log.exception("job %s chunk %d: giving up after %d retries", job_id, chunk, retries)
        return _fail_chunk(
            job_id,
            chunk,
            dest,
            paths,
            f"worker error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
        )


def _encode_chunk(
    task: Any, job_id: str, chunk: int, dest: str, fingerprint: str, paths: list[str]
) -> dict[str, int]:
    start = time.monotonic()
    state = get_state()
    registry = state.registry
    if registry.chunk_recorded(job_id, chunk):  # done, but its ack was lost: nothing to redo
        log.info("job %s chunk %d: already recorded, skipping the redelivery", job_id, chunk)
        finalize_if_complete(state, job_id, dest)
        return {}
    attempt = registry.next_attempt(job_id, chunk)
    retries = task.request.retries or 0
    writer = _chunk_writer(state, job_id, dest)
    if fingerprint != state.encoder.spec.fingerprint:
        _refuse_mismatched_spec(state, job_id, chunk, fingerprint, paths, writer)
    else:
        root = os.environ.get("IMGENC_IMAGE_ROOT") or registry.job(job_id)["image_root"]
        loader = WatchedLoader(ImageLoader(root, state.encoder.input_size), state.watchdog)
        deaths = attempt - 1 - retries
        if deaths > 0:
            log.warning(
                "job %s chunk %d: delivery %d after %d lost deliveries; encoding "
                "one image at a time",
                job_id,
                chunk,
                attempt,
                deaths,
            )
            _encode_carefully(state, loader, job_id, chunk, paths, writer)
        else:
            _encode_fast(state, loader, paths, writer)
    _write(task, writer, job_id, chunk)
    registry.record_chunk(job_id, chunk, writer.counts)
    seconds = time.monotonic() - start
    log.info(
        "job %s chunk %d: %s in %.2f s (%.1f img/s)",
        job_id,
        chunk,
        writer.counts,
        seconds,
        len(paths) / seconds if seconds else 0.0,
    )
    finalize_if_complete(state, job_id, dest)
    return writer.counts


def _write(task: Any, writer: ShardWriter, job_id: str, chunk: int) -> None:
    name = shard_name(job_id, chunk)
    try:
        STORAGE_BACKOFF.run(lambda: writer.flush(name), what=f"job {job_id} chunk {chunk}")
    except StorageError as exc:
        log.error(
            "job %s chunk %d: storage still failing (%s); the chunk will be retried in %.0f s",
            job_id,
            chunk,
            exc,
            TASK_RETRY_COUNTDOWN,
        )
        raise task.retry(exc=exc, countdown=TASK_RETRY_COUNTDOWN) from None


def _fail_chunk(
    job_id: str, chunk: int, dest: str, paths: list[str], reason: str
) -> dict[str, int]:
    state = get_state()
    writer = _chunk_writer(state, job_id, dest)
    results = [LoadResult(id=p, path="", status=ImageStatus.FAILED, error=reason) for p in paths]
    writer.add(results, np.zeros((0, state.encoder.spec.bytes_per_code), np.uint8))
    STORAGE_BACKOFF.run(lambda: writer.flush(shard_name(job_id, chunk)), what=f"job {job_id}")
    state.registry.record_chunk(job_id, chunk, writer.counts)
    finalize_if_complete(state, job_id, dest)
    return writer.counts


def finalize_if_complete(state: WorkerState, job_id: str, dest: str) -> bool:
    """Merge the manifest once every chunk is recorded and the producer has finished."""
    if not state.registry.is_complete(job_id):
        return False
    storage = state.storage(dest)
    rows = STORAGE_BACKOFF.run(lambda: merge_manifest(storage), what=f"job {job_id} merge")
    state.registry.mark_finished(job_id)
    log.info("job %s complete: manifest of %d rows merged into %s", job_id, len(rows), dest)
    return True


@app.task(name="imgenc.finalize_job", bind=True, max_retries=None)
def finalize_job(self: Any, job_id: str, dest: str) -> bool:
    if not isinstance(job_id, str) or not isinstance(dest, str):
        raise Reject("malformed finalize message", requeue=False)
    try:
        return finalize_if_complete(get_state(), job_id, dest)
    except StorageError as exc:
        raise self.retry(exc=exc, countdown=TASK_RETRY_COUNTDOWN) from None
