"""The search-backend seam: where a destination's codes are held and searched.

``Index`` (the manifest parts it covers, the merge rule, deletions) talks to a
``CodeBackend`` and never to a search engine directly.  A backend stores packed codes
under image keys (``encoder.keys``), each with its row (``search.segments.row_schema``:
the id and the facts a search needs), answers the k nearest and the within-a-radius
searches by Hamming distance, and **owns its persistence**: ``save`` writes what it has not
written yet and returns what ``load`` needs to find it again (a server-side engine such
as Milvus returns where its collection is, and its ``load`` reconnects).  Results are
plain arrays, nearest first; ties and ids are the ``Index``'s business.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from encoder.storage import Storage

BACKENDS = {  # index kind -> "module:class"
    "flat": "search.faiss_backend:FaissFlat",
    "hnsw": "search.faiss_backend:FaissHNSW",
    "milvus": "search.milvus_backend:MilvusBackend",
}
REMOTE_KINDS = ("milvus",)  # engines of their own, which every process shares


class CodeBackend(Protocol):
    kind: str
    exact: bool  # True when searches are exhaustive (every code compared)
    added: int  # codes added by updates in this process (new and re-encoded images)

    def __len__(self) -> int: ...

    def update(self, rows: Any, codes: np.ndarray, remove: np.ndarray) -> None:
        """Add ``codes`` (``(n, code_bytes)`` uint8) with their ``rows`` (an Arrow table,
        key first), and forget the codes under ``remove`` and under the added keys;
        searches see all of it or none."""
        ...

    def lookup(self, keys: np.ndarray, columns: list[str] | None = None) -> tuple[np.ndarray, Any]:
        """Whether each key is held, and the rows of those held, in the order of ``keys``."""
        ...

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """The stored codes under ``keys``, in their order (``KeyError`` if one is unknown)."""
        ...

    def iter_codes(
        self, batch: int = 65536, padded: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(keys, codes)`` of every stored code, ``batch`` at a time (``padded``: zero
        bytes may follow each code)."""
        ...

    def iter_rows(self, columns: list[str], batch: int = 65536) -> Iterator[Any]:
        """The rows of every stored code, ``batch`` at a time (Arrow tables)."""
        ...

    def search(
        self, codes: np.ndarray, k: int, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, keys)``, each ``(n, k)``, nearest first; key -1 where fewer are
        held.  ``exact`` compares every code even where the backend is approximate."""
        ...

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each of ``codes``, ``(distances, keys)`` of every stored code within
        ``max_distance`` bits (inclusive), nearest first."""
        ...

    def save(self, storage: Storage, prefix: str) -> dict[str, Any]:
        """Persist what is not persisted yet; return what ``load`` needs (JSON-able)."""
        ...

    def load(self, storage: Storage, prefix: str, meta: dict[str, Any]) -> None:
        """Take back what ``save`` described; ``ValueError`` or ``KeyError`` if damaged."""
        ...

    @staticmethod
    def files(prefix: str, meta: dict[str, Any]) -> list[str]:
        """The storage keys a ``save`` that returned ``meta`` wrote."""
        ...


def new_backend(kind: str, code_bytes: int, **options: Any) -> CodeBackend:
    """An empty backend of ``kind`` for codes of ``code_bytes`` bytes."""
    if kind not in BACKENDS:
        raise ValueError(f"index kind must be one of {tuple(BACKENDS)}, not {kind!r}")
    module, _, name = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)(code_bytes, **options)
