"""The Milvus backend: a destination's codes held and searched by a Milvus server.

``imgenc index DEST --kind milvus`` puts the codes into Milvus (``IMGENC_MILVUS_URI``: a
server such as ``http://milvus:19530``, or a local ``file.db`` run by milvus-lite), and
every ``imgenc serve`` of the destination then searches there: a search server keeps no
copy of the codes and reads none to start, so several can answer behind one load
balancer, and the catalogue can outgrow one machine.

**The collection.**  One per destination and code fingerprint (``collection_name``), with
the image key as its primary key, the code as a ``BINARY_VECTOR`` (its bits padded with
zeros to a multiple of 8, which changes no distance) searched by ``HAMMING``, and the row
a search needs beside it (id, time, pixels, file bytes, root, shard and row).  Its index
is ``IMGENC_MILVUS_INDEX``: ``BIN_IVF_FLAT`` on a server (``IMGENC_MILVUS_NLIST``
clusters, ``IMGENC_MILVUS_NPROBE`` visited by a search; an exact search visits them all),
``BIN_FLAT`` on milvus-lite, the only one it has.  Reads use Strong consistency, so a
search sees every write acknowledged before it.

**Updates are idempotent.**  Codes go in by ``upsert`` on the key and out by ``delete``
on the key, so applying the same manifest rows twice leaves the collection as once: a sync
cut off half-way (the server killed) is completed by the next one, and nothing is doubled.
``search.index.Index`` serialises syncs (``search.sync_lock``) and records what they
covered in ``DEST/index/meta.json``.  Unlike the faiss backends, a search running during a
sync may see part of it.

**Limits** are Milvus's: at most 16,384 results per query (``MAX_RESULTS``) for a top-k
or a range search.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from encoder.storage import Storage

log = logging.getLogger("imgenc.search")

MAX_RESULTS = 16_384  # Milvus's cap on topk, range results and a query's rows
WRITE_ROWS = 4096  # rows per upsert message (well under gRPC's 64 MB)
KEYS_PER_QUERY = 4096  # keys in one ``key in [...]`` filter
QUERIES_PER_SEARCH = 256  # query codes per search call
WITHIN_FIRST_K = 64  # neighbours first asked for by ``within`` on an IVF index
DEFAULT_NLIST = 1024
DEFAULT_NPROBE = 64
FAR = np.iinfo(np.int32).max  # the distance of an empty result slot
TEXT_BYTES = 65_535  # VARCHAR's largest max_length
CONSISTENCY = "Strong"
CALL_SECONDS = 60  # one call's limit (with retries): a server gone away fails a sync
# Row columns (search.segments.row_schema) -> collection fields.
FIELDS = {
    "key": "key",
    "id": "image_id",
    "time": "time",
    "pixels": "pixels",
    "file_bytes": "file_bytes",
    "root": "root",
    "shard": "shard",
    "row": "row",
}


class MilvusUnavailable(RuntimeError):
    """No Milvus to talk to (no URI, the client not installed, or the server down)."""


def collection_name(destination_url: str, fingerprint: str) -> str:
    """The collection of a destination's codes of one spec (names allow [A-Za-z0-9_])."""
    where = hashlib.sha256(destination_url.encode()).hexdigest()[:16]
    spec = re.sub(r"[^0-9A-Za-z]", "", fingerprint)[:16]
    return f"imgenc_{where}_{spec}"


def is_lite(uri: str) -> bool:
    """A local ``.db`` file (milvus-lite) rather than a server address."""
    return uri.endswith(".db")


