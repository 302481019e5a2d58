"""``Index``: the nearest stored codes of a destination, by Hamming distance, with faiss.

``Index.open(DEST)`` reads the destination's spec and indexes every ``ok`` code (the
manifest parts merged as ``encoder.manifest`` merges them: one row per image).  The index
is exact by default (faiss ``IndexBinaryFlat``); ``kind="hnsw"`` builds an
``IndexBinaryHNSW`` graph, approximate and faster for large collections.

Codes of up to 64 bytes are zero-padded to the next size faiss has a fast Hamming kernel
for (4, 8, 16, 20, 32 or 64 bytes: a 63-byte pooled code becomes 64); padding adds the same
zero bits to every code, so distances do not change.  Longer codes (3,063-byte spatial
ones) use faiss's generic kernel.

The index persists under ``DEST/index/``: ``meta.json`` (the spec fingerprint, the kind,
and the version of every manifest part it covers), then ``<generation>.faiss`` and
``<generation>.ids.json``.  ``open`` and ``refresh`` compare the parts with what the
index covers: new parts are added incrementally; a part rewritten, or an indexed image
encoded again, rebuilds.  The index is never silently stale: ``stale`` says whether the
destination moved on since the last ``refresh``.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from encoder.codes import codes_at, read_spec
from encoder.manifest import PARTS_PREFIX, Row, csv_to_rows, row_rank
from encoder.spec import CodeSpec
from encoder.storage import Storage, StorageError, open_storage

log = logging.getLogger("imgenc.search")
logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every import

INDEX_PREFIX = "index"
META_KEY = f"{INDEX_PREFIX}/meta.json"
KINDS = ("flat", "hnsw")
FAST_CODE_BYTES = (4, 8, 16, 20, 32, 64)  # faiss's specialised Hamming kernels
DEFAULT_HNSW_M = 32  # graph neighbours per node
DEFAULT_HNSW_EF_SEARCH = 128
TIE_MARGIN = 16  # extra neighbours fetched to break ties at the k-th distance by id


def stored_bytes(code_bytes: int) -> int:
    """The code size the index holds: padded up to a fast faiss kernel when it fits one."""
    return next((n for n in FAST_CODE_BYTES if n >= code_bytes), code_bytes)


@dataclass
class Neighbours:
    """One query's results: image ids and Hamming distances, nearest first."""

    ids: list[str] = field(default_factory=list)
    distances: list[int] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"id": i, "distance": d} for i, d in zip(self.ids, self.distances, strict=True)]


class StoredImage(NamedTuple):
    """What the index keeps of an ok manifest row: where its code is, and what the
    near-duplicate keep rule and the thumbnails need."""

    id: str
    shard: str
    row: int
    pixels: int  # width x height as stored (0 when unknown)
    file_bytes: int
    root: str  # the image root it was encoded under (its path without its id)


@dataclass
class _Facts:
    """Per-position arrays of what ``StoredImage`` holds beyond the code: a few bytes per
    image instead of a manifest row's dict."""

    pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    root_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    roots: list[str] = field(default_factory=list)

    def extended(self, images: list[StoredImage]) -> _Facts:
        roots = list(self.roots)
        known = {r: i for i, r in enumerate(roots)}
        for image in images:
            if image.root not in known:
                known[image.root] = len(roots)
                roots.append(image.root)
        return _Facts(
            np.concatenate([self.pixels, np.array([i.pixels for i in images], np.int64)]),
            np.concatenate([self.file_bytes, np.array([i.file_bytes for i in images], np.int64)]),
            np.concatenate([self.root_index, np.array([known[i.root] for i in images], np.int32)]),
            roots,
        )


