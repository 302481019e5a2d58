"""Feature centring for the LSH: the mean feature vector, subtracted before hashing.

ReLU features are all non-negative, so hyperplanes through the origin cut them unevenly;
subtracting the collection's mean feature (the notebook's commented-out
``K.mean(input, axis=0) - input``) moves the cloud to the origin.  ``imgenc fit-center``
computes the mean; ``--center FILE`` uses it, and its SHA-256 goes into the code spec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_center(path: str | Path) -> np.ndarray:
    center = np.load(path, allow_pickle=False)
    if center.ndim != 1:
        raise ValueError(f"{path}: a centre must be a 1-D vector, got shape {center.shape}")
    return center.astype(np.float32)


def save_center(path: str | Path, center: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.asarray(center, np.float32), allow_pickle=False)
