"""Synthetic codes for the query half's measurements, written as a real destination.

``ClusteredCodes`` draws packed codes around random centres: each bit of a code differs
from its centre's with probability 1/8 (the AND of three random bits), so two codes of one
cluster are about 22% of their bits apart and two of different clusters about 50%, a
neighbourhood structure like that of real codes rather than uniform noise.  Codes are made
directly in packed form (fast even for 3,063-byte spatial codes); the spare bits of the
last byte stay zero, as ``np.packbits`` leaves them.

``plant_copies`` adds near-duplicate groups: copies of a code that differ from it in a few
bits.  ``write_destination`` writes codes with ``encoder.writer.ShardWriter`` under the
spec of the stub backbone (``spec_for`` never builds a model), so that ``search.Index``
reads them exactly as it reads what ``imgenc encode`` wrote.  ``rss_kb`` and
``reset_peak_rss`` read and reset this process's memory figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder.images import ImageStatus, LoadResult
from encoder.settings import Settings
from encoder.spec import CodeSpec, spec_for
from encoder.storage import open_storage
from encoder.writer import ShardWriter, ensure_spec

SHARD_SIZE = 50_000  # codes per shard written


def stub_spec(layout: str, bits: int = 500) -> CodeSpec:
    """The spec of ``Settings(backbone="stub", layout=..., bits=..., weights="random")``:
    63-byte pooled codes, 3,063-byte spatial ones (49 positions x 500 bits), like VGG16's."""
    return spec_for(Settings(backbone="stub", layout=layout, bits=bits, weights="random"))


def _mask_spare_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    spare = codes.shape[1] * 8 - bits
    if spare:
        codes[:, -1] &= (0xFF << spare) & 0xFF
    return codes


@dataclass
class ClusteredCodes:
    """Packed codes of ``bits`` bits drawn around ``clusters`` random centres."""

    bits: int
    clusters: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.bytes = (self.bits + 7) // 8
        self.rng = np.random.default_rng(self.seed)
        self.centres = self._random_bytes(self.clusters)

    def _random_bytes(self, n: int) -> np.ndarray:
        return np.frombuffer(self.rng.bytes(n * self.bytes), np.uint8).reshape(n, self.bytes)

    def draw(self, n: int) -> np.ndarray:
        """``n`` new codes, each around a random centre."""
        which = self.rng.integers(0, self.clusters, n)
        flips = self._random_bytes(n) & self._random_bytes(n) & self._random_bytes(n)
        return _mask_spare_bits(self.centres[which] ^ flips, self.bits)

    def batches(self, n: int, chunk: int = SHARD_SIZE) -> Iterator[np.ndarray]:
        for start in range(0, n, chunk):
            yield self.draw(min(chunk, n - start))


def flip_bits(code: np.ndarray, bits: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of one packed code with ``count`` of its ``bits`` bits flipped."""
    unpacked = np.unpackbits(code, count=bits)
    unpacked[rng.choice(bits, count, replace=False)] ^= 1
    return np.packbits(unpacked)


def plant_copies(
    n: int,
    bits: int,
    seed: int = 0,
    grouped_share: float = 0.05,
    max_copies: int = 3,
    max_flips: int = 8,
) -> tuple[np.ndarray, list[str], list[frozenset[str]]]:
    """``n`` codes, ids and the planted groups: ``grouped_share`` of the originals have 1 to
    ``max_copies`` copies, each 1 to ``max_flips`` bits from its original (so two copies of
    one group are at most ``2 * max_flips`` bits apart).  Ids are shuffled, so copies are
    not neighbours in the index's order."""
    rng = np.random.default_rng(seed + 1)
    originals = round(n / (1 + grouped_share * (1 + max_copies) / 2))
    copies = rng.integers(1, max_copies + 1, round(grouped_share * originals))
    originals = n - int(copies.sum())
    codes = ClusteredCodes(bits, max(10, n // 1000), seed).draw(originals)
    grouped = rng.choice(originals, len(copies), replace=False)
    extra = [
        flip_bits(codes[source], bits, int(rng.integers(1, max_flips + 1)), rng)
        for source, count in zip(grouped, copies, strict=True)
        for _ in range(count)
    ]
    all_codes = np.concatenate([codes, np.array(extra, np.uint8).reshape(-1, codes.shape[1])])
    names = [f"synthetic/{number:07d}.jpg" for number in rng.permutation(n)]
    groups, position = [], originals
    for source, count in zip(grouped, copies, strict=True):
        members = [names[source], *names[position : position + count]]
        groups.append(frozenset(members))
        position += count
    return all_codes, names, groups


def write_destination(
    dest: Path, spec: CodeSpec, batches: Iterable[np.ndarray], names: list[str] | None = None
) -> int:
    """Write ``batches`` of packed codes into ``dest`` as ok images (``synthetic/NNNNNNN.jpg``
    unless ``names`` are given), a shard and a manifest part per ``SHARD_SIZE`` codes;
    returns how many were written."""
    storage = open_storage(str(dest))
    ensure_spec(storage, spec)
    writer = ShardWriter(
        storage, spec, "synthetic", shard_size=SHARD_SIZE, flush_seconds=1e9, host="bench"
    )
    written = 0
    for codes in batches:
        ids = names[written : written + len(codes)] if names else None
        results = [
            LoadResult(
                ids[i] if ids else f"synthetic/{written + i:07d}.jpg",
                f"/synthetic/{written + i:07d}.jpg",
                ImageStatus.OK,
                width=640,
                height=480,
            )
            for i in range(len(codes))
        ]
        writer.add(results, codes)
        written += len(codes)
    writer.flush()
    return written


def rss_kb(field: str = "VmRSS") -> float:
    """This process's ``VmRSS`` (or ``VmHWM``, its peak) in kB; 0 where /proc is missing."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return 0.0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
