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
ENCODE_IMAGES = "imgenc.encode_images"  # query images in, codes out (a result is stored)
QUERY_QUEUE_SUFFIX = ".queries"  # encode_images goes to <queue>.queries

MAX_PATHS_PER_CHUNK = 10_000
MAX_PATH_LENGTH = 4096
MAX_IMAGES_PER_MESSAGE = 64
MAX_IMAGE_BYTES = 32 * 1024 * 1024


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
    features: bool = False  # also write the pooled float features (optional field)

    def to_kwargs(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.features:  # a message without features reads as before
            del data["features"]
        return data

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ChunkMessage:
        """The message, or ``MalformedMessage`` naming every problem found."""
        names = {f.name for f in fields(cls)}
        problems = [f"unknown field {k!r}" for k in kwargs if k not in names]
        problems += [f"missing field {n!r}" for n in names if n not in kwargs and n != "features"]
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
        features = kwargs.get("features", False)
        if not isinstance(features, bool):
            problems.append("features is not true or false")
        if problems:
            raise MalformedMessage("; ".join(problems))
        return cls(job_id, chunk, dest, fingerprint, paths, features)


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


class NoWorkerAnswered(TimeoutError):
    """No worker answered an ``imgenc.encode_images`` message in time."""


@dataclass(frozen=True)
class EncodeImagesMessage:
    """``imgenc.encode_images``: encode query images (base64 bytes) under the spec
    ``fingerprint``; the worker stores an ``EncodedImages`` result."""

    fingerprint: str
    names: list[str]
    images: list[str]  # base64 of each file's bytes
    features: bool = False  # answer the pooled float features too (optional field)

    def to_kwargs(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.features:
            del data["features"]
        return data

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EncodeImagesMessage:
        if set(kwargs) - {"features"} != {"fingerprint", "names", "images"}:
            raise MalformedMessage(f"fields {sorted(kwargs)} are not fingerprint, names, images")
        fingerprint, names, images = kwargs["fingerprint"], kwargs["names"], kwargs["images"]
        features = kwargs.get("features", False)
        problems = [] if isinstance(features, bool) else ["features is not true or false"]
        if not isinstance(fingerprint, str):
            problems.append("bad fingerprint")
        if not (isinstance(names, list) and isinstance(images, list)) or len(names) != len(images):
            problems.append("names and images are not two lists of the same length")
        elif len(images) > MAX_IMAGES_PER_MESSAGE:
            problems.append(f"{len(images)} images is over the {MAX_IMAGES_PER_MESSAGE} limit")
        elif not all(isinstance(x, str) and len(x) <= MAX_IMAGE_BYTES * 4 // 3 + 4 for x in images):
            problems.append("an image is not a base64 string within the size limit")
        elif not all(isinstance(n, str) and len(n) <= MAX_PATH_LENGTH for n in names):
            problems.append("a name is not a string")
        if problems:
            raise MalformedMessage("; ".join(problems))
        return cls(fingerprint, names, images, features)


@dataclass(frozen=True)
class EncodedImages:
    """The result of ``imgenc.encode_images``: per image its status and error, and the
    packed codes of the ok ones, concatenated and base64-encoded."""

    fingerprint: str  # the worker's spec
    statuses: list[str]
    errors: list[str]
    codes: str  # base64 of (n_ok * bytes_per_code) bytes
    features: str = ""  # on request: base64 of (n_ok, channels) float32, little-endian

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncodedImages:
        return cls(
            data["fingerprint"],
            data["statuses"],
            data["errors"],
            data["codes"],
            data.get("features", ""),
        )
