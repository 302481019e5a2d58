"""``ImageRoot``: where this worker resolves a job's relative paths, and the diagnosis when
they are not there.

Paths travel relative to the producer's image root.  A worker resolves them against its
own ``IMGENC_IMAGE_ROOT`` when set (the images mounted elsewhere on this host), else
against the producer's root as recorded with the job (same host, or the same mount
point).  When a chunk comes back with ``missing`` images, the worker checks the job's
*probe* (the first path the producer sent, which existed when it was scanned): if the
probe is not under this worker's root either, the roots disagree.  The first worker to
find that records it in the job registry (``imgenc status`` shows it) and logs it once
per job, instead of a line per image.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from jobs.registry import JobRegistry

log = logging.getLogger("imgenc.worker")


@dataclass
class ImageRoot:
    configured: str | None  # this worker's image_root setting (IMGENC_IMAGE_ROOT), if any
    checked_jobs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.configured:  # a relative root means the same folder in every message and log
            self.configured = os.path.abspath(self.configured)

    def for_job(self, job: dict[str, str]) -> tuple[str, str]:
        """``(root, where the root comes from)`` for a job's registry entry."""
        if self.configured:
            return self.configured, "this worker's IMGENC_IMAGE_ROOT"
        return job["image_root"], "the producer's root; this worker sets no IMGENC_IMAGE_ROOT"

    def check_missing(
        self, registry: JobRegistry, job_id: str, job: dict[str, str], missing: int
    ) -> None:
        """After a chunk with ``missing`` images: tell once per job if the roots disagree."""
        if not missing or job_id in self.checked_jobs or not job.get("probe"):
            return
        self.checked_jobs.add(job_id)
        root, source = self.for_job(job)
        probe_path = os.path.join(root, job["probe"])
        if os.path.lexists(probe_path):
            return  # the root is right; those files really are gone
        problem = {
            "host": socket.gethostname(),
            "worker_root": root,
            "worker_root_source": source,
            "producer_root": job.get("image_root", ""),
            "producer_host": job.get("producer_host", ""),
            "example": job["probe"],
            "example_path": probe_path,
        }
        if registry.report_root_problem(job_id, problem):
            log.error(
                "job %s: images not found under this worker's image root %s (%s); the "
                "producer on %s sent paths relative to %s, and %r is not at %s. Set "
                "IMGENC_IMAGE_ROOT to the same root for the producer and the workers "
                "(each where it sees the images). Logged once per job; imgenc status "
                "shows it too.",
                job_id,
                root,
                source,
                problem["producer_host"] or "?",
                problem["producer_root"],
                job["probe"],
                probe_path,
            )
