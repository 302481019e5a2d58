"""The Celery application: ``celery -A worker worker`` finds it as ``worker.app``.

Its configuration is the queue's, shared with the producer (``jobs.celery_app``), built
from this process's ``Settings``; the tasks are in ``worker.tasks``.
"""

from __future__ import annotations

from encoder.settings import process_settings
from jobs.celery_app import make_app

app = make_app(process_settings(), include=("worker.tasks",))
