"""``HyperplaneHashing``: the Keras layer that turns a feature map into LSH bits.

It multiplies each feature vector by ``n_bits`` hyperplanes and keeps the sign, like the
notebook's ``HyperPlaneHashingLayer``, with three differences: the planes come from NumPy
(see ``encoder.planes``), they are a non-trainable weight saved with the model, and
``get_config()`` round-trips, so ``model.save`` / ``keras.models.load_model`` give
identical codes.

Input ``(batch, h, w, c)`` gives ``(batch, h*w, n_bits)``: one code per feature-map
position (the ``spatial`` layout).  Input ``(batch, c)`` gives ``(batch, n_bits)`` (the
``pooled`` layout).  An optional ``center`` vector is subtracted first.  Output is uint8 0/1.

With ``learned=True`` the planes and the offset are fitted ones (``encoder.fitted_planes``:
``planes`` and ``offset`` passed as arrays) instead of the seed's: they are weights of the
layer, saved and restored with the model like any other, so ``get_config`` only says that
they are learned, and a loaded model gets them back from its weights.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from encoder.planes import hyperplanes


@keras.saving.register_keras_serializable(package="imgenc")
class HyperplaneHashing(keras.layers.Layer):
    def __init__(
        self,
        n_bits: int = 500,
        seed: int = 628,
        center: list[float] | None = None,
        learned: bool = False,
        planes: np.ndarray | None = None,
        offset: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        # Hash in float32 whatever the global policy: bf16 rounding right at the sign
        # boundary would flip bits for nothing.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.n_bits = int(n_bits)
        self.seed = int(seed)
        self.center = None if center is None else [float(v) for v in center]
        self.learned = bool(learned)
        if self.learned and self.center is not None:
            raise ValueError("learned planes carry their own offset; give no center")
        self._fitted = (planes, offset)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if len(input_shape) not in (2, 4):
            raise ValueError(
                f"HyperplaneHashing needs (batch, h, w, c) or (batch, c) input, got {input_shape}"
            )
        if len(input_shape) == 4 and (input_shape[1] is None or input_shape[2] is None):
            raise ValueError(
                "HyperplaneHashing needs a known spatial size; build the backbone with a fixed "
                f"input size (got {input_shape})"
            )
        channels = int(input_shape[-1])
        self.planes = self.add_weight(
            name="planes", shape=(channels, self.n_bits), initializer="zeros", trainable=False
        )
        if self.learned:
            self.center_vector = self.add_weight(
                name="offset", shape=(channels,), initializer="zeros", trainable=False
            )
            planes, offset = self._fitted
            if planes is not None and offset is not None:  # else restored from saved weights
                if tuple(planes.shape) != (channels, self.n_bits) or len(offset) != channels:
                    raise ValueError(
                        f"planes {tuple(planes.shape)} and offset ({len(offset)}) do not fit "
                        f"{channels} channels and {self.n_bits} bits"
                    )
                self.planes.assign(np.asarray(planes, np.float32))
                self.center_vector.assign(np.asarray(offset, np.float32))
            return
        self.planes.assign(hyperplanes(channels, self.n_bits, self.seed))
        if self.center is not None:
            if len(self.center) != channels:
                raise ValueError(f"center has {len(self.center)} values, features have {channels}")
            self.center_vector = self.add_weight(
                name="center", shape=(channels,), initializer="zeros", trainable=False
            )
            self.center_vector.assign(np.asarray(self.center, dtype=np.float32))

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        if len(inputs.shape) == 4:
            _, h, w, c = inputs.shape
            x = ops.reshape(x, (-1, h * w, c))
        if self.center is not None or self.learned:
            x = x - self.center_vector
        return ops.cast(ops.matmul(x, self.planes) > 0, "uint8")

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        if len(input_shape) == 4:
            return (input_shape[0], input_shape[1] * input_shape[2], self.n_bits)
        return (input_shape[0], self.n_bits)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(n_bits=self.n_bits, seed=self.seed, center=self.center, learned=self.learned)
        return config
