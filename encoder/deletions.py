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
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from datetime import datetime, timezone

from encoder.manifest import DELETED, PARTS_PREFIX, Row, rows_to_csv
from encoder.storage import Storage

MAX_DELETED_SHARE = 0.5  # refuse when more than this share of the images would go at once...
MIN_DELETED_REFUSED = 20  # ...and at least this many (a small catalogue may lose half)
ACCEPT_FLAG = "--accept-deletions"


class TooManyDeletions(ValueError):
    """A resume would mark the whole folder, or most of it, ``deleted``; nothing was written."""

    def __init__(self, n_vanished: int, n_previous: int, reason: str) -> None:
        self.n_vanished, self.n_previous = n_vanished, n_previous
        super().__init__(
            f"refusing to mark {n_vanished} of {n_previous} images deleted ({reason}): the "
            "folder may be unmounted or the wrong one; nothing was written. If they are "
            f"really gone, rerun with {ACCEPT_FLAG}"
        )


def in_scope(value: str, scope: str) -> bool:
    """Whether ``value`` (an id or a path) lies under ``scope`` ("" is everything)."""
    if not scope:
        return True
    prefix = scope.rstrip("/") + "/"
    return value.startswith(prefix)


def row_root(row: Row) -> str:
    """The root a row's image was read under: its ``path`` without its ``id``."""
    path, image_id = row.get("path", ""), row.get("id", "")
    return path[: -len(image_id) - 1] if image_id and path.endswith("/" + image_id) else ""


def vanished(
    previous_rows: Iterable[Row],
    scanned: set[str],
    scope: str = "",
    column: str = "id",
    same_root: bool = False,
) -> tuple[list[Row], int]:
    """The rows of ``previous_rows`` (a merged manifest: one row per image) that are not
    ``deleted``, whose ``column`` lies under ``scope``, and that the scan did not find
    (``scanned`` holds the same column's values of the scan); and how many rows were
    under ``scope`` and not yet deleted (what the refusal rule compares with).

    ``same_root`` (for ids, which do not say which folder they were read from) keeps only
    the rows read under a root (``row_root``) that an image still found was read under:
    two folders enqueued into one destination without a common image root both have ids
    relative to themselves, and the one scanned must not delete the other's.  When the
    scan found none of them, every row in scope counts (and the refusal rule applies)."""
    rows = [
        row
        for row in previous_rows
        if row.get("status") != DELETED and row.get(column) and in_scope(row.get(column, ""), scope)
    ]
    if same_root:
        roots = {row_root(row) for row in rows if row[column] in scanned}
        if roots:
            rows = [row for row in rows if row_root(row) in roots]
    gone = [row for row in rows if row[column] not in scanned]
    return gone, len(rows)


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


def record_deletions(
    storage: Storage, rows: Iterable[Row], run_id: str, host: str | None = None
) -> int:
    """Write one ``deleted`` row per row of ``rows`` (its id and path, the time now in
    ``encoded_at``, no shard) as ``parts/<run_id>-deleted.csv``; returns how many."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    host = host or socket.gethostname()
    deleted = [
        {
            "id": row["id"],
            "path": row.get("path", ""),
            "status": DELETED,
            "error": "gone from the folder when it was scanned again",
            "job_id": run_id,
            "worker_host": host,
            "encoded_at": now,
        }
        for row in rows
    ]
    if deleted:
        storage.put(deleted_part_key(run_id), rows_to_csv(deleted))
    return len(deleted)
