"""``TensorFlowEncoder``: the model of ``encoder.model`` run by TensorFlow, through one
compiled ``tf.function`` (never ``predict()`` in a loop, which is slow and has leaked)."""

from __future__ import annotations

from typing import Any

import numpy as np

from encoder.backbones import get_backbone
from encoder.centering import load_center
from encoder.codes import pack_bits
from encoder.model import build_model, feature_model
from encoder.runtime import pooled, warm_up
from encoder.settings import Settings
from encoder.spec import CodeSpec, spec_for
from encoder.tensorflow_import import tensorflow


class TensorFlowEncoder:
    """Pixels in, packed codes out, with the spec those codes are made under."""

    def __init__(self, settings: Settings, model: Any | None = None) -> None:
        tf = tensorflow()
        self.settings = settings
        self.spec: CodeSpec = spec_for(settings)
        self.empty_codes = np.zeros((0, self.spec.bytes_per_code), np.uint8)
        self.backbone = get_backbone(settings.backbone)
        center = load_center(settings.center) if settings.center else None
        self.model = model if model is not None else build_model(settings, center)
        self._signature = [tf.TensorSpec((None, self.input_size, self.input_size, 3), tf.uint8)]
        self._forward = tf.function(
            lambda pixels: self.model(tf.cast(pixels, tf.float32), training=False),
            input_signature=self._signature,
            reduce_retracing=True,
        )
        self._features: Any = None
        self._both: Any = None

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    def features(self, pixels: np.ndarray) -> np.ndarray:
        if self._features is None:
            tf = tensorflow()
            extractor = feature_model(self.model)
            self._features = tf.function(
                lambda x: tf.cast(extractor(tf.cast(x, tf.float32), training=False), tf.float32),
                input_signature=self._signature,
            )
        out = self._features(pixels).numpy()
        return out.reshape(out.shape[0], -1, out.shape[-1]) if out.ndim == 4 else out

    def encode_with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if pixels.shape[0] == 0:
            return self.empty_codes, np.zeros((0, self.backbone.channels), np.float32)
        if self._both is None:
            tf = tensorflow()
            import keras

            extractor = feature_model(self.model)
            both = keras.Model(self.model.input, [self.model.output, extractor.output])
            self._both = tf.function(
                lambda x: [
                    tf.cast(y, tf.float32) for y in both(tf.cast(x, tf.float32), training=False)
                ],
                input_signature=self._signature,
            )
        bits, features = self._both(pixels)
        return pack_bits(bits.numpy().astype(np.uint8)), pooled(features.numpy())

    def bits(self, pixels: np.ndarray) -> np.ndarray:
        return self._forward(pixels).numpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[0] == 0:
            return self.empty_codes
        return pack_bits(self.bits(pixels))

    def warm_up(self) -> None:
        warm_up(self)
