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

``load_features(dest, mmap=True)`` gathers the features once into one ``.npy`` file, in
id order (beside a local destination, under ``cache/``; in the user's cache for S3), and
returns it memory-mapped: a million Lite0 images (2.6 GB) then cost no memory until read.
``features_at`` reads the rows of a few images where they are (the near-duplicate
re-scoring does that, by the index's locations).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from encoder.codes import numpy_strings, read_shard, shard_groups
from encoder.manifest import CODES_PREFIX, OK, SPEC_KEY
from encoder.merged import parts_digest, read_manifest
from encoder.spec import CodeSpec
from encoder.storage import LocalStorage, Storage, open_storage

FEATURES_PREFIX = "features"
FEATURES_DTYPE = np.float16
CACHE_PREFIX = "cache"  # under a local destination: derived files, safe to delete


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


def lacking_features(storage: Storage, ok_rows: Any) -> Any:
    """The rows of ``ok_rows`` (an Arrow table with a ``shard`` column) whose shard has no
    features file beside it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    present = set(storage.list(FEATURES_PREFIX))
    shards = pc.unique(ok_rows["shard"]).to_pylist()
    missing = [s for s in shards if features_key(s) not in present]
    if not missing:
        return ok_rows.slice(0, 0)
    return ok_rows.filter(pc.is_in(ok_rows["shard"], value_set=pa.array(missing, pa.string())))


@dataclass
class FeaturesPlan:
    """Whether a run writes features, and what it must re-encode to fill them."""

    storage: Storage
    on: bool
    turning_on: bool = False  # the destination had none: spec.json changes once accepted
    lacking: Any = None  # Arrow table (id, size, mtime_ns) of ok images without features
    _empty: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        self._empty = self.lacking is None or self.lacking.num_rows == 0

    @property
    def needs_filling(self) -> bool:
        return not self._empty

    def adjust_skip(self, skip: Any) -> Any:
        """``skip`` (``encoder.resume.ResumeKeys``) without the ok images lacking features."""
        return skip.without(self.lacking) if self.needs_filling else skip

    def forget(self, gone_ids: Any) -> None:
        """Images recorded deleted now need no features."""
        import pyarrow.compute as pc

        if self.needs_filling and len(gone_ids):
            self.lacking = self.lacking.filter(
                pc.invert(pc.is_in(self.lacking["id"], value_set=gone_ids))
            )
            self.__post_init__()

    def check_reachable(self, found: Any, folder: str) -> None:
        """Refuse when ok images lacking features are not among those the run scanned
        (``found``: an ``encoder.deletions.ScannedSet`` of ids)."""
        if not self.needs_filling:
            return
        away = self.lacking["id"].filter(~found.contains(self.lacking["id"]))
        if len(away):
            raise ValueError(
                f"--features on {self.storage.url}: {len(away)} of its ok images without "
                f"features are not under {folder} (first: {away[0].as_py()!r}), so their "
                "features cannot be filled; encode from the folder that holds them all, "
                "or write the features to another destination"
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
    rows = read_manifest(storage, ["id", "shard", "size", "mtime_ns"], status=OK)
    # Without --resume every image of the folder is encoded again anyway; with it, the
    # skip set loses the lacking ones (adjust_skip).  Either way, check_reachable refuses
    # a run that could not reach them all.
    lacking = lacking_features(storage, rows).select(["id", "size", "mtime_ns"])
    return FeaturesPlan(storage, True, turning_on=not spec.features, lacking=lacking)


def _ok_rows_with_features(storage: Storage) -> Any:
    spec = CodeSpec.from_json(storage.get(SPEC_KEY))
    if not spec.features:
        raise FeaturesMissing(
            f"{storage.url} was encoded without --features: rerun `imgenc encode IMAGE_DIR "
            f"--out {storage.url} --resume --features` to add them"
        )
    rows = read_manifest(storage, ["id", "shard", "row"], status=OK)
    lacking = lacking_features(storage, rows)
    if lacking.num_rows:
        raise FeaturesMissing(
            f"{lacking.num_rows} of the {rows.num_rows} ok images of {storage.url} have no "
            f"features (first: {lacking['id'][0].as_py()!r}); rerun `imgenc encode IMAGE_DIR "
            f"--out {storage.url} --resume --features` to fill them"
        )
    return rows


def features_at(storage: Storage, shards: Any, rows: Any) -> np.ndarray:
    """``(n, channels)`` float16 features of the images whose codes are at ``(shards[i],
    rows[i])`` (code shard keys and rows, as the manifest names them), each shard read once."""
    rows = np.asarray(rows, np.int64)
    names, order, starts = shard_groups(shards)
    out: np.ndarray | None = None
    for n, key in enumerate(names):
        targets = order[starts[n] : starts[n + 1]]
        if not len(targets):
            continue
        shard = read_shard(storage, features_key(key), "features shard")
        if out is None:
            out = np.empty((len(rows), shard.shape[1]), FEATURES_DTYPE)
        out[targets] = shard[rows[targets]]
    return out if out is not None else np.zeros((len(rows), 0), FEATURES_DTYPE)


def load_features(dest: str | Path | Storage, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, features)`` of every ok image, in manifest order (ids sorted, as
    ``load_codes``): ``features`` is ``(n, channels)`` float16, the pooled features.
    With ``mmap``, ``features`` is a read-only memory map of a file gathered once (see the
    module docstring), so its size costs no memory.  ``FeaturesMissing`` when ``dest`` was
    made without ``--features``, or when some ok images lack them (an interrupted
    ``--resume --features``)."""
    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    rows = _ok_rows_with_features(storage)
    ids = numpy_strings(rows["id"])
    shards, positions = rows["shard"], rows["row"].to_numpy()
    if not mmap:
        return ids, features_at(storage, shards, positions)
    return ids, _gathered_file(storage, shards, positions)


def _cache_folder(storage: Storage) -> Path:
    if isinstance(storage, LocalStorage):
        return storage.local_path(CACHE_PREFIX)
    import hashlib

    base = os.environ.get("IMGENC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imgenc"
    )
    return Path(base) / hashlib.sha256(storage.url.encode()).hexdigest()[:16]


def _gathered_file(storage: Storage, shards: Any, rows: np.ndarray) -> np.ndarray:
    """The features of the rows at these locations, in their order, as a memory-mapped
    ``.npy`` written once per manifest (each shard read once, each row written where it
    goes, so memory holds one shard at a time)."""
    from encoder.manifest import part_keys

    folder = _cache_folder(storage)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"features-{parts_digest(part_keys(storage))}-{len(rows)}.npy"
    if not target.exists():
        names, order, starts = shard_groups(shards)
        channels = 0
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                header_at = f.tell()
                for n, key in enumerate(names):
                    targets = order[starts[n] : starts[n + 1]]
                    shard = np.ascontiguousarray(
                        read_shard(storage, features_key(key), "features shard")[rows[targets]],
                        FEATURES_DTYPE,
                    )
                    if not channels:
                        channels = shard.shape[1]
                        header = _npy_header((len(rows), channels))
                        f.write(header)
                        f.flush()
                        header_at = len(header)
                    row_bytes = channels * shard.itemsize
                    for target_row, data in zip(targets.tolist(), shard, strict=True):
                        os.pwrite(f.fileno(), data.tobytes(), header_at + target_row * row_bytes)
                if not channels:
                    f.write(_npy_header((0, 0)))
                f.truncate(header_at + len(rows) * channels * np.dtype(FEATURES_DTYPE).itemsize)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in folder.glob("features-*.npy"):
            if old != target:
                old.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r", allow_pickle=False)


def _npy_header(shape: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.dtype(FEATURES_DTYPE).str, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()