@dataclass
class _State:
    """What a search reads, swapped as a whole when the index changes."""

    faiss_index: Any
    ids: list[str]
    positions: dict[str, int]
    parts: dict[str, str]  # manifest part key -> version covered
    facts: _Facts


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
        self.ef_search = DEFAULT_HNSW_EF_SEARCH
        self.code_bytes = spec.bytes_per_code
        self.stored_bytes = stored_bytes(self.code_bytes)
        self._state = _State(self._new_faiss(), [], {}, {}, _Facts())
        self._lock = threading.Lock()  # one refresh at a time
        self.generation = ""
        self.updated_at = 0.0
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
    def stale(self) -> bool:
        """True when the destination holds manifest parts this index does not cover."""
        return self.storage.list_versions(PARTS_PREFIX) != self._state.parts

    def refresh(self, save: bool = True) -> bool:
        """Cover what the destination holds now; returns whether anything changed."""
        with self._lock:
            current = self.storage.list_versions(PARTS_PREFIX)
            state = self._state
            if current == state.parts:
                return False
            rewritten = [k for k, v in state.parts.items() if current.get(k) != v]
            new_keys = [k for k in current if k not in state.parts]
            new_images = _ok_images(self.storage, new_keys)
            if rewritten or any(i.id in state.positions for i in new_images):
                self._state = self._build(current)
            else:
                self._state = self._extend(state, new_images, current)
            self.generation = secrets.token_hex(6)
            self.updated_at = time.time()
            if save:
                self.save()
            return True

    def _build(self, parts: dict[str, str]) -> _State:
        images = _ok_images(self.storage, list(parts))
        state = _State(self._new_faiss(), [], {}, {}, _Facts())
        return self._extend(state, images, parts)

    def _extend(self, state: _State, images: list[StoredImage], parts: dict[str, str]) -> _State:
        """A new state: ``state`` plus the codes of ``images`` (none of them indexed yet)."""
        import faiss

        ids = state.ids + [i.id for i in images]
        positions = dict(state.positions)
        positions.update((image.id, len(state.ids) + n) for n, image in enumerate(images))
        faiss_index = state.faiss_index
        if images:
            locations = [(i.shard, i.row) for i in images]
            codes = self._pad(codes_at(self.storage, self.spec, locations))
            # Add to a copy: searches running on the current state never see a half-added index.
            faiss_index = (
                faiss.clone_binary_index(faiss_index) if faiss_index.ntotal else self._new_faiss()
            )
            faiss_index.add(codes)
        return _State(faiss_index, ids, positions, parts, state.facts.extended(images))

    def _new_faiss(self) -> Any:
        import faiss

        bits = self.stored_bytes * 8
        if self.kind == "hnsw":
            index = faiss.IndexBinaryHNSW(bits, self.hnsw_m)
            index.hnsw.efSearch = self.ef_search
            return index
        return faiss.IndexBinaryFlat(bits)

    def _pad(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.shape[1] == self.stored_bytes:
            return codes
        padded = np.zeros((codes.shape[0], self.stored_bytes), np.uint8)
        padded[:, : codes.shape[1]] = codes
        return padded

    # --- persistence ----------------------------------------------------------------------
    def save(self) -> None:
        """Write the index under ``DEST/index/``: data files first, ``meta.json`` last."""
        import faiss

        state, generation = self._state, self.generation or secrets.token_hex(6)
        self.generation = generation
        data = faiss.serialize_index_binary(state.faiss_index)
        self.storage.put(f"{INDEX_PREFIX}/{generation}.faiss", np.asarray(data).tobytes())
        self.storage.put(f"{INDEX_PREFIX}/{generation}.ids.json", json.dumps(state.ids).encode())
        facts = io.BytesIO()
        np.savez(
            facts,
            pixels=state.facts.pixels,
            file_bytes=state.facts.file_bytes,
            root_index=state.facts.root_index,
            roots=np.array(state.facts.roots, dtype=str),
        )
        self.storage.put(f"{INDEX_PREFIX}/{generation}.facts.npz", facts.getvalue())
        previous = _read_meta(self.storage)
        meta = {
            "format": 1,
            "generation": generation,
            "fingerprint": self.spec.fingerprint,
            "kind": self.kind,
            "hnsw_m": self.hnsw_m,
            "count": len(state.ids),
            "code_bytes": self.code_bytes,
            "stored_bytes": self.stored_bytes,
            "parts": state.parts,
            "saved_at": time.time(),
            "faiss": faiss.__version__,
        }
        self.storage.put(META_KEY, json.dumps(meta, indent=1).encode())
        if previous and previous.get("generation") not in (None, generation):
            for suffix in (".faiss", ".ids.json", ".facts.npz"):
                self.storage.delete(f"{INDEX_PREFIX}/{previous['generation']}{suffix}")

    def _load(self, meta: dict[str, Any]) -> bool:
        """Adopt the persisted index if it fits this spec and kind; False otherwise."""
        import faiss

        if (
            meta.get("format") != 1
            or meta.get("fingerprint") != self.spec.fingerprint
            or meta.get("kind") != self.kind
            or meta.get("stored_bytes") != self.stored_bytes
            or (self.kind == "hnsw" and meta.get("hnsw_m") != self.hnsw_m)
        ):
            return False
        try:
            generation = meta["generation"]
            data = self.storage.get(f"{INDEX_PREFIX}/{generation}.faiss")
            ids = json.loads(self.storage.get(f"{INDEX_PREFIX}/{generation}.ids.json"))
            with np.load(
                io.BytesIO(self.storage.get(f"{INDEX_PREFIX}/{generation}.facts.npz"))
            ) as f:
                facts = _Facts(
                    f["pixels"], f["file_bytes"], f["root_index"], [str(r) for r in f["roots"]]
                )
            faiss_index = faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))
        except (KeyError, ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile):
            return False  # damaged or partly written (faiss raises RuntimeError): rebuild
        if not faiss_index.ntotal == len(ids) == meta.get("count") == len(facts.pixels):
            return False
        if self.kind == "hnsw":
            faiss_index.hnsw.efSearch = self.ef_search
        parts = dict(meta.get("parts", {}))
        positions = {image_id: i for i, image_id in enumerate(ids)}
        self._state = _State(faiss_index, ids, positions, parts, facts)
        self.generation = generation
        self.updated_at = float(meta.get("saved_at", 0.0))
        return True

    # --- searching ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._state.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._state.positions

    @property
    def ids(self) -> list[str]:
        return list(self._state.ids)

    def image(self, image_id: str) -> tuple[int, int, str]:
        """``(pixels, file bytes, image root)`` of an indexed image (``KeyError`` if none)."""
        state = self._state
        position = state.positions[image_id]
        facts = state.facts
        root = facts.roots[facts.root_index[position]]
        return int(facts.pixels[position]), int(facts.file_bytes[position]), root

    def code(self, image_id: str) -> np.ndarray:
        """The stored (unpadded) code of ``image_id``; ``KeyError`` if it is not indexed."""
        state = self._state
        position = state.positions[image_id]
        return state.faiss_index.reconstruct(position)[: self.code_bytes]

    def search(self, codes: np.ndarray, k: int = 10) -> list[Neighbours]:
        """The ``k`` nearest stored codes to each of ``codes`` (``(n, bytes_per_code)``
        packed uint8), nearest first, ties broken by id."""
        codes = np.atleast_2d(np.asarray(codes, np.uint8))
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        return self._search(self._state, self._pad(codes), k)

    def similar(self, image_id: str, k: int = 10) -> Neighbours:
        """The ``k`` nearest other images to an indexed one (``KeyError`` if unknown)."""
        state = self._state
        query = self._pad(self.code(image_id)[None])
        found = self._search(state, query, k + 1)[0]
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

    def _search(self, state: _State, queries: np.ndarray, k: int) -> list[Neighbours]:
        total = state.faiss_index.ntotal
        k = min(k, total)
        if k <= 0 or queries.shape[0] == 0:
            return [Neighbours() for _ in range(queries.shape[0])]
        fetch = min(total, k + TIE_MARGIN)
        while True:
            if self.kind == "hnsw":
                state.faiss_index.hnsw.efSearch = max(self.ef_search, fetch)
            distances, positions = state.faiss_index.search(queries, fetch)
            # Fetch more where the k-th distance ties with the last one fetched.
            if fetch >= total or not (distances[:, k - 1] == distances[:, fetch - 1]).any():
                break
            fetch = min(total, fetch * 4)
        results = []
        for row_d, row_p in zip(distances, positions, strict=True):
            pairs = sorted(
                (int(d), state.ids[p]) for d, p in zip(row_d, row_p, strict=True) if p >= 0
            )[:k]
            results.append(Neighbours([i for _, i in pairs], [d for d, _ in pairs]))
        return results

    def raw_search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's own ``(distances, positions)`` for already padded codes (for duplicates)."""
        return self._state.faiss_index.search(codes, k)

    def exact(self) -> Index:
        """This index, or for HNSW an exact (flat) copy of the same codes, ids and rows."""
        if self.kind == "flat":
            return self
        state = self._state
        flat = Index(self.storage, self.spec, "flat")
        codes = state.faiss_index.reconstruct_n(0, state.faiss_index.ntotal)
        faiss_index = flat._new_faiss()
        faiss_index.add(codes)
        flat._state = _State(faiss_index, state.ids, state.positions, state.parts, state.facts)
        flat.generation = self.generation
        return flat

    def range_search(
        self, codes: np.ndarray, radius: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss's ``(lims, distances, positions)`` of every stored code closer than
        ``radius`` to each of the padded ``codes``."""
        return self._state.faiss_index.range_search(codes, radius)

    def padded_codes(self, start: int, stop: int) -> np.ndarray:
        """Stored codes at positions ``start:stop``, as the index holds them (padded)."""
        return self._state.faiss_index.reconstruct_n(start, stop - start)

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self),
            "kind": self.kind,
            "code_bytes": self.code_bytes,
            "stored_bytes": self.stored_bytes,
            "fingerprint": self.spec.fingerprint,
            "layout": self.spec.layout,
            "backbone": self.spec.backbone,
            "generation": self.generation,
            "origin": self.origin,
        }


def _read_meta(storage: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(META_KEY))
    except (KeyError, ValueError):
        return None


def _ok_images(storage: Storage, part_keys: Sequence[str]) -> list[StoredImage]:
    """The images of these manifest parts whose row, one per image as the manifest merge
    keeps them (ok beats failure, then the latest), is ok; sorted by id.  Parts are read
    16 at a time and reduced to what the index keeps as they are parsed, so memory holds
    a few parts' rows at most, never the whole manifest as dicts."""
    best: dict[str, tuple[tuple[int, str], StoredImage | None]] = {}

    def parse(key: str) -> list[tuple[tuple[int, str], StoredImage | None, str]]:
        return [
            (row_rank(row), _stored_image(row) if row["status"] == "ok" else None, row["id"])
            for row in csv_to_rows(storage.get(key))
        ]

    with ThreadPoolExecutor(max_workers=16) as pool:
        for start in range(0, len(part_keys), 16):
            for part in pool.map(parse, part_keys[start : start + 16]):
                for rank, image, image_id in part:
                    current = best.get(image_id)
                    if current is None or rank >= current[0]:
                        best[image_id] = (rank, image)
    return [image for _, (_, image) in sorted(best.items()) if image is not None]


def _stored_image(row: Row) -> StoredImage:
    def number(name: str) -> int:
        try:
            return int(row.get(name) or 0)
        except ValueError:
            return 0

    image_id, path = row["id"], row.get("path", "")
    root = path[: -len(image_id) - 1] if path.endswith("/" + image_id) else ""
    return StoredImage(
        image_id,
        row["shard"],
        int(row["row"]),
        number("width") * number("height"),
        number("size"),
        root or ("/" if path == "/" + image_id else ""),
    )
