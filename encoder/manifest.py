"""The manifest: one CSV row per image, saying what happened to it and where its code is.

Layout of a destination (local directory or S3 prefix)::

    spec.json                 the code spec (encoder.spec.CodeSpec)
    center.npy                the centre (only for --center codes; its SHA-256 is in the spec)
    calibration.npz           the int8 calibration sample (only for int8 codes; hashed likewise)
    planes.npz                the fitted planes (only for --planes codes; hashed likewise)
    codes/<shard>.npy         uint8 (n, bytes_per_code) bit-packed codes, one row per ok image
    parts/<shard>.csv         manifest rows for that shard, written after the shard
    manifest.csv              all parts merged: one row per image id

A part is written only after its shard, so a part never names a code that is not on disk.
Merging keeps exactly one row per image id: an ``ok`` row wins over a failure, and among
rows of the same kind the latest ``encoded_at`` wins.  Re-running a chunk rewrites the same
shard and part keys, so redelivery never adds rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from encoder.storage import Storage

COLUMNS = (
    "id",
    "path",
    "status",
    "error",
    "sha256",
    "size",
    "mtime_ns",
    "width",
    "height",
    "shard",
    "row",
    "job_id",
    "worker_host",
    "encoded_at",
)
SPEC_KEY = "spec.json"
CENTER_KEY = "center.npy"  # the mean feature subtracted before hashing, when --center is used
CALIBRATION_KEY = "calibration.npz"  # the int8 calibration sample, when --precision int8
PLANES_KEY = "planes.npz"  # the fitted planes, when --planes
MANIFEST_KEY = "manifest.csv"
PARTS_PREFIX = "parts"
CODES_PREFIX = "codes"

Row = dict[str, str]


def rows_to_csv(rows: Iterable[Row]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return buffer.getvalue().encode("utf-8")


def csv_to_rows(data: bytes) -> list[Row]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def read_parts(storage: Storage, threads: int = 16) -> Iterator[Row]:
    keys = [k for k in storage.list(PARTS_PREFIX) if k.endswith(".csv")]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for data in pool.map(storage.get, keys):
            yield from csv_to_rows(data)


def row_rank(row: Row) -> tuple[int, str]:
    """How rows of one image compete in the merge: an ok row beats a failure, then the
    latest ``encoded_at`` wins (on equal ranks, the row seen last)."""
    return (1 if row.get("status") == "ok" else 0, row.get("encoded_at", ""))


def deduplicate(rows: Iterable[Row]) -> list[Row]:
    """One row per image id (ok beats failure, then the latest wins), in id order."""
    best: dict[str, Row] = {}
    for row in rows:
        current = best.get(row["id"])
        if current is None or row_rank(row) >= row_rank(current):
            best[row["id"]] = row
    return [best[k] for k in sorted(best)]


def merge_manifest(storage: Storage) -> list[Row]:
    """Merge every part into ``manifest.csv`` (atomically) and return its rows."""
    rows = deduplicate(read_parts(storage))
    storage.put(MANIFEST_KEY, rows_to_csv(rows))
    return rows


def read_manifest(storage: Storage) -> list[Row]:
    """The merged manifest if one exists, else the parts merged in memory."""
    try:
        return csv_to_rows(storage.get(MANIFEST_KEY))
    except KeyError:
        return deduplicate(read_parts(storage))


class StatusTotals:
    """Totals of a run or job from its ``counts`` (status -> images), shared by
    ``imgenc encode``'s summary and a distributed job's status."""

    counts: dict[str, int]

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "ok")

    def count_lines(self) -> list[str]:
        return [f"  {status:<14} {n}" for status, n in sorted(self.counts.items())]


def status_counts(rows: Iterable[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return dict(sorted(counts.items()))


def done_keys(storage: Storage) -> set[tuple[str, int | None, int | None]]:
    """``(id, size, mtime_ns)`` of every image the destination already holds as ok.

    This is the resume rule of both ``imgenc encode --resume`` and ``imgenc enqueue
    --resume``: same relative path, same size, same mtime.
    """
    keys = set()
    for row in read_manifest(storage):
        if row["status"] == "ok":
            size = int(row["size"]) if row["size"] else None
            mtime = int(row["mtime_ns"]) if row["mtime_ns"] else None
            keys.add((row["id"], size, mtime))
    return keys
