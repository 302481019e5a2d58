"""``ShardWriter``: the one writer of codes and manifest rows, for every way of running.

Shards are named ``<run id>-<number>`` (``shard_name``) everywhere.  ``imgenc encode``
lets the writer cut shards by size and age, numbered from 0 under a run id of its own;
the Celery worker writes one shard per chunk, numbered by the chunk under the job's id,
so a redelivered chunk overwrites the same keys.  Each flush writes the ``.npy`` shard
first (and, with ``features``, the float16 ``features/<shard>.npy`` of the same rows)
and its manifest part last, all atomically, so an interrupted run never leaves a manifest
row without its code (or its features).
"""

from __future__ import annotations

import io
import socket
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from encoder.features import FEATURES_DTYPE, Encoded, features_key
from encoder.images import LoadResult
from encoder.manifest import (
    CALIBRATION_KEY,
    CENTER_KEY,
    CODES_PREFIX,
    PARTS_PREFIX,
    PLANES_KEY,
    SPEC_KEY,
    Row,
    part_keys,
    rows_to_csv,
)
from encoder.merged import read_info, read_manifest
from encoder.settings import Settings
from encoder.spec import CodeSpec, SpecMismatch
from encoder.storage import Storage, open_storage


def ensure_spec(
    storage: Storage,
    spec: CodeSpec,
    center: str | None = None,
    calibration: str | None = None,
    planes: str | None = None,
) -> None:
    """Write ``spec.json`` (and beside it the files the spec hashes: the centre, the int8
    calibration sample, the fitted planes), or check that the spec already there matches."""
    if check_spec(storage, spec):
        return
    for key, path in ((CENTER_KEY, center), (CALIBRATION_KEY, calibration), (PLANES_KEY, planes)):
        if path:
            with open(path, "rb") as f:
                storage.put(key, f.read())
    storage.put(SPEC_KEY, spec.to_json().encode())


def check_spec(storage: Storage, spec: CodeSpec) -> bool:
    """Whether ``storage`` already has a spec; raises ``SpecMismatch`` if it is another
    one.  Reads only: a destination is refused before a model is built for it."""
    try:
        existing = CodeSpec.from_json(storage.get(SPEC_KEY))
    except KeyError:
        return False
    try:
        existing.check_compatible(spec, what=f"the destination {storage.url}: its codes")
    except SpecMismatch as exc:
        raise SpecMismatch(f"{exc}; write to another destination") from None
    return True


RESUME_COLUMNS = ["id", "path", "status", "size", "mtime_ns"]


def open_destination(
    dest: str, spec: CodeSpec, settings: Settings, resume: bool
) -> tuple[Storage, Any, bool]:
    """Open ``dest`` for writing codes of ``spec`` (refusing another spec), and return the
    storage with its merged manifest's ``RESUME_COLUMNS`` as an Arrow table, read once
    (None unless ``resume``): the resume keys (``encoder.resume.ResumeKeys``) and the
    deletions (``encoder.deletions``) come from it; and whether ``manifest.parquet`` was
    current (else the parts were merged for the reading).  Used by ``imgenc encode`` and
    by the producer alike."""
    storage = open_storage(dest)
    calibration = settings.calibration if spec.calibration_sha256 else None
    ensure_spec(storage, spec, settings.center, calibration, settings.planes)
    if not resume:
        return storage, None, False
    info = read_info(storage)
    current = info is not None and info.parts == part_keys(storage)
    return storage, read_manifest(storage, RESUME_COLUMNS), current


def shard_name(run_id: str, number: int) -> str:
    """The one naming rule of shards and manifest parts: ``<run id>-<number, 6 digits>``."""
    return f"{run_id}-{number:06d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    def __init__(
        self,
        storage: Storage,
        spec: CodeSpec,
        job_id: str,
        shard_size: int = 1024,
        flush_seconds: float = 60.0,
        host: str | None = None,
        first_shard: int = 0,
        features: bool = False,
    ) -> None:
        """``shard_size=0`` never flushes by itself: one shard per ``flush()`` call.
        ``features``: ``add`` gets ``Encoded`` (codes and pooled features), and each shard
        has its features shard."""
        self.storage = storage
        self.spec = spec
        self.job_id = job_id
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.host = host or socket.gethostname()
        self._results: list[LoadResult] = []
        self._codes: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self.features = features
        self._n_codes = 0
        self._opened = time.monotonic()
        self._next_shard = first_shard
        self.counts: dict[str, int] = {}

    def add(self, results: list[LoadResult], codes: np.ndarray | Encoded) -> None:
        """``codes`` holds one packed row per ok result, in the order of ``results`` (with
        ``features``, an ``Encoded``: the codes and their pooled features)."""
        n_ok = sum(r.ok for r in results)
        features = None
        if isinstance(codes, Encoded):
            codes, features = codes
        if codes.shape[0] != n_ok:
            raise ValueError(f"{codes.shape[0]} codes for {n_ok} ok images")
        if self.features and n_ok:
            if features is None or features.shape[0] != n_ok:
                raise ValueError(f"features for {n_ok} ok images expected")
            self._features.append(np.asarray(features, FEATURES_DTYPE))
        if not self._results:
            self._opened = time.monotonic()
        self._results.extend(results)
        if n_ok:
            self._codes.append(codes)
            self._n_codes += n_ok
        if self.shard_size and (
            self._n_codes >= self.shard_size
            or time.monotonic() - self._opened >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> str | None:
        """Write what is buffered as the next shard; returns its name (None if empty)."""
        if not self._results:
            return None
        name = shard_name(self.job_id, self._next_shard)
        codes = (
            np.concatenate(self._codes)
            if self._codes
            else np.zeros((0, self.spec.bytes_per_code), np.uint8)
        )
        shard_key = f"{CODES_PREFIX}/{name}.npy"
        if codes.shape[0]:
            self.storage.put(shard_key, npy_bytes(codes))
            if self.features:
                features = np.concatenate(self._features)
                self.storage.put(features_key(shard_key), npy_bytes(features))
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        rows: list[Row] = []
        row_index = 0
        for result in self._results:
            row = self.row_for(result, now)
            if result.ok:
                row["shard"], row["row"] = shard_key, str(row_index)
                row_index += 1
            rows.append(row)
        self.storage.put(f"{PARTS_PREFIX}/{name}.csv", rows_to_csv(rows))
        # Counted once written: a flush retried after a storage error counts its rows once.
        for row in rows:
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        self._results, self._codes, self._features, self._n_codes = [], [], [], 0
        self._next_shard += 1
        return name

    def row_for(self, result: LoadResult, encoded_at: str) -> Row:
        return {
            "id": result.id,
            "path": result.path,
            "status": str(result.status),
            "error": result.error,
            "sha256": result.sha256,
            "size": "" if result.size is None else str(result.size),
            "mtime_ns": "" if result.mtime_ns is None else str(result.mtime_ns),
            "width": "" if result.width is None else str(result.width),
            "height": "" if result.height is None else str(result.height),
            "shard": "",
            "row": "",
            "job_id": self.job_id,
            "worker_host": self.host,
            "encoded_at": encoded_at,
        }
