"""The contract between the producer and the workers: task names and message schema
(``jobs.messages``), the job registry in Redis (``jobs.registry``) and the Celery
application both sides talk through (``jobs.celery_app``).  It depends on ``encoder``
only; neither side imports the other."""
