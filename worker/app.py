"""The Celery application: ``celery -A worker worker`` finds it as ``worker.app``.

Settings use Celery's own names.  Delivery is at least once: JSON only (pickle refused),
acks after the task (``task_acks_late``), a task whose worker process dies goes back on
the queue (``task_reject_on_worker_lost``), one message in hand per process
(``worker_prefetch_multiplier=1``), and Redis' visibility timeout above the hard time
limit so a running chunk is not handed out twice.  Writes are idempotent, and the final
manifest keeps one row per image.  The broker URL comes from ``IMGENC_BROKER_URL``; a
module named by ``IMGENC_CELERY_CONFIG`` may override any Celery setting.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from encoder.settings import Settings

settings = Settings.from_env()

app = Celery("imgenc", broker=settings.broker_url, include=["worker.tasks"])
app.conf.update(
    # serialization: JSON only, never pickle
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_accept_content=["json"],
    task_ignore_result=True,
    # delivery
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        # Look for messages abandoned by a dead worker every few seconds (kombu's default
        # sweep runs every 10 s x 10 = 100 s); the scan is one ZRANGE.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 5)),
        "unacked_restore_throttle": 1,
        # A broker that disappears without closing TCP must not hang a publish forever.
        "socket_timeout": 60,
        "socket_connect_timeout": 10,
        "health_check_interval": 30,
    },
    task_time_limit=settings.task_time_limit,
    task_acks_on_timeout=False,  # a chunk killed by the hard time limit goes back on the queue
    # A broker blip does not kill the child (and its model); a chunk whose ack was lost with
    # the connection is redelivered and recognised as already recorded.
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
    task_queues=[Queue(settings.queue)],
    # monitoring (Flower)
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=True,
)
app.config_from_envvar("IMGENC_CELERY_CONFIG", silent=True, force=True)
if app.conf.task_serializer == "auth":  # message signing, enabled by an IMGENC_CELERY_CONFIG module
    app.setup_security()
