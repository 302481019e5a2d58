"""Deletions: the images a ``--resume`` finds gone from the folder it scans.

``imgenc encode --resume`` and ``imgenc enqueue --resume`` compare the destination's
merged manifest with the scan: an image the manifest holds (``ok`` or failed, not already
``deleted``) *under the scanned folder* that the scan no longer finds has vanished.  They
are recorded as ``deleted`` rows in one manifest part, ``parts/<run id>-deleted.csv``, with
the time they were seen gone in ``encoded_at``.  The manifest merge then lets a later
``deleted`` beat an earlier ``ok`` (and a later ``ok``, the photo back again, beat
``deleted``), and the search index drops them at its next open or refresh.

Only the scanned folder counts (``vanished``'s ``scope``): ``enqueue`` ids carry the
folder's path under the image root, so enqueueing ``catalogue/shoes`` looks only at ids
under ``catalogue/shoes/``; embedded ids are relative to the scanned folder, so ``encode``
compares the ``path`` column (the absolute path encoded) under the folder's real path.

A folder that lost every image, or most of them at once, is more likely a failed mount
or a wrong path than a withdrawn catalogue: ``check_deletions`` refuses it unless the
caller accepts (``--accept-deletions``), and says how many images would go.

The manifest is compared as Arrow columns and the scan as sorted 64-bit hashes
(``ScannedSet``), so a catalogue of millions costs no Python object per image.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np

from encoder.keys import image_keys
from encoder.manifest import DELETED, PARTS_PREFIX, rows_to_csv
from encoder.storage import Storage

MAX_DELETED_SHARE = 0.5  # refuse when more than this share of the images would go at once...
MIN_DELETED_REFUSED = 20  # ...and at least this many (a small catalogue may lose half)
ACCEPT_FLAG = "--accept-deletions"
CHUNK = 65536  # rows turned into Python values at a time


class TooManyDeletions(ValueError):
    """A resume would mark the whole folder, or most of it, ``deleted``; nothing was written."""

    def __init__(self, n_vanished: int, n_previous: int, reason: str) -> None:
        self.n_vanished, self.n_previous = n_vanished, n_previous
        super().__init__(
            f"refusing to mark {n_vanished} of {n_previous} images deleted ({reason}): the "
            "folder may be unmounted or the wrong one; nothing was written. If they are "
            f"really gone, rerun with {ACCEPT_FLAG}"
        )


class ScannedSet:
    """The strings a scan found (ids or paths), as sorted 64-bit hashes; ``add`` them as
    the scan goes, then ask ``contains``."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._parts: list[np.ndarray] = []  # hashes of CHUNK values each, unsorted
        self._sorted = np.zeros(0, np.int64)

    def add(self, value: str) -> None:
        self._pending.append(value)
        if len(self._pending) >= CHUNK:
            self._parts.append(image_keys(self._pending))
            self._pending = []

    def _hashes(self) -> np.ndarray:
        if self._pending:
            self._parts.append(image_keys(self._pending))
            self._pending = []
        if self._parts:
            self._sorted = np.unique(np.concatenate([self._sorted, *self._parts]))
            self._parts = []
        return self._sorted

    def __len__(self) -> int:
        return len(self._hashes())

    def contains(self, values: Any) -> np.ndarray:
        """Whether each of ``values`` (an Arrow string column or a list) was found."""
        hashes = self._hashes()
        wanted = image_keys(values)
        if not len(hashes):
            return np.zeros(len(wanted), bool)
        where = np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)
        return hashes[where] == wanted


def in_scope(value: str, scope: str) -> bool:
    """Whether ``value`` (an id or a path) lies under ``scope`` ("" is everything)."""
    if not scope:
        return True
    prefix = scope.rstrip("/") + "/"
    return value.startswith(prefix)


def row_root(path: str, image_id: str) -> str:
    """The root an image was read under: its ``path`` without its ``id``."""
    return path[: -len(image_id) - 1] if image_id and path.endswith("/" + image_id) else ""


