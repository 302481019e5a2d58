"""``imgenc fit-center`` and ``--center``: the mean feature, subtracted before hashing."""

from __future__ import annotations

import hashlib

import numpy as np

from encoder.codes import load_codes, read_spec
from tests.test_cli_encode import imgenc


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
