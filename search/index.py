"""``Index``: the nearest stored codes of a destination, by Hamming distance.

``Index.open(DEST)`` reads the destination's spec and indexes every ``ok`` code, one per
image as the manifest merge keeps them.  The codes are held and searched by a
``search.backend.CodeBackend`` (faiss: exact by default, ``kind="hnsw"`` for approximate
graphs, faster for large collections), under each image's **key** (``encoder.keys``: a
hash of its id, which never changes while the image stays in the catalogue).

**Keeping up.**  The index records the version of every manifest part it covers.
``refresh`` (and ``open``) reads only the parts that are new since, a few hundred
thousand rows at a time, and applies the merge rule to what it holds: a newer ``ok`` row
of an indexed image (encoded again) removes its old code and adds the new one, a newer
``deleted`` row removes it; nothing else is touched or copied (the backend adds a
segment and tombstones: ``search.segments``).  Only a part rewritten in place (a chunk
redelivered after its part was indexed) rebuilds the index, from the merged manifest.
Deleted images leave ``search``, ``similar``, the near-duplicates and the thumbnails at
the next ``open`` or ``refresh``; ``stale`` says whether the destination moved on.

**On disk**, under ``DEST/index/``: what the backend saves (faiss segments and their
tombstones), ``gone-<token>.npz`` (the keys of deleted images with the time they went,
which the merge rule needs), and ``meta.json`` last (the spec fingerprint, the kind, the
parts covered).  A save writes only what is new.

Results are ordered by distance, ties broken by id, so exact search equals a brute-force
Hamming ranking whatever the order codes were added in.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoder.codes import codes_at, read_spec
from encoder.keys import image_key, image_keys
from encoder.manifest import DELETED, OK, part_keys, read_parts
from encoder.merged import merged_manifest_file, with_order
from encoder.spec import CodeSpec
from encoder.storage import Storage, StorageError, open_storage
from search.backend import BACKENDS, REMOTE_KINDS, CodeBackend, new_backend
from search.sync_lock import SyncBusy, sync_lock

log = logging.getLogger("imgenc.search")

FORMAT = 3  # 3: segments under stable keys
INDEX_PREFIX = "index"
META_KEY = f"{INDEX_PREFIX}/meta.json"
KINDS = tuple(BACKENDS)
SYNC_WAIT = 600.0  # s an explicit sync (imgenc index, a job's end) waits for another one
DEFAULT_HNSW_M = 32  # graph neighbours per node
TIE_MARGIN = 16  # extra neighbours fetched to break ties at the k-th distance by id
PARTS_PER_STEP = 256  # new manifest parts applied at a time
NO_TIME = -(2**63)
MANIFEST_COLUMNS = ["id", "path", "status", "encoded_at", "shard", "row", "width", "height", "size"]


@dataclass
class Neighbours:
    """One query's results: image ids and Hamming distances, nearest first."""

    ids: list[str] = field(default_factory=list)
    distances: list[int] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"id": i, "distance": d} for i, d in zip(self.ids, self.distances, strict=True)]


