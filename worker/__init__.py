"""The Celery worker: ``celery -A worker worker --loglevel=INFO``.

Importing this package does not import TensorFlow; each worker process builds the model
when it starts (see ``worker.state``).
"""

from worker.app import app

__all__ = ["app"]
