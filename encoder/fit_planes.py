"""Fitting a planes file: ``imgenc fit-planes`` (the file format is ``encoder.fitted_planes``).

A sample of the catalogue goes through the model the destination will use, and its features
give the offset (their mean) and, for ``itq``, PCA's top directions turned by ITQ's learned
rotation (``faiss.ITQTransform``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from encoder.fitted_planes import METHODS, MIN_VECTORS_PER_BIT, FittedPlanes, PlanesInfo


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


def refuse_impossible_itq(bits: int, channels: int, vectors: int, source: str) -> None:
    """``ValueError`` when ITQ cannot give ``bits`` bits from ``vectors`` feature vectors of
    ``channels`` dimensions (``source`` says where the count comes from)."""
    if bits > channels:
        raise ValueError(
            f"ITQ gives at most as many bits as the features have dimensions: {channels} "
            f"here, not {bits}"
        )
    needed = MIN_VECTORS_PER_BIT * bits
    if vectors < needed:
        raise ValueError(
            f"ITQ with {bits} bits needs at least {needed} feature vectors "
            f"({MIN_VECTORS_PER_BIT} per bit); {source} {vectors}"
        )


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
    refuse_impossible_itq(bits, channels, n, "the sample gave")
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
    from encoder.backbones import get_backbone
    from encoder.fit_center import sample_features, sample_ids
    from encoder.runtime import load_encoder
    from encoder.spec import weights_identity

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    backbone = get_backbone(settings.backbone)
    positions = backbone.positions if settings.layout == "spatial" else 1
    ids = sample_ids(image_dir, sample)
    if method == "itq":  # refused before the model loads and the sample is encoded
        refuse_impossible_itq(
            settings.bits, backbone.channels, len(ids) * positions,
            f"{len(ids)} images under {image_dir} offer at most",
        )  # fmt: skip
    base = settings.replace(center=None, planes=None)
    encoder = encoder or load_encoder(base)
    features = FeatureSample(len(ids) * positions)
    sample_features(image_dir, encoder, features, settings, ids, progress, f"fit-planes {method}")
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
