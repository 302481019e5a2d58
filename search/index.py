"""``Index``: the nearest stored codes of a destination, by Hamming distance.

``Index.open(DEST)`` reads the destination's spec and indexes every ``ok`` code (the
manifest parts merged as ``encoder.manifest`` merges them: one row per image).  The codes
are held and searched by a ``search.backend.CodeBackend`` (faiss: exact by default,
``kind="hnsw"`` for an approximate graph, faster for large collections); the index keeps
the image ids (an image's key is its position in ``ids``), the per-image facts and the
persistence, and never touches the engine itself.

The index persists under ``DEST/index/``: ``meta.json`` (the spec fingerprint, the kind,
and the version of every manifest part it covers), then ``<generation>.faiss`` (what the
backend dumps), ``<generation>.ids.json`` and ``<generation>.facts.npz``.  ``open`` and
``refresh`` compare the parts with what the index covers: new parts are added
incrementally; a part rewritten, or an indexed image encoded again or recorded
``deleted`` (by a ``--resume`` that found it gone), rebuilds a new generation from the
merged parts, so a deleted image leaves ``search``, ``similar``, the near-duplicates and
the thumbnails at the next ``open`` or ``refresh``.  The index is never silently stale:
``stale`` says whether the destination moved on since the last ``refresh``.

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
from encoder.manifest import DELETED, OK, PARTS_PREFIX, Row, RowMerge, csv_to_rows
from encoder.spec import CodeSpec
from encoder.storage import Storage, StorageError, open_storage
from search.backend import BACKENDS, CodeBackend, new_backend

log = logging.getLogger("imgenc.search")

FORMAT = 2  # 2: codes under keys (faiss IndexBinaryIDMap2)
INDEX_PREFIX = "index"
META_KEY = f"{INDEX_PREFIX}/meta.json"
KINDS = tuple(BACKENDS)
DEFAULT_HNSW_M = 32  # graph neighbours per node
TIE_MARGIN = 16  # extra neighbours fetched to break ties at the k-th distance by id


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

    backend: CodeBackend
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
        self.code_bytes = spec.bytes_per_code
        self._state = _State(self._new_backend(), [], {}, {}, _Facts())
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
            touched: set[str] = set()
            new_images = _ok_images(self.storage, new_keys, touched)
            # An indexed image encoded again or recorded deleted: rebuild from the merged
            # parts (HNSW cannot remove, and a removal would shift the flat positions).
            if rewritten or any(i in state.positions for i in touched):
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
        state = _State(self._new_backend(), [], {}, {}, _Facts())
        return self._extend(state, images, parts)

    def _extend(self, state: _State, images: list[StoredImage], parts: dict[str, str]) -> _State:
        """A new state: ``state`` plus the codes of ``images`` (none of them indexed yet)."""
        ids = state.ids + [i.id for i in images]
        positions = dict(state.positions)
        positions.update((image.id, len(state.ids) + n) for n, image in enumerate(images))
        backend = state.backend
        if images:
            codes = codes_at(self.storage, self.spec, [(i.shard, i.row) for i in images])
            # Add to a copy: searches running on the current state never see a half-added index.
            backend = backend.copy()
            backend.add(np.arange(len(state.ids), len(ids), dtype=np.int64), codes)
        return _State(backend, ids, positions, parts, state.facts.extended(images))

    def _new_backend(self) -> CodeBackend:
        return new_backend(self.kind, self.code_bytes, hnsw_m=self.hnsw_m)

    # --- persistence ----------------------------------------------------------------------
    def save(self) -> None:
        """Write the index under ``DEST/index/``: data files first, ``meta.json`` last."""
        state, generation = self._state, self.generation or secrets.token_hex(6)
        self.generation = generation
        data = state.backend.dump()
        if data is not None:
            self.storage.put(f"{INDEX_PREFIX}/{generation}.faiss", data)
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
            "format": FORMAT,
            "generation": generation,
            "fingerprint": self.spec.fingerprint,
            "kind": self.kind,
            "hnsw_m": self.hnsw_m,
            "count": len(state.ids),
            "code_bytes": self.code_bytes,
            "parts": state.parts,
            "saved_at": time.time(),
        }
        self.storage.put(META_KEY, json.dumps(meta, indent=1).encode())
        if previous and previous.get("generation") not in (None, generation):
            for suffix in (".faiss", ".ids.json", ".facts.npz"):
                self.storage.delete(f"{INDEX_PREFIX}/{previous['generation']}{suffix}")

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
        backend = self._new_backend()
        try:
            generation = meta["generation"]
            ids = json.loads(self.storage.get(f"{INDEX_PREFIX}/{generation}.ids.json"))
            with np.load(
                io.BytesIO(self.storage.get(f"{INDEX_PREFIX}/{generation}.facts.npz"))
            ) as f:
                facts = _Facts(
                    f["pixels"], f["file_bytes"], f["root_index"], [str(r) for r in f["roots"]]
                )
            backend.load(self.storage.get(f"{INDEX_PREFIX}/{generation}.faiss"))
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
            return False  # damaged or partly written: rebuild
        if not len(backend) == len(ids) == meta.get("count") == len(facts.pixels):
            return False
        parts = dict(meta.get("parts", {}))
        positions = {image_id: i for i, image_id in enumerate(ids)}
        self._state = _State(backend, ids, positions, parts, facts)
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
        return state.backend.codes(np.array([state.positions[image_id]]))[0]

    def search(self, codes: np.ndarray, k: int = 10) -> list[Neighbours]:
        """The ``k`` nearest stored codes to each of ``codes`` (``(n, bytes_per_code)``
        packed uint8), nearest first, ties broken by id."""
        codes = np.atleast_2d(np.asarray(codes, np.uint8))
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        return self._search(self._state, codes, k)

    def similar(self, image_id: str, k: int = 10) -> Neighbours:
        """The ``k`` nearest other images to an indexed one (``KeyError`` if unknown)."""
        state = self._state
        found = self._search(state, self.code(image_id)[None], k + 1)[0]
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
        total = len(state.backend)
        k = min(k, total)
        if k <= 0 or queries.shape[0] == 0:
            return [Neighbours() for _ in range(queries.shape[0])]
        fetch = min(total, k + TIE_MARGIN)
        while True:
            distances, positions = state.backend.search(queries, fetch)
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

    @property
    def backend(self) -> CodeBackend:
        """The codes, keyed by position in ``ids`` (for searches over stored codes)."""
        return self._state.backend

    def exact(self) -> Index:
        """This index, or for HNSW an exact (flat) copy of the same codes, ids and rows."""
        if self._state.backend.exact:
            return self
        state = self._state
        flat = Index(self.storage, self.spec, "flat")
        flat._state = _State(
            state.backend.exact_copy(), state.ids, state.positions, state.parts, state.facts
        )
        flat.generation = self.generation
        return flat

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self),
            "kind": self.kind,
            "code_bytes": self.code_bytes,
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


def _ok_images(
    storage: Storage, part_keys: Sequence[str], touched: set[str] | None = None
) -> list[StoredImage]:
    """The images of these manifest parts whose row, one per image as the manifest merge
    keeps them (``encoder.manifest.RowMerge``: ok and deleted by time, a failure never
    over ok), is ok; sorted by id.  Parts are read 16 at a time and reduced to what the
    index keeps as they are parsed, so memory holds a few parts' rows at most, never the
    whole manifest as dicts.  ``touched``, when given, receives the id of every ``ok`` or
    ``deleted`` row read (what may change an image already indexed)."""
    merge: RowMerge[StoredImage | None] = RowMerge()

    def parse(key: str) -> list[tuple[str, str, str, StoredImage | None]]:
        return [
            (
                row["id"],
                row["status"],
                row.get("encoded_at", ""),
                _stored_image(row) if row["status"] == OK else None,
            )
            for row in csv_to_rows(storage.get(key))
        ]

    with ThreadPoolExecutor(max_workers=16) as pool:
        for start in range(0, len(part_keys), 16):
            for part in pool.map(parse, part_keys[start : start + 16]):
                for image_id, status, encoded_at, image in part:
                    merge.add(image_id, status, encoded_at, image)
                    if touched is not None and status in (OK, DELETED):
                        touched.add(image_id)
    return [image for _, ok, image in merge.winners() if ok and image is not None]


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
