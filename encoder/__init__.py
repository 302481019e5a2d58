"""imgenc's encoder: VGG16 (or another Keras backbone) + hyperplane LSH, the image loader,
the shard writer, the code reader and ``load_features``.  Importing this package does not
import TensorFlow; ``encoder.model`` does, when a model is built."""

from encoder.codes import hamming, load_codes, pack_bits, read_spec, unpack_codes
from encoder.features import FeaturesMissing, load_features
from encoder.images import ImageLoader, ImageStatus, LoadResult
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
    "load_codes",
    "load_features",
    "pack_bits",
    "read_spec",
    "spec_for",
    "unpack_codes",
]
