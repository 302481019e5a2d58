"""The notebook's own pipeline, ported only as far as Keras 3 forces, for comparison.

Changes from the notebook, all required to run on TensorFlow 2.21 / Keras 3:

- ``Input([None, None, 3])`` becomes ``Input([224, 224, 3])``: with an unknown spatial size
  the hashing layer's reshape fails ("unsupported operand type(s) for *: 'NoneType'...").
- ``from keras.preprocessing.image import ImageDataGenerator`` no longer exists; the legacy
  ``tf.keras.preprocessing.image.ImageDataGenerator`` does.
- Inside the layer, ``tf.reshape``/``tf.matmul``/``K.random_uniform`` on symbolic Keras 3
  tensors are not allowed; the same operations come from ``keras.ops``/``keras.random``.

Everything else is the notebook's: ``flow_from_dataframe`` with ``target_size=(224, 224)``,
``batch_size=128``, ``model.predict(generator)``, 500 hyperplanes, seed 628, int32 output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KERAS3_CHANGES = (
    "Input([None,None,3]) -> Input([224,224,3]); keras.preprocessing.image -> "
    "tf.keras.preprocessing.image (legacy); tf ops in the layer -> keras.ops"
)


def build_notebook_model(weights: str | None = None) -> Any:
    import keras
    from keras import ops

    class HyperPlaneHashingLayer(keras.layers.Layer):
        def __init__(self, n, random_seed=628):
            super().__init__()
            self.random_seed = random_seed
            self.n = n

        def build(self, input_shape):
            if len(input_shape) <= 3:
                raise Exception("> input dimension need to greater than 3.")
            self.hyperplanes = keras.random.uniform(
                (input_shape[-1], self.n), minval=-1.0, maxval=1.0, seed=self.random_seed
            )

        def call(self, input):
            scaled = ops.reshape(input, (-1, input.shape[-2] * input.shape[-3], input.shape[-1]))
            hash_val = ops.matmul(scaled, self.hyperplanes)
            return ops.cast(hash_val > 0, "int32")

    i = keras.layers.Input([224, 224, 3], dtype="float32")
    x = keras.applications.vgg16.preprocess_input(i)
    x = keras.applications.VGG16(include_top=False, weights=weights, input_shape=(224, 224, 3))(x)
    x = HyperPlaneHashingLayer(500)(x)
    return keras.Model(inputs=[i], outputs=[x])


def run_notebook_pipeline(image_dir: Path, files: list[str], model: Any, batch_size: int = 128):
    """The notebook's encode step: a dataframe of paths, flow_from_dataframe, predict."""
    import pandas as pd
    import tensorflow as tf

    df = pd.DataFrame({"filename": files})
    df["full_path_file_name"] = [str(image_dir / f) for f in files]
    df["class"] = "1"
    image_datagen = tf.keras.preprocessing.image.ImageDataGenerator()
    image_generator = image_datagen.flow_from_dataframe(
        dataframe=df,
        x_col="full_path_file_name",
        y_col="class",
        color_mode="rgb",
        target_size=(224, 224),
        shuffle=False,
        validate_filenames=True,
        batch_size=batch_size,
    )
    return model.predict(image_generator, verbose=0)
