"""The near-duplicate threshold of a destination, fitted on its own images.

How far apart two copies of one photo end up depends on the model, the layout, the bits
and the photos themselves, so no constant serves every destination.  ``fit_threshold``
measures it where the model and the images are (the end of ``imgenc encode``, the last
task of a distributed job, or ``imgenc fit-dedup``), and stores the result in the
destination (``dedup/<spec fingerprint>.json``); ``imgenc dedup`` then reads it and needs
neither the model nor the images.

1. **Copies found.**  A sample of the destination's images (``COPIES_SAMPLE``) is copied in
   each configured kind (``encoder.copies``: recompressed, downscaled, cropped, rotated,
   brightened, greyscale, mirrored), the copies are encoded with the destination's model,
   and their distance to the original's stored code is recorded: the share of each kind
   found at a distance is read off those.
2. **Distinct images paired.**  For a sample of the destination's images
   (``PAIRS_SAMPLE``), the nearest *other* image is looked up in the index.  A catalogue
   that already holds copies would make most of those neighbours copies, not distinct
   photos, and drag any threshold down to nothing.  So each close neighbour is checked on
   the pixels (``encoder.copies.PixelCheck``: thumbnails compared over small crops and
   rotations), and one that is a copy of the image is passed over: an image's *distinct
   distance* is the distance to its nearest neighbour that is not a copy of it.
3. **The threshold** is the largest distance at which at most ``target`` (1% by default)
   of the sampled images have a distinct image that close, and never more than the
   farthest copy measured (a larger one would pair more photos and find no more copies).
   Smaller codes that reach the same pairs get the same result.

A destination with fewer than ``MIN_IMAGES`` images is not fitted: the false-pair share
cannot be measured on it (``TooFewImages``); any earlier fit is kept.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from encoder.codes import hamming, read_spec
from encoder.copies import COPY_KINDS, PixelCheck, make_copy, open_picture
from encoder.features import Encoded, feature_mapper
from encoder.images import LoadResult
from encoder.storage import Storage
from search.catalogue import CatalogueImages
from search.index import Index
from search.rescore import Rescore, feature_lookup, fit_rescore

log = logging.getLogger("imgenc.search")

FIT_PREFIX = "dedup"
MIN_IMAGES = 100  # a 1% false-pair share needs at least this many images to be measured
COPIES_SAMPLE = 100  # originals copied in every kind
PAIRS_SAMPLE = 2000  # images whose distinct distance is measured
NEIGHBOURS = 16  # neighbours looked at per image for a distinct one
DEFAULT_TARGET = 0.01  # the share of distinct images the threshold may pair
CHECK_SIDE = 96  # pixels: pictures are decoded this small for the pixel check
ENCODE_BATCH = 32


class TooFewImages(ValueError):
    """The destination has too few images for a threshold to be measured."""


class NoThreshold(LookupError):
    """The destination has no fitted threshold for its codes."""


class ImageSource(Protocol):
    """What the fit reads images with: ``encoder.images.ImageLoader``."""

    def read(self, rel: str) -> tuple[LoadResult, bytes | None]: ...
    def load_bytes(self, data: bytes, image_id: str = "upload") -> LoadResult: ...
    def load_picture(self, rel: str, max_side: int) -> tuple[LoadResult, Any]: ...


@dataclass
class DuplicateThreshold:
    """A fitted threshold and what it is expected to do."""

    max_distance: int  # bits
    bits: int  # bits per code (the whole code: positions x bits for spatial)
    fingerprint: str
    target: float  # the share of distinct images allowed to be paired
    false_pairs: float  # the share of the sampled images paired at max_distance
    found: dict[str, float]  # kind -> share of its copies within max_distance
    kinds: list[str]
    images: int  # images in the destination when fitted
    copies_sampled: int  # originals copied
    pairs_sampled: int  # images whose distinct distance was measured
    # Close neighbours recognised as copies and passed over (one copy counts once for each
    # sampled image it is a neighbour of).
    copies_in_catalogue: int
    limited_by: str  # "false pairs", "farthest copy" or "half the bits"
    fitted_at: float = field(default_factory=time.time)
    method: str = "copies of a sample; distinct distances with pixel-checked copies passed over"
    # Where the destination keeps float features: the re-scoring of the candidates near
    # the threshold by cosine (search.rescore.Rescore as a dict), fitted the same way.
    rescore: dict[str, Any] | None = None

    def rescoring(self) -> Rescore | None:
        return Rescore(**self.rescore) if self.rescore else None

    @property
    def found_all(self) -> float:
        return float(np.mean(list(self.found.values()))) if self.found else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in self.found.items())
        text = (
            f"max distance {self.max_distance} of {self.bits} bits "
            f"({self.max_distance / self.bits:.1%}), fitted on this destination's "
            f"{self.images} images: expected to find {self.found_all:.0%} of copies ({kinds}) "
            f"and to pair {self.false_pairs:.1%} of distinct images"
        )
        rescore = self.rescoring()
        return f"{text}; {rescore.summary()}" if rescore else text

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> DuplicateThreshold:
        return cls(**json.loads(data))


def fit_key(fingerprint: str) -> str:
    return f"{FIT_PREFIX}/{fingerprint}.json"


def read_threshold(storage: Storage, fingerprint: str) -> DuplicateThreshold:
    """The stored fit for codes of ``fingerprint``; ``NoThreshold`` when there is none."""
    try:
        return DuplicateThreshold.from_json(storage.get(fit_key(fingerprint)))
    except KeyError:
        raise NoThreshold(fingerprint) from None
    except (ValueError, TypeError) as exc:
        raise NoThreshold(f"{fit_key(fingerprint)} is damaged ({exc})") from None


def save_threshold(storage: Storage, fit: DuplicateThreshold) -> None:
    storage.put(fit_key(fit.fingerprint), fit.to_json().encode())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


def copy_distances(
    index: Index,
    images: ImageSource,
    encode: Callable[[np.ndarray], np.ndarray],
    kinds: Sequence[str],
    sample: Sequence[str],
    progress: Callable[[int], None] = lambda n: None,
    stored: Callable[[str], np.ndarray] | None = None,
    cosines: dict[str, list[float]] | None = None,
) -> dict[str, list[int]]:
    """For each kind, the distances between copies of the ``sample`` images and the
    originals' stored codes.  An image that cannot be read, or whose file no longer gives
    its stored code (it changed since), is left out.  When ``encode`` gives ``Encoded``
    (codes and pooled features) and ``stored`` gives an original's stored features,
    ``cosines`` gets, per kind and in the same order, each copy's cosine to them."""
    distances: dict[str, list[int]] = {k: [] for k in kinds}
    scores: dict[str, list[tuple[int, float]]] = {k: [] for k in kinds}
    # A file re-encoded in another batch may differ in a bit or two; more means it changed.
    tolerance = max(1, int(np.prod(index.spec.code_shape)) // 50)
    pending: list[tuple[str, str, np.ndarray]] = []  # (kind or "", id, pixels)

    def flush() -> None:
        if not pending:
            return
        out = encode(np.stack([p for _, _, p in pending]))
        codes, pooled = (out.codes, out.features) if isinstance(out, Encoded) else (out, None)
        fresh: dict[str, int] = {}
        for row, ((kind, image_id, _), code) in enumerate(zip(pending, codes, strict=True)):
            d = int(hamming(code, index.code(image_id)[None])[0, 0])
            if kind:
                d = d if fresh.get(image_id, 0) <= tolerance else -1
                similarity = 0.0
                if pooled is not None and stored is not None:
                    similarity = cosine(pooled[row], stored(image_id))
                scores[kind].append((d, similarity))
            else:
                fresh[image_id] = d
        for kind in kinds:  # drop the copies of images whose own file moved on
            scores[kind] = [(d, c) for d, c in scores[kind] if d >= 0]
            distances[kind] = [d for d, _ in scores[kind]]
        if cosines is not None:
            for kind in kinds:
                cosines[kind] = [c for _, c in scores[kind]]
        pending.clear()

    for image_id in sample:
        result, data = images.read(image_id)
        if data is None:
            continue
        try:
            picture = open_picture(data)
        except Exception:  # noqa: BLE001  (a file broken since: left out)
            continue
        made = [("", image_id, images.load_bytes(data, image_id))]
        made += [(k, image_id, images.load_bytes(make_copy(picture, k), image_id)) for k in kinds]
        if all(r.ok for _, _, r in made):
            pending.extend((k, i, r.pixels) for k, i, r in made)
        if len(pending) >= ENCODE_BATCH:
            flush()
        progress(1)
    flush()
    return distances


class _DistinctDistances:
    """Each sampled image's distance to its nearest neighbour that is not a copy of it."""

    def __init__(self, index: Index, images: ImageSource, kinds: Sequence[str]) -> None:
        self.index, self.images = index, images
        self.check = PixelCheck(kinds)
        self._thumbs: dict[str, np.ndarray | None] = {}
        self.copies_seen = 0

    def _variants(self, image_id: str) -> np.ndarray | None:
        if image_id not in self._thumbs:
            _, picture = self.images.load_picture(image_id, CHECK_SIDE)
            self._thumbs[image_id] = None if picture is None else self.check.variants(picture)
        return self._thumbs[image_id]

    def is_copy(self, a: str, b: str) -> bool:
        va, vb = self._variants(a), self._variants(b)
        return va is not None and vb is not None and self.check.same_picture(va, vb)

    def measure(self, sample: Sequence[str], target: float, cap: int) -> np.ndarray:
        """Distinct distances of ``sample``.  Only what decides the threshold is checked:
        images are taken nearest first, and once more than ``target`` of them have a
        distinct neighbour closer than the next image's nearest one, the rest cannot
        lower the threshold and keep their nearest distance."""
        index = self.index
        codes = index.codes_of(sample)
        found = index.search(codes, min(NEIGHBOURS + 1, len(index)))
        neighbours = [
            [(d, o) for o, d in zip(n.ids, n.distances, strict=True) if o != me]
            for me, n in zip(sample, found, strict=True)
        ]
        nearest = np.array([n[0][0] if n else cap + 1 for n in neighbours], np.int64)
        distinct = nearest.copy()
        enough = int(np.floor(target * len(sample))) + 1
        settled: list[int] = []  # kept sorted
        for position in np.argsort(nearest, kind="stable"):
            if len(settled) >= enough and settled[enough - 1] < nearest[position]:
                break  # more than the target share is paired below what is left
            me, found_here = sample[position], neighbours[position]
            value = found_here[-1][0] if found_here else cap + 1  # all copies: at least the last
            for d, other in found_here:
                if d > cap or not self.is_copy(me, other):
                    value = d
                    break
                self.copies_seen += 1
            distinct[position] = value
            bisect.insort(settled, int(value))
        return distinct


def fit_threshold(
    index: Index,
    images: ImageSource,
    encode: Callable[[np.ndarray], np.ndarray],
    kinds: Sequence[str],
    target: float = DEFAULT_TARGET,
    copies_sample: int = COPIES_SAMPLE,
    pairs_sample: int = PAIRS_SAMPLE,
    progress: Callable[[int], None] = lambda n: None,
    features: Callable[[str], np.ndarray] | None = None,
) -> DuplicateThreshold:
    """Fit the near-duplicate threshold of ``index``'s destination (see the module
    docstring).  ``images`` reads the catalogue's images by id, ``encode`` is the
    destination's model (pixels to packed codes).  With ``features`` (an image's stored
    float features) ``encode`` gives ``Encoded`` (codes and pooled features), and the
    re-scoring by cosine (``search.rescore``) is fitted too."""
    spec = index.spec
    total = len(index)
    if total < MIN_IMAGES:
        raise TooFewImages(
            f"{total} images are too few to fit a near-duplicate threshold on (at least "
            f"{MIN_IMAGES}: the share of distinct images paired cannot be measured on fewer)"
        )
    if not 0 < target < 0.5:
        raise ValueError(f"the false-pair target must be between 0 and 0.5, not {target}")
    kinds = [k for k in kinds if k in COPY_KINDS]
    bits = int(np.prod(spec.code_shape))
    sample = index.sample_ids(max(copies_sample, pairs_sample), spec.fingerprint)
    copy_cosines: dict[str, list[float]] = {}
    copies = copy_distances(
        index,
        images,
        encode,
        kinds,
        sample[:copies_sample],
        progress,
        stored=features,
        cosines=copy_cosines if features is not None else None,
    )
    measured = [d for k in kinds for d in copies[k]]
    if not measured:
        raise TooFewImages("none of the sampled images could be read to make copies of")
    cap = max(measured)
    distinct_finder = _DistinctDistances(index, images, kinds)
    sample = sample[:pairs_sample]
    distinct = np.sort(distinct_finder.measure(sample, target, cap))
    allowed = int(np.floor(target * len(distinct)))  # images that may be paired
    # The largest distance that pairs at most `allowed` images: just below the next one.
    by_pairs = int(distinct[allowed]) - 1 if allowed < len(distinct) else bits // 2
    threshold = max(0, min(by_pairs, cap, bits // 2))  # beyond half the bits: unrelated codes
    found = {k: float(np.mean(np.asarray(copies[k]) <= threshold)) for k in kinds if copies[k]}
    rescore = None
    if features is not None:
        fitted = fit_rescore(
            index, sample, distinct_finder.is_copy, features, copies, copy_cosines,
            threshold, cap, target,
        )  # fmt: skip
        rescore = asdict(fitted) if fitted is not None else None
    return DuplicateThreshold(
        max_distance=threshold,
        bits=bits,
        fingerprint=spec.fingerprint,
        target=target,
        false_pairs=float(np.mean(distinct <= threshold)),
        found=found,
        kinds=list(kinds),
        images=total,
        copies_sampled=len(copies[kinds[0]]) if kinds else 0,
        pairs_sampled=len(distinct),
        copies_in_catalogue=distinct_finder.copies_seen,
        limited_by=min(
            (by_pairs, "false pairs"), (cap, "farthest copy"), (bits // 2, "half the bits")
        )[1],
        rescore=rescore,
    )


def fit_destination(
    index: Index,
    encoder: Any,
    kinds: Sequence[str],
    target: float = DEFAULT_TARGET,
    image_root: str | None = None,
    progress: bool = True,
    copies_sample: int = COPIES_SAMPLE,
) -> DuplicateThreshold:
    """Fit ``index``'s destination with ``encoder`` (its model: ``encode`` and
    ``input_size``), reading its images where the manifest says they are (or under
    ``image_root``), and store the result there.  ``copies_sample``: originals copied."""
    from tqdm import tqdm

    images = CatalogueImages(index, image_root, encoder.input_size)
    stored = stored_features(index)
    encode = feature_mapper(encoder)[0] if stored is not None else encoder.encode
    bar = tqdm(
        total=min(copies_sample, len(index)),
        desc="fit-dedup",
        unit="img",
        disable=not progress,
        leave=False,
    )
    try:
        fit = fit_threshold(
            index, images, encode, kinds, target, copies_sample, progress=bar.update,
            features=stored,
        )  # fmt: skip
    finally:
        bar.close()
    save_threshold(index.storage, fit)
    return fit


def fit_is_current(index: Index, growth: float = 1.25) -> bool:
    """Whether the stored fit for ``index``'s codes was made on at least ``1 / growth`` of
    the images it holds now (a catalogue that grew more is fitted again), and with the
    re-scoring when the destination keeps features."""
    try:
        fit = read_threshold(index.storage, index.spec.fingerprint)
    except NoThreshold:
        return False
    if fit.rescore is None and read_spec(index.storage).features:
        return False  # features added since: fit the re-scoring too
    return fit.images * growth >= len(index)


def stored_features(index: Index) -> Callable[[str], np.ndarray] | None:
    """An image's stored float features by id, or None when the destination has none
    (for every ok image)."""
    return feature_lookup(index)
