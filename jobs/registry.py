"""The job registry in Redis: what a job is, how far it got, and the worker's bookkeeping.

Keys (all under ``imgenc:``, expiring after ``JOB_TTL`` seconds):

- ``job:<id>``: hash with ``dest``, ``spec`` (JSON), ``fingerprint``, ``image_root`` (the
  producer's), ``producer_host``, ``probe`` (the first path enqueued), ``queue``,
  ``enqueued`` (images so far), ``deleted`` (images a ``--resume`` recorded gone from the
  folder), ``chunks``, ``scanning`` (1 until the producer has
  enqueued everything), ``created_at``, ``started_at``, ``updated_at``, ``finished_at``,
  and ``root_problem`` (JSON, set once by the first worker that could not find the
  job's images under its image root).
- ``jobs``: sorted set of job ids by creation time (``imgenc jobs``).
- ``job:<id>:chunks``: chunk number -> JSON of its status counts.  HSET is idempotent, so
  a chunk done twice is counted once.
- ``job:<id>:attempts``: chunk number -> deliveries so far.
- ``job:<id>:errors``: chunk number -> retries for unexpected errors (``worker.retries``).
- ``job:<id>:completions``: chunk number -> times it was recorded (1 unless a chunk was
  run twice to the end, which is harmless and counted here).
- ``job:<id>:current``: chunk number -> the image a careful re-run is working on, left
  behind if the worker dies there.
- ``job:<id>:strikes``: image id -> times it was in hand when a worker died.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from encoder.manifest import DELETED, StatusTotals

PREFIX = "imgenc:"
JOB_TTL = 30 * 24 * 3600  # s


REDIS_RETRIES = 7  # with backoff from 0.25 s doubling to 8 s: rides out ~20 s of restart


def connect(url: str) -> redis.Redis:
    """A client that reconnects and retries through a Redis restart before giving up."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=8, base=0.25), REDIS_RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


@dataclass
class JobStatus(StatusTotals):
    job_id: str
    dest: str
    total: int  # images enqueued (final once scanning is over)
    chunks: int
    chunks_done: int
    counts: dict[str, int] = field(default_factory=dict)
    scanning: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    reruns: int = 0  # deliveries beyond the first, over all chunks (worker deaths, retries)
    repeated_completions: int = 0  # chunks run to the end more than once (harmless)
    image_root: str = ""  # the producer's
    root_problem: dict[str, Any] | None = None  # why a worker could not find the images

    @property
    def done(self) -> bool:
        return not self.scanning and self.chunks_done >= self.chunks

    @property
    def not_encodable(self) -> int:
        """Images that a setup problem, not their content, kept from being encoded: not
        found by the workers (``missing``) or refused by a worker of another spec."""
        return self.counts.get("missing", 0) + self.counts.get("spec_mismatch", 0)

    def problems(self) -> list[str]:
        """What is wrong with the job's setup, in sentences, with the likely cause."""
        problems = []
        missing = self.counts.get("missing", 0)
        if missing:
            text = f"{missing} of {self.processed} images were not found by the workers."
            p = self.root_problem
            if p:
                text += (
                    f" The producer sent paths relative to its image root {p['producer_root']};"
                    f" the worker on {p['host']} resolved them against {p['worker_root']}"
                    f" ({p['worker_root_source']}), where {p['example']!r} is not"
                    f" ({p['example_path']} does not exist). Set IMGENC_IMAGE_ROOT to the"
                    " same root for the producer and the workers, each where it sees the"
                    " images, then rerun with --resume."
                )
            problems.append(text)
        if self.counts.get("spec_mismatch"):
            problems.append(
                f"{self.counts['spec_mismatch']} images were refused by workers made for "
                "another code spec (their log names the differing settings)."
            )
        return problems

    def exit_code(self, strict: bool = False) -> int:
        """3 when a setup problem kept images from being encoded, 1 when ``strict`` and any
        image failed, else 0."""
        if self.not_encodable:
            return 3
        return 1 if strict and self.failed else 0

    @property
    def images_per_second(self) -> float:
        if not self.started_at or not self.updated_at or self.updated_at <= self.started_at:
            return 0.0
        return self.processed / (self.updated_at - self.started_at)

    @property
    def eta_seconds(self) -> float | None:
        rate = self.images_per_second
        return (self.total - self.processed) / rate if rate > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "dest": self.dest,
            "total": self.total,
            "processed": self.processed,
            "failed": self.failed,
            "deleted": self.deleted,
            "counts": self.counts,
            "chunks": self.chunks,
            "chunks_done": self.chunks_done,
            "done": self.done,
            "scanning": self.scanning,
            "images_per_second": round(self.images_per_second, 2),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "reruns": self.reruns,
            "repeated_completions": self.repeated_completions,
            "problems": self.problems(),
        }

    def lines(self) -> list[str]:
        state = "done" if self.done else ("enqueueing" if self.scanning else "running")
        eta = "" if self.eta_seconds is None or self.done else f", ETA {self.eta_seconds:.0f} s"
        lines = [
            f"job {self.job_id} ({state}) -> {self.dest}",
            f"  {self.processed}/{self.total} images, {self.failed} failed, "
            + (f"{self.deleted} marked deleted, " if self.deleted else "")
            + f"{self.chunks_done}/{self.chunks} chunks, {self.images_per_second:.2f} img/s{eta}"
            + (f", {self.reruns} chunk reruns" if self.reruns else ""),
        ]
        return lines + self.count_lines() + [f"problem: {p}" for p in self.problems()]


