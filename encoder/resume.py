"""What ``--resume`` skips: every image the destination holds as ``ok`` with the same
relative path, size and mtime.

This is the resume rule of both ``imgenc encode --resume`` and ``imgenc enqueue
--resume``.  A replaced photo (new size or mtime) and one that came back after it was
recorded ``deleted`` are encoded again.  The ok rows are kept as sorted 64-bit hashes of
``(key, size, mtime_ns)`` (8 bytes per image, not a Python tuple), and a scan is checked
against them a batch of entries at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from encoder.keys import image_keys, mix64

SCAN_BATCH = 4096  # scan entries checked at a time
_NONE = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # a size or mtime that is not known


def _as_u64(values: Any) -> np.ndarray:
    """Non-negative integers as uint64, None (or null) as ``_NONE``."""
    if hasattr(values, "fill_null"):
        array = values.fill_null(-1).to_numpy()
    else:
        array = np.array([-1 if v is None else v for v in values], np.int64)
    out = array.astype(np.int64).view(np.uint64).copy()
    out[array < 0] = _NONE
    return out


def triple_hashes(keys: np.ndarray, sizes: Any, mtimes: Any) -> np.ndarray:
    """The hash of each ``(image key, size, mtime_ns)``."""
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(keys, np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        h = mix64(h ^ _as_u64(sizes))
        return mix64(h ^ _as_u64(mtimes))


class ResumeKeys:
    """The ok images of a destination, by path, size and mtime."""

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self.hashes = np.unique(hashes) if hashes is not None else np.zeros(0, np.uint64)

    @classmethod
    def of(cls, rows: Any) -> ResumeKeys:
        """From manifest rows (an Arrow table with ``id``, ``status``, ``size`` and
        ``mtime_ns``): its ok ones."""
        import pyarrow.compute as pc

        if rows is None or rows.num_rows == 0:
            return cls()
        if "status" in rows.column_names:
            rows = rows.filter(pc.equal(rows["status"], "ok"))
        return cls(triple_hashes(image_keys(rows["id"]), rows["size"], rows["mtime_ns"]))

    def __len__(self) -> int:
        return len(self.hashes)

    def without(self, rows: Any) -> ResumeKeys:
        """These keys less those of ``rows`` (id, size, mtime_ns)."""
        drop = triple_hashes(image_keys(rows["id"]), rows["size"], rows["mtime_ns"])
        return ResumeKeys(self.hashes[~np.isin(self.hashes, drop)])

    def contains(self, ids: Sequence[str], sizes: Sequence, mtimes: Sequence) -> np.ndarray:
        """Whether each ``(ids[i], sizes[i], mtimes[i])`` is held ok."""
        if not len(self.hashes) or not len(ids):
            return np.zeros(len(ids), bool)
        wanted = triple_hashes(image_keys(ids), sizes, mtimes)
        where = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        return self.hashes[where] == wanted

    def split(self, entries: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """Each scan entry (``encoder.scan.ScanEntry``) with whether it is skipped."""
        batch: list[Any] = []

        def checked() -> Iterator[tuple[Any, bool]]:
            done = self.contains(
                [e.id for e in batch], [e.size for e in batch], [e.mtime_ns for e in batch]
            )
            yield from zip(batch, done.tolist(), strict=True)
            batch.clear()

        for entry in entries:
            batch.append(entry)
            if len(batch) >= SCAN_BATCH:
                yield from checked()
        if batch:
            yield from checked()
