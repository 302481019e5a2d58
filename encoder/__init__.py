"""imgenc's encoder: VGG16 (or another Keras backbone) + hyperplane LSH, the image loader,
the shard writer, the code and manifest readers and ``load_features``.  Importing this
package does not import TensorFlow; ``encoder.model`` does, when a model is built."""

from encoder.codes import hamming, iter_codes, load_codes, pack_bits, read_spec, unpack_codes
from encoder.features import FeaturesMissing, load_features
from encoder.images import ImageLoader, ImageStatus, LoadResult
from encoder.keys import image_key, image_keys
from encoder.merged import read_manifest
from encoder.settings import Settings
from encoder.spec import CodeSpec, SpecMismatch, spec_for

__all__ = [
    "CodeSpec",
    "FeaturesMissing",
    "ImageLoader",
    "ImageStatus",
    "LoadResult",
    "Settings",
    "SpecMismatch",
    "hamming",
    "image_key",
    "image_keys",
    "iter_codes",
    "load_codes",
    "load_features",
    "pack_bits",
    "read_manifest",
    "read_spec",
    "spec_for",
    "unpack_codes",
]
