"""The ``Encoder`` interface, and ``load_encoder``, the one factory of encoders.

An encoder turns a batch of decoded images (``(n, size, size, 3)`` uint8 pixels) into
packed codes, and on request into the float features the hashing sees, under the code
spec it declares.  Two runtimes implement it: TensorFlow (``encoder.tf_runtime``) and
OpenVINO for CPU workers (``encoder.openvino_runtime``); a runtime is one more entry in
``RUNTIME_CLASSES``.  Everything that encodes (``imgenc encode``, the Celery worker,
query encoding, the fits) takes an ``Encoder`` from ``load_encoder``.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from encoder.backbones import Backbone
from encoder.settings import Settings
from encoder.spec import CodeSpec

RUNTIME_CLASSES = {  # settings.runtime -> "module:class"
    "tensorflow": "encoder.tf_runtime:TensorFlowEncoder",
    "openvino": "encoder.openvino_runtime:OpenVinoEncoder",
}


class Encoder(Protocol):
    settings: Settings
    spec: CodeSpec
    backbone: Backbone
    empty_codes: np.ndarray  # (0, bytes_per_code) uint8: what a batch without images maps to

    @property
    def input_size(self) -> int: ...

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, size, size, 3)`` uint8 pixels to ``(n, bytes_per_code)`` packed codes."""
        ...

    def bits(self, pixels: np.ndarray) -> np.ndarray:
        """The same, unpacked: ``(n, *spec.code_shape)`` 0/1 uint8."""
        ...

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """The float features the hashing sees (centre not subtracted): ``(n, positions,
        channels)`` for the spatial layout, ``(n, channels)`` for pooled."""
        ...

    def encode_with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes and the pooled float features (``(n, channels)`` float32: the
        spatial layout's features averaged over positions), from one forward pass."""
        ...

    def warm_up(self) -> None:
        """Run one batch, so that the first real one pays no tracing or compiling."""
        ...


def load_encoder(settings: Settings) -> Encoder:
    """The encoder of ``settings.runtime`` for ``settings``."""
    module, _, name = RUNTIME_CLASSES[settings.runtime].partition(":")
    return getattr(importlib.import_module(module), name)(settings)


def pooled(features: np.ndarray) -> np.ndarray:
    """``(n, positions, channels)`` or ``(n, h, w, channels)`` features averaged over
    positions; ``(n, channels)`` ones as they are (float32)."""
    features = np.asarray(features, np.float32)
    if features.ndim > 2:
        features = features.reshape(features.shape[0], -1, features.shape[-1]).mean(axis=1)
    return features


def warm_up(encoder: Encoder) -> None:
    """Run one black image through ``encoder`` (the ``warm_up`` of both runtimes)."""
    size = encoder.input_size
    encoder.encode(np.zeros((1, size, size, 3), np.uint8))
