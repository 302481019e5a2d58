"""The search-backend seam: where a destination's codes are held and searched.

``Index`` (ids, per-image facts, persistence, freshness) talks to a ``CodeBackend`` and
never to a search engine directly.  A backend stores packed codes under integer keys and
answers the k nearest and the within-a-radius searches by Hamming distance.  Its results
are plain arrays, one entry per hit, nearest first; ties and ids are the ``Index``'s
business.  faiss (exact, or HNSW) is the one engine today (``search.faiss_backend``); a
server-side engine such as Milvus is one new module and one line in ``BACKENDS``: its
``dump`` can return ``None`` (the engine keeps the data) and ``load`` reconnect.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

BACKENDS = {  # index kind -> "module:class"
    "flat": "search.faiss_backend:FaissFlat",
    "hnsw": "search.faiss_backend:FaissHNSW",
}


class CodeBackend(Protocol):
    kind: str
    exact: bool  # True when searches are exhaustive (every code compared)

    def __len__(self) -> int: ...

    def add(self, keys: np.ndarray, codes: np.ndarray) -> None:
        """Store ``codes`` (``(n, code_bytes)`` uint8) under ``keys`` (``(n,)`` int64)."""
        ...

    def remove(self, keys: np.ndarray) -> None:
        """Forget the codes under ``keys`` (unknown keys are ignored)."""
        ...

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """The stored codes under ``keys``, in their order (``KeyError`` if one is unknown)."""
        ...

    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, keys)``, each ``(n, k)``, nearest first; ``k`` at most ``len``."""
        ...

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each of ``codes``, ``(distances, keys)`` of every stored code within
        ``max_distance`` bits (inclusive), nearest first."""
        ...

    def copy(self) -> CodeBackend:
        """An independent copy: a search running on this one never sees a half update."""
        ...

    def exact_copy(self) -> CodeBackend:
        """A copy that searches exhaustively (itself when it already does)."""
        ...

    def dump(self) -> bytes | None:
        """What to persist with the index (None: the engine keeps the data itself)."""
        ...

    def load(self, data: bytes | None) -> None:
        """Take back what ``dump`` gave; ``ValueError`` if it is damaged."""
        ...


def new_backend(kind: str, code_bytes: int, **options: Any) -> CodeBackend:
    """An empty backend of ``kind`` for codes of ``code_bytes`` bytes."""
    if kind not in BACKENDS:
        raise ValueError(f"index kind must be one of {tuple(BACKENDS)}, not {kind!r}")
    module, _, name = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)(code_bytes, **options)
