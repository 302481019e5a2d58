"""Near-duplicate groups: an image kept, and the images within ``max_distance`` of it.

``max_distance`` defaults to the threshold fitted on the destination's own images
(``search.duplicate_fit``); there is no constant default, since how far copies land
depends on the model, the layout, the bits and the photos.

1. **Pairs.**  Every pair of images within ``max_distance`` is found by
   ``search.near_pairs``: an exact scan for small catalogues and long (spatial) codes,
   bit-sampling LSH above ``EXACT_LIMIT`` images, which compares candidates sharing
   random bits instead of every image with every other, and misses a pair at the
   threshold with probability under 0.5% (nearer pairs far less).  Memory is the codes
   and the pairs found, never N x N.
2. **Groups** form around centres: the image with the most neighbours within the
   threshold (an original among its copies; then the most pixels, the largest file, the
   smallest id) is kept, and its neighbours not yet in a group join it; then the next.
   Every image of a group is within ``max_distance`` of the kept one, so nothing chains:
   if A–B and B–C are close but A and C are far apart, A and C share a group only with B
   kept.
3. The others of a group are the files that could go; each row gives its distance to
   the kept image.

Where the destination keeps float features (``--features``) and its fit has a re-scoring
(``search.rescore``), the pairs near the threshold are decided by the cosine of their
features before grouping (``features=False``, ``imgenc dedup --no-features``, turns it
off; a ``max_distance`` given by hand uses the codes alone).  Only the features of images
in candidate pairs are read.

Everything is deterministic: the same codes give the same groups in the same order (the
LSH tables are drawn from a fixed seed).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search.duplicate_fit import DuplicateThreshold, read_threshold
from search.index import Index
from search.near_pairs import NearPairs, close_pairs
from search.rescore import Rescore, cosines_of, feature_lookup

CODES_BATCH = 1 << 18  # codes read from the index at a time
ENGINE_PAGE = 4096  # codes read and range-searched at a time on a search engine


@dataclass
class DuplicateGroups:
    """Groups of near-duplicates, each ``[(kept id, 0), (id, distance to kept), ...]``."""

    max_distance: int
    groups: list[list[tuple[str, int]]] = field(default_factory=list)
    images: int = 0  # images looked at
    threshold: DuplicateThreshold | None = None  # the fit max_distance came from, if any
    rescored: Rescore | None = None  # the re-scoring applied, if any
    pairs: str = ""  # how the pairs were found (NearPairs.describe)

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
            + (f"; {self.pairs}" if self.pairs else "")
        )

    def to_json(self) -> dict[str, object]:
        return {
            "max_distance": self.max_distance,
            "fitted": None if self.threshold is None else asdict(self.threshold),
            "rescored": None if self.rescored is None else asdict(self.rescored),
            "images": self.images,
            "pairs": self.pairs,
            "groups": [
                [{"id": image_id, "distance": d} for image_id, d in group] for group in self.groups
            ],
            "removable": len(self.removable),
        }


def all_codes(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, codes)`` of every indexed image, in one array each (codes as the backend
    stores them: padded with zero bytes, which change no distance)."""
    parts = list(index.backend.iter_codes(CODES_BATCH, padded=True))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, index.code_bytes), np.uint8)
    keys = np.concatenate([k for k, _ in parts])
    codes = np.empty((len(keys), parts[0][1].shape[1]), np.uint8)
    at = 0
    while parts:  # one copy: each batch freed once in place
        _, chunk = parts.pop(0)
        codes[at : at + len(chunk)] = chunk
        at += len(chunk)
    return keys, codes


def engine_pairs(
    index: Index, radius: int, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, NearPairs]:
    """Every pair within ``radius`` bits by the search engine's own range search (each
    stored code against the collection, a page at a time): ``(keys, pairs)`` as
    ``close_pairs`` gives them, rows numbering ``keys``."""
    pages, found = [], []
    for keys, codes in index.backend.iter_codes(ENGINE_PAGE):
        pages.append(keys)
        for key, (distances, others) in zip(
            keys.tolist(), index.backend.within(codes, radius), strict=True
        ):
            later = others > key  # each pair once (and never an image with itself)
            if later.any():
                found.append((np.full(int(later.sum()), key), others[later], distances[later]))
        if progress:
            progress(len(keys))
    keys = np.concatenate(pages) if pages else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    if found and len(keys):
        a_keys, b_keys, d = (np.concatenate(x) for x in zip(*found, strict=True))
    else:
        a_keys = b_keys = d = np.zeros(0, np.int64)
    a = order[np.minimum(np.searchsorted(keys, a_keys, sorter=order), len(keys) - 1)]
    b = order[np.minimum(np.searchsorted(keys, b_keys, sorter=order), len(keys) - 1)]
    held = (keys[a] == a_keys) & (keys[b] == b_keys)  # not one written during the scan
    a, b, d = a[held], b[held], d[held]
    swap = a > b
    a[swap], b[swap] = b[swap], a[swap]
    return keys, NearPairs(a, b, d, radius, "range")