class JobRegistry:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @classmethod
    def from_url(cls, url: str) -> JobRegistry:
        return cls(connect(url))

    def _key(self, job_id: str, suffix: str = "") -> str:
        return f"{PREFIX}job:{job_id}{':' + suffix if suffix else ''}"

    def _touch(self, pipe: Any, job_id: str) -> None:
        for suffix in ("", "chunks", "attempts", "errors", "completions", "current", "strikes"):
            pipe.expire(self._key(job_id, suffix), JOB_TTL)

    # --- producer side -------------------------------------------------------------
    def create(
        self,
        job_id: str,
        dest: str,
        spec_json: str,
        fingerprint: str,
        image_root: str,
        queue: str,
        producer_host: str = "",
        dedup_fit: bool = True,
    ) -> None:
        now = time.time()
        with self.r.pipeline() as pipe:
            pipe.hset(
                self._key(job_id),
                mapping={
                    "dest": dest,
                    "spec": spec_json,
                    "fingerprint": fingerprint,
                    "image_root": image_root,
                    "producer_host": producer_host,
                    "queue": queue,
                    "dedup_fit": int(dedup_fit),  # fit the near-duplicate threshold at the end
                    "enqueued": 0,
                    "chunks": 0,
                    "scanning": 1,
                    "created_at": now,
                },
            )
            pipe.zadd(PREFIX + "jobs", {job_id: now})
            self._touch(pipe, job_id)
            pipe.execute()

    def add_enqueued(self, job_id: str, images: int, probe: str | None = None) -> None:
        with self.r.pipeline() as pipe:
            if probe is not None:
                pipe.hsetnx(self._key(job_id), "probe", probe)
            pipe.hincrby(self._key(job_id), "enqueued", images)
            pipe.hincrby(self._key(job_id), "chunks", 1)
            pipe.execute()

    def set_deleted(self, job_id: str, images: int) -> None:
        """How many images the producer recorded ``deleted`` (counted apart, no chunk)."""
        self.r.hset(self._key(job_id), "deleted", images)

    def finish_scanning(self, job_id: str) -> None:
        self.r.hset(self._key(job_id), "scanning", 0)

    # --- worker side ---------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, str]:
        data = self.r.hgetall(self._key(job_id))
        if not data:
            raise KeyError(f"no job {job_id!r} in the registry")
        return data

    def error_retries(self, job_id: str, chunk: int) -> int:
        """How often the chunk was retried for an unexpected error (storage retries apart)."""
        return int(self.r.hget(self._key(job_id, "errors"), str(chunk)) or 0)

    def note_error_retry(self, job_id: str, chunk: int) -> int:
        return int(self.r.hincrby(self._key(job_id, "errors"), str(chunk), 1))

    def next_attempt(self, job_id: str, chunk: int) -> int:
        self.r.hsetnx(self._key(job_id), "started_at", time.time())
        return int(self.r.hincrby(self._key(job_id, "attempts"), str(chunk), 1))

    def set_current(self, job_id: str, chunk: int, image_id: str | None) -> None:
        if image_id is None:
            self.r.hdel(self._key(job_id, "current"), str(chunk))
        else:
            self.r.hset(self._key(job_id, "current"), str(chunk), image_id)

    def strike_left_behind(self, job_id: str, chunk: int) -> tuple[str, int] | None:
        """If a previous delivery died while working on an image, count a strike against it."""
        image_id = self.r.hget(self._key(job_id, "current"), str(chunk))
        if image_id is None:
            return None
        strikes = int(self.r.hincrby(self._key(job_id, "strikes"), image_id, 1))
        self.r.hdel(self._key(job_id, "current"), str(chunk))
        return image_id, strikes

    def strikes(self, job_id: str, image_ids: list[str]) -> dict[str, int]:
        if not image_ids:
            return {}
        values = self.r.hmget(self._key(job_id, "strikes"), image_ids)
        return {i: int(v) for i, v in zip(image_ids, values, strict=True) if v}

    def chunk_recorded(self, job_id: str, chunk: int) -> bool:
        return bool(self.r.hexists(self._key(job_id, "chunks"), str(chunk)))

    def record_chunk(self, job_id: str, chunk: int, counts: dict[str, int]) -> None:
        with self.r.pipeline() as pipe:
            pipe.hset(self._key(job_id, "chunks"), str(chunk), json.dumps(counts))
            pipe.hincrby(self._key(job_id, "completions"), str(chunk), 1)
            pipe.hset(self._key(job_id), "updated_at", time.time())
            self._touch(pipe, job_id)
            pipe.execute()

    def is_complete(self, job_id: str) -> bool:
        """Every chunk recorded and nothing more to come (O(1), safe to ask per chunk)."""
        with self.r.pipeline() as pipe:
            pipe.hmget(self._key(job_id), ["scanning", "chunks"])
            pipe.hlen(self._key(job_id, "chunks"))
            (scanning, chunks), recorded = pipe.execute()
        return scanning == "0" and recorded >= int(chunks or 0)

    def is_merged(self, job_id: str) -> bool:
        return self.r.hexists(self._key(job_id), "finished_at")

    def mark_finished(self, job_id: str) -> None:
        self.r.hset(self._key(job_id), "finished_at", time.time())

    def report_root_problem(self, job_id: str, problem: dict[str, Any]) -> bool:
        """Note why the job's images cannot be found; True for the first report only."""
        return bool(self.r.hsetnx(self._key(job_id), "root_problem", json.dumps(problem)))

    # --- anyone --------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        job = self.job(job_id)
        counts: dict[str, int] = {}
        with self.r.pipeline() as pipe:
            pipe.hgetall(self._key(job_id, "chunks"))
            pipe.hvals(self._key(job_id, "attempts"))
            pipe.hvals(self._key(job_id, "completions"))
            chunk_results, attempts, completions = pipe.execute()
        for raw in chunk_results.values():
            for status, n in json.loads(raw).items():
                counts[status] = counts.get(status, 0) + n
        if int(job.get("deleted", 0) or 0):
            counts[DELETED] = int(job["deleted"])  # recorded by the producer, apart from chunks
        return JobStatus(
            job_id=job_id,
            dest=job["dest"],
            total=int(job.get("enqueued", 0)),
            chunks=int(job.get("chunks", 0)),
            chunks_done=len(chunk_results),
            counts=dict(sorted(counts.items())),
            scanning=job.get("scanning") == "1",
            created_at=float(job["created_at"]),
            started_at=float(job["started_at"]) if job.get("started_at") else None,
            updated_at=float(job["updated_at"]) if job.get("updated_at") else None,
            finished_at=float(job["finished_at"]) if job.get("finished_at") else None,
            reruns=sum(int(n) for n in attempts) - len(attempts),
            repeated_completions=sum(int(n) for n in completions) - len(completions),
            image_root=job.get("image_root", ""),
            root_problem=json.loads(job["root_problem"]) if job.get("root_problem") else None,
        )

    def recent(self, limit: int = 20) -> list[str]:
        return list(self.r.zrevrange(PREFIX + "jobs", 0, limit - 1))
