"""Re-scoring near-duplicate candidates with the float features (``--features``).

Binary codes estimate the angle between two feature vectors noisily (by Charikar's
result, a pair at cosine 0.9 differs in about 72 ± 8 of 500 bits), so a copy can land a
little beyond the code threshold while a distinct photo lands a little within it.  Where
a destination keeps its pooled float features, the pairs near the threshold are decided
by their cosine instead:

- a pair within ``sure_distance`` bits is a duplicate, as with codes alone;
- a pair within ``max_distance`` bits (the candidates) is a duplicate when the cosine of
  its two stored feature vectors is at least ``min_cosine``;
- anything farther is not.

The three numbers are fitted like the code threshold (``search.duplicate_fit``), on the
same copies of a sample of the destination's images and the same pixel check of distinct
neighbours: ``max_distance`` is the code distance within which half of the sampled images
have their nearest neighbour (never beyond the farthest copy), ``sure_distance`` is tried
at a few values up to the code threshold, and for each ``min_cosine`` is the lowest cosine
that pairs at most ``target`` of the sampled images with a distinct one; the pair that
finds the most copies is kept (the code threshold itself is among the tries, so re-scoring
never finds fewer copies than the codes at the same false-pair share).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NEIGHBOURS = 16  # neighbours looked at per sampled image
CANDIDATE_SHARE = 0.5  # max_distance: within it, this share of images has a neighbour
SURE_STEPS = 4  # sure_distance tried at 0, 1/4 ... 4/4 of the code threshold


@dataclass
class Rescore:
    sure_distance: int  # bits: duplicates without re-scoring
    max_distance: int  # bits: candidates re-scored by cosine
    min_cosine: float
    false_pairs: float  # the share of sampled images paired with a distinct one
    found: dict[str, float]  # kind -> share of its copies found

    @property
    def found_all(self) -> float:
        return float(np.mean(list(self.found.values()))) if self.found else 0.0

    def accepts(self, distance: int, similarity: float) -> bool:
        return distance <= self.sure_distance or (
            distance <= self.max_distance and similarity >= self.min_cosine
        )

    def summary(self) -> str:
        return (
            f"re-scored with float features (pairs within {self.sure_distance} bits, or within "
            f"{self.max_distance} bits at cosine >= {self.min_cosine:.3f}): expected to find "
            f"{self.found_all:.0%} of copies and to pair {self.false_pairs:.1%} of distinct "
            "images"
        )


class FeatureLookup:
    """The stored float features of indexed images, read where they are (by the index's
    shard and row of each), a batch at a time; single ids are cached."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self._cache: dict[str, np.ndarray] = {}

    def by_keys(self, keys: np.ndarray) -> np.ndarray:
        """``(n, channels)`` features of the images under ``keys``; zeros (cosine 0) for
        one no longer indexed (deleted by a refresh meanwhile)."""
        from encoder.features import features_at

        found, rows = self.index.rows(keys, ["shard", "row"])
        held = features_at(self.index.storage, rows["shard"].cast("string"), rows["row"].to_numpy())
        if found.all():
            return held
        out = np.zeros((len(keys), held.shape[1]), held.dtype)
        out[found] = held
        return out

    def prefetch(self, ids: Sequence[str]) -> None:
        from encoder.features import features_at

        wanted = sorted({i for i in ids if i not in self._cache})
        if wanted:
            shards, rows = self.index.locations(wanted)
            for image_id, row in zip(
                wanted, features_at(self.index.storage, shards, rows), strict=True
            ):
                self._cache[image_id] = row

    def __call__(self, image_id: str) -> np.ndarray:
        if image_id not in self._cache:
            self.prefetch([image_id])
        return self._cache[image_id]


def feature_lookup(index: Any) -> FeatureLookup | None:
    """A ``FeatureLookup`` when the destination keeps features for every indexed image
    (its spec says so and no indexed shard lacks its features file), else None."""
    from encoder.codes import read_spec
    from encoder.features import FEATURES_PREFIX, features_key

    if not read_spec(index.storage).features or not len(index):
        return None
    present = set(index.storage.list(FEATURES_PREFIX))
    if any(features_key(shard) not in present for shard in index.shards()):
        return None
    return FeatureLookup(index)


def cosines_of(features: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines between rows ``a`` and rows ``b`` of ``features`` (float16 stored)."""
    x = np.asarray(features[a], np.float32)
    y = np.asarray(features[b], np.float32)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(norms > 0, (x * y).sum(axis=1) / np.maximum(norms, 1e-30), 0.0)


def fit_rescore(
    index: Any,
    sample: Sequence[str],
    is_copy: Callable[[str, str], bool],
    features: Callable[[str], np.ndarray],
    copies: dict[str, list[int]],
    copy_cosines: dict[str, list[float]],
    threshold: int,
    cap: int,
    target: float,
) -> Rescore | None:
    """Fit the re-scoring (see the module docstring); None when there is nothing to fit."""
    kinds = [k for k in copies if copies[k] and len(copy_cosines.get(k, [])) == len(copies[k])]
    if not kinds or not sample:
        return None
    codes = index.codes_of(sample)
    found = index.search(codes, min(NEIGHBOURS + 1, len(index)))
    neighbours = [
        [(int(d), o) for o, d in zip(n.ids, n.distances, strict=True) if o != me]
        for me, n in zip(sample, found, strict=True)
    ]
    if hasattr(features, "prefetch"):
        features.prefetch([*sample, *(o for n in neighbours for _, o in n)])
    nearest = np.array([n[0][0] if n else cap + 1 for n in neighbours])
    half = int(np.prod(index.spec.code_shape)) // 2
    radius = int(max(threshold, min(cap, half, np.quantile(nearest, CANDIDATE_SHARE))))
    # Per sampled image, its distinct neighbours within the radius: (distance, cosine).
    distinct: list[list[tuple[int, float]]] = []
    for me, found_here in zip(sample, neighbours, strict=True):
        mine = features(me).astype(np.float32)
        rows = []
        for d, other in found_here:
            if d > radius:
                break
            if not is_copy(me, other):
                theirs = features(other).astype(np.float32)
                norm = float(np.linalg.norm(mine) * np.linalg.norm(theirs))
                rows.append((d, float(mine @ theirs) / norm if norm > 0 else 0.0))
        distinct.append(rows)
    allowed = int(math.floor(target * len(sample)))
    best: Rescore | None = None
    for step in range(SURE_STEPS + 1):
        sure = threshold * step // SURE_STEPS
        scores = np.array([_score(rows, sure) for rows in distinct])
        ranked = np.sort(scores)[::-1]
        if allowed < len(ranked):
            if ranked[allowed] == np.inf:
                continue  # `sure` alone pairs too many
            bound = ranked[allowed]
            min_cosine = float(np.nextafter(bound, np.inf)) if bound > -np.inf else -1.0
        else:
            min_cosine = -1.0
        rule = Rescore(sure, radius, min_cosine, float(np.mean(scores >= min_cosine)), {})
        rule.found = {
            k: float(
                np.mean(
                    [rule.accepts(d, c) for d, c in zip(copies[k], copy_cosines[k], strict=True)]
                )
            )
            for k in kinds
        }
        if best is None or rule.found_all >= best.found_all:
            best = rule
    return best


def _score(rows: list[tuple[int, float]], sure: int) -> float:
    """An image's pairing score under ``sure``: inf when a distinct neighbour is within
    it, else the highest cosine of a distinct candidate (-inf when none)."""
    if any(d <= sure for d, _ in rows):
        return np.inf
    return max((c for _, c in rows), default=-np.inf)
