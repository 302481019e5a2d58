"""The producer: scan an image folder and enqueue its paths onto Redis for the Celery workers.

Python API for scripts::

    import producer
    job = producer.enqueue("/data/images", "s3://bucket/codes", broker="redis://...")
    print(job.id, job.status().counts)
    final = job.wait(progress=True)

Paths travel relative to an image root (``image_root``, by default ``image_dir``) so that
a worker on another host resolves them against its own mount (``IMGENC_IMAGE_ROOT``).
The scan streams: memory stays flat however large the folder.
"""

from producer.enqueue import Job, enqueue

__all__ = ["Job", "enqueue"]