def _roots(rows: Any) -> np.ndarray:
    """Each row's ``row_root`` (rows: Arrow ``id`` and ``path``), as a number per distinct
    root (a catalogue has few), computed a chunk of rows at a time."""
    roots: dict[str, int] = {}
    codes = np.empty(rows.num_rows, np.int32)
    for start in range(0, rows.num_rows, CHUNK):
        chunk = rows.slice(start, CHUNK)
        for n, (path, image_id) in enumerate(
            zip(chunk["path"].to_pylist(), chunk["id"].to_pylist(), strict=True)
        ):
            codes[start + n] = roots.setdefault(row_root(path or "", image_id), len(roots))
    return codes


def vanished(
    previous: Any,
    scanned: ScannedSet,
    scope: str = "",
    column: str = "id",
    same_root: bool = False,
) -> tuple[Any, int]:
    """The rows of ``previous`` (the merged manifest as an Arrow table with ``id``,
    ``path`` and ``status``) that are not ``deleted``, whose ``column`` lies under
    ``scope``, and that the scan did not find (``scanned`` holds the same column's values
    of the scan); and how many rows were under ``scope`` and not yet deleted (what the
    refusal rule compares with).

    ``same_root`` (for ids, which do not say which folder they were read from) keeps only
    the rows read under a root (``row_root``) that an image still found was read under:
    two folders enqueued into one destination without a common image root both have ids
    relative to themselves, and the one scanned must not delete the other's.  When the
    scan found none of them, every row in scope counts (and the refusal rule applies)."""
    import pyarrow.compute as pc

    if previous is None or previous.num_rows == 0:
        return _empty_gone(), 0
    keep = pc.and_(pc.not_equal(previous["status"], DELETED), pc.not_equal(previous[column], ""))
    if scope:
        keep = pc.and_(keep, pc.starts_with(previous[column], scope.rstrip("/") + "/"))
    rows = previous.filter(keep)
    found = scanned.contains(rows[column])
    if same_root and found.any():
        codes = _roots(rows)
        rows = rows.filter(np.isin(codes, np.unique(codes[found])))
        found = scanned.contains(rows[column])
    return rows.filter(~found).select(["id", "path"]), rows.num_rows


def _empty_gone() -> Any:
    import pyarrow as pa

    return pa.table({"id": pa.array([], pa.string()), "path": pa.array([], pa.string())})


def check_deletions(n_vanished: int, n_previous: int, accept: bool = False) -> None:
    """Refuse (``TooManyDeletions``) to mark ``n_vanished`` of the ``n_previous`` images
    under the folder deleted when that is all of them (an empty folder) or more than
    ``MAX_DELETED_SHARE`` of them and at least ``MIN_DELETED_REFUSED``, unless ``accept``."""
    if accept or n_vanished == 0:
        return
    if n_vanished >= n_previous:
        raise TooManyDeletions(n_vanished, n_previous, "every image the destination holds there")
    if n_vanished > MAX_DELETED_SHARE * n_previous and n_vanished >= MIN_DELETED_REFUSED:
        raise TooManyDeletions(
            n_vanished,
            n_previous,
            f"{n_vanished / n_previous:.0%}, over the {MAX_DELETED_SHARE:.0%} limit",
        )


def deleted_part_key(run_id: str) -> str:
    return f"{PARTS_PREFIX}/{run_id}-deleted.csv"


def record_deletions(storage: Storage, gone: Any, run_id: str, host: str | None = None) -> int:
    """Write one ``deleted`` row per row of ``gone`` (an Arrow table with ``id`` and
    ``path``; the time now in ``encoded_at``, no shard) as ``parts/<run_id>-deleted.csv``;
    returns how many."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    host = host or socket.gethostname()

    def rows() -> Iterator[dict[str, str]]:
        for start in range(0, gone.num_rows, CHUNK):
            chunk = gone.slice(start, CHUNK)
            for image_id, path in zip(
                chunk["id"].to_pylist(), chunk["path"].to_pylist(), strict=True
            ):
                yield {
                    "id": image_id,
                    "path": path or "",
                    "status": DELETED,
                    "error": "gone from the folder when it was scanned again",
                    "job_id": run_id,
                    "worker_host": host,
                    "encoded_at": now,
                }

    if gone.num_rows:
        storage.put(deleted_part_key(run_id), rows_to_csv(rows()))
    return gone.num_rows
