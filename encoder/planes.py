"""The random hyperplanes of the LSH, drawn with NumPy so that every worker holds the same ones.

``numpy.random.RandomState`` is NumPy's frozen legacy generator: its stream for a given
seed is guaranteed not to change between NumPy versions (the newer ``Generator`` makes no
such promise).  TensorFlow's random ops are avoided on purpose: their streams differ by
device and version.  The SHA-256 of the planes goes into the code spec, so a mismatch
would be caught anyway.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def hyperplanes(n_features: int, n_bits: int, seed: int) -> np.ndarray:
    """``(n_features, n_bits)`` float32 planes, uniform in [-1, 1) as in the notebook.

    Each column is the normal of one hyperplane; a code bit is 1 where the feature vector
    lies on the positive side.  The array is read-only because it is cached.
    """
    planes = np.random.RandomState(seed).uniform(-1.0, 1.0, size=(n_features, n_bits))
    planes = planes.astype(np.float32)
    planes.setflags(write=False)
    return planes


def planes_sha256(n_features: int, n_bits: int, seed: int) -> str:
    return hashlib.sha256(hyperplanes(n_features, n_bits, seed).tobytes()).hexdigest()


def hash_features(
    features: np.ndarray, planes: np.ndarray, center: np.ndarray | None = None
) -> np.ndarray:
    """The bits of ``features`` (``(..., channels)``), as the Keras ``HyperplaneHashing``
    layer computes them: 1 where ``(features - center) @ planes > 0``, as uint8."""
    if center is not None:
        features = features - center
    return (features @ planes > 0).astype(np.uint8)