def find_duplicates(
    index: Index,
    max_distance: int | None = None,
    features: bool = True,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> DuplicateGroups:
    """The near-duplicate groups of an index; see the module docstring.  Without
    ``max_distance``, the destination's fitted threshold (``NoThreshold`` if none), and
    with ``features`` its re-scoring by float features where it has one.  ``method``:
    how pairs are found (``auto``, ``exact`` or ``lsh``: ``search.near_pairs``)."""
    threshold, rescore = None, None
    if max_distance is None:
        threshold = read_threshold(index.storage, index.spec.fingerprint)
        max_distance = threshold.max_distance
        rescore = threshold.rescoring() if features else None
    bits = int(np.prod(index.spec.code_shape))
    limit = bits // 2
    if not 0 <= max_distance <= limit:
        raise ValueError(
            f"max distance must be between 0 and {limit} bits, half the code: unrelated "
            f"codes differ by about that much, so a larger one would group everything"
        )
    lookup = feature_lookup(index) if rescore is not None else None
    if lookup is None:
        rescore = None
    reach = min(limit, max(max_distance, rescore.max_distance)) if rescore else max_distance
    if index.remote and method in ("auto", "range"):
        keys, pairs = engine_pairs(index, reach, progress)
    else:
        keys, codes = all_codes(index)
        pairs = close_pairs(codes, reach, bits, method=method, progress=progress)
        del codes
    a, b, d = pairs.a, pairs.b, pairs.distance.astype(np.int64)
    if rescore is not None and lookup is not None:
        keep = _rescored(rescore, lookup, keys, a, b, d)
    else:
        keep = d <= max_distance
    a, b, d = a[keep], b[keep], d[keep]
    groups = group_pairs(index, keys, a, b, d)
    return DuplicateGroups(max_distance, groups, len(keys), threshold, rescore, _describe(pairs))


def _describe(pairs: NearPairs) -> str:
    return pairs.describe()


def _rescored(
    rescore: Rescore, lookup: Any, keys: np.ndarray, a: np.ndarray, b: np.ndarray, d: np.ndarray
) -> np.ndarray:
    """Which pairs the re-scoring accepts: within ``sure_distance``, or within its
    ``max_distance`` at a cosine of at least ``min_cosine``."""
    accept = d <= rescore.sure_distance
    ask = ~accept & (d <= rescore.max_distance)
    if ask.any():
        nodes, inverse = np.unique(np.concatenate([a[ask], b[ask]]), return_inverse=True)
        features = lookup.by_keys(keys[nodes])
        half = int(ask.sum())
        similarity = cosines_of(features, inverse[:half], inverse[half:])
        accept[np.flatnonzero(ask)] = similarity >= rescore.min_cosine
    return accept


def group_pairs(
    index: Index, keys: np.ndarray, a: np.ndarray, b: np.ndarray, d: np.ndarray
) -> list[list[tuple[str, int]]]:
    """Groups around centres (see the module docstring) from pairs of rows of ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(a):
        return []
    nodes = np.unique(np.concatenate([a, b]))
    found, rows = index.rows(keys[nodes], ["id", "pixels", "file_bytes"])
    if not found.all():  # deleted by a refresh since the codes were read: left out
        held = np.isin(a, nodes[found]) & np.isin(b, nodes[found])
        a, b, d, nodes = a[held], b[held], d[held], nodes[found]
        if not len(a):
            return []
    m = len(nodes)
    half = len(a)
    inverse = np.searchsorted(nodes, np.concatenate([a, b]))
    src = np.concatenate([inverse[:half], inverse[half:]])
    dst = np.concatenate([inverse[half:], inverse[:half]])
    dist = np.concatenate([d, d])
    id_rank = np.empty(m, np.int64)
    id_rank[pc.sort_indices(rows["id"]).to_numpy()] = np.arange(m)
    pixels = rows["pixels"].to_numpy()
    file_bytes = rows["file_bytes"].to_numpy()
    degree = np.bincount(src, minlength=m)
    # Centres first: most neighbours, then most pixels, largest file, smallest id.
    centres = np.lexsort((id_rank, -file_bytes, -pixels, -degree))
    by_src = np.lexsort((id_rank[dst], dist, src))
    dst, dist = dst[by_src], dist[by_src]
    starts = np.searchsorted(src[by_src], np.arange(m + 1))
    assigned = np.zeros(m, bool)
    kept_nodes, members, distances = [], [], []
    for centre in centres.tolist():
        if assigned[centre]:
            continue
        lo, hi = starts[centre], starts[centre + 1]
        others = dst[lo:hi]
        free = ~assigned[others]
        if not free.any():
            continue
        others, to_kept = others[free], dist[lo:hi][free]
        assigned[centre] = True
        assigned[others] = True
        kept_nodes.append(centre)
        members.append(others)
        distances.append(to_kept)
    ids = rows["id"]
    order = np.argsort(id_rank[np.array(kept_nodes, np.int64)], kind="stable")
    groups = []
    for g in order.tolist():
        names = ids.take(pa.array(np.concatenate([[kept_nodes[g]], members[g]]))).to_pylist()
        groups.append([(names[0], 0)] + list(zip(names[1:], distances[g].tolist(), strict=True)))
    return groups


def duplicates(dest: Any, max_distance: int | None = None) -> DuplicateGroups:
    """The near-duplicate groups of a destination (its index is built or updated first)."""
    return find_duplicates(Index.open(dest), max_distance)
