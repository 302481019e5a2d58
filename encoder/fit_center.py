"""``fit_center``: the mean feature vector of a sample of the collection, for ``--center``.

The backbone's features are ReLU outputs, all non-negative, so random hyperplanes through
the origin see them all on one side of most planes and many bits come out (nearly) the
same for every image.  Subtracting the collection's mean feature first (the notebook's
commented-out ``K.mean(input, axis=0) - input``) centres the cloud on the origin; the
benchmark measures what it does to recall.  For the spatial layout the mean is taken over
images and positions, one value per channel.  It runs on the same ``Runner`` as
``imgenc encode``, with the features as output and ``FeatureMean`` as the sink.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from encoder.images import ImageLoader, LoadResult
from encoder.progress import TqdmProgress
from encoder.runner import Runner
from encoder.scan import scan_images
from encoder.settings import Settings


class FeatureMean:
    """A sink that keeps the running mean of feature vectors (float64 sums)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.vectors = 0  # feature vectors summed (images x positions)
        self.images = 0

    def add(self, results: list[LoadResult], features: np.ndarray) -> None:
        if features.shape[0] == 0:
            return
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        self.total = flat.sum(axis=0) if self.total is None else self.total + flat.sum(axis=0)
        self.vectors += flat.shape[0]
        self.images += features.shape[0]

    def flush(self) -> None:
        pass

    @property
    def mean(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("no feature vector was added")
        return (self.total / self.vectors).astype(np.float32)


def fit_center(
    image_dir: str | Path,
    settings: Settings,
    sample: int = 2000,
    progress: bool = True,
    encoder: Any | None = None,
) -> tuple[np.ndarray, int]:
    """Mean feature vector over the first ``sample`` images found; returns (centre, images
    that decoded)."""
    from encoder.runtime import load_encoder

    if encoder is None:
        encoder = load_encoder(settings.replace(center=None))
    mean = FeatureMean()
    ids = sample_ids(image_dir, sample)
    sample_features(image_dir, encoder, mean, settings, ids, progress, "fit-center")
    return mean.mean, mean.images


def sample_ids(image_dir: str | Path, sample: int) -> list[str]:
    """The ids of the first ``sample`` images found under ``image_dir``: the sample."""
    return [entry.id for entry in itertools.islice(scan_images(image_dir), sample)]


def sample_features(
    image_dir: str | Path,
    encoder: Any,
    sink: Any,
    settings: Settings,
    ids: list[str],
    progress: bool,
    desc: str,
) -> None:
    """The features of the images ``ids`` of ``image_dir`` into ``sink`` (a ``Runner``
    sink with an ``images`` count), with a progress bar; ``ValueError`` when none
    decodes.  What ``fit-center`` and ``fit-planes`` read their sample with."""
    bar = TqdmProgress(len(ids), progress, desc=desc)
    runner = Runner(
        ImageLoader(image_dir, encoder.input_size),
        encoder.features,
        sink,
        np.zeros((0, encoder.backbone.channels), np.float32),
        settings.batch,
        settings.decode_threads,
        bar,
    )
    try:
        runner.run(ids)
    finally:
        bar.close()
    if sink.images == 0:
        raise ValueError(f"no decodable image under {image_dir}")
