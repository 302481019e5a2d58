"""Segments and tombstones: how the faiss backend changes without being rebuilt or copied.

Codes are held in **segments**, as Lucene and Milvus hold theirs: a segment is written once
and never changed.  It holds some images' codes in a faiss index (flat, or an HNSW graph)
by row, and beside them their rows (``ROW_COLUMNS``: the image key, its id and the facts
the search needs), with the keys sorted for look-ups.  Adding images adds a segment;
removing one (a ``deleted`` row, or the old code of an image encoded again) adds its row
to the segment's **tombstones**, which searches skip (a faiss ``IDSelector``).  A change
publishes a new ``SegmentSet`` (the segments, and the tombstones per segment): a search
that started on the previous one finishes on it, and nothing is copied but the tombstone
lists.

Segments are merged in the background of updates, by size tiers: when ``TIER`` segments
of one tier (a power of ``TIER`` in live rows) exist, they become one; a segment whose
tombstones reach ``COMPACT_DEAD_SHARE`` of it is rewritten without them.  An image is so
rewritten about log_8(N / new rows) times over its life.  HNSW segments, whose merges
rebuild a graph, stop growing at ``HNSW_SEGMENT_ROWS``.

On disk, under the index's folder: ``segments/<name>.faiss`` (faiss's own format) and
``segments/<name>.rows.arrow`` (Arrow IPC), written once; local ones are memory-mapped
when opened, so opening a large index reads nothing up front.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoder.storage import LocalStorage, Storage

SEGMENTS_PREFIX = "segments"
TIER = 8  # segments of one size tier merged into one
COMPACT_DEAD_SHARE = 0.25  # a segment with this share of tombstones is rewritten
HNSW_SEGMENT_ROWS = 1_000_000  # HNSW segments are built (and merged) up to this size
ROW_COLUMNS = ("key", "id", "time", "pixels", "file_bytes", "root", "shard", "row")


def row_schema() -> Any:
    """The rows a segment keeps beside its codes."""
    import pyarrow as pa

    text = pa.dictionary(pa.int32(), pa.string())
    return pa.schema(
        [
            pa.field("key", pa.int64()),  # encoder.keys
            pa.field("id", pa.string()),
            pa.field("time", pa.int64()),  # µs: encoded_at, which decides re-encodes
            pa.field("pixels", pa.int64()),  # width x height as stored (0 if unknown)
            pa.field("file_bytes", pa.int64()),
            pa.field("root", text),  # the image root it was read under
            pa.field("shard", text),  # where its code (and features) are in the destination
            pa.field("row", pa.int64()),
        ]
    )


def rows_for_keys(keys: np.ndarray) -> Any:
    """Rows for codes that stand for no image (benchmarks, tests): the key as the id."""
    import pyarrow as pa

    keys = np.asarray(keys, np.int64)
    n = len(keys)
    zeros = pa.array(np.zeros(n, np.int64))
    empty = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([""]))
    columns = [pa.array(keys), pa.array(keys.astype(str)), zeros, zeros, zeros, empty, empty, zeros]
    return pa.Table.from_arrays(columns, schema=row_schema())


def flat_storage(index: Any) -> Any:
    """The ``IndexBinaryFlat`` holding an index's codes (the index itself, or HNSW's)."""
    import faiss

    storage = getattr(index, "storage", None)
    return faiss.downcast_IndexBinary(storage) if storage is not None else index


def code_view(index: Any) -> np.ndarray:
    """The codes of a faiss binary index, ``(n, code_size)``, without a copy."""
    import faiss

    flat = flat_storage(index)
    if flat.ntotal == 0:
        return np.zeros((0, flat.code_size), np.uint8)
    memory = faiss.rev_swig_ptr(flat.xb.data(), flat.ntotal * flat.code_size)
    return memory.reshape(flat.ntotal, flat.code_size)


@dataclass(frozen=True, eq=False)
class Segment:
    """Codes and rows written once: row ``i`` of ``rows`` is code ``i`` of ``index``."""

    name: str
    rows: Any  # pyarrow Table of row_schema()
    index: Any  # faiss IndexBinaryFlat or IndexBinaryHNSW, by row
    sorted_keys: np.ndarray  # the rows' keys, sorted
    order: np.ndarray  # rows by key: row order[i] has key sorted_keys[i]
    keys: np.ndarray  # the rows' keys, by row

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def codes(self) -> np.ndarray:
        return code_view(self.index)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where this segment does not hold it."""
        if not len(self.sorted_keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        return np.where(self.sorted_keys[at] == keys, self.order[at], -1).astype(np.int64)


def make_segment(rows: Any, index: Any, name: str | None = None) -> Segment:
    keys = rows["key"].to_numpy()
    order = np.argsort(keys, kind="stable")
    return Segment(name or secrets.token_hex(6), rows, index, keys[order], order, keys)


@dataclass(frozen=True)
class SegmentSet:
    """What a search reads: the segments and their tombstones, replaced as a whole."""

    segments: tuple[Segment, ...] = ()
    dead: dict[str, np.ndarray] = field(default_factory=dict)  # name -> sorted dead rows

    def live(self, segment: Segment) -> int:
        return len(segment) - len(self.dead.get(segment.name, ()))

    def __len__(self) -> int:
        return sum(self.live(s) for s in self.segments)

    def live_rows(self, segment: Segment) -> np.ndarray:
        dead = self.dead.get(segment.name)
        rows = np.arange(len(segment), dtype=np.int64)
        return rows if dead is None or not len(dead) else np.setdiff1d(rows, dead)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key, the segment (its number) and row holding it alive; -1, -1 if
        none."""
        keys = np.asarray(keys, np.int64)
        where = np.full(len(keys), -1, np.int64)
        rows = np.full(len(keys), -1, np.int64)
        for n, segment in enumerate(self.segments):
            todo = np.flatnonzero(where < 0)
            if not len(todo):
                break
            found = segment.find(keys[todo])
            dead = self.dead.get(segment.name)
            if dead is not None and len(dead):
                found[np.isin(found, dead)] = -1
            hit = found >= 0
            where[todo[hit]], rows[todo[hit]] = n, found[hit]
        return where, rows

    def selector(self, segment: Segment) -> Any:
        """A faiss selector of the segment's live rows (None when all are)."""
        import faiss

        dead = self.dead.get(segment.name)
        if dead is None or not len(dead):
            return None
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(dead, np.int64)))


