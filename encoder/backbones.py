"""The registry of feature extractors: each entry keeps its constructor, its own
``preprocess_input``, its input size and its feature-map shape together.

The four ImageNet backbones are the ones the notebook imports, all from
``keras.applications`` with ``include_top=False``.  ``stub`` is a test backbone: a cheap,
deterministic, weight-free feature map used to measure and test the queue path without
paying for a CNN.  Nothing here imports TensorFlow until a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int  # square input, pixels per side
    feature_shape: tuple[int, int, int]  # (height, width, channels) of the conv feature map
    application: str  # attribute of keras.applications, or "" for the stub
    module: str  # keras.applications submodule holding preprocess_input
    gflops: float  # multiply-adds x2 per image for the conv part (benchmark bookkeeping)

    @property
    def channels(self) -> int:
        return self.feature_shape[-1]

    @property
    def positions(self) -> int:
        return self.feature_shape[0] * self.feature_shape[1]

    def preprocess(self) -> Callable[[Any], Any]:
        import keras

        if not self.module:
            return lambda x: x / 127.5 - 1.0
        return getattr(keras.applications, self.module).preprocess_input

    def build(self, weights: str | None) -> Any:
        """The Keras feature extractor. ``weights`` is "imagenet", a file path or None."""
        import keras

        shape = (self.input_size, self.input_size, 3)
        if not self.application:
            return _stub_model(shape, self.feature_shape)
        constructor = getattr(keras.applications, self.application)
        return constructor(include_top=False, weights=weights, input_shape=shape)


def _stub_model(shape: tuple[int, int, int], feature_shape: tuple[int, int, int]) -> Any:
    """Average-pool the image to the feature grid and spread the 3 colours over the
    channels with a fixed projection: image-dependent, deterministic, and nearly free."""
    import keras
    import numpy as np

    h, w, c = feature_shape
    inputs = keras.Input(shape)
    pooled = keras.layers.AveragePooling2D(pool_size=(shape[0] // h, shape[1] // w))(inputs)
    projection = keras.layers.Dense(c, use_bias=False, trainable=False, name="stub_projection")
    features = projection(pooled)
    rng = np.random.RandomState(0)
    projection.set_weights([rng.standard_normal((3, c)).astype("float32")])
    return keras.Model(inputs, features, name="stub")


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", 224, (7, 7, 512), "VGG16", "vgg16", 30.7),
        Backbone("vgg19", 224, (7, 7, 512), "VGG19", "vgg19", 39.0),
        Backbone("inception_v3", 299, (8, 8, 2048), "InceptionV3", "inception_v3", 11.5),
        Backbone("xception", 299, (10, 10, 2048), "Xception", "xception", 16.8),
        Backbone("stub", 28, (7, 7, 16), "", "", 0.0),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None
