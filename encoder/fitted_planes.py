"""Hyperplanes fitted on a sample of the catalogue: ``imgenc fit-planes`` and ``--planes``.

The hashing stays the notebook's: a bit is 1 where ``(x - offset) . w > 0``, for one plane
``w`` per bit.  Random planes through the origin waste bits on trained features (all
positive after ReLU, and many directions in which every photo looks alike), so a planes
file fits them on the features of a sample of the catalogue, with the model the
destination will use:

- ``center``: the offset is the features' mean; the planes stay the random ones of the
  seed (what ``--center`` did, in the one file type);
- ``itq``: the offset is the mean, and the planes are PCA's top directions turned by ITQ's
  learned rotation (Gong & Lazebnik, 2011), as ``faiss.ITQTransform`` fits them (faiss
  normalises each centred vector before the transform; the sign does not change).

The file (``planes.npz``) holds the offset, the planes and what they were fitted for:
backbone, layout, weights, bits, method and sample size.  Its SHA-256 goes into the code
spec, it is copied into the destination, and query encoders and workers take it from
there.  ITQ needs at least ``MIN_VECTORS_PER_BIT`` feature vectors per bit (images for the
pooled layout, positions for spatial), and cannot give more bits than the features have
dimensions.
"""

from __future__ import annotations

import functools
import json
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("center", "itq")
FORMAT = 1
# Measured on 944 labelled photos, pooled Lite0 features: ITQ fitted on as many images as
# bits lost 3% of its label precision at 64 bits against a fit on all of them; on twice as
# many, nothing measurable.  faiss's PCA refuses fewer vectors than bits.
MIN_VECTORS_PER_BIT = 2


class PlanesFileError(ValueError):
    """A planes file that cannot be used: damaged, or fitted for another model."""


@dataclass(frozen=True)
class PlanesInfo:
    """What a planes file was fitted for (its header)."""

    method: str
    backbone: str
    layout: str
    weights: str  # the spec's weights identity
    bits: int
    channels: int
    seed: int
    images: int  # images in the sample
    vectors: int  # feature vectors fitted on (images, or images x positions for spatial)
    format: int = FORMAT


