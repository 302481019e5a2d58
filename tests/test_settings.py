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


def test_a_process_reads_its_environment_once_and_shares_the_settings(monkeypatch):
    from encoder.settings import process_settings

    process_settings.cache_clear()
    monkeypatch.setenv("IMGENC_BITS", "128")
    first = process_settings()
    monkeypatch.setenv("IMGENC_BITS", "256")
    assert process_settings() is first and first.bits == 128
    process_settings.cache_clear()


def test_an_unknown_setting_is_an_error_not_silently_ignored():
    with pytest.raises(TypeError, match="bacbone"):
        Settings.from_env({"bacbone": "vgg19"}, environ={})


def test_a_malformed_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="IMGENC_BITS='many'"):
        Settings.from_env(environ={"IMGENC_BITS": "many"})


def test_stub_delay_and_the_image_root_come_from_the_environment_like_every_setting():
    s = Settings.from_env(environ={"IMGENC_STUB_DELAY": "0.5", "IMGENC_IMAGE_ROOT": "/data"})
    assert s.stub_delay == 0.5 and s.image_root == "/data"
