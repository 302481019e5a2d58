"""``imgenc fit-center`` and ``--center``: the mean feature, subtracted before hashing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from encoder.codes import load_codes, read_spec
from encoder.images import ImageLoader
from tests.helpers import get_encoder, imgenc


def test_fit_center_then_encode_with_it_records_the_centre_in_spec_and_destination(
    jpeg_dir, tmp_path
):
    center = tmp_path / "center.npy"
    fit = imgenc(
        "fit-center",
        str(jpeg_dir),
        "--out",
        str(center),
        "--weights",
        "random",
        "--backbone",
        "stub",
        "--layout",
        "pooled",
        "--no-progress",
    )
    assert fit.returncode == 0, fit.stderr
    vector = np.load(center)
    assert vector.shape == (16,) and (vector > 0).any()  # the stub's 16 channels

    plain, centred = tmp_path / "plain", tmp_path / "centred"
    common = ("--weights", "random", "--backbone", "stub", "--layout", "pooled", "--no-progress")
    assert imgenc("encode", str(jpeg_dir), "--out", str(plain), *common).returncode == 0
    run = imgenc("encode", str(jpeg_dir), "--out", str(centred), "--center", str(center), *common)
    assert run.returncode == 0, run.stderr

    spec = read_spec(centred)
    assert spec.center_sha256 == hashlib.sha256(center.read_bytes()).hexdigest()
    assert read_spec(plain).center_sha256 is None
    assert (centred / "center.npy").read_bytes() == center.read_bytes()
    assert spec.fingerprint != read_spec(plain).fingerprint
    _, a = load_codes(plain)
    _, b = load_codes(centred)
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
def test_fit_center_writes_the_mean_of_the_features_over_images_and_positions(
    jpeg_dir, tmp_path, layout
):
    import keras

    center = tmp_path / "center.npy"
    fit = imgenc(
        "fit-center", str(jpeg_dir), "--out", str(center), "--weights", "random",
        "--layout", layout, "--no-progress",
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    # The same features, computed here from the backbone's raw output, averaged in float64.
    enc = get_encoder(layout=layout)
    extractor = keras.Model(enc.model.input, enc.model.get_layer("hyperplane_hashing").input)
    names = sorted(p.name for p in jpeg_dir.iterdir())
    loader = ImageLoader(jpeg_dir, enc.input_size)
    pixels = np.stack([loader.load(n).pixels for n in names]).astype("float32")
    features = np.asarray(extractor(pixels, training=False), np.float64)
    expected = features.reshape(-1, features.shape[-1]).mean(axis=0)
    got = np.load(center)
    assert got.shape == (512,) and got.dtype == np.float32
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(got, features[0].reshape(-1, 512).mean(axis=0))  # not one image's
