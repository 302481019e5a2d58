"""The Celery tasks: ``imgenc.encode_chunk`` (a chunk of image paths to one shard),
``imgenc.finalize_job`` (merge the manifest once every chunk is in) and
``imgenc.encode_images`` (query images to codes, and on request to pooled float features,
for ``imgenc serve --workers``).

A chunk message (``jobs.messages.ChunkMessage``) names its job, its number, the
destination, the spec fingerprint the job expects and the paths, relative to the image
root.  The worker:

1. refuses malformed messages (logged, dropped);
2. counts the delivery.  The first one runs the ``Runner`` as ``imgenc encode`` does
   (decode-ahead thread pool, batched model calls).  A later delivery of a chunk that
   was not recorded means a worker died on it, so it runs *carefully*: one image at a
   time, noting in Redis which image is in hand.  An image in hand when a worker died
   ``max_strikes`` times is marked ``failed`` instead of killing workers forever;
3. refuses, with status ``spec_mismatch`` for every image, a job made for another spec;
4. writes one shard (and its features shard, when the message asks) and its manifest
   part, named after the job and chunk (a redelivered chunk overwrites them), retrying
   storage errors with backoff;
5. records the chunk's counts in the registry, and merges the manifest when it is the
   last; when images were ``missing``, checks once per job whether the image roots agree.

What happens after a failure is ``worker.retries.RETRIES``'s decision: registry (Redis)
errors requeue the chunk, storage errors retry it, any other unexpected error is retried a
few times with backoff, then every image of the chunk is written as ``failed`` with the
error, so that no image is ever left without a manifest row.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
from typing import Any

import numpy as np
from celery.exceptions import Reject, Retry
from celery.utils.log import get_task_logger

from encoder.features import feature_mapper
from encoder.images import ImageLoader, ImageStatus, LoadResult
from encoder.merged import merge_manifest
from encoder.runner import Runner
from encoder.spec import CodeSpec
from encoder.storage import StorageError
from encoder.writer import ShardWriter
from jobs.messages import (
    ENCODE_CHUNK,
    ENCODE_IMAGES,
    FINALIZE_JOB,
    MAX_IMAGE_BYTES,
    ChunkMessage,
    EncodedImages,
    EncodeImagesMessage,
    FinalizeMessage,
    MalformedMessage,
)
from jobs.registry import JobRegistry
from worker import leases  # noqa: F401  (connects the lease keeper to worker start)
from worker.app import app
from worker.retries import RETRIES, Action
from worker.state import WorkerState, get_state
from worker.watchdog import WatchedLoader

log: logging.Logger = get_task_logger("imgenc.worker")


class ChunkSink:
    """The chunk's ``ShardWriter`` (one shard, named after the chunk), whose flush is
    retried with the storage backoff."""

    def __init__(self, state: WorkerState, message: ChunkMessage) -> None:
        self.writer = ShardWriter(
            state.storage(message.dest),
            state.encoder.spec,
            message.job_id,
            shard_size=0,
            host=socket.gethostname(),
            first_shard=message.chunk,
            features=message.features,
        )
        self.what = f"job {message.job_id} chunk {message.chunk}"

    def add(self, results: list[LoadResult], codes: Any) -> None:
        self.writer.add(results, codes)

    def flush(self) -> str | None:
        return RETRIES.storage.run(self.writer.flush, what=self.what)

    @property
    def counts(self) -> dict[str, int]:
        return self.writer.counts


class NotingLoader:
    """A loader that notes in the registry which image is in hand before loading it."""

    def __init__(self, loader: Any, registry: JobRegistry, job_id: str, chunk: int) -> None:
        self.loader, self.registry, self.job_id, self.chunk = loader, registry, job_id, chunk

    def load(self, image_id: str) -> LoadResult:
        self.registry.set_current(self.job_id, self.chunk, image_id)
        return self.loader.load(image_id)


def _refuse_mismatched_spec(
    state: WorkerState, message: ChunkMessage, job: dict[str, str], sink: ChunkSink
) -> None:
    mine = state.encoder.spec
    detail = ""
    try:
        expected = CodeSpec.from_json(job["spec"])
        detail = "; ".join(
            f"{k}: job {b!r}, worker {a!r}" for k, (a, b) in mine.differences(expected).items()
        )
    except (KeyError, ValueError):
        pass
    reason = f"worker spec {mine.fingerprint} differs from the job's {message.fingerprint}"
    log.error(
        "job %s chunk %d: refusing %d images: %s%s",
        message.job_id,
        message.chunk,
        len(message.paths),
        reason,
        f" ({detail})" if detail else "",
    )
    results = [
        LoadResult(id=p, path="", status=ImageStatus.SPEC_MISMATCH, error=reason)
        for p in message.paths
    ]
    sink.add(results, state.encoder.empty_codes)
    sink.flush()


def _struck_out(state: WorkerState, message: ChunkMessage, root: str, sink: ChunkSink) -> list[str]:
    """Write ``failed`` rows for the images that killed workers too often; return the rest."""
    registry, limit = state.registry, state.settings.max_strikes
    left = registry.strike_left_behind(message.job_id, message.chunk)
    if left:
        log.warning(
            "job %s chunk %d: a worker died while on %r (strike %d of %d)",
            message.job_id,
            message.chunk,
            left[0],
            left[1],
            limit,
        )
    strikes = registry.strikes(message.job_id, message.paths)
    remaining = []
    for image_id in message.paths:
        if strikes.get(image_id, 0) < limit:
            remaining.append(image_id)
            continue
        reason = (
            f"the worker died {strikes[image_id]} times while this image was in hand "
            "(crash, memory or time limit); given up"
        )
        log.error("job %s chunk %d: %r failed: %s", message.job_id, message.chunk, image_id, reason)
        failed = LoadResult(
            id=image_id,
            path=f"{root.rstrip('/')}/{image_id}",
            status=ImageStatus.FAILED,
            error=reason,
        )
        sink.add([failed], state.encoder.empty_codes)
    return remaining


def _encode(
    state: WorkerState, message: ChunkMessage, job: dict[str, str], careful: bool, sink: ChunkSink
) -> str:
    """Run the chunk's images through the ``Runner``; returns the stage timings line."""
    settings, encoder = state.settings, state.encoder
    root, _ = state.image_root.for_job(job)
    loader: Any = WatchedLoader(ImageLoader(root, encoder.input_size), state.watchdog)
    paths = message.paths
    if careful:
        paths = _struck_out(state, message, root, sink)
        loader = NotingLoader(loader, state.registry, message.job_id, message.chunk)
    mapper, empty = (
        feature_mapper(encoder) if message.features else (encoder.encode, encoder.empty_codes)
    )
    runner = Runner(
        loader,
        mapper,
        sink,
        empty,
        batch_size=1 if careful else settings.batch,
        decode_threads=0 if careful else settings.decode_threads,
    )
    stats = runner.run(paths)
    if careful:
        state.registry.set_current(message.job_id, message.chunk, None)
    return stats.stage_line()


