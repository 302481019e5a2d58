"""Float features beside the codes: ``--features`` and ``load_features``.

A destination made with ``--features`` also keeps the pooled float features of every ok
image, float16 ``features/<shard>.npy``, row-aligned with ``codes/<shard>.npy`` (the
spatial layout's features are averaged over positions first): 1,280 x 2 B per image for
EfficientNet-Lite0, 512 x 2 B for VGG16.  ``features`` is a destination option in
``spec.json``, outside the fingerprint, so codes with and without features compare.

Once a destination has features, the option sticks: every later run writes them.  Turning
it on for a destination that holds codes without features re-encodes its ok images that
lack them (they must be under the folder being encoded; otherwise it is refused, naming
how many are elsewhere), so no destination ends with features for only some images
without ``load_features`` saying so.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from encoder.manifest import CODES_PREFIX, SPEC_KEY, Row, read_manifest
from encoder.spec import CodeSpec
from encoder.storage import LocalStorage, Storage, StorageError, open_storage

FEATURES_PREFIX = "features"
FEATURES_DTYPE = np.float16


class FeaturesMissing(LookupError):
    """The destination holds no features (or not for every ok image)."""


class Encoded(NamedTuple):
    """What a ``--features`` run's mapper gives the writer: codes and pooled features."""

    codes: np.ndarray
    features: np.ndarray


def feature_mapper(encoder: Any) -> tuple[Callable[[np.ndarray], Encoded], Encoded]:
    """The ``Runner`` mapper of a ``--features`` run, and what an empty batch maps to."""

    def encode(pixels: np.ndarray) -> Encoded:
        return Encoded(*encoder.encode_with_features(pixels))

    empty = Encoded(encoder.empty_codes, np.zeros((0, encoder.backbone.channels), np.float32))
    return encode, empty


def feature_bytes(spec: CodeSpec) -> int:
    """Bytes per image of the stored features: channels x 2 (float16)."""
    from encoder.backbones import get_backbone

    return get_backbone(spec.backbone).channels * np.dtype(FEATURES_DTYPE).itemsize


def features_key(shard_key: str) -> str:
    """``codes/<shard>.npy`` -> ``features/<shard>.npy``."""
    return FEATURES_PREFIX + shard_key[len(CODES_PREFIX) :]


def rows_lacking_features(storage: Storage, rows: Iterable[Row]) -> list[Row]:
    """The ok rows whose shard has no features file beside it."""
    present = set(storage.list(FEATURES_PREFIX))
    return [r for r in rows if r["status"] == "ok" and features_key(r["shard"]) not in present]


def resume_key(row: Row) -> tuple[str, int | None, int | None]:
    size = int(row["size"]) if row["size"] else None
    mtime = int(row["mtime_ns"]) if row["mtime_ns"] else None
    return (row["id"], size, mtime)


@dataclass
class FeaturesPlan:
    """Whether a run writes features, and what it must re-encode to fill them."""

    storage: Storage
    on: bool
    turning_on: bool = False  # the destination had none: spec.json changes once accepted
    lacking: list[Row] = field(default_factory=list)  # ok rows without features

    def adjust_skip(self, skip: set) -> set:
        """``skip`` (resume keys) without the ok images that lack features."""
        return skip - {resume_key(r) for r in self.lacking} if self.lacking else skip

    def check_reachable(self, ids: set[str], folder: str) -> None:
        """Refuse when ok images lacking features are not among ``ids`` (the run's)."""
        away = sorted(r["id"] for r in self.lacking if r["id"] not in ids)
        if away:
            raise ValueError(
                f"--features on {self.storage.url}: {len(away)} of its ok images without "
                f"features are not under {folder} (first: {away[0]!r}), so their features "
                "cannot be filled; encode from the folder that holds them all, or write "
                "the features to another destination"
            )

    def accept(self) -> None:
        """Record the option in spec.json (once the run is known to be able to fill)."""
        if self.turning_on:
            spec = CodeSpec.from_json(self.storage.get(SPEC_KEY))
            self.storage.put(SPEC_KEY, _with_features(spec).to_json().encode())


def _with_features(spec: CodeSpec) -> CodeSpec:
    data = spec.to_dict()
    data["features"] = True
    return CodeSpec.from_dict(data)


def plan_features(storage: Storage, requested: bool) -> FeaturesPlan:
    """What a run into ``storage`` (whose spec.json is written) does about features:
    on when ``requested`` or when the destination already has them."""
    spec = CodeSpec.from_json(storage.get(SPEC_KEY))
    on = requested or spec.features
    if not on:
        return FeaturesPlan(storage, False)
    rows = read_manifest(storage)
    # Without --resume every image of the folder is encoded again anyway; with it, the
    # skip set loses the lacking ones (adjust_skip).  Either way, check_reachable refuses
    # a run that could not reach them all.
    lacking = rows_lacking_features(storage, rows)
    return FeaturesPlan(storage, True, turning_on=not spec.features, lacking=lacking)


def _load_shard(storage: Storage, key: str) -> np.ndarray:
    if isinstance(storage, LocalStorage):
        return np.load(storage.local_path(key), mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(storage.get(key)), allow_pickle=False)


def load_features(dest: str | Path | Storage) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, features)`` of every ok image, in manifest order (ids sorted, as
    ``load_codes``): ``features`` is ``(n, channels)`` float16, the pooled features.
    ``FeaturesMissing`` when ``dest`` was made without ``--features``, or when some ok
    images lack them (an interrupted ``--resume --features``)."""
    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    spec = CodeSpec.from_json(storage.get(SPEC_KEY))
    if not spec.features:
        raise FeaturesMissing(
            f"{storage.url} was encoded without --features: rerun `imgenc encode IMAGE_DIR "
            f"--out {storage.url} --resume --features` to add them"
        )
    rows = [r for r in read_manifest(storage) if r["status"] == "ok"]
    lacking = rows_lacking_features(storage, rows)
    if lacking:
        raise FeaturesMissing(
            f"{len(lacking)} of the {len(rows)} ok images of {storage.url} have no features "
            f"(first: {lacking[0]['id']!r}); rerun `imgenc encode IMAGE_DIR --out "
            f"{storage.url} --resume --features` to fill them"
        )
    ids = np.array([r["id"] for r in rows], dtype=str)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        by_shard.setdefault(features_key(r["shard"]), []).append((i, int(r["row"])))
    out: np.ndarray | None = None
    for key, pairs in by_shard.items():
        try:
            shard = _load_shard(storage, key)
        except (FileNotFoundError, KeyError):
            raise StorageError(f"{storage.url}: the features shard {key} went missing") from None
        if out is None:
            out = np.empty((len(rows), shard.shape[1]), FEATURES_DTYPE)
        targets, sources = zip(*pairs, strict=True)
        out[list(targets)] = shard[list(sources)]
    if out is None:
        out = np.zeros((0, 0), FEATURES_DTYPE)
    return ids, out
