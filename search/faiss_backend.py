"""The faiss backends: exact (``IndexBinaryFlat``) and approximate (``IndexBinaryHNSW``)
search of codes held in segments with tombstones (``search.segments``).

Codes of up to 64 bytes are zero-padded to the next size faiss has a fast Hamming kernel
for (4, 8, 16, 20, 32 or 64 bytes: a 63-byte pooled code becomes 64; measured 2.7x faster
over 1M codes); padding adds the same zero bits to every code, so distances do not change.
Longer codes (3,063-byte spatial ones) use faiss's generic kernel.

Each segment's faiss index works by row; the backend turns rows into image keys and back.
A search asks every segment for its nearest live codes (tombstones are skipped by a faiss
selector) and keeps the nearest of all.  An update adds one segment and tombstones: it
neither rebuilds nor copies what is there.  ``added`` counts the codes updates handed to
faiss, and ``rewritten`` those merges and compactions copied, so a caller (or a test) can
see that a deletion wrote none.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np

from encoder.storage import Storage
from search.segments import (
    COMPACT_DEAD_SHARE,
    HNSW_SEGMENT_ROWS,
    TIER,
    Segment,
    SegmentSet,
    code_view,
    flat_storage,
    iter_live,
    make_segment,
    read_segment,
    row_schema,
    segment_keys,
    tier,
    write_segment,
)

logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every import

FAST_CODE_BYTES = (4, 8, 16, 20, 32, 64)  # faiss's specialised Hamming kernels
DEFAULT_HNSW_M = 32  # graph neighbours per node
DEFAULT_HNSW_EF_SEARCH = 128
FAR = np.iinfo(np.int32).max  # the distance of an empty result slot


def stored_bytes(code_bytes: int) -> int:
    """The code size faiss holds: padded up to a fast kernel when it fits one."""
    return next((n for n in FAST_CODE_BYTES if n >= code_bytes), code_bytes)


class FaissFlat:
    kind = "flat"
    exact = True
    segment_rows = 0  # no limit: flat segments merge by copying codes

    def __init__(
        self,
        code_bytes: int,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_search: int = DEFAULT_HNSW_EF_SEARCH,
        **_: Any,
    ) -> None:
        self.code_bytes = code_bytes
        self.stored_bytes = stored_bytes(code_bytes)
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self._view = SegmentSet()
        self._saved: set[str] = set()
        self._saved_dead: tuple[str | None, str] = (None, "")  # tombstones file, digest
        self.added = 0  # codes added by updates (new and re-encoded images)
        self.rewritten = 0  # codes copied into merged or compacted segments

    # --- codes in, codes out -----------------------------------------------------------------
    def _new_index(self) -> Any:
        import faiss

        return faiss.IndexBinaryFlat(self.stored_bytes * 8)

    def _pad(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        if self.stored_bytes == self.code_bytes:
            return codes
        padded = np.zeros((codes.shape[0], self.stored_bytes), np.uint8)
        padded[:, : self.code_bytes] = codes
        return padded

    def _build(self, rows: Any, codes: np.ndarray, merged: bool = False) -> Segment:
        """A segment of ``rows`` and their codes (stored or unpadded width)."""
        index = self._new_index()
        if len(codes):
            self._fill(index, codes)
        if merged:
            self.rewritten += len(codes)
        else:
            self.added += len(codes)
        rows = rows.unify_dictionaries().combine_chunks()
        return make_segment(rows, index)

    def _fill(self, index: Any, codes: np.ndarray) -> None:
        """Copy codes straight into faiss's own storage (one copy, padding included)."""
        n, width = codes.shape
        if width not in (self.code_bytes, self.stored_bytes):
            raise ValueError(f"codes of {width} bytes; this index holds {self.code_bytes}")
        index.xb.resize(n * self.stored_bytes)  # zero-filled: the padding
        index.ntotal = n
        code_view(index)[:, :width] = codes

    def __len__(self) -> int:
        return len(self._view)

    @property
    def segments(self) -> SegmentSet:
        """What a search reads now (segments and tombstones)."""
        return self._view

    def update(self, rows: Any, codes: np.ndarray, remove: np.ndarray) -> None:
        """Add ``codes`` with their ``rows`` (``search.segments.row_schema``), and forget
        the codes under ``remove`` and under the added keys (an image encoded again).
        Searches see the index before or after, never half of it."""
        view = self._view
        added = rows["key"].to_numpy() if rows is not None and rows.num_rows else np.zeros(0)
        dead = dict(view.dead)
        gone = np.zeros(0, np.int64)
        if view.segments:  # what the update replaces or removes
            gone = np.unique(np.concatenate([np.asarray(remove, np.int64), added.astype(np.int64)]))
        if len(gone):
            where, at = view.find(gone)
            for n in np.unique(where[where >= 0]):
                name = view.segments[n].name
                dead[name] = np.union1d(dead.get(name, np.zeros(0, np.int64)), at[where == n])
        segments = list(view.segments)
        if len(added):
            padded = self._pad(codes)
            step = self.segment_rows or len(added)
            for start in range(0, len(added), step):
                segments.append(self._build(rows.slice(start, step), padded[start : start + step]))
        self._view = self._maintained(SegmentSet(tuple(segments), dead))

    def _maintained(self, view: SegmentSet) -> SegmentSet:
        """Segments without their tombstones where those are many, and tiers merged."""
        segments, dead = list(view.segments), dict(view.dead)
        while True:
            current = SegmentSet(tuple(segments), dead)
            empty = [s for s in segments if current.live(s) == 0]
            heavy = [
                s
                for s in segments
                if current.live(s) and len(dead.get(s.name, ())) >= COMPACT_DEAD_SHARE * len(s)
            ]
            group = heavy[:1] or self._tier_to_merge(current)
            if empty:
                segments = [s for s in segments if s not in empty]
                for s in empty:
                    dead.pop(s.name, None)
                continue
            if not group:
                return current
            merged = self._merge(current, group)
            at = segments.index(group[0])
            segments = [s for s in segments if s not in group]
            segments.insert(min(at, len(segments)), merged)
            for s in group:
                dead.pop(s.name, None)

    def _tier_to_merge(self, view: SegmentSet) -> list[Segment]:
        tiers: dict[int, list[Segment]] = {}
        for segment in view.segments:
            tiers.setdefault(tier(view.live(segment)), []).append(segment)
        for level in sorted(tiers):
            group = tiers[level]
            if len(group) >= TIER:
                group = sorted(group, key=view.live)[:TIER]
                if not self.segment_rows or sum(map(view.live, group)) <= self.segment_rows:
                    return group
        return []

    def _merge(self, view: SegmentSet, group: list[Segment]) -> Segment:
        import pyarrow as pa

        tables, codes = [], []
        for segment in group:
            live = view.live_rows(segment)
            tables.append(segment.rows.take(pa.array(live)))
            codes.append(segment.codes[live])
        return self._build(pa.concat_tables(tables), np.concatenate(codes), merged=True)

    # --- looking up ----------------------------------------------------------------------------
    def lookup(self, keys: np.ndarray, columns: list[str] | None = None) -> tuple[np.ndarray, Any]:
        """Whether each key is held, and the rows of those held (in the order of ``keys``)."""
        import pyarrow as pa

        view = self._view
        keys = np.asarray(keys, np.int64)
        where, at = view.find(keys)
        found = where >= 0
        pieces, positions = [], []
        for n in np.unique(where[found]):
            mine = np.flatnonzero(where == n)
            table = view.segments[n].rows
            pieces.append((table.select(columns) if columns else table).take(pa.array(at[mine])))
            positions.append(mine)
        if not pieces:
            schema = row_schema()
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return found, schema.empty_table()
        table = pa.concat_tables(pieces)
        order = np.argsort(np.concatenate(positions), kind="stable")
        return found, table.take(pa.array(order))

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """The stored (unpadded) codes under ``keys``, in their order."""
        view = self._view
        keys = np.asarray(keys, np.int64)
        where, at = view.find(keys)
        if (where < 0).any():
            raise KeyError(int(keys[np.flatnonzero(where < 0)[0]]))
        out = np.empty((len(keys), self.code_bytes), np.uint8)
        for n in np.unique(where):
            mine = where == n
            out[mine] = view.segments[n].codes[at[mine], : self.code_bytes]
        return out

    def iter_codes(
        self, batch: int = 65536, padded: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(keys, codes)`` of every live code, ``batch`` at a time (``padded``: as
        stored, zero bytes added up to ``stored_bytes``)."""
        width = self.stored_bytes if padded else self.code_bytes
        for segment, rows, codes in iter_live(self._view, batch, width):
            yield segment.keys[rows], codes

    def iter_rows(self, columns: list[str], batch: int = 65536) -> Iterator[Any]:
        """The live rows (``columns`` of them), ``batch`` at a time."""
        import pyarrow as pa

        view = self._view
        for segment in view.segments:
            live = view.live_rows(segment)
            table = segment.rows.select(columns)
            for start in range(0, len(live), batch):
                yield table.take(pa.array(live[start : start + batch]))

    # --- searching -------------------------------------------------------------------------------
    def _params(self, view: SegmentSet, segment: Segment, k: int, exact: bool) -> Any:
        import faiss

        selector = view.selector(segment)
        if not exact and self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if selector is not None:
                params.sel = selector
            return params, selector
        return (faiss.SearchParameters(sel=selector) if selector is not None else None), selector

    def search(
        self, codes: np.ndarray, k: int, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, keys)``, each ``(n, k)``, nearest first (key -1 and a huge
        distance where fewer than ``k`` are held); ``exact`` scans every code even for
        HNSW."""
        view = self._view
        queries = self._pad(codes)
        found_d, found_k = [], []
        for segment in view.segments:
            live = view.live(segment)
            if not live:
                continue
            kk = min(k, live)
            index = flat_storage(segment.index) if exact else segment.index
            params, _selector = self._params(view, segment, kk, exact)
            distances, rows = index.search(queries, kk, params=params)
            held = rows >= 0
            found_k.append(np.where(held, segment.keys[np.maximum(rows, 0)], -1))
            found_d.append(np.where(held, distances, FAR).astype(np.int64))
        if not found_d:
            n = queries.shape[0]
            return np.full((n, 0), FAR, np.int64), np.full((n, 0), -1, np.int64)
        distances, keys = np.hstack(found_d), np.hstack(found_k)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(distances, order, 1), np.take_along_axis(keys, order, 1)

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each of ``codes``, ``(distances, keys)`` of every live code within
        ``max_distance`` bits (inclusive), nearest first; exact, for HNSW too."""
        import faiss

        view = self._view
        queries = self._pad(codes)
        per_query: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(queries))]
        for segment in view.segments:
            if not view.live(segment):
                continue
            selector = view.selector(segment)
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            lims, distances, rows = flat_storage(segment.index).range_search(
                queries, max_distance + 1, params=params
            )
            for q in range(len(queries)):
                lo, hi = lims[q], lims[q + 1]
                if hi > lo:
                    per_query[q].append((distances[lo:hi], segment.keys[rows[lo:hi]]))
        found = []
        for parts in per_query:
            if not parts:
                found.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            d = np.concatenate([p[0] for p in parts]).astype(np.int64)
            k = np.concatenate([p[1] for p in parts])
            order = np.argsort(d, kind="stable")
            found.append((d[order], k[order]))
        return found

    # --- persistence -----------------------------------------------------------------------------
    def save(self, storage: Storage, prefix: str) -> dict[str, Any]:
        """Write what is not on disk yet (new segments, the tombstones if they changed)
        and return what ``load`` needs."""
        view = self._view
        for segment in view.segments:
            if segment.name not in self._saved:
                write_segment(storage, prefix, segment)
                self._saved.add(segment.name)
        dead = {name: rows for name, rows in view.dead.items() if len(rows)}
        dead_key, saved = self._saved_dead
        digest = _digest(dead)
        if not dead:
            dead_key = None
        elif digest != saved:
            dead_key = f"{prefix}/tombstones-{secrets.token_hex(6)}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, **dead)
            storage.put(dead_key, buffer.getvalue())
        self._saved_dead = (dead_key, digest)
        return {
            "segments": [{"name": s.name, "rows": len(s)} for s in view.segments],
            "dead": dead_key,
        }

    def load(self, storage: Storage, prefix: str, meta: dict[str, Any]) -> None:
        """Take back what ``save`` wrote; ``ValueError`` (or ``KeyError``) if damaged."""
        segments = tuple(read_segment(storage, prefix, s["name"]) for s in meta["segments"])
        for segment, described in zip(segments, meta["segments"], strict=True):
            if len(segment) != described["rows"]:
                raise ValueError(f"segment {segment.name} holds {len(segment)} rows")
            if flat_storage(segment.index).code_size != self.stored_bytes:
                raise ValueError("a saved faiss index of another code size")
            if self.kind == "hnsw" and getattr(segment.index, "hnsw", None) is None:
                raise ValueError("a saved faiss index that is not HNSW")
            if self.kind == "hnsw":
                segment.index.hnsw.efSearch = self.ef_search
        dead: dict[str, np.ndarray] = {}
        if meta.get("dead"):
            with np.load(io.BytesIO(storage.get(meta["dead"]))) as saved:
                dead = {name: saved[name].astype(np.int64) for name in saved.files}
        sizes = {s.name: len(s) for s in segments}
        for name, rows in dead.items():
            if name not in sizes or (len(rows) and (rows.max() >= sizes[name] or rows.min() < 0)):
                raise ValueError(f"tombstones of an unknown segment {name}")
        self._view = SegmentSet(segments, dead)
        self._saved = set(sizes)
        self._saved_dead = (meta.get("dead"), _digest(dead))

    @staticmethod
    def files(prefix: str, meta: dict[str, Any]) -> list[str]:
        """The keys ``save`` wrote for ``meta`` (to delete once another meta replaces it)."""
        keys = [k for s in meta.get("segments", []) for k in segment_keys(prefix, s["name"])]
        return keys + ([meta["dead"]] if meta.get("dead") else [])


def _digest(dead: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(dead):
        h.update(name.encode())
        h.update(np.asarray(dead[name], np.int64).tobytes())
    return h.hexdigest()


class FaissHNSW(FaissFlat):
    kind = "hnsw"
    exact = False
    segment_rows = HNSW_SEGMENT_ROWS

    def _fill(self, index: Any, codes: np.ndarray) -> None:
        """HNSW links each code as it is added: a chunk at a time, padded."""
        for start in range(0, len(codes), 65536):
            chunk = codes[start : start + 65536]
            index.add(chunk if chunk.shape[1] == self.stored_bytes else self._pad(chunk))

    def _new_index(self) -> Any:
        import faiss

        index = faiss.IndexBinaryHNSW(self.stored_bytes * 8, self.hnsw_m)
        index.hnsw.efSearch = self.ef_search
        return index