@dataclass(frozen=True)
class Gone:
    """Keys of deleted images and when they went (sorted by key)."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def times_of(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.full(len(keys), NO_TIME, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, self.times[at], NO_TIME)

    def updated(self, drop: np.ndarray, keys: np.ndarray, times: np.ndarray) -> Gone:
        keep = ~np.isin(self.keys, np.concatenate([drop, keys]))
        all_keys = np.concatenate([self.keys[keep], keys])
        all_times = np.concatenate([self.times[keep], times])
        order = np.argsort(all_keys, kind="stable")
        return Gone(all_keys[order], all_times[order])


def image_rows(table: Any) -> Any:
    """Manifest rows (``MANIFEST_COLUMNS``, and ``key``) as the rows a backend keeps
    (``search.segments.row_schema``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from search.segments import row_schema

    keys = table["key"] if "key" in table.column_names else pa.array(image_keys(table["id"]))
    width = pc.fill_null(table["width"], 0)
    height = pc.fill_null(table["height"], 0)
    columns = {
        "key": keys,
        "id": table["id"],
        "time": pc.fill_null(table["encoded_at"].cast(pa.int64()), NO_TIME),
        "pixels": pc.multiply(width, height),
        "file_bytes": pc.fill_null(table["size"], 0),
        "root": pc.dictionary_encode(image_roots(table["path"], table["id"])),
        "shard": pc.dictionary_encode(table["shard"]),
        "row": pc.fill_null(table["row"], 0),
    }
    return pa.table(columns).cast(row_schema())


def image_roots(paths: Any, ids: Any) -> Any:
    """Each image's root: its path without ``/id`` ("/" for a path ``/id``; "" when the
    path does not end with the id), computed once per distinct root length."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths, ids = (
        c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
        for c in (pc.fill_null(paths, ""), ids)
    )
    lengths = pc.subtract(pc.utf8_length(paths), pc.add(pc.utf8_length(ids), 1))
    lengths = pc.fill_null(lengths, -1).to_numpy(zero_copy_only=False)
    positions, pieces = [], []
    for length in np.unique(lengths).tolist():
        where = np.flatnonzero(lengths == length)
        positions.append(where)
        if length < 0:
            pieces.append(pa.array([""] * len(where), pa.string()))
            continue
        mine = paths.take(pa.array(where))
        root = pc.utf8_slice_codeunits(mine, 0, length) if length else pa.scalar("/")
        rebuilt = pc.binary_join_element_wise(
            pc.utf8_slice_codeunits(mine, 0, length), ids.take(pa.array(where)), "/"
        )
        pieces.append(pc.if_else(pc.equal(mine, rebuilt), root, ""))
    if not pieces:
        return pa.array([], pa.string())
    order = np.argsort(np.concatenate(positions), kind="stable")
    return pa.concat_arrays(pieces).take(pa.array(order))


class Index:
    def __init__(
        self,
        storage: Storage,
        spec: CodeSpec,
        kind: str = "flat",
        hnsw_m: int = DEFAULT_HNSW_M,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, not {kind!r}")
        self.storage = storage
        self.spec = spec
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.code_bytes = spec.bytes_per_code
        self._backend = self._new_backend()
        self._parts: dict[str, str] = {}
        self._gone = Gone()
        self._saved_gone: tuple[str | None, int] = (None, 0)
        self._lock = threading.Lock()  # one refresh at a time
        self.generation = ""
        self.updated_at = 0.0
        self.collisions = 0  # ids left out because another id has their key
        self._embedded: Any = None
        self.origin = "built"  # or "loaded" from DEST/index/, or "updated" after loading

    # --- opening and keeping up to date ---------------------------------------------------
    @classmethod
    def open(
        cls,
        dest: str | Storage,
        kind: str | None = None,
        hnsw_m: int = DEFAULT_HNSW_M,
        save: bool = True,
    ) -> Index:
        """The index of ``dest`` (a directory or ``s3://bucket/prefix``), loaded from
        ``DEST/index/`` when one matches the spec and ``kind`` (default: the persisted
        kind, else ``flat``), brought up to date with the manifest parts, and saved back
        if it changed (unless ``save=False``)."""
        storage = open_storage(dest) if isinstance(dest, str) else dest
        spec = read_spec(storage)
        meta = _read_meta(storage)
        persisted_kind = meta.get("kind") if meta else None
        index = cls(storage, spec, kind or persisted_kind or "flat", hnsw_m)
        loaded = bool(meta) and index._load(meta)
        if index.remote:  # the engine and meta.json are shared: sync under the lock
            changed = index.refresh(wait=SYNC_WAIT if save else 0.0)
            index.origin = "built" if not loaded else ("updated" if changed else "loaded")
            return index
        if meta and not loaded:
            log.info("index in %s/%s is not reusable; rebuilding", storage.url, INDEX_PREFIX)
        changed = index.refresh(save=False)
        index.origin = "built" if not loaded else ("updated" if changed else "loaded")
        if save and index.origin != "loaded":
            try:
                index.save()
            except StorageError as exc:  # a read-only destination: search it all the same
                log.warning("index not saved under %s/%s: %s", storage.url, INDEX_PREFIX, exc)
        return index

    @property
    def remote(self) -> bool:
        """Whether a search engine of its own keeps the codes (shared by every process)."""
        return bool(getattr(self._backend, "remote", False))

    @property
    def stale(self) -> bool:
        """True when the destination holds manifest parts this index does not cover."""
        if self.remote:  # another process may have synced the engine since
            meta = _read_meta(self.storage) or {}
            return part_keys(self.storage) != meta.get("parts")
        return part_keys(self.storage) != self._parts

    def refresh(self, save: bool = True, wait: float = 0.0) -> bool:
        """Cover what the destination holds now; returns whether anything changed.

        With a search engine of its own (Milvus), the sync runs under the destination's
        sync lock (``search.sync_lock``; ``wait`` seconds for another process's sync to
        end, else nothing is done now and False returned), starts from what the last
        sync recorded in ``meta.json``, and records its progress there after each step,
        whatever ``save`` says: a sync cut off is completed by the next one."""
        with self._lock:
            if not self.remote:
                return self._refresh(save, checkpoint=False)
            try:
                with sync_lock(self.storage, wait):
                    self._adopt_saved()
                    return self._refresh(True, checkpoint=True)
            except SyncBusy as exc:
                log.info("%s; this refresh is left to it", exc)
                return False

    def _adopt_saved(self) -> None:
        """Take the state the last sync saved (another process's, maybe)."""
        meta = _read_meta(self.storage)
        if not meta or meta.get("generation") == self.generation and self._parts:
            return
        if not self._load(meta):
            self._parts = {}  # nothing to build on: the next step rebuilds

    def _refresh(self, save: bool, checkpoint: bool) -> bool:
        current = part_keys(self.storage)
        if current == self._parts:
            return False
        rewritten = [k for k, v in self._parts.items() if current.get(k) != v]
        if rewritten or not self._parts:
            if rewritten:
                log.info(
                    "index of %s: %d parts rewritten since (first %s); rebuilding",
                    self.storage.url, len(rewritten), rewritten[0],
                )  # fmt: skip
            self._build()
        else:
            new = [k for k in current if k not in self._parts]
            for start in range(0, len(new), PARTS_PER_STEP):
                step = new[start : start + PARTS_PER_STEP]
                self._apply(read_parts(self.storage, step))
                self._parts.update((k, current[k]) for k in step)
                if checkpoint and start + PARTS_PER_STEP < len(new):
                    self.save()
        self.generation = secrets.token_hex(6)
        self.updated_at = time.time()
        if save:
            self.save()
        return True

    def _build(self) -> None:
        """Index the merged manifest from scratch (it is merged now if not current)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables, gone_keys, gone_times = [], [], []
        with merged_manifest_file(self.storage) as (path, info):
            columns = [*MANIFEST_COLUMNS, "key"]
            for batch in pq.ParquetFile(str(path)).iter_batches(columns=columns):
                batch = pa.Table.from_batches([batch])
                deleted = batch.filter(pc.equal(batch["status"], DELETED))
                if deleted.num_rows:
                    gone_keys.append(deleted["key"].to_numpy())
                    gone_times.append(
                        pc.fill_null(deleted["encoded_at"].cast(pa.int64()), NO_TIME).to_numpy()
                    )
                ok = batch.filter(pc.equal(batch["status"], OK))
                if ok.num_rows:
                    tables.append(image_rows(ok))
            parts = dict(info.parts)
        rows = pa.concat_tables(tables).unify_dictionaries().combine_chunks() if tables else None
        del tables
        self._backend = self._new_backend()
        if self.remote:
            self._backend.clear()  # type: ignore[attr-defined]
        self.collisions = 0
        if rows is not None:
            rows = self._without_collisions(rows)
            codes = codes_at(self.storage, self.spec, rows["shard"], rows["row"].to_numpy())
            self._backend.update(rows, codes, np.zeros(0, np.int64))
            del codes
        keys = np.concatenate(gone_keys) if gone_keys else np.zeros(0, np.int64)
        times = np.concatenate(gone_times) if gone_times else np.zeros(0, np.int64)
        self._gone = Gone().updated(np.zeros(0, np.int64), keys, times)
        self._parts = parts

    def _without_collisions(self, rows: Any) -> Any:
        """``rows`` less those whose key another id of ``rows`` already has."""
        keys = rows["key"].to_numpy()
        _, first = np.unique(keys, return_index=True)
        if len(first) == len(keys):
            return rows
        keep = np.zeros(len(keys), bool)
        keep[first] = True
        dropped = rows.filter(~keep)
        self.collisions += dropped.num_rows
        log.warning(
            "%d images share a key with another (first: %r); they are left out of the index",
            dropped.num_rows, dropped["id"][0].as_py(),
        )  # fmt: skip
        return rows.filter(keep)

    def _apply(self, table: Any) -> None:
        """Apply manifest rows (read from new parts) to what the index holds."""
        import pyarrow as pa
        import pyarrow.compute as pc

        presence = table.filter(pc.is_in(table["status"], value_set=pa.array([OK, DELETED])))
        if not presence.num_rows:
            return
        ordered = with_order(presence, 0).sort_by(
            [("id", "ascending"), ("_time", "ascending"), ("_seq", "ascending")]
        )
        ids = ordered["id"]
        last = np.ones(ordered.num_rows, bool)
        if ordered.num_rows > 1:
            last[:-1] = ~pc.equal(ids.slice(0, len(ids) - 1), ids.slice(1)).to_numpy(
                zero_copy_only=False
            )
        latest = ordered.filter(last)  # each image's latest ok or deleted row here
        keys = image_keys(latest["id"])
        latest = latest.append_column("key", pa.array(keys))
        latest = self._without_collisions(latest)
        keys = latest["key"].to_numpy()
        times = latest["_time"].to_numpy()
        found, held = self._backend.lookup(keys, ["id", "time"])
        held_times = np.full(len(keys), NO_TIME, np.int64)
        held_times[found] = held["time"].to_numpy()
        clash = np.zeros(len(keys), bool)
        clash[found] = ~pc.equal(held["id"], latest["id"].filter(found)).to_numpy(
            zero_copy_only=False
        )
        if clash.any():
            self.collisions += int(clash.sum())
            log.warning("%d images share a key with an indexed one; left out", int(clash.sum()))
        gone_times = self._gone.times_of(keys)
        now = np.where(found, held_times, gone_times)
        newer = ~clash & (times >= now)
        is_ok = pc.equal(latest["status"], OK).to_numpy(zero_copy_only=False)
        add, deleted = newer & is_ok, newer & ~is_ok
        added = latest.filter(add)
        rows = image_rows(added) if added.num_rows else None
        codes = (
            codes_at(self.storage, self.spec, added["shard"], added["row"])
            if added.num_rows
            else np.zeros((0, self.code_bytes), np.uint8)
        )
        self._backend.update(rows, codes, keys[deleted & found])
        self._gone = self._gone.updated(keys[add], keys[deleted], times[deleted])

    def _new_backend(self, saved: dict[str, Any] | None = None) -> CodeBackend:
        """An empty backend of this index's kind (``saved``: what a save of it returned)."""
        options: dict[str, Any] = {"hnsw_m": self.hnsw_m}
        if self.kind == "milvus":
            options.update(milvus_options(self.storage, self.spec, saved or {}))
        return new_backend(self.kind, self.code_bytes, **options)

    # --- persistence ----------------------------------------------------------------------
    def save(self) -> None:
        """Write what is new under ``DEST/index/`` (the backend's own files first, then
        the deleted keys), then ``meta.json``; then remove what no meta names any more."""
        generation = self.generation or secrets.token_hex(6)
        self.generation = generation
        backend_meta = self._backend.save(self.storage, INDEX_PREFIX)
        gone_key, saved_count = self._saved_gone
        digest = hash((self._gone.keys.tobytes(), self._gone.times.tobytes()))
        if not len(self._gone.keys):
            gone_key = None
        elif digest != saved_count:
            gone_key = f"{INDEX_PREFIX}/gone-{secrets.token_hex(6)}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, keys=self._gone.keys, times=self._gone.times)
            self.storage.put(gone_key, buffer.getvalue())
        self._saved_gone = (gone_key, digest)
        previous = _read_meta(self.storage)
        meta = {
            "format": FORMAT,
            "generation": generation,
            "fingerprint": self.spec.fingerprint,
            "kind": self.kind,
            "hnsw_m": self.hnsw_m,
            "count": len(self),
            "code_bytes": self.code_bytes,
            "parts": self._parts,
            "backend": backend_meta,
            "gone": gone_key,
            "saved_at": time.time(),
        }
        self.storage.put(META_KEY, json.dumps(meta, indent=1).encode())
        if previous:
            for key in set(_files(previous)) - set(_files(meta)):
                self.storage.delete(key)

    def _load(self, meta: dict[str, Any]) -> bool:
        """Adopt the persisted index if it fits this spec and kind; False otherwise."""
        if (
            meta.get("format") != FORMAT
            or meta.get("fingerprint") != self.spec.fingerprint
            or meta.get("kind") != self.kind
            or meta.get("code_bytes") != self.code_bytes
            or (self.kind == "hnsw" and meta.get("hnsw_m") != self.hnsw_m)
        ):
            return False
        backend = self._new_backend(meta.get("backend"))
        current = self._backend
        if getattr(current, "_client", None) is not None and getattr(
            current, "uri", None
        ) == getattr(backend, "uri", None):  # the same engine: keep the connection
            backend._client = current._client  # type: ignore[attr-defined]
        try:
            backend.load(self.storage, INDEX_PREFIX, meta["backend"])
            gone = Gone()
            if meta.get("gone"):
                with np.load(io.BytesIO(self.storage.get(meta["gone"]))) as f:
                    gone = Gone(f["keys"].astype(np.int64), f["times"].astype(np.int64))
        except (
            KeyError,
            ValueError,
            TypeError,
            OSError,
            EOFError,
            RuntimeError,
            zipfile.BadZipFile,
        ):
            return False  # damaged or partly written: rebuild
        if not getattr(backend, "remote", False) and len(backend) != meta.get("count"):
            return False  # (an engine's count is its own: a sync cut off may have moved it)
        self._backend = backend
        self._gone = gone
        self._saved_gone = (meta.get("gone"), hash((gone.keys.tobytes(), gone.times.tobytes())))
        self._parts = dict(meta.get("parts", {}))
        self.generation = meta["generation"]
        self.updated_at = float(meta.get("saved_at", 0.0))
        return True

    # --- what it holds ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._backend)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._row(image_id) is not None

    def _row(self, image_id: str, columns: list[str] | None = None) -> dict[str, Any] | None:
        found, rows = self._backend.lookup(np.array([image_key(image_id)]), columns)
        if not found[0]:
            return None
        row = rows.to_pylist()[0]
        if columns and "id" not in columns:
            return row
        return row if row["id"] == image_id else None

    @property
    def ids(self) -> list[str]:
        """Every indexed id, sorted (a list of them all: ``iter_ids`` streams)."""
        return sorted(i for chunk in self.iter_ids() for i in chunk)

    def iter_ids(self, batch: int = 65536) -> Iterator[list[str]]:
        """The indexed ids, ``batch`` at a time, in no particular order."""
        for table in self._backend.iter_rows(["id"], batch):
            yield table["id"].to_pylist()

    def first_id(self) -> str | None:
        """One indexed id (None when empty)."""
        for chunk in self.iter_ids(1):
            return chunk[0]
        return None

    def sample_ids(self, n: int, salt: str) -> list[str]:
        """``n`` ids spread over the whole catalogue, the same for the same ``salt`` and
        catalogue: those whose SHA-256 of ``salt/id`` is smallest, in that order (a
        batch of ids at a time: memory holds ``n`` of them, not the catalogue)."""
        import hashlib

        import pyarrow as pa

        best_scores = np.zeros(0, ">u8")
        best_ids = pa.array([], pa.string())
        for table in self._backend.iter_rows(["id"]):
            ids = table["id"].combine_chunks()
            digests = b"".join(
                hashlib.sha256(f"{salt}/{i}".encode()).digest()[:8] for i in ids.to_pylist()
            )
            scores = np.concatenate([best_scores, np.frombuffer(digests, ">u8")])
            keep = np.argsort(scores, kind="stable")[:n]
            best_scores = scores[keep]
            best_ids = pa.concat_arrays([best_ids, ids]).take(pa.array(keep))
        return best_ids.to_pylist()

    def shards(self) -> set[str]:
        """The shard keys that hold the indexed codes."""
        import pyarrow.compute as pc

        found: set[str] = set()
        for table in self._backend.iter_rows(["shard"]):
            found.update(pc.unique(table["shard"].cast("string")).to_pylist())
        return found

    def codes_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored codes of ``ids`` (``KeyError`` if one is not indexed)."""
        import pyarrow.compute as pc

        keys = image_keys(list(ids))
        found, rows = self._backend.lookup(keys, ["id"])
        if not found.all() or not pc.all(pc.equal(rows["id"], list(ids))).as_py():
            missing = [i for i, f in zip(ids, found, strict=True) if not f]
            raise KeyError(missing[0] if missing else "an id sharing its key with another")
        return self._backend.codes(keys) if len(keys) else np.zeros((0, self.code_bytes), np.uint8)

    def image(self, image_id: str) -> tuple[int, int, str]:
        """``(pixels, file bytes, image root)`` of an indexed image (``KeyError`` if none)."""
        row = self._row(image_id, ["id", "pixels", "file_bytes", "root"])
        if row is None:
            raise KeyError(image_id)
        return int(row["pixels"]), int(row["file_bytes"]), row["root"] or ""

    def rows(self, keys: np.ndarray, columns: list[str]) -> tuple[np.ndarray, Any]:
        """Whether each key is indexed, and the rows (``columns``) of those that are."""
        return self._backend.lookup(np.asarray(keys, np.int64), columns)

    def locations(self, ids: Sequence[str]) -> tuple[Any, np.ndarray]:
        """Where the codes (and features) of ``ids`` are: shard keys and rows."""
        import pyarrow.compute as pc

        found, rows = self._backend.lookup(image_keys(ids), ["id", "shard", "row"])
        if not found.all() or not pc.all(pc.equal(rows["id"], list(ids))).as_py():
            missing = [i for i, f in zip(ids, found, strict=True) if not f]
            raise KeyError(missing[0] if missing else "an id sharing its key with another")
        return rows["shard"].cast("string"), rows["row"].to_numpy()

    def code(self, image_id: str) -> np.ndarray:
        """The stored (unpadded) code of ``image_id``; ``KeyError`` if it is not indexed."""
        if self._row(image_id, ["id"]) is None:
            raise KeyError(image_id)
        return self._backend.codes(np.array([image_key(image_id)]))[0]

    @property
    def backend(self) -> CodeBackend:
        """The codes, under image keys (for searches over stored codes)."""
        return self._backend

    # --- searching ------------------------------------------------------------------------
    def search(self, codes: np.ndarray, k: int = 10, exact: bool = False) -> list[Neighbours]:
        """The ``k`` nearest stored codes to each of ``codes`` (``(n, bytes_per_code)``
        packed uint8), nearest first, ties broken by id (``exact`` compares every code
        even in an HNSW index)."""
        codes = np.atleast_2d(np.asarray(codes, np.uint8))
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        return self._search(codes, k, exact)

    def similar(self, image_id: str, k: int = 10) -> Neighbours:
        """The ``k`` nearest other images to an indexed one (``KeyError`` if unknown)."""
        found = self._search(self.code(image_id)[None], k + 1, False)[0]
        keep = [i for i, other in enumerate(found.ids) if other != image_id][:k]
        return Neighbours([found.ids[i] for i in keep], [found.distances[i] for i in keep])

    def query(
        self, images: Sequence[str | tuple[str, bytes]], k: int = 10, encoder: Any = None
    ) -> list[Any]:
        """Encode query images (paths, or ``(name, bytes)``) with the model the spec
        describes, through the encoder's image loader, and search for each: one
        ``QueryResult`` per image, a bad one with its status instead of results.
        ``encoder`` defaults to one built in this process (``EmbeddedQueryEncoder``)."""
        from search.query_encoder import QueryResult, answer_queries, read_query_file

        if encoder is None:
            encoder = self.embedded_encoder()
        read = [read_query_file(x) if isinstance(x, str) else x for x in images]
        readable = [x for x in read if not isinstance(x, QueryResult)]
        answers = iter(answer_queries(self, encoder, readable, k))
        return [x if isinstance(x, QueryResult) else next(answers) for x in read]

    def embedded_encoder(self, **kwargs: Any) -> Any:
        """The destination's model in this process, built on first use (TensorFlow)."""
        if self._embedded is None:
            from encoder.settings import process_settings
            from search.query_encoder import EmbeddedQueryEncoder

            self._embedded = EmbeddedQueryEncoder(
                self.storage, self.spec, process_settings(), **kwargs
            )
        return self._embedded

    def _search(self, queries: np.ndarray, k: int, exact: bool) -> list[Neighbours]:
        backend = self._backend
        total = len(backend)
        k = min(k, total)
        if k <= 0 or queries.shape[0] == 0:
            return [Neighbours() for _ in range(queries.shape[0])]
        fetch = min(total, k + TIE_MARGIN)
        while True:
            distances, keys = backend.search(queries, fetch, exact=exact)
            # Fetch more where the k-th distance ties with the last one fetched.
            width = distances.shape[1]
            if (
                fetch >= total
                or width < fetch
                or not (distances[:, k - 1] == distances[:, width - 1]).any()
            ):
                break
            fetch = min(total, fetch * 4)
        held = np.unique(keys[keys >= 0])
        found, rows = backend.lookup(held, ["id"])
        names = dict(zip(held[found].tolist(), rows["id"].to_pylist(), strict=True))
        results = []
        for row_d, row_k in zip(distances, keys, strict=True):
            pairs = sorted(
                (int(d), names[int(key)]) for d, key in zip(row_d, row_k, strict=True) if key >= 0
            )[:k]
            results.append(Neighbours([i for _, i in pairs], [d for d, _ in pairs]))
        return results

    def describe(self) -> dict[str, Any]:
        segments = self._backend.segments.segments if hasattr(self._backend, "segments") else ()
        return {
            "images": len(self),
            "kind": self.kind,
            "code_bytes": self.code_bytes,
            "fingerprint": self.spec.fingerprint,
            "layout": self.spec.layout,
            "backbone": self.spec.backbone,
            "generation": self.generation,
            "origin": self.origin,
            "segments": len(segments),
            "deleted": len(self._gone.keys),
        }


def sync_engine(dest: str | Storage) -> bool:
    """Bring a destination's search engine (a remote kind, such as Milvus) up to date
    with its manifest, waiting for another sync if one runs; False if it has none."""
    storage = open_storage(dest) if isinstance(dest, str) else dest
    meta = _read_meta(storage)
    if not meta or meta.get("kind") not in REMOTE_KINDS:
        return False
    Index.open(storage)
    return True


def milvus_options(storage: Storage, spec: CodeSpec, saved: dict[str, Any]) -> dict[str, Any]:
    """The Milvus backend's options: the settings (``IMGENC_MILVUS_*``) first, then what
    the last save recorded; the collection is the destination's and the spec's."""
    from encoder.settings import process_settings
    from search.milvus_backend import collection_name

    settings = process_settings()
    index_type = settings.milvus_index or saved.get("index_type")
    same_type = index_type == saved.get("index_type")
    return {
        "uri": settings.milvus_uri or saved.get("uri"),
        "token": settings.milvus_token,
        "collection": collection_name(storage.url, spec.fingerprint),
        "index_type": index_type,
        "nlist": saved["nlist"] if same_type and saved.get("nlist") else settings.milvus_nlist,
        "nprobe": settings.milvus_nprobe,
        "timeout": settings.milvus_timeout,
    }


def _read_meta(storage: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(META_KEY))
    except (KeyError, ValueError):
        return None


def _files(meta: dict[str, Any]) -> list[str]:
    """The files of a saved index that ``meta`` names (of this format or the one before)."""
    if meta.get("format") == FORMAT:
        kind = meta.get("kind", "flat")
        backend_cls = new_backend(kind, 8).__class__ if kind in BACKENDS else None
        files = backend_cls.files(INDEX_PREFIX, meta.get("backend", {})) if backend_cls else []
        return files + ([meta["gone"]] if meta.get("gone") else [])
    generation = meta.get("generation")
    if not generation:
        return []
    return [
        f"{INDEX_PREFIX}/{generation}{suffix}" for suffix in (".faiss", ".ids.json", ".facts.npz")
    ]
