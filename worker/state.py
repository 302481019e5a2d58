"""What a worker process holds: the model (loaded once, at process start), its settings
(``process_settings()``, the same object the Celery app was built from), the registry
connection, the decode watchdog and the storage clients.

TensorFlow is not fork-safe, so under the prefork pool the model is built in each child
(``worker_process_init``), never in the parent; under ``--pool solo`` or ``threads`` it is
built in the worker's own process once its logging is set up (``worker_ready``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import concurrency
from celery.signals import worker_process_init, worker_ready

from encoder.settings import Settings, process_settings
from encoder.storage import Storage, open_storage
from jobs.registry import JobRegistry
from worker.image_root import ImageRoot
from worker.watchdog import DecodeWatchdog

log = logging.getLogger("imgenc.worker")


@dataclass
class WorkerState:
    settings: Settings
    encoder: Any
    registry: JobRegistry
    watchdog: DecodeWatchdog
    image_root: ImageRoot
    storages: dict[str, Storage] = field(default_factory=dict)

    def storage(self, dest: str) -> Storage:
        if dest not in self.storages:
            self.storages[dest] = open_storage(dest)
        return self.storages[dest]


_state: WorkerState | None = None
_lock = threading.Lock()


def get_state() -> WorkerState:
    global _state
    with _lock:
        if _state is None:
            from encoder.runtime import load_encoder

            settings = process_settings()
            start = time.monotonic()
            encoder = load_encoder(settings)
            encoder.warm_up()  # trace or compile now, not on the first chunk
            log.info(
                "model ready in %.1f s: %s %s, %d bits, weights %s, %s %s, spec %s (pid %d)",
                time.monotonic() - start,
                settings.backbone,
                settings.layout,
                settings.bits,
                encoder.spec.weights,
                settings.runtime,
                settings.precision,
                encoder.spec.fingerprint,
                os.getpid(),
            )
            _state = WorkerState(
                settings,
                encoder,
                JobRegistry.from_url(settings.broker_url),
                DecodeWatchdog(settings.image_time_limit),
                ImageRoot(settings.image_root),
            )
        return _state


@worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    get_state()


@worker_ready.connect
def _load_in_main_unless_prefork(sender: Any = None, **_: Any) -> None:
    pool = getattr(getattr(sender, "controller", None), "pool_cls", "prefork")
    if not concurrency.get_implementation(pool).__module__.endswith("prefork"):
        get_state()
