"""Near-duplicate groups: an image kept, and the images within ``max_distance`` of it.

``max_distance`` defaults to the threshold fitted on the destination's own images
(``search.duplicate_fit``); there is no constant default, since how far copies land
depends on the model, the layout, the bits and the photos.

1. Every image's neighbours within ``max_distance`` are found through the index, in batches:
   the ``k`` nearest first, and a search within the radius only for images whose
   ``k``-th neighbour is still within the threshold (a cluster of many copies).  Memory is
   O(N·k) plus the pairs found, never N×N.
2. Groups form around centres: the image with the most neighbours within the threshold
   (an original among its copies; then the most pixels, the largest file, the smallest
   id) is kept, and its neighbours not yet in a group join it; then the next.  Every
   image of a group is within ``max_distance`` of the kept one, so nothing chains: if A–B
   and B–C are close but A and C are far apart, A and C share a group only with B kept.
3. The others of a group are the files that could go; each row gives its distance to
   the kept image.

Where the destination keeps float features (``--features``) and its fit has a re-scoring
(``search.rescore``), the pairs near the threshold are decided by the cosine of their
features before grouping (``features=False``, ``imgenc dedup --no-features``, turns it
off; a ``max_distance`` given by hand uses the codes alone).

Everything is deterministic: the same codes give the same groups in the same order.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from encoder.features import FeaturesMissing, load_features
from encoder.storage import Storage
from search.duplicate_fit import DuplicateThreshold, read_threshold
from search.index import Index
from search.rescore import Rescore, cosines_of

NEIGHBOURS = 32  # k of the first search per image
BATCH = 2048  # images searched per backend call


@dataclass
class DuplicateGroups:
    """Groups of near-duplicates, each ``[(kept id, 0), (id, distance to kept), ...]``."""

    max_distance: int
    groups: list[list[tuple[str, int]]] = field(default_factory=list)
    images: int = 0  # images looked at
    threshold: DuplicateThreshold | None = None  # the fit max_distance came from, if any
    rescored: Rescore | None = None  # the re-scoring applied, if any

    @property
    def removable(self) -> list[str]:
        """Every image but the kept one of each group: the files that could go."""
        return [image_id for group in self.groups for image_id, _ in group[1:]]

    def rows(self) -> list[dict[str, object]]:
        return [
            {"group": g, "id": image_id, "distance": distance}
            for g, group in enumerate(self.groups)
            for image_id, distance in group
        ]

    def to_csv(self) -> str:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, ["group", "id", "distance"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buffer.getvalue()

    def summary(self) -> str:
        in_groups = sum(len(g) for g in self.groups)
        how = f"max distance {self.max_distance}"
        if self.rescored is not None:
            how = (
                f"within {self.rescored.sure_distance} bits, or within "
                f"{self.rescored.max_distance} at cosine >= {self.rescored.min_cosine:.3f}"
            )
        return (
            f"{len(self.groups)} groups of near-duplicates ({how}) "
            f"among {self.images} images: {in_groups} images in groups, "
            f"{len(self.removable)} files could go (one kept per group)"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "max_distance": self.max_distance,
            "fitted": None if self.threshold is None else asdict(self.threshold),
            "rescored": None if self.rescored is None else asdict(self.rescored),
            "images": self.images,
            "groups": [
                [{"id": image_id, "distance": d} for image_id, d in group] for group in self.groups
            ],
            "removable": len(self.removable),
        }


def close_pairs(index: Index, max_distance: int, k: int = NEIGHBOURS) -> dict[tuple[int, int], int]:
    """``(position a, position b) -> distance`` for every pair within ``max_distance``
    (a < b), found with k-nearest searches, and searches within the radius where k was
    not enough (a crowd of copies)."""
    backend = index.backend
    pairs: dict[tuple[int, int], int] = {}
    total = len(backend)
    k = min(k + 1, total)
    for start in range(0, total, BATCH):
        keys = np.arange(start, min(total, start + BATCH), dtype=np.int64)
        codes = backend.codes(keys)
        distances, found = backend.search(codes, k)
        # Rows whose k-th neighbour is still close may have more: a radius search gets all.
        crowded = distances[:, -1] <= max_distance if k < total else np.zeros(len(keys), bool)
        for row in np.flatnonzero(~crowded):
            _add_pairs(pairs, int(keys[row]), distances[row], found[row], max_distance)
        if crowded.any():
            for row, (near_d, near) in zip(
                np.flatnonzero(crowded), backend.within(codes[crowded], max_distance), strict=True
            ):
                _add_pairs(pairs, int(keys[row]), near_d, near, max_distance)
    return pairs


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _add_pairs(
    pairs: dict[tuple[int, int], int],
    me: int,
    distances: np.ndarray,
    keys: np.ndarray,
    max_distance: int,
) -> None:
    for d, other in zip(distances, keys, strict=True):
        if other == me or d > max_distance:
            continue
        pairs[_pair(me, int(other))] = int(d)


def _keep_rank(index: Index, image_id: str) -> tuple[int, int, str]:
    """Sort key of the image to keep: most pixels, then largest file, then smallest id."""
    pixels, file_bytes, _ = index.image(image_id)
    return (-pixels, -file_bytes, image_id)


def find_duplicates(
    index: Index, max_distance: int | None = None, features: bool = True
) -> DuplicateGroups:
    """The near-duplicate groups of an index; see the module docstring.  Without
    ``max_distance``, the destination's fitted threshold (``NoThreshold`` if none), and
    with ``features`` its re-scoring by float features where it has one."""
    threshold, rescore = None, None
    if max_distance is None:
        threshold = read_threshold(index.storage, index.spec.fingerprint)
        max_distance = threshold.max_distance
        rescore = threshold.rescoring() if features else None
    limit = int(np.prod(index.spec.code_shape)) // 2
    if not 0 <= max_distance <= limit:
        raise ValueError(
            f"max distance must be between 0 and {limit} bits, half the code: unrelated "
            f"codes differ by about that much, so a larger one would group everything"
        )
    index = index.exact()
    ids = index.ids
    pairs = rescored_pairs(index, max_distance, rescore) if rescore else None
    if pairs is None:
        rescore, pairs = None, close_pairs(index, max_distance)
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    groups = []
    assigned: set[int] = set()
    centre_first = sorted(
        neighbours, key=lambda p: (-len(neighbours[p]), _keep_rank(index, ids[p]))
    )
    for kept in centre_first:
        if kept in assigned:
            continue
        others = [p for p in neighbours[kept] if p not in assigned]
        if not others:
            continue
        others.sort(key=lambda p: (pairs[_pair(kept, p)], ids[p]))
        assigned.update([kept, *others])
        groups.append([(ids[kept], 0)] + [(ids[p], pairs[_pair(kept, p)]) for p in others])
    groups.sort(key=lambda g: g[0][0])
    return DuplicateGroups(max_distance, groups, len(ids), threshold, rescore)


def rescored_pairs(
    index: Index, max_distance: int, rescore: Rescore
) -> dict[tuple[int, int], int] | None:
    """The pairs within the re-scoring's reach that it accepts (by distance, or by the
    cosine of their stored features); None when the destination has no features."""
    try:
        feature_ids, features = load_features(index.storage)
    except FeaturesMissing:
        return None
    rows = {image_id: row for row, image_id in enumerate(feature_ids.tolist())}
    ids = index.ids
    if any(image_id not in rows for image_id in ids):
        return None  # the index holds images the features do not (yet)
    limit = int(np.prod(index.spec.code_shape)) // 2
    candidates = close_pairs(index, min(limit, max(max_distance, rescore.max_distance)))
    if not candidates:
        return {}
    keys = list(candidates)
    a = np.array([rows[ids[p]] for p, _ in keys])
    b = np.array([rows[ids[q]] for _, q in keys])
    similarity = cosines_of(features, a, b)
    return {
        key: candidates[key]
        for key, c in zip(keys, similarity, strict=True)
        if rescore.accepts(candidates[key], float(c))
    }


def duplicates(dest: str | Storage, max_distance: int | None = None) -> DuplicateGroups:
    """The near-duplicate groups of a destination (its index is built or updated first)."""
    return find_duplicates(Index.open(dest), max_distance)


def write_groups_csv(groups: DuplicateGroups, path: str | Path) -> None:
    Path(path).write_text(groups.to_csv(), encoding="utf-8")
