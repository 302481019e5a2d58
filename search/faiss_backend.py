"""The faiss backends: exact (``IndexBinaryFlat``) and approximate (``IndexBinaryHNSW``),
each under an ``IndexBinaryIDMap2`` so that codes keep their keys.

Codes of up to 64 bytes are zero-padded to the next size faiss has a fast Hamming kernel
for (4, 8, 16, 20, 32 or 64 bytes: a 63-byte pooled code becomes 64; measured 2.7x faster
over 1M codes); padding adds the same zero bits to every code, so distances do not change.
Longer codes (3,063-byte spatial ones) use faiss's generic kernel.  HNSW cannot remove
codes, so removing rebuilds its graph from the codes that stay.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every import

FAST_CODE_BYTES = (4, 8, 16, 20, 32, 64)  # faiss's specialised Hamming kernels
DEFAULT_HNSW_M = 32  # graph neighbours per node
DEFAULT_HNSW_EF_SEARCH = 128


def stored_bytes(code_bytes: int) -> int:
    """The code size faiss holds: padded up to a fast kernel when it fits one."""
    return next((n for n in FAST_CODE_BYTES if n >= code_bytes), code_bytes)


class FaissFlat:
    kind = "flat"
    exact = True

    def __init__(self, code_bytes: int, **_: Any) -> None:
        self.code_bytes = code_bytes
        self.stored_bytes = stored_bytes(code_bytes)
        self._index = self._new()

    def _inner(self) -> Any:
        import faiss

        return faiss.IndexBinaryFlat(self.stored_bytes * 8)

    def _new(self) -> Any:
        import faiss

        return faiss.IndexBinaryIDMap2(self._inner())

    def _pad(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes of {codes.shape[1]} bytes; this index holds {self.code_bytes}")
        if self.stored_bytes == self.code_bytes:
            return codes
        padded = np.zeros((codes.shape[0], self.stored_bytes), np.uint8)
        padded[:, : self.code_bytes] = codes
        return padded

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, keys: np.ndarray, codes: np.ndarray) -> None:
        if len(keys):
            self._index.add_with_ids(self._pad(codes), np.asarray(keys, np.int64))

    def remove(self, keys: np.ndarray) -> None:
        if len(keys):
            self._index.remove_ids(np.asarray(keys, np.int64))

    def codes(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty((len(keys), self.stored_bytes), np.uint8)
        for n, key in enumerate(np.asarray(keys, np.int64)):
            try:
                out[n] = self._index.reconstruct(int(key))
            except RuntimeError:
                raise KeyError(int(key)) from None
        return out[:, : self.code_bytes]

    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, keys = self._index.search(self._pad(codes), k)
        return distances.astype(np.int64), keys

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        lims, distances, keys = self._index.range_search(self._pad(codes), max_distance + 1)
        found = []
        for lo, hi in zip(lims[:-1], lims[1:], strict=True):
            order = np.argsort(distances[lo:hi], kind="stable")
            found.append((distances[lo:hi][order].astype(np.int64), keys[lo:hi][order]))
        return found

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        keys = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        codes = self._index.index.reconstruct_n(0, self._index.index.ntotal)
        return keys, codes

    def copy(self) -> FaissFlat:
        import faiss

        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        # Through faiss's own serialisation: clone_binary_index knows no loaded IDMap2.
        twin._index = (
            faiss.deserialize_index_binary(faiss.serialize_index_binary(self._index))
            if len(self)
            else self._new()
        )
        twin._configure(twin._index)
        return twin

    def exact_copy(self) -> FaissFlat:
        return self

    def dump(self) -> bytes:
        import faiss

        return np.asarray(faiss.serialize_index_binary(self._index)).tobytes()

    def load(self, data: bytes | None) -> None:
        import faiss

        try:
            index = faiss.deserialize_index_binary(np.frombuffer(data or b"", np.uint8))
        except (RuntimeError, ValueError) as exc:  # damaged or partly written
            raise ValueError(f"not a saved faiss index ({exc})") from None
        if index.d != self.stored_bytes * 8 or not isinstance(index, type(self._index)):
            raise ValueError("a saved faiss index of another kind or code size")
        self._configure(index)
        self._index = index

    def _configure(self, index: Any) -> None:
        pass


class FaissHNSW(FaissFlat):
    kind = "hnsw"
    exact = False

    def __init__(
        self,
        code_bytes: int,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_search: int = DEFAULT_HNSW_EF_SEARCH,
        **_: Any,
    ) -> None:
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        super().__init__(code_bytes)

    def _inner(self) -> Any:
        import faiss

        index = faiss.IndexBinaryHNSW(self.stored_bytes * 8, self.hnsw_m)
        index.hnsw.efSearch = self.ef_search
        return index

    def _configure(self, index: Any) -> None:
        import faiss

        inner = faiss.downcast_IndexBinary(index.index)
        if getattr(inner, "hnsw", None) is None:
            raise ValueError("a saved faiss index that is not HNSW")
        inner.hnsw.efSearch = self.ef_search

    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.downcast_IndexBinary(self._index.index).hnsw.efSearch = max(self.ef_search, k)
        return super().search(codes, k)

    def within(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.exact_copy().within(codes, max_distance)  # HNSW has no range search

    def remove(self, keys: np.ndarray) -> None:
        """HNSW cannot remove: a new graph of the codes that stay."""
        if not len(keys):
            return
        stored_keys, codes = self._all()
        keep = ~np.isin(stored_keys, np.asarray(keys, np.int64))
        self._index = self._new()
        if keep.any():
            self._index.add_with_ids(codes[keep], stored_keys[keep])

    def exact_copy(self) -> FaissFlat:
        flat = FaissFlat(self.code_bytes)
        keys, codes = self._all()
        if len(keys):
            flat._index.add_with_ids(codes, keys)
        return flat
