"""The task messages: their names and their schema, shared by the producer and the worker.

The producer publishes by task name (``ENCODE_CHUNK``, ``FINALIZE_JOB``) and never imports
the worker's code; the worker validates every message against the same dataclasses before
touching anything.  Messages are JSON (Celery's ``kwargs``): paths travel relative to the
image root, at most ``MAX_PATHS_PER_CHUNK`` of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ENCODE_CHUNK = "imgenc.encode_chunk"
FINALIZE_JOB = "imgenc.finalize_job"

MAX_PATHS_PER_CHUNK = 10_000
MAX_PATH_LENGTH = 4096


class MalformedMessage(ValueError):
    """A message that does not follow the schema; the worker drops it (and logs why)."""


def _valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and job_id.isalnum() and 0 < len(job_id) <= 64


@dataclass(frozen=True)
class ChunkMessage:
    """``imgenc.encode_chunk``: encode ``paths`` into the shard ``<job_id>-<chunk>``."""

    job_id: str
    chunk: int
    dest: str
    fingerprint: str  # the code spec the job expects (CodeSpec.fingerprint)
    paths: list[str]

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ChunkMessage:
        """The message, or ``MalformedMessage`` naming every problem found."""
        names = {f.name for f in fields(cls)}
        problems = [f"unknown field {k!r}" for k in kwargs if k not in names]
        problems += [f"missing field {n!r}" for n in names if n not in kwargs]
        if problems:
            raise MalformedMessage("; ".join(problems))
        job_id, chunk, dest = kwargs["job_id"], kwargs["chunk"], kwargs["dest"]
        fingerprint, paths = kwargs["fingerprint"], kwargs["paths"]
        if not _valid_job_id(job_id):
            problems.append("bad job id")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            problems.append("bad chunk number")
        if not isinstance(dest, str) or not dest:
            problems.append("bad destination")
        if not isinstance(fingerprint, str):
            problems.append("bad fingerprint")
        if not isinstance(paths, list):
            problems.append("paths is not a list")
        elif len(paths) > MAX_PATHS_PER_CHUNK:
            problems.append(f"{len(paths)} paths is over the {MAX_PATHS_PER_CHUNK} limit")
        elif not all(isinstance(p, str) and 0 < len(p) <= MAX_PATH_LENGTH for p in paths):
            problems.append("a path is not a non-empty string")
        if problems:
            raise MalformedMessage("; ".join(problems))
        return cls(job_id, chunk, dest, fingerprint, paths)


@dataclass(frozen=True)
class FinalizeMessage:
    """``imgenc.finalize_job``: merge the job's manifest once every chunk is in."""

    job_id: str
    dest: str

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> FinalizeMessage:
        if set(kwargs) != {"job_id", "dest"}:
            raise MalformedMessage(f"fields {sorted(kwargs)} are not job_id and dest")
        if not _valid_job_id(kwargs["job_id"]) or not isinstance(kwargs["dest"], str):
            raise MalformedMessage("bad job id or destination")
        return cls(kwargs["job_id"], kwargs["dest"])
