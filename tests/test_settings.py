"""One config for CLI, producer and worker: defaults, IMGENC_* variables, then flags."""

import pytest

from encoder.settings import Settings


def test_defaults_are_the_notebooks_model():
    s = Settings.from_env(environ={})
    assert (s.backbone, s.layout, s.bits, s.seed, s.weights, s.precision, s.batch) == (
        "vgg16",
        "spatial",
        500,
        628,
        "imagenet",
        "fp32",
        32,
    )


def test_environment_overrides_defaults_and_flags_override_environment():
    env = {"IMGENC_BITS": "256", "IMGENC_WEIGHTS": "random", "IMGENC_LAYOUT": "pooled"}
    s = Settings.from_env({"bits": 64, "layout": None}, environ=env)
    assert s.bits == 64 and s.weights == "random" and s.layout == "pooled"


def test_invalid_layout_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="spatial"):
        Settings.from_env({"layout": "flat"}, environ={})
