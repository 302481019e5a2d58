"""The producer: scan an image folder and enqueue its paths onto Redis for the Celery workers.

Python API for scripts::

    import producer
    job = producer.enqueue("/data/images", "s3://bucket/codes", broker="redis://...")
    print(job.id, job.status().counts)
    final = job.wait(progress=True)

Paths travel relative to the image root: the ``image_root`` setting (``IMGENC_IMAGE_ROOT``,
the same variable the workers read), else the folder being enqueued.  A worker on another
host resolves them against its own ``IMGENC_IMAGE_ROOT``.  The scan streams: memory stays
flat however large the folder.  ``final.exit_code()`` is non-zero when the workers could
not find the images, and ``final.problems()`` says why.
"""

from producer.enqueue import Job, enqueue

__all__ = ["Job", "enqueue"]
