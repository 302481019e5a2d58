"""Seeded random weights for a backbone: the same values in every process, on every host.

``keras.applications.VGG16(weights=None)`` draws its kernels from TensorFlow's random
ops, unseeded, so two processes built two different networks and their ``--weights
random`` codes disagreed on about 39% of their bits.  Here every kernel (every weight of
two or more dimensions) is redrawn from NumPy's frozen ``RandomState``, seeded with the
code spec's ``seed`` and the weight's position in ``model.weights``, with Keras's default
Glorot-uniform scale.  Biases and batch-norm statistics keep their constant initial
values (zeros and ones).  The spec records this rule as ``RANDOM_WEIGHTS_ID``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RANDOM_WEIGHTS_ID = "random:glorot-uniform/numpy-RandomState(seed,index)"


def glorot_limit(shape: tuple[int, ...]) -> float:
    """Keras's Glorot-uniform bound for a kernel of ``shape``: sqrt(6 / (fan_in + fan_out))."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    return float(np.sqrt(6.0 / (fan_in + fan_out)))


def seeded_kernel(shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    limit = glorot_limit(shape)
    rng = np.random.RandomState([seed, index])
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def randomize(model: Any, seed: int) -> None:
    """Overwrite every kernel of ``model`` (a built Keras model) with seeded values."""
    for index, variable in enumerate(model.weights):
        shape = tuple(int(n) for n in variable.shape)
        if len(shape) >= 2:
            variable.assign(seeded_kernel(shape, seed, index))
