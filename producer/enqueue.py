"""``enqueue()`` and ``Job``: register a job in Redis, send its chunks, follow its progress.

Chunks are published by task name (``jobs.messages``); the producer never imports the
worker.  Paths travel relative to the image root: the ``image_root`` setting
(``IMGENC_IMAGE_ROOT``, read by the workers too), else the folder being enqueued.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from encoder.deletions import ScannedSet, check_deletions, record_deletions, vanished
from encoder.features import plan_features
from encoder.resume import ResumeKeys
from encoder.scan import ScanEntry, scan_images
from encoder.settings import Settings, process_settings
from encoder.spec import spec_for
from encoder.writer import open_destination
from jobs.celery_app import make_app
from jobs.messages import ENCODE_CHUNK, FINALIZE_JOB, ChunkMessage, FinalizeMessage
from jobs.registry import JobRegistry, JobStatus

log = logging.getLogger("imgenc")


class EnqueueInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while enqueueing: the job holds what was sent before it."""

    def __init__(self, job_id: str, enqueued: int) -> None:
        super().__init__(job_id, enqueued)
        self.job_id, self.enqueued = job_id, enqueued


class Job:
    """A job in the registry: ``status()`` now, or ``wait()`` until it is done."""

    def __init__(self, job_id: str, broker_url: str, dest: str = "") -> None:
        self.id = job_id
        self.broker_url = broker_url
        self.registry = JobRegistry.from_url(broker_url)
        self.dest = dest or self.registry.job(job_id)["dest"]

    def __repr__(self) -> str:
        return (
            f"Job({self.id!r}, dest={self.dest!r}, broker={maybe_sanitize_url(self.broker_url)!r})"
        )

    def status(self) -> JobStatus:
        return self.registry.status(self.id)

    def wait(
        self, progress: bool = False, poll: float = 0.5, timeout: float | None = None
    ) -> JobStatus:
        """Block until every chunk is in and the manifest is merged; returns the final status."""
        from tqdm import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        bar = tqdm(
            total=status.total,
            unit="img",
            disable=not progress,
            file=sys.stderr,
            desc=f"job {self.id}",
            smoothing=0.1,
        )
        try:
            while True:
                status = self.status()
                bar.total = status.total
                bar.n = status.processed
                bar.set_postfix(failed=status.failed, refresh=False)
                bar.refresh()
                if status.done and status.finished_at is not None:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"job {self.id} not done after {timeout} s: "
                        f"{status.processed}/{status.total}"
                    )
                time.sleep(poll)
        finally:
            bar.close()


def relative_prefix(image_dir: Path, image_root: Path) -> str:
    """Where ``image_dir`` lies under ``image_root`` ("" when they are the same folder)."""
    prefix = os.path.relpath(image_dir, image_root)
    if prefix == ".." or prefix.startswith("../"):
        raise ValueError(
            f"{image_dir} is not inside the image root {image_root} (IMGENC_IMAGE_ROOT or "
            "--image-root): paths are sent relative to it, so the folder must lie under it"
        )
    return "" if prefix == "." else prefix


def _relative_entries(image_dir: Path, prefix: str) -> Iterator[ScanEntry]:
    """The scan's entries with ids relative to the image root (``prefix/id``)."""
    for entry in scan_images(image_dir):
        yield ScanEntry(f"{prefix}/{entry.id}", entry.size, entry.mtime_ns) if prefix else entry