def tier(live: int) -> int:
    return int(math.log(max(live, 1), TIER))


# --- persistence ----------------------------------------------------------------------------
def segment_keys(prefix: str, name: str) -> tuple[str, str]:
    base = f"{prefix}/{SEGMENTS_PREFIX}/{name}"
    return f"{base}.faiss", f"{base}.rows.arrow"


def write_segment(storage: Storage, prefix: str, segment: Segment) -> None:
    """Write a segment's two files (through temporary files: faiss and Arrow write to
    paths)."""
    import faiss
    import pyarrow as pa

    index_key, rows_key = segment_keys(prefix, segment.name)
    scratch = str(storage.root) if isinstance(storage, LocalStorage) else None
    with tempfile.TemporaryDirectory(prefix=".segment-", dir=scratch) as folder:
        index_path = os.path.join(folder, "index.faiss")
        rows_path = os.path.join(folder, "rows.arrow")
        faiss.write_index_binary(segment.index, index_path)
        with pa.OSFile(rows_path, "wb") as sink, pa.ipc.new_file(sink, segment.rows.schema) as w:
            w.write_table(segment.rows)
        storage.put_file(index_key, index_path)
        storage.put_file(rows_key, rows_path)


def read_segment(storage: Storage, prefix: str, name: str) -> Segment:
    """A segment written by ``write_segment``: memory-mapped when local."""
    import faiss
    import pyarrow as pa

    index_key, rows_key = segment_keys(prefix, name)
    if isinstance(storage, LocalStorage):
        index_path, rows_path = storage.local_path(index_key), storage.local_path(rows_key)
        if not index_path.exists() or not rows_path.exists():
            raise KeyError(name)
        index = faiss.read_index_binary(str(index_path), faiss.IO_FLAG_MMAP)
        rows = pa.ipc.open_file(pa.memory_map(str(rows_path))).read_all()
    else:
        index = faiss.deserialize_index_binary(np.frombuffer(storage.get(index_key), np.uint8))
        rows = pa.ipc.open_file(pa.BufferReader(storage.get(rows_key))).read_all()
    if rows.num_rows != index.ntotal or list(rows.schema.names) != list(ROW_COLUMNS):
        raise ValueError(f"segment {name}: {rows.num_rows} rows for {index.ntotal} codes")
    return make_segment(rows, index, name)


def iter_live(
    view: SegmentSet, batch: int, code_bytes: int
) -> Iterator[tuple[Segment, np.ndarray, np.ndarray]]:
    """``(segment, rows, codes)`` of every live code, ``batch`` rows at a time."""
    for segment in view.segments:
        rows = view.live_rows(segment)
        codes = segment.codes
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            yield segment, chunk, np.ascontiguousarray(codes[chunk, :code_bytes])
