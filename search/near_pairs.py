"""Pairs of codes within a Hamming radius, without comparing every code with every other.

``close_pairs(codes, radius)`` returns every pair of rows whose codes differ in at most
``radius`` bits (each pair once, ``a < b``), by one of two methods:

- **exact**: faiss's flat range search, a batch of rows against all of them: N²/2
  comparisons.  Chosen for small catalogues (``EXACT_LIMIT``) and long codes.
- **lsh**: bit-sampling locality-sensitive hashing (Indyk and Motwani, 1998), done as
  sorts.  Each *table* draws ``k`` bit positions at random and keys every code by its
  bits there; codes with equal keys are candidates, and a candidate pair is kept when its
  full codes are within the radius, so nothing farther is ever reported.  Two codes ``d``
  bits apart agree on ``k`` random bits with probability ``C(n - d, k) / C(n, k)``, the
  same for every pair at that distance whatever the data; tables are drawn independently
  until a pair at the radius has been missed by all of them with probability at most
  ``MISS`` (0.2%; pairs nearer are missed far less often).  A radius so large that this
  would take more than ``MAX_TABLES`` tables (near half the bits) is scanned exactly.  ``k`` starts near
  log2(N) and grows while a table yields more than ``CANDIDATES_PER_CODE`` candidates per
  code (clustered codes share more keys).  Work grows as N x tables, not N².

The keys are sorted packed with the row number (one ``np.sort`` of uint64), candidates
come from runs of equal keys, and distances are computed in batches on uint64 words; two
tables run at a time (NumPy releases the GIL).  Memory: the codes, their bytes transposed
(as much again), and a few arrays of N per table in flight.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 20_000  # codes up to which the exact scan is cheaper than tables
MAX_LSH_BYTES = 256  # longer codes (spatial layouts) are compared exactly
MISS = 0.002  # the largest chance that a pair at the radius escapes every table
CANDIDATES_PER_CODE = 2  # a table yielding more candidate pairs per code gets more bits
MAX_TABLES = 2000
VERIFY_BATCH = 1 << 22  # candidate pairs compared at a time
BIG_BUCKET = 256  # rows sharing a key beyond which faiss compares them
EXACT_BATCH = 4096  # rows per range search of the exact scan
THREADS = 2
INDEX_BITS = 24  # row numbers packed below the key (more rows: argsort instead)


@dataclass
class NearPairs:
    """Row pairs within ``radius`` bits: ``a < b``, with their ``distance``."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    radius: int
    method: str  # "exact", "lsh", or "range" (a search engine's: search.duplicates)
    tables: int = 0
    bits: list[int] | None = None  # bits per table (lsh)
    miss: float = 0.0  # chance bound that a pair at the radius was missed (lsh)
    candidates: int = 0  # candidate pairs compared (lsh)

    def __len__(self) -> int:
        return len(self.a)

    def describe(self) -> str:
        if self.method == "exact":
            return "pairs by an exact scan"
        if self.method == "range":
            return f"pairs by the search engine's range search within {self.radius} bits"
        k = sorted(set(self.bits or []))
        span = f"{k[0]}" if len(k) == 1 else f"{k[0]}-{k[-1]}"
        return (
            f"pairs by bit-sampling LSH ({self.tables} tables of {span} bits, "
            f"{self.candidates:,} candidates compared; a pair at {self.radius} bits is "
            f"missed with probability <= {self.miss:.2%})"
        )


def collision_probability(n_bits: int, distance: int, k: int) -> float:
    """The chance that ``k`` distinct random bits of two codes ``distance`` apart agree."""
    p = 1.0
    for i in range(k):
        p *= max(0.0, (n_bits - distance - i) / (n_bits - i))
    return p


def choose_method(n: int, code_bytes: int, n_bits: int, radius: int) -> str:
    """``exact`` for few or long codes, or where LSH would need too many tables."""
    if n <= EXACT_LIMIT or code_bytes > MAX_LSH_BYTES:
        return "exact"
    k = _first_k(n)
    p = collision_probability(n_bits, radius, k)
    if p <= 0 or math.log(MISS) / math.log1p(-p) > MAX_TABLES:
        return "exact"
    return "lsh"


