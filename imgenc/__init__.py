"""``imgenc``, the command line: the top of the project, which nothing else imports.

``imgenc encode``, ``show`` and ``fit-center`` run on this machine with the ``encoder``
library alone (no Celery is imported); ``enqueue``, ``status`` and ``jobs`` talk to the
workers through the ``producer``.
"""