@dataclass(frozen=True)
class FittedPlanes:
    info: PlanesInfo
    offset: np.ndarray  # (channels,) float32, subtracted before the planes
    planes: np.ndarray  # (channels, bits) float32, one column per bit

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(
                f,
                offset=self.offset.astype(np.float32),
                planes=self.planes.astype(np.float32),
                info=np.array(json.dumps(asdict(self.info))),
            )

    @classmethod
    def load(cls, path: str | Path) -> FittedPlanes:
        """The planes in ``path``; ``PlanesFileError`` naming the file when it is none."""
        not_planes = f"{path} is not a planes file from `imgenc fit-planes`"
        try:
            with np.load(path, allow_pickle=False) as data:
                offset, planes = data["offset"], data["planes"]
                info = PlanesInfo(**json.loads(str(data["info"])))
        except FileNotFoundError:
            raise PlanesFileError(f"planes file {path} does not exist") from None
        except (ValueError, OSError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            raise PlanesFileError(f"{not_planes} (damaged or of another kind)") from None
        if info.format != FORMAT or info.method not in METHODS:
            raise PlanesFileError(f"{not_planes} (format {info.format}, method {info.method!r})")
        if offset.shape != (info.channels,) or planes.shape != (info.channels, info.bits):
            raise PlanesFileError(f"{not_planes} (its arrays do not match its header)")
        return cls(info, offset.astype(np.float32), planes.astype(np.float32))

    def check_fits(self, backbone: str, layout: str, weights: str, bits: int) -> None:
        """Refuse planes fitted for another model, naming both."""
        mine = self.info
        wanted = {"backbone": backbone, "layout": layout, "weights": weights, "bits": bits}
        have = {"backbone": mine.backbone, "layout": mine.layout, "weights": mine.weights,
                "bits": mine.bits}  # fmt: skip
        differ = [
            f"{k} {have[k]!r} (planes) vs {v!r} (here)" for k, v in wanted.items() if have[k] != v
        ]
        if differ:
            raise PlanesFileError(
                f"the planes file was fitted for another model: {'; '.join(differ)}; fit "
                "planes with the same --backbone, --layout and --weights"
            )


def read_planes(path: str | Path) -> FittedPlanes:
    """``FittedPlanes.load``, read once per process for each (path, size, mtime)."""
    import os

    st = os.stat(path) if os.path.exists(path) else None
    return _read_planes(str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)


@functools.lru_cache(maxsize=8)
def _read_planes(path: str, size: int, mtime_ns: int) -> FittedPlanes:
    return FittedPlanes.load(path)


def read_planes_info(path: str | Path) -> PlanesInfo:
    return read_planes(path).info


class FeatureSample:
    """A sink that keeps the feature vectors of a run (one per image pooled, one per
    position spatial), up to ``limit`` vectors."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[np.ndarray] = []
        self.vectors = 0
        self.images = 0

    def add(self, results: Iterable[Any], features: np.ndarray) -> None:
        if features.shape[0] == 0 or self.vectors >= self.limit:
            return
        self.images += features.shape[0]
        flat = features.reshape(-1, features.shape[-1]).astype(np.float32)
        flat = flat[: self.limit - self.vectors]
        self.parts.append(flat)
        self.vectors += flat.shape[0]

    def flush(self) -> None:
        pass

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, 0), np.float32)


def planes_from_features(
    features: np.ndarray, method: str, bits: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, planes)`` fitted on ``(n, channels)`` features; ``ValueError`` with the
    number needed when there are too few, or more bits than dimensions for ITQ."""
    from encoder.planes import hyperplanes

    n, channels = features.shape
    offset = features.mean(axis=0).astype(np.float32)
    if method == "center":
        if n == 0:
            raise ValueError("no feature vector to average")
        return offset, np.array(hyperplanes(channels, bits, seed))
    if bits > channels:
        raise ValueError(
            f"ITQ gives at most as many bits as the features have dimensions: {channels} "
            f"here, not {bits}"
        )
    needed = MIN_VECTORS_PER_BIT * bits
    if n < needed:
        raise ValueError(
            f"ITQ with {bits} bits needs at least {needed} feature vectors "
            f"({MIN_VECTORS_PER_BIT} per bit); the sample gave {n}"
        )
    import logging

    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every import
    import faiss

    itq = faiss.ITQTransform(channels, bits, True)
    itq.train(np.ascontiguousarray(features, dtype=np.float32))
    transform = itq.pca_then_itq
    matrix = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    bias = faiss.vector_to_array(transform.b) if transform.have_bias else np.zeros(bits)
    mean = faiss.vector_to_array(itq.mean).astype(np.float32)
    planes = matrix.T.astype(np.float32)
    # sign((x - mean) A^T + b) = sign((x - offset) . planes) with offset = mean - A^T b
    # (A's rows are orthonormal).
    return (mean - planes @ bias.astype(np.float32)).astype(np.float32), planes


def fit_planes(
    image_dir: str | Path,
    settings: Any,
    method: str,
    sample: int = 20000,
    progress: bool = True,
    encoder: Any | None = None,
) -> FittedPlanes:
    """Fit planes of ``method`` on the features of up to ``sample`` images of
    ``image_dir``, with the model ``settings`` describe (see the module docstring)."""
    import itertools

    from encoder.backbones import get_backbone
    from encoder.images import ImageLoader
    from encoder.progress import TqdmProgress
    from encoder.runner import Runner
    from encoder.runtime import load_encoder
    from encoder.scan import scan_images
    from encoder.spec import weights_identity

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    backbone = get_backbone(settings.backbone)
    base = settings.replace(center=None, planes=None)
    encoder = encoder or load_encoder(base)
    positions = backbone.positions if settings.layout == "spatial" else 1
    features = FeatureSample(sample * positions)
    bar = TqdmProgress(sample, progress, desc=f"fit-planes {method}")
    runner = Runner(
        ImageLoader(image_dir, encoder.input_size),
        encoder.features,
        features,
        np.zeros((0, backbone.channels), np.float32),
        settings.batch,
        settings.decode_threads,
        bar,
    )
    try:
        runner.run(e.id for e in itertools.islice(scan_images(image_dir), sample))
    finally:
        bar.close()
    if features.images == 0:
        raise ValueError(f"no decodable image under {image_dir}")
    offset, planes = planes_from_features(features.array(), method, settings.bits, settings.seed)
    info = PlanesInfo(
        method=method,
        backbone=backbone.name,
        layout=settings.layout,
        weights=weights_identity(settings.weights, backbone.name),
        bits=settings.bits,
        channels=backbone.channels,
        seed=settings.seed,
        images=features.images,
        vectors=features.vectors,
    )
    return FittedPlanes(info, offset, planes)