def _first_k(n: int) -> int:
    return max(12, int(math.ceil(math.log2(max(n, 2)))) + 1)


def close_pairs(
    codes: np.ndarray,
    radius: int,
    n_bits: int | None = None,
    method: str = "auto",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> NearPairs:
    """Every pair of rows of ``codes`` (packed uint8) within ``radius`` bits; ``n_bits``:
    the bits that are code (the rest of the last byte is padding), all by default."""
    codes = np.ascontiguousarray(codes, np.uint8)
    n, width = codes.shape
    n_bits = n_bits or width * 8
    if method == "auto":
        method = choose_method(n, width, n_bits, radius)
    if method == "exact" or n < 2:
        return _exact(codes, radius)
    if method != "lsh":
        raise ValueError(f"method must be auto, exact or lsh, not {method!r}")
    found = _Tables(codes, radius, n_bits, seed, progress).run()
    return found if found.miss <= MISS else _exact(codes, radius)  # out of tables


def _exact(codes: np.ndarray, radius: int) -> NearPairs:
    import faiss

    n, width = codes.shape
    padded = _padded(codes, _fast_width(width))
    index = faiss.IndexBinaryFlat(padded.shape[1] * 8)
    index.add(padded)
    a_parts, b_parts, d_parts = [], [], []
    for start in range(0, n, EXACT_BATCH):
        lims, distances, rows = index.range_search(padded[start : start + EXACT_BATCH], radius + 1)
        me = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = rows > me
        a_parts.append(me[keep])
        b_parts.append(rows[keep].astype(np.int64))
        d_parts.append(distances[keep].astype(np.int32))
    return NearPairs(*_joined(a_parts, b_parts, d_parts), radius, "exact")


def _fast_width(width: int) -> int:
    return next((n for n in (4, 8, 16, 20, 32, 64) if n >= width), width)


def _padded(codes: np.ndarray, width: int) -> np.ndarray:
    if codes.shape[1] == width:
        return codes
    out = np.zeros((codes.shape[0], width), np.uint8)
    out[:, : codes.shape[1]] = codes
    return out


def _joined(a: list, b: list, d: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(a), np.concatenate(b), np.concatenate(d)


class _Tables:
    """The LSH search: tables drawn and joined until the miss bound is met."""

    def __init__(
        self,
        codes: np.ndarray,
        radius: int,
        n_bits: int,
        seed: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.n, width = codes.shape
        self.radius, self.n_bits = radius, n_bits
        if width % 8:
            words = np.zeros((self.n, (width + 7) // 8 * 8), np.uint8)
            words[:, :width] = codes
        else:
            words = codes
        self.words = words.view(np.uint64)  # (n, words) for the distances
        self.planes = np.ascontiguousarray(codes.T)  # (width, n): one byte of every code
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        self.lock = threading.Lock()
        self.k = _first_k(self.n)
        self.found: list[np.ndarray] = []  # pair ids a * n + b
        self.found_d: list[np.ndarray] = []
        self.bits: list[int] = []
        self.miss = 1.0
        self.candidates = 0

    def run(self) -> NearPairs:
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            while self.miss > MISS and len(self.bits) < MAX_TABLES:
                draws = [self._draw() for _ in range(THREADS)]
                for k, pairs, dist, candidates in pool.map(self._table, draws):
                    self.bits.append(k)
                    self.miss *= 1.0 - collision_probability(self.n_bits, self.radius, k)
                    self.candidates += candidates
                    self.found.append(pairs)
                    self.found_d.append(dist)
                    if self.progress:
                        self.progress(1)
                if sum(len(f) for f in self.found) > 4 * self.n:
                    self._compact()
        self._compact()
        ids = self.found[0] if self.found else np.zeros(0, np.int64)
        dist = self.found_d[0] if self.found_d else np.zeros(0, np.int32)
        return NearPairs(
            ids // self.n, ids % self.n, dist, self.radius, "lsh",
            tables=len(self.bits), bits=self.bits, miss=self.miss,
            candidates=self.candidates,
        )  # fmt: skip

    def _compact(self) -> None:
        if not self.found:
            return
        ids = np.concatenate(self.found)
        dist = np.concatenate(self.found_d)
        ids, first = np.unique(ids, return_index=True)
        self.found, self.found_d = [ids], [dist[first]]

    def _draw(self) -> np.ndarray:
        with self.lock:
            return self.rng.permutation(self.n_bits)

    def _table(self, permutation: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, int]:
        """One table: ``(k, pair ids, distances, candidates compared)``, with ``k`` raised
        (on the same draw) while it yields too many candidates."""
        while True:
            k = self.k
            starts, sizes, order = self._buckets(np.sort(permutation[:k]))
            candidates = int((sizes * (sizes - 1) // 2).sum())
            if candidates <= CANDIDATES_PER_CODE * self.n or k + 2 > min(self.n_bits, 62):
                break
            with self.lock:
                self.k = max(self.k, k + 2)
        pairs, dist = self._join(starts, sizes, order)
        return k, pairs, dist, candidates

    def _buckets(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows sorted by their key on ``bits``: runs of two or more equal keys (their
        start in ``order`` and size), and ``order``."""
        key = np.zeros(self.n, np.uint64)
        prime = np.uint64(0x100000001B3)
        with np.errstate(over="ignore"):
            for byte in np.unique(bits // 8):
                mask = 0
                for bit in bits[bits // 8 == byte]:
                    mask |= 0x80 >> int(bit % 8)
                key *= prime
                key += self.planes[byte] & np.uint8(mask)
        if self.n < (1 << INDEX_BITS):
            shift = np.uint64(INDEX_BITS)
            packed = np.sort((key << shift) | np.arange(self.n, dtype=np.uint64))
            order = (packed & np.uint64((1 << INDEX_BITS) - 1)).astype(np.int64)
            key = packed >> shift
        else:
            key = (key << np.uint64(INDEX_BITS)) >> np.uint64(INDEX_BITS)  # as packed above
            order = np.argsort(key, kind="stable")
            key = key[order]
        change = np.flatnonzero(key[1:] != key[:-1]) + 1
        starts = np.concatenate([[0], change])
        sizes = np.diff(np.concatenate([starts, [self.n]]))
        several = sizes > 1
        return starts[several], sizes[several], order

    def _join(
        self, starts: np.ndarray, sizes: np.ndarray, order: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pairs within the radius among the rows of each run."""
        ids, dists = [], []
        small = sizes <= BIG_BUCKET
        if small.any():
            s_starts, s_sizes = starts[small], sizes[small]
            members = np.repeat(s_starts, s_sizes) + _ranks(s_sizes)
            size_of = np.repeat(s_sizes, s_sizes)
            offset = _ranks(s_sizes)
            for j in range(1, int(s_sizes.max())):
                live = offset + j < size_of
                if not live.any():
                    break
                members, size_of, offset = members[live], size_of[live], offset[live]
                a, b = order[members], order[members + j]
                for lo in range(0, len(a), VERIFY_BATCH):
                    pair, d = self._verified(a[lo : lo + VERIFY_BATCH], b[lo : lo + VERIFY_BATCH])
                    ids.append(pair)
                    dists.append(d)
        for start, size in zip(starts[~small].tolist(), sizes[~small].tolist(), strict=True):
            rows = np.sort(order[start : start + size])
            found = _exact(self._codes_of(rows), self.radius)
            a, b = rows[found.a], rows[found.b]
            ids.append(a * self.n + b)
            dists.append(found.distance)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(ids), np.concatenate(dists)

    def _codes_of(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.words[rows]).view(np.uint8)

    def _verified(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.bitwise_count(self.words[a] ^ self.words[b]).sum(axis=1, dtype=np.int32)
        near = d <= self.radius
        a, b = a[near], b[near]
        low, high = np.minimum(a, b), np.maximum(a, b)
        return low * self.n + high, d[near]


def _ranks(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., size - 1 for each size, concatenated."""
    total = int(sizes.sum())
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.arange(total, dtype=np.int64) - starts
