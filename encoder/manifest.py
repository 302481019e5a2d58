"""The manifest: one CSV row per image, saying what happened to it and where its code is.

Layout of a destination (local directory or S3 prefix)::

    spec.json                 the code spec (encoder.spec.CodeSpec)
    center.npy                the centre (only for --center codes; its SHA-256 is in the spec)
    calibration.npz           the int8 calibration sample (only for int8 codes; hashed likewise)
    planes.npz                the fitted planes (only for --planes codes; hashed likewise)
    codes/<shard>.npy         uint8 (n, bytes_per_code) bit-packed codes, one row per ok image
    parts/<shard>.csv         manifest rows for that shard, written after the shard
    parts/<run>-deleted.csv   ``deleted`` rows: images a ``--resume`` found gone (no shard)
    manifest.csv              all parts merged: one row per image id

A part is written only after its shard, so a part never names a code that is not on disk.
Merging keeps exactly one row per image id (``RowMerge``):

- ``ok`` and ``deleted`` compete by ``encoded_at`` (for ``deleted``, the time the image
  was seen gone): the later wins, so a photo deleted then restored and encoded again is
  ``ok`` again, and a photo deleted after it was encoded is ``deleted``;
- a failure never beats ``ok`` (a redelivered chunk that failed does not undo a code);
  it beats an earlier ``deleted`` (the photo came back, and could not be encoded);
- among failures, the latest wins.

Among rows of one kind, on equal times the row seen last wins.  Re-running a chunk
rewrites the same shard and part keys, so redelivery never adds rows.  ``deleted`` is not
a failure: the status totals count it apart (``StatusTotals.deleted``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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

OK = "ok"
DELETED = "deleted"  # gone from the folder when a --resume scanned it; not a failure

Row = dict[str, str]
T = TypeVar("T")


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


class RowMerge(Generic[T]):
    """The merge rule (see the module docstring), applied row by row: ``add`` each row's
    id, status and ``encoded_at`` with a payload (the row, or what a reader keeps of it);
    ``winners`` gives each image's winning status and payload.  It keeps, per image, the
    latest ``ok``/``deleted`` row and the latest failure, so the result does not depend on
    the order of the parts."""

    def __init__(self) -> None:
        # id -> [latest ok/deleted (time, is_ok, payload), latest failure (time, payload)]
        self._best: dict[str, list] = {}

    def add(self, image_id: str, status: str, encoded_at: str, payload: T) -> None:
        slot = self._best.get(image_id)
        if slot is None:
            slot = self._best[image_id] = [None, None]
        if status in (OK, DELETED):
            if slot[0] is None or encoded_at >= slot[0][0]:
                slot[0] = (encoded_at, status == OK, payload)
        elif slot[1] is None or encoded_at >= slot[1][0]:
            slot[1] = (encoded_at, payload)

    def __len__(self) -> int:
        return len(self._best)

    def winners(self) -> Iterator[tuple[str, bool, T]]:
        """``(id, is_ok, payload)`` of each image's winning row, in id order."""
        for image_id in sorted(self._best):
            presence, failure = self._best[image_id]
            if presence is not None and (
                presence[1] or failure is None or failure[0] <= presence[0]
            ):
                yield image_id, presence[1], presence[2]
            else:
                yield image_id, False, failure[1]


def deduplicate(rows: Iterable[Row]) -> list[Row]:
    """One row per image id, by the merge rule (``RowMerge``), in id order."""
    merge: RowMerge[Row] = RowMerge()
    for row in rows:
        merge.add(row["id"], row.get("status", ""), row.get("encoded_at", ""), row)
    return [row for _, _, row in merge.winners()]


def merge_manifest(storage: Storage) -> list[Row]:
    """Merge every part into ``manifest.csv`` (atomically) and return its rows."""
    rows = deduplicate(read_parts(storage))
    storage.put(MANIFEST_KEY, rows_to_csv(rows))
    return rows


def read_manifest(storage: Storage) -> list[Row]:
    """The merged manifest if one exists, else the parts merged in memory."""
    rows = read_merged_manifest(storage)
    return rows if rows is not None else deduplicate(read_parts(storage))


def read_merged_manifest(storage: Storage) -> list[Row] | None:
    """``manifest.csv`` (one read), or None when the parts were never merged."""
    try:
        return csv_to_rows(storage.get(MANIFEST_KEY))
    except KeyError:
        return None


class StatusTotals:
    """Totals of a run or job from its ``counts`` (status -> images), shared by
    ``imgenc encode``'s summary and a distributed job's status."""

    counts: dict[str, int]

    @property
    def processed(self) -> int:
        """Images read and encoded (or failed): ``deleted`` ones are not processed."""
        return sum(n for status, n in self.counts.items() if status != DELETED)

    @property
    def failed(self) -> int:
        """Images that failed; ``deleted`` is not a failure (``--strict`` ignores it)."""
        return sum(n for status, n in self.counts.items() if status not in (OK, DELETED))

    @property
    def deleted(self) -> int:
        """Images recorded ``deleted``: gone from the folder a ``--resume`` scanned."""
        return self.counts.get(DELETED, 0)

    def count_lines(self) -> list[str]:
        return [f"  {status:<14} {n}" for status, n in sorted(self.counts.items())]


def status_counts(rows: Iterable[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return dict(sorted(counts.items()))


def done_keys(storage: Storage) -> set[tuple[str, int | None, int | None]]:
    """``(id, size, mtime_ns)`` of every image the destination already holds as ok."""
    return resume_keys(read_manifest(storage))


def resume_keys(rows: Iterable[Row]) -> set[tuple[str, int | None, int | None]]:
    """``(id, size, mtime_ns)`` of every ok row of a merged manifest.

    This is the resume rule of both ``imgenc encode --resume`` and ``imgenc enqueue
    --resume``: same relative path, same size, same mtime.  A replaced photo (new size or
    mtime) and one that came back after it was recorded ``deleted`` are encoded again.
    """
    keys = set()
    for row in rows:
        if row["status"] == OK:
            size = int(row["size"]) if row["size"] else None
            mtime = int(row["mtime_ns"]) if row["mtime_ns"] else None
            keys.add((row["id"], size, mtime))
    return keys