@app.task(name=ENCODE_CHUNK, bind=True, max_retries=None)
def encode_chunk(self: Any, **kwargs: Any) -> dict[str, int]:
    try:
        message = ChunkMessage.from_kwargs(kwargs)
    except MalformedMessage as exc:
        log.error(
            "refusing malformed chunk message (job %r chunk %r): %s",
            str(kwargs.get("job_id"))[:64],
            kwargs.get("chunk"),
            exc,
        )
        raise Reject(str(exc), requeue=False) from None
    try:
        return _encode_chunk(self, message)
    except (Reject, Retry):
        raise
    except Exception as exc:  # whatever it is, the policy decides; nothing is ever dropped
        return _after_failure(self, message, exc)


def _after_failure(task: Any, message: ChunkMessage, exc: Exception) -> dict[str, int]:
    """Retry, requeue or give up on a chunk that failed with ``exc``, as ``RETRIES`` says."""
    job_id, chunk = message.job_id, message.chunk
    registry = get_state().registry
    decision = RETRIES.retry_when(exc, lambda: registry.error_retries(job_id, chunk))
    if decision.action is Action.REQUEUE:
        # Redis stayed down through the client's retries. Publishing a Celery retry would
        # need Redis too, and Celery drops a message whose retry it cannot publish; so
        # reject with requeue, which is never an ack: the message stays unacked in Redis
        # and comes back when its lease runs out (or at once, if the requeue goes through).
        log.warning(
            "job %s chunk %d: registry unreachable (%s); requeueing the chunk", job_id, chunk, exc
        )
        raise Reject(str(exc), requeue=True) from None
    if decision.action is Action.RETRY:
        if decision.counts_as_error:
            done = registry.note_error_retry(job_id, chunk)
            log.exception(
                "job %s chunk %d: %s; error retry %d of %d in %.0f s", job_id, chunk, exc,
                done, RETRIES.max_error_retries, decision.countdown,
            )  # fmt: skip
        else:
            log.error(
                "job %s chunk %d: storage still failing (%s); the chunk will be retried in "
                "%.0f s", job_id, chunk, exc, decision.countdown,
            )  # fmt: skip
        raise task.retry(exc=exc, countdown=decision.countdown) from None
    log.exception(
        "job %s chunk %d: giving up after %d error retries", job_id, chunk,
        RETRIES.max_error_retries,
    )  # fmt: skip
    return _fail_chunk(
        message, f"worker error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    )


def _encode_chunk(task: Any, message: ChunkMessage) -> dict[str, int]:
    state = get_state()
    registry, job_id, chunk = state.registry, message.job_id, message.chunk
    if registry.chunk_recorded(job_id, chunk):  # done, but its ack was lost: nothing to redo
        log.info("job %s chunk %d: already recorded, skipping the redelivery", job_id, chunk)
        finalize_if_complete(state, job_id, message.dest)
        return {}
    attempt = registry.next_attempt(job_id, chunk)
    job = registry.job(job_id)
    sink = ChunkSink(state, message)
    timings = ""
    if message.fingerprint != state.encoder.spec.fingerprint:
        _refuse_mismatched_spec(state, message, job, sink)
    else:
        # Every delivery beyond the first that was not a Celery retry: a worker died on it.
        deaths = attempt - 1 - (task.request.retries or 0)
        if deaths > 0:
            log.warning(
                "job %s chunk %d: delivery %d after %d lost deliveries; encoding one image "
                "at a time", job_id, chunk, attempt, deaths,
            )  # fmt: skip
        timings = _encode(state, message, job, deaths > 0, sink)
    registry.record_chunk(job_id, chunk, sink.counts)
    log.info(
        "job %s chunk %d: recorded %s (attempt %d; %s)",
        job_id,
        chunk,
        sink.counts,
        attempt,
        timings or "nothing encoded",
    )
    state.image_root.check_missing(registry, job_id, job, sink.counts.get("missing", 0))
    finalize_if_complete(state, job_id, message.dest)
    return sink.counts


def _fail_chunk(message: ChunkMessage, reason: str) -> dict[str, int]:
    state = get_state()
    sink = ChunkSink(state, message)
    results = [
        LoadResult(id=p, path="", status=ImageStatus.FAILED, error=reason) for p in message.paths
    ]
    sink.add(results, state.encoder.empty_codes)
    sink.flush()
    state.registry.record_chunk(message.job_id, message.chunk, sink.counts)
    finalize_if_complete(state, message.job_id, message.dest)
    return sink.counts


def finalize_if_complete(state: WorkerState, job_id: str, dest: str) -> bool:
    """Merge the manifest once every chunk is recorded and the producer has finished
    (by the last chunk, or by the finalize message when the scan ended after it), once."""
    if not state.registry.is_complete(job_id):
        return False
    if state.registry.is_merged(job_id):
        return True
    storage = state.storage(dest)
    info = RETRIES.storage.run(lambda: merge_manifest(storage), what=f"job {job_id} merge")
    fit_duplicate_threshold(state, job_id, storage)
    sync_search_engine(job_id, storage)
    state.registry.mark_finished(job_id)
    log.info("job %s complete: manifest of %d rows merged into %s", job_id, info.rows, dest)
    return True


def sync_search_engine(job_id: str, storage: Any) -> None:
    """Where the destination's index is a search engine of its own (Milvus), bring it up
    to date with what the job wrote.  A sync that fails is logged and left to the next
    one (``imgenc index``, or a search server's refresh); it never fails the job."""
    from search.index import sync_engine

    try:
        if sync_engine(storage):
            log.info("job %s: the search engine of %s is in step", job_id, storage.url)
    except Exception:
        log.exception("job %s: search engine sync failed; `imgenc index` redoes it", job_id)


def fit_duplicate_threshold(state: WorkerState, job_id: str, storage: Any) -> None:
    """The job's last step: fit the destination's near-duplicate threshold here, where the
    model and the images are (unless a fit of nearly as many images is there).  A fit
    that fails is logged; it never fails the job (``imgenc fit-dedup`` can redo it)."""
    from search import Index
    from search.duplicate_fit import TooFewImages, fit_destination, fit_is_current

    settings = state.settings
    job = state.registry.job(job_id)
    if job.get("dedup_fit", "1") == "0":
        return
    try:
        index = Index.open(storage)
        if fit_is_current(index):
            return
        root, _ = state.image_root.for_job(job)
        fit = fit_destination(
            index,
            state.encoder,
            settings.dedup_kinds.split(","),
            settings.dedup_false_pairs,
            image_root=root,
            progress=False,
        )
        log.info("job %s: near-duplicate threshold fitted: %s", job_id, fit.summary())
    except TooFewImages as exc:
        log.info("job %s: no near-duplicate threshold fitted: %s", job_id, exc)
    except Exception:  # noqa: BLE001  (the codes are all written; only the fit failed)
        log.exception("job %s: near-duplicate threshold not fitted", job_id)


@app.task(name=FINALIZE_JOB, bind=True, max_retries=None)
def finalize_job(self: Any, **kwargs: Any) -> bool:
    try:
        message = FinalizeMessage.from_kwargs(kwargs)
    except MalformedMessage as exc:
        raise Reject(f"malformed finalize message: {exc}", requeue=False) from None
    try:
        return finalize_if_complete(get_state(), message.job_id, message.dest)
    except StorageError as exc:
        raise self.retry(exc=exc, countdown=RETRIES.storage_countdown) from None


@app.task(name=ENCODE_IMAGES, bind=True, ignore_result=False, acks_late=True)
def encode_images(self: Any, **kwargs: Any) -> dict[str, Any]:
    """Query images (base64) to packed codes, for ``imgenc serve --workers``: decoded by the
    same loader, under the same watchdog, encoded in one batch."""
    try:
        message = EncodeImagesMessage.from_kwargs(kwargs)
    except MalformedMessage as exc:
        log.error("refusing malformed encode_images message: %s", exc)
        raise Reject(str(exc), requeue=False) from None
    state = get_state()
    encoder = state.encoder
    if message.fingerprint != encoder.spec.fingerprint:
        reason = f"worker spec {encoder.spec.fingerprint} differs from {message.fingerprint}"
        n = len(message.images)
        return EncodedImages(
            encoder.spec.fingerprint, ["spec_mismatch"] * n, [reason] * n, ""
        ).to_json()
    loader = ImageLoader("/", encoder.input_size, max_file_bytes=MAX_IMAGE_BYTES)
    results = []
    for name, data in zip(message.names, message.images, strict=True):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        results.append(
            state.watchdog.watch(name, lambda raw=raw, name=name: loader.load_bytes(raw, name))
        )
    pixels = [r.pixels for r in results if r.ok]
    features = ""
    if message.features:
        codes, pooled = encoder.encode_with_features(
            np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
        )
        features = base64.b64encode(pooled.astype("<f4").tobytes()).decode("ascii")
    else:
        codes = encoder.encode(np.stack(pixels)) if pixels else encoder.empty_codes
    return EncodedImages(
        encoder.spec.fingerprint,
        [str(r.status) for r in results],
        [r.error for r in results],
        base64.b64encode(codes.tobytes()).decode("ascii"),
        features,
    ).to_json()