class MilvusBackend:
    kind = "milvus"
    remote = True  # the engine keeps the codes: nothing is saved beside the destination

    def __init__(
        self,
        code_bytes: int,
        uri: str | None = None,
        token: str | None = None,
        collection: str | None = None,
        index_type: str | None = None,
        nlist: int = DEFAULT_NLIST,
        nprobe: int = DEFAULT_NPROBE,
        timeout: int = CALL_SECONDS,
        **_: Any,
    ) -> None:
        self.code_bytes = code_bytes
        self.uri = uri
        self.token = token
        self.collection = collection or "imgenc"
        self.index_type = index_type or ("BIN_FLAT" if uri and is_lite(uri) else "BIN_IVF_FLAT")
        if self.index_type not in ("BIN_FLAT", "BIN_IVF_FLAT"):
            raise ValueError(
                f"milvus index must be BIN_FLAT or BIN_IVF_FLAT, not {self.index_type!r}"
            )
        self.nlist, self.nprobe = nlist, min(nprobe, nlist)
        self.exact = self.index_type == "BIN_FLAT" or self.nprobe >= self.nlist
        self.timeout = int(timeout)  # pymilvus bounds its retries by an int timeout only
        self.added = 0  # codes written by updates in this process
        self.removed = 0  # keys deleted by updates in this process
        self._client: Any = None

    # --- the connection and the collection ---------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            if not self.uri:
                raise MilvusUnavailable(
                    "the milvus index needs a server: set IMGENC_MILVUS_URI (an address "
                    "such as http://localhost:19530, or a local file.db for milvus-lite)"
                )
            try:
                from pymilvus import MilvusClient
            except ImportError as exc:
                raise MilvusUnavailable(
                    "the milvus index needs pymilvus: pip install 'imgenc[milvus]'"
                ) from exc
            try:
                with warnings.catch_warnings():  # milvus-lite's own "pkg_resources is deprecated"
                    warnings.simplefilter("ignore", UserWarning)
                    self._client = MilvusClient(uri=self.uri, token=self.token or "")
            except Exception as exc:  # pymilvus raises MilvusException, grpc errors...
                raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: {exc}") from exc
        return self._client

    @property
    def dim(self) -> int:
        return self.code_bytes * 8  # already a multiple of 8: the padding bits are zeros

    def create(self) -> None:
        """A new, empty collection (dropping one of the same name)."""
        from pymilvus import DataType

        client = self.client
        if client.has_collection(self.collection, timeout=self.timeout):
            client.drop_collection(self.collection, timeout=self.timeout)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.INT64, is_primary=True)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=self.dim)
        schema.add_field("image_id", DataType.VARCHAR, max_length=TEXT_BYTES)
        for name in ("time", "pixels", "file_bytes"):
            schema.add_field(name, DataType.INT64)
        schema.add_field("root", DataType.VARCHAR, max_length=TEXT_BYTES)
        schema.add_field("shard", DataType.VARCHAR, max_length=TEXT_BYTES)
        schema.add_field("row", DataType.INT64)
        params = client.prepare_index_params()
        options = {"nlist": self.nlist} if self.index_type == "BIN_IVF_FLAT" else {}
        params.add_index("code", index_type=self.index_type, metric_type="HAMMING", params=options)
        client.create_collection(
            self.collection,
            schema=schema,
            index_params=params,
            consistency_level=CONSISTENCY,
            timeout=self.timeout,
        )
        log.info(
            "milvus collection %s created at %s (%s)", self.collection, self.uri, self.index_type
        )

    def clear(self) -> None:
        """Start from an empty collection (a rebuild)."""
        self.create()

    def drop(self) -> None:
        if self.client.has_collection(self.collection, timeout=self.timeout):
            self.client.drop_collection(self.collection, timeout=self.timeout)

    def __len__(self) -> int:
        result = self.client.query(
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=CONSISTENCY,
            timeout=self.timeout,
        )
        return int(result[0]["count(*)"])

    # --- codes in ------------------------------------------------------------------------------
    def update(self, rows: Any, codes: np.ndarray, remove: np.ndarray) -> None:
        """Upsert ``codes`` with their ``rows`` under their keys, then delete the keys of
        ``remove`` that were not just written.  Idempotent: the same call twice leaves
        the collection as one does."""
        added = np.zeros(0, np.int64)
        if rows is not None and rows.num_rows:
            codes = np.ascontiguousarray(codes, dtype=np.uint8)
            if codes.shape != (rows.num_rows, self.code_bytes):
                raise ValueError(
                    f"codes of shape {codes.shape}; rows {rows.num_rows} x {self.code_bytes}"
                )
            added = rows["key"].to_numpy().astype(np.int64)
            for start in range(0, rows.num_rows, WRITE_ROWS):
                chunk = rows.slice(start, WRITE_ROWS)
                self.client.upsert(
                    self.collection,
                    _entities(chunk, codes[start : start + WRITE_ROWS]),
                    timeout=self.timeout,
                )
            self.added += rows.num_rows
        remove = np.setdiff1d(np.asarray(remove, np.int64), added)
        for start in range(0, len(remove), KEYS_PER_QUERY):
            batch = remove[start : start + KEYS_PER_QUERY].tolist()
            self.client.delete(self.collection, ids=batch, timeout=self.timeout)
        self.removed += len(remove)

    # --- rows and codes out --------------------------------------------------------------------
    def _query_keys(self, keys: np.ndarray, fields: list[str]) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        unique = np.unique(np.asarray(keys, np.int64))
        for start in range(0, len(unique), KEYS_PER_QUERY):
            batch = unique[start : start + KEYS_PER_QUERY].tolist()
            for hit in self.client.query(
                self.collection,
                filter=f"key in {batch}",
                output_fields=fields,
                consistency_level=CONSISTENCY,
                timeout=self.timeout,
            ):
                found[int(hit["key"])] = hit
        return found

    def lookup(self, keys: np.ndarray, columns: list[str] | None = None) -> tuple[np.ndarray, Any]:
        """Whether each key is held, and the rows of those held, in the order of ``keys``."""
        columns = list(columns or FIELDS)
        keys = np.asarray(keys, np.int64)
        hits = self._query_keys(keys, [FIELDS[c] for c in columns if c != "key"])
        found = np.array([int(k) in hits for k in keys.tolist()], bool)
        held = [hits[int(k)] for k in keys[found].tolist()]
        return found, _table(held, columns)

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """The stored codes under ``keys``, in their order (``KeyError`` if one is unknown)."""
        keys = np.asarray(keys, np.int64)
        hits = self._query_keys(keys, ["code"])
        out = np.empty((len(keys), self.code_bytes), np.uint8)
        for i, key in enumerate(keys.tolist()):
            if key not in hits:
                raise KeyError(key)
            out[i] = np.frombuffer(_vector_bytes(hits[key]["code"]), np.uint8)
        return out

    def _iterate(self, fields: list[str], batch: int) -> Iterator[list[dict[str, Any]]]:
        iterator = self.client.query_iterator(
            self.collection,
            batch_size=max(1, min(batch, MAX_RESULTS)),
            filter="",
            output_fields=fields,
            consistency_level=CONSISTENCY,
            timeout=self.timeout,
        )
        try:
            while True:
                page = iterator.next()
                if not page:
                    return
                yield page
        finally:
            iterator.close()

    def iter_codes(
        self, batch: int = 65536, padded: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(keys, codes)`` of every stored code, a page at a time (never padded)."""
        for page in self._iterate(["key", "code"], batch):
            keys = np.fromiter((int(h["key"]) for h in page), np.int64, len(page))
            joined = b"".join(_vector_bytes(h["code"]) for h in page)
            yield keys, np.frombuffer(joined, np.uint8).reshape(len(page), self.code_bytes)

    def iter_rows(self, columns: list[str], batch: int = 65536) -> Iterator[Any]:
        """The rows of every stored code, a page at a time (Arrow tables)."""
        for page in self._iterate(["key", *(FIELDS[c] for c in columns if c != "key")], batch):
            yield _table(page, columns)

    # --- searching -------------------------------------------------------------------------------
    def _search_params(self, exact: bool, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(extra)
        if self.index_type == "BIN_IVF_FLAT":
            params["nprobe"] = self.nlist if exact else self.nprobe
        return {"metric_type": "HAMMING", "params": params}

    def _search(self, codes: np.ndarray, limit: int, params: dict[str, Any]) -> list[Any]:
        codes = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        hits: list[Any] = []
        for start in range(0, len(codes), QUERIES_PER_SEARCH):
            chunk = codes[start : start + QUERIES_PER_SEARCH]
            hits.extend(
                self.client.search(
                    self.collection,
                    data=[c.tobytes() for c in chunk],
                    anns_field="code",
                    limit=limit,
                    search_params=params,
                    consistency_level=CONSISTENCY,
                    timeout=self.timeout,
                )
            )
        return hits

    def search(
        self, codes: np.ndarray, k: int, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, keys)``, each ``(n, k)``, nearest first; key -1 where fewer are
        held (at most ``MAX_RESULTS`` per query)."""
        k = max(1, min(k, MAX_RESULTS))
        hits = self._search(codes, k, self._search_params(exact))
        distances = np.full((len(hits), k), FAR, np.int64)
        keys = np.full((len(hits), k), -1, np.int64)
        for i, row in enumerate(hits):
            for j, hit in enumerate(row):
                distances[i, j] = int(round(hit["distance"]))
                keys[i, j] = int(hit["id"])
        return distances, keys

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each of ``codes``, ``(distances, keys)`` of every stored code within
        ``max_distance`` bits, nearest first, exactly.  On BIN_FLAT a range search
        (``radius`` is exclusive).  On BIN_IVF_FLAT an exact top-k search (every cluster
        visited), widened for the codes whose k-th result is still within reach: Milvus
        2.3's range search on an IVF index missed pairs that its top-k search finds."""
        codes = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
        if self.index_type == "BIN_FLAT":
            params = self._search_params(True, radius=max_distance + 1)
            rows = self._search(codes, MAX_RESULTS, params)
            found = [_hits(row) for row in rows]
            capped = sum(len(row) >= MAX_RESULTS for row in rows)
        else:
            found = [None] * len(codes)
            todo, k, capped = np.arange(len(codes)), WITHIN_FIRST_K, 0
            while len(todo):
                distances, keys = self.search(codes[todo], k, exact=True)
                full = (distances[:, -1] <= max_distance) & (keys[:, -1] >= 0)
                if k >= MAX_RESULTS:
                    capped += int(full.sum())
                    full[:] = False
                for i in np.flatnonzero(~full):
                    near = (distances[i] <= max_distance) & (keys[i] >= 0)
                    found[todo[i]] = (distances[i][near], keys[i][near])
                todo, k = todo[full], min(k * 8, MAX_RESULTS)
        if capped:
            log.warning(
                "%d codes have more than %d stored codes within %d bits (Milvus's cap): "
                "the nearest %d of each were kept", capped, MAX_RESULTS, max_distance, MAX_RESULTS,
            )  # fmt: skip
        out = []
        for distances, keys in found:  # type: ignore[misc]
            order = np.lexsort((keys, distances))
            out.append((distances[order], keys[order]))
        return out

    # --- persistence ------------------------------------------------------------------------------
    def save(self, storage: Storage, prefix: str) -> dict[str, Any]:
        """Nothing to write beside the destination: flush the collection's writes into
        sealed segments and say where it is."""
        self.client.flush(self.collection, timeout=self.timeout)
        return {
            "uri": self.uri,
            "collection": self.collection,
            "index_type": self.index_type,
            "nlist": self.nlist,
            "dim": self.dim,
        }

    def load(self, storage: Storage, prefix: str, meta: dict[str, Any]) -> None:
        """Reconnect to the collection ``meta`` names (``KeyError`` if it is not there or
        holds codes of another size); reads no codes."""
        if meta.get("collection") != self.collection or meta.get("dim") != self.dim:
            raise KeyError(f"collection {meta.get('collection')!r} of dim {meta.get('dim')}")
        if meta.get("index_type") != self.index_type or meta.get("nlist") != self.nlist:
            raise KeyError(f"the collection has a {meta.get('index_type')} index")
        if not self.client.has_collection(self.collection, timeout=self.timeout):
            raise KeyError(f"no collection {self.collection} at {self.uri}")
        self.client.load_collection(self.collection, timeout=self.timeout)

    @staticmethod
    def files(prefix: str, meta: dict[str, Any]) -> list[str]:
        return []


def _hits(row: Any) -> tuple[np.ndarray, np.ndarray]:
    """One query's search hits as ``(distances, keys)``."""
    distances = np.array([int(round(h["distance"])) for h in row], np.int64)
    return distances, np.array([int(h["id"]) for h in row], np.int64)


def _entities(rows: Any, codes: np.ndarray) -> list[dict[str, Any]]:
    """Collection entities of a slice of rows (``search.segments.row_schema``)."""
    import pyarrow.compute as pc

    columns = {
        field: (rows[column].cast("string") if column in ("root", "shard") else rows[column])
        for column, field in FIELDS.items()
    }
    values = {field: pc.fill_null(array, "" if array.type == "string" else 0).to_pylist()
              for field, array in columns.items()}  # fmt: skip
    return [
        {**{field: values[field][i] for field in values}, "code": codes[i].tobytes()}
        for i in range(rows.num_rows)
    ]


def _table(hits: list[dict[str, Any]], columns: list[str]) -> Any:
    """Query hits as an Arrow table of row columns."""
    import pyarrow as pa

    from search.segments import row_schema

    schema = row_schema()
    arrays = {}
    for column in columns:
        kind = schema.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        arrays[column] = pa.array([h[FIELDS[column]] for h in hits], kind)
    return pa.table(arrays) if arrays else pa.table({"key": pa.array([], pa.int64())})


def _vector_bytes(value: Any) -> bytes:
    """A binary vector as a query returns it: bytes, or a list holding them."""
    if isinstance(value, list | tuple):
        value = value[0]
    return bytes(value)
