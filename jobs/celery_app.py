"""``make_app``: the Celery application and its delivery settings, for both sides of the queue.

The producer uses it to publish by task name (``app.send_task``); the worker
(``celery -A worker worker``) adds its tasks to the same configuration.  Settings use
Celery's own names.  Delivery is at least once:

- JSON only, pickle refused (``accept_content``);
- a message is acknowledged after its chunk is written (``task_acks_late``), and a chunk
  whose pool process dies goes back on the queue (``task_reject_on_worker_lost``);
- one message in hand per process (``worker_prefetch_multiplier=1``);
- a message in hand is *leased*: the worker renews it every ``visibility_timeout / 6``
  seconds (``worker.leases``), so Redis hands it to another worker only when its holder
  has stopped renewing, that is, died: after ``visibility_timeout`` (30 s) plus one sweep
  (``unacked_restore_interval``, 5 s), not after Redis' default hour.

Query images sent by ``imgenc serve --workers`` go to ``<queue>.queries``, which every
worker consumes too (run a worker with ``-Q imgenc.queries`` to keep one free for them);
their codes come back through a Redis result backend.  A module named by
``IMGENC_CELERY_CONFIG`` may override any of it.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from celery import Celery
from kombu import Queue

from encoder.settings import Settings
from jobs.messages import QUERY_QUEUE_SUFFIX

RESTORE_SWEEP_SECONDS = 5  # s between two looks for messages whose lease has run out


def make_app(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    app = Celery("imgenc", broker=settings.broker_url, include=list(include))
    app.conf.update(**{**delivery_settings(settings), **config_module(settings.celery_config)})
    if app.conf.task_serializer == "auth":  # message signing, enabled by a config module
        app.setup_security()
    return app


def config_module(name: str | None) -> dict[str, Any]:
    """The Celery settings (lowercase public names) of the module ``name``, if any."""
    if not name:
        return {}
    module = importlib.import_module(name)
    return {
        k: v
        for k, v in vars(module).items()
        if k.islower() and not k.startswith("_") and not isinstance(v, types.ModuleType)
    }


def delivery_settings(settings: Settings) -> dict[str, Any]:
    return dict(
        # serialization: JSON only, never pickle
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,  # only imgenc.encode_images stores a result...
        result_backend=settings.broker_url,  # ...in the same Redis, for a few minutes
        result_expires=600,
        # delivery
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Look for messages whose lease ran out every few seconds (kombu's default
            # sweep runs every 10 s x 10 = 100 s); the scan is one ZRANGE.
            "unacked_restore_interval": min(
                RESTORE_SWEEP_SECONDS, max(1, settings.visibility_timeout // 6)
            ),
            "unacked_restore_throttle": 1,
            # A broker that disappears without closing TCP must not hang a publish forever.
            "socket_timeout": 60,
            "socket_connect_timeout": 10,
            "health_check_interval": 30,
        },
        task_time_limit=settings.task_time_limit,
        task_acks_on_timeout=False,  # a chunk killed by the hard time limit is requeued
        # A broker blip does not kill the child (and its model); a chunk whose ack was lost
        # with the connection is redelivered and recognised as already recorded.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Cold shutdown (SIGQUIT, a second Ctrl-C) still gives the chunk in hand this long.
        worker_soft_shutdown_timeout=30.0,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # one process per device by default; the model takes a while to load in each
        worker_concurrency=1,
        worker_proc_alive_timeout=300,
        # routing
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue), Queue(settings.queue + QUERY_QUEUE_SUFFIX)],
        # monitoring (Flower)
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=True,
    )