def enqueue(
    image_dir: str | Path,
    out: str,
    settings: Settings | None = None,
    broker: str | None = None,
    chunk: int | None = None,
    queue: str | None = None,
    resume: bool = False,
    image_root: str | Path | None = None,
    stop: threading.Event | None = None,
    dedup_fit: bool = True,
    features: bool = False,
    accept_deletions: bool = False,
    **model: Any,
) -> Job:
    """Register a job and enqueue every image under ``image_dir``; returns the ``Job``.

    ``model`` takes the model settings (``backbone``, ``layout``, ``bits``, ``seed``,
    ``weights``, ``precision``, ``center``); unset ones come from ``IMGENC_*`` variables,
    exactly as the workers read them.  The job records the code spec it expects, and
    workers with another spec refuse its chunks.  Paths are sent relative to
    ``image_root`` (default: the ``image_root`` setting, else ``image_dir`` itself).

    ``stop``, when set (the CLI sets it on Ctrl-C and SIGTERM), ends the enqueueing at the
    next chunk boundary: the job keeps what was sent and ``EnqueueInterrupted`` is raised.

    ``dedup_fit=False`` skips the job's last step, the near-duplicate threshold fitted on
    the destination by a worker.

    ``features`` has the workers write the pooled float features too (``encoder.features``:
    it sticks to a destination that has them, and fills them for the ok images of one
    that had none).

    With ``resume``, the images the destination holds under this folder (ids under its
    path relative to the image root) that the scan no longer finds are recorded
    ``deleted`` (``encoder.deletions``) before any chunk is sent; ``check_deletions``
    refuses an emptied folder unless ``accept_deletions``.  The job counts them apart
    (``JobStatus.deleted``).
    """
    settings = (settings or process_settings()).override(
        {
            "broker_url": broker,
            "chunk": chunk,
            "queue": queue,
            "image_root": None if image_root is None else str(image_root),
            **model,
        }
    )
    image_dir = Path(image_dir).resolve()
    if not image_dir.is_dir():
        raise NotADirectoryError(f"{image_dir} is not a directory")
    root = Path(settings.image_root).resolve() if settings.image_root else image_dir
    prefix = relative_prefix(image_dir, root)
    spec = spec_for(settings)
    registry = JobRegistry.from_url(settings.broker_url)
    registry.r.ping()  # an unreachable broker fails here, before anything is written
    storage, previous, _ = open_destination(out, spec, settings, resume)
    out = storage.url  # a local destination as an absolute path, the same for every worker
    skip = ResumeKeys.of(previous)
    plan = plan_features(storage, features)
    skip = plan.adjust_skip(skip)
    gone = None
    if resume or plan.needs_filling:
        # One scan before any chunk: the deletions are checked before anything is sent.
        scanned = ScannedSet()
        for entry in _relative_entries(image_dir, prefix):
            scanned.add(entry.id)
        if resume:
            gone, known = vanished(previous, scanned, prefix, column="id", same_root=True)
            check_deletions(gone.num_rows, known, accept_deletions)
        if plan.needs_filling:  # images gone now need no features; the others must be here
            if gone is not None:
                plan.forget(gone["id"])
            plan.check_reachable(scanned, str(image_dir))
        del scanned
    del previous
    plan.accept()

    job_id = uuid.uuid4().hex[:12]
    registry.create(
        job_id,
        str(out),
        spec.to_json(),
        spec.fingerprint,
        str(root),
        settings.queue,
        producer_host=socket.gethostname(),
        dedup_fit=dedup_fit,
    )
    if gone is not None and gone.num_rows:
        # Written before the chunks: the job's merge (by the last chunk or the finalize
        # message) includes it.
        registry.set_deleted(job_id, record_deletions(storage, gone, job_id))
        log.info("job %s: %d images gone from %s marked deleted", job_id, gone.num_rows, image_dir)
    app = make_app(settings)
    skipped = 0
    with app.connection_for_write() as connection:

        def send(number: int, paths: list[str]) -> None:
            message = ChunkMessage(job_id, number, str(out), spec.fingerprint, paths, plan.on)
            app.send_task(
                ENCODE_CHUNK,
                kwargs=message.to_kwargs(),
                queue=settings.queue,
                connection=connection,
            )
            registry.add_enqueued(job_id, len(paths), probe=paths[0] if number == 0 else None)

        def finish() -> None:
            registry.finish_scanning(job_id)
            app.send_task(
                FINALIZE_JOB,
                kwargs=FinalizeMessage(job_id, str(out)).to_kwargs(),
                queue=settings.queue,
                connection=connection,
            )

        number, paths = 0, []
        try:
            for entry, done in skip.split(_relative_entries(image_dir, prefix)):
                if done:
                    skipped += 1
                    continue
                paths.append(entry.id)
                if len(paths) == settings.chunk:
                    if stop is not None and stop.is_set():
                        raise KeyboardInterrupt
                    send(number, paths)
                    number, paths = number + 1, []
            if paths and not (stop is not None and stop.is_set()):
                send(number, paths)
                number += 1
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Stop cleanly: what was sent stays a complete job; --resume sends the rest.
            finish()
            raise EnqueueInterrupted(job_id, registry.status(job_id).total) from None
        finish()
    log.info(
        "job %s: %d images in %d chunks enqueued on %s (queue %s, image root %s)%s",
        job_id,
        registry.status(job_id).total,
        number,
        maybe_sanitize_url(settings.broker_url),
        settings.queue,
        root,
        f", {skipped} already done" if resume else "",
    )
    return Job(job_id, settings.broker_url, str(out))
