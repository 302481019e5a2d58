"""``RemoteQueryEncoder``: query images encoded by the Celery workers, not in this process.

It sends one ``imgenc.encode_images`` message per batch of query images (base64 in JSON;
asking for the pooled float features too for ``POST /encode?features=true``) to
``<queue>.queries`` and waits for the result in the Redis result backend.  The web
process then needs no model and no TensorFlow.  When no worker answers within
``timeout`` seconds, it raises ``NoWorkerAnswered`` with what to check.  A worker built for
another code spec answers ``spec_mismatch`` for every image.

Several calls may be in flight at once (``concurrent_batches``, 4 by default): the service
sends its micro-batches from several threads, and each heavy upload alone, so one slow
batch does not hold every query behind it.  Each call borrows one of as many Celery apps,
each with its own broker and result-backend connections: Celery's Redis result consumer
is not safe to share between threads (celery/celery#4480, #6335).  ``decoded_pixels``
reads an upload's header here (nothing decoded) for the service's admission.
"""

from __future__ import annotations

import base64
import queue
from typing import Any

import numpy as np
from kombu.utils.url import maybe_sanitize_url

from encoder.images import ImageLoader, ImageStatus, LoadResult
from encoder.settings import Settings
from encoder.spec import CodeSpec
from jobs.celery_app import make_app
from jobs.messages import (
    ENCODE_IMAGES,
    QUERY_QUEUE_SUFFIX,
    EncodedImages,
    EncodeImagesMessage,
    NoWorkerAnswered,
)

DEFAULT_CONCURRENT_BATCHES = 4


class RemoteQueryEncoder:
    def __init__(
        self,
        settings: Settings,
        spec: CodeSpec,
        timeout: float = 30.0,
        concurrent_batches: int = DEFAULT_CONCURRENT_BATCHES,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.timeout = timeout  # s
        self.queue = settings.queue + QUERY_QUEUE_SUFFIX
        self.concurrent_batches = max(1, concurrent_batches)
        self._apps: queue.Queue[Any] = queue.Queue()
        for _ in range(self.concurrent_batches):
            app = make_app(settings)
            # One backend per app whatever thread borrows it (not one per thread, each with
            # its own connections): an app serves one call at a time.
            app.conf.result_backend_thread_safe = True
            self._apps.put(app)
        self._header_reader = ImageLoader("/", spec.input_size)

    def decoded_pixels(self, data: bytes) -> int | None:
        """The pixels a worker will decode for ``data``, from its header (for admission)."""
        return self._header_reader.decoded_pixels(data)

    def encode(self, images: list[tuple[str, bytes]]) -> tuple[list[LoadResult], np.ndarray]:
        """One call to a worker; safe from up to ``concurrent_batches`` threads at once
        (more wait for a free app)."""
        results, codes, _ = self._ask(images, features=False)
        return results, codes

    def encode_with_features(
        self, images: list[tuple[str, bytes]]
    ) -> tuple[list[LoadResult], np.ndarray, np.ndarray]:
        """The same, and the ok images' pooled float features."""
        return self._ask(images, features=True)

    def _ask(
        self, images: list[tuple[str, bytes]], features: bool
    ) -> tuple[list[LoadResult], np.ndarray, np.ndarray]:
        app = self._apps.get()
        try:
            return self._call(app, images, features)
        finally:
            self._apps.put(app)

    def _call(
        self, app: Any, images: list[tuple[str, bytes]], features: bool
    ) -> tuple[list[LoadResult], np.ndarray, np.ndarray]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        message = EncodeImagesMessage(
            self.spec.fingerprint,
            [name for name, _ in images],
            [base64.b64encode(data).decode("ascii") for _, data in images],
            features,
        )
        pending = app.send_task(
            ENCODE_IMAGES, kwargs=message.to_kwargs(), queue=self.queue, expires=self.timeout
        )
        try:
            answer = EncodedImages.from_json(pending.get(timeout=self.timeout))
        except CeleryTimeout:
            pending.forget()
            raise NoWorkerAnswered(
                f"no worker answered within {self.timeout:.0f} s on queue {self.queue} at "
                f"{maybe_sanitize_url(self.settings.broker_url)}: start one with "
                "`celery -A worker worker` (its IMGENC_* model settings must match the "
                "destination's spec)"
            ) from None
        results = [
            LoadResult(id=name, path="", status=ImageStatus(status), error=error)
            for (name, _), status, error in zip(images, answer.statuses, answer.errors, strict=True)
        ]
        raw = base64.b64decode(answer.codes) if answer.codes else b""
        codes = np.frombuffer(raw, np.uint8).reshape(-1, self.spec.bytes_per_code)
        n_ok = sum(r.ok for r in results)
        if codes.shape[0] != n_ok:
            raise ValueError("the worker's answer holds a code count that does not match")
        pooled = np.frombuffer(base64.b64decode(answer.features), "<f4") if features else None
        if pooled is None or n_ok == 0:
            return results, codes, np.zeros((n_ok, 0), np.float32)
        return results, codes, pooled.reshape(n_ok, -1).astype(np.float32)
