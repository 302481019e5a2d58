"""The VGG16 + hyperplane LSH model, run for real with random weights on generated images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from encoder.backbones import BACKBONES
from encoder.codes import hamming, pack_bits, unpack_codes
from encoder.images import ImageLoader
from encoder.planes import hyperplanes, planes_sha256
from encoder.settings import Settings
from encoder.spec import spec_for
from tests.helpers import REPO, get_encoder, make_settings, write_jpegs


def _pixels(folder: Path, names: list[str], size: int = 224) -> np.ndarray:
    loader = ImageLoader(folder, size)
    return np.stack([loader.load(n).pixels for n in names])


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> np.ndarray:
    folder = tmp_path_factory.mktemp("model_images")
    names = write_jpegs(folder, 3)
    return _pixels(folder, names)


def test_spatial_vgg16_gives_49_codes_of_500_bits_packed_to_3063_bytes(batch):
    enc = get_encoder()
    bits = enc.bits(batch)
    assert bits.shape == (3, 49, 500)
    assert set(np.unique(bits)) <= {0, 1}
    codes = enc.encode(batch)
    assert codes.shape == (3, 3063) and codes.dtype == np.uint8
    assert enc.spec.bytes_per_code == 3063 and enc.spec.code_shape == (49, 500)


def test_pooled_layout_gives_one_500_bit_code_per_image(batch):
    enc = get_encoder(layout="pooled")
    assert enc.bits(batch).shape == (3, 500)
    assert enc.encode(batch).shape == (3, 63)


def test_different_images_get_different_codes_and_the_same_image_the_same(batch):
    enc = get_encoder(layout="pooled")
    codes = enc.encode(batch)
    again = enc.encode(batch[::-1])[::-1]
    assert np.array_equal(codes, again)
    assert hamming(codes[0], codes[1:]).min() > 0


def test_pack_then_unpack_restores_every_bit():
    spec = spec_for(Settings.from_env({"weights": "random"}, environ={}))
    bits = np.random.RandomState(1).randint(0, 2, size=(4, 49, 500)).astype(np.uint8)
    packed = pack_bits(bits)
    assert packed.shape == (4, 3063)
    assert np.array_equal(unpack_codes(packed, spec), bits)


def test_hamming_counts_differing_bits_on_packed_codes():
    a = pack_bits(np.array([[1, 0, 1, 1, 0, 0, 0, 1, 1]]))
    b = pack_bits(np.array([[1, 1, 1, 0, 0, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0, 0, 1, 1]]))
    assert hamming(a[0], b).tolist() == [[3, 0]]


def test_hyperplanes_are_numpy_uniform_in_minus_one_one_and_stable():
    planes = hyperplanes(512, 500, 628)
    assert planes.shape == (512, 500) and planes.dtype == np.float32
    assert planes.min() >= -1 and planes.max() < 1
    # RandomState is NumPy's frozen stream: these values must never change.
    assert np.allclose(planes[0, :3], np.random.RandomState(628).uniform(-1, 1, 3))
    assert planes_sha256(512, 500, 628) == spec_for(Settings.from_env(environ={})).planes_sha256


def test_hashing_layer_holds_the_planes_as_a_non_trainable_weight():
    layer = get_encoder().model.get_layer("hyperplane_hashing")
    assert layer.trainable_weights == []
    assert np.array_equal(layer.planes.numpy(), hyperplanes(512, 500, 628))


def test_saving_and_reloading_the_model_gives_identical_codes(batch, tmp_path):
    import keras

    from encoder.hashing import HyperplaneHashing

    enc = get_encoder()
    path = tmp_path / "encoder.keras"
    enc.model.save(path)
    reloaded = keras.models.load_model(path)
    layer = reloaded.get_layer("hyperplane_hashing")
    assert isinstance(layer, HyperplaneHashing) and (layer.n_bits, layer.seed) == (500, 628)
    assert np.array_equal(reloaded(batch.astype("float32")).numpy(), enc.bits(batch))


def test_a_weights_file_gives_identical_codes_in_processes_with_different_tf_seeds(batch, tmp_path):
    np.save(tmp_path / "pixels.npy", batch)
    script = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[3]);"
        "from encoder.tf_runtime import TensorFlowEncoder as Encoder; from encoder.settings import Settings;"
        "import keras; keras.utils.set_random_seed(int(sys.argv[4]));"
        "enc = Encoder(Settings.from_env({'weights': sys.argv[5], 'layout': 'pooled'}, environ={}));"
        "np.save(sys.argv[2], enc.encode(np.load(sys.argv[1])))"
    )
    import keras

    from encoder.tf_runtime import TensorFlowEncoder

    # Weights drawn by Keras here, unseeded: neither the seeded random weights nor any
    # other process could draw them again, so only the file can carry them.
    weights = tmp_path / "backbone.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None).save_weights(weights)
    here = TensorFlowEncoder(make_settings(layout="pooled", weights=str(weights))).encode(batch)
    assert not np.array_equal(here, get_encoder(layout="pooled").encode(batch))
    # Another process with its own TF seed.
    out = tmp_path / "codes.npy"
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "pixels.npy"),
            str(out),
            str(REPO),
            "12345",
            str(weights),
        ],
        check=True,
        capture_output=True,
    )
    assert np.array_equal(np.load(out), here)


# Every backbone (each in one layout, both layouts between them: the layout only changes
# the head), encoded with --weights random in a fresh process.
BACKBONE_LAYOUTS = [
    ("vgg16", "pooled"),
    ("vgg16", "spatial"),
    ("vgg19", "pooled"),
    ("inception_v3", "spatial"),
    ("xception", "pooled"),
    ("efficientnet_lite0", "spatial"),
    ("stub", "pooled"),
]
_RANDOM_WEIGHTS_SCRIPT = (
    f"BACKBONE_LAYOUTS = {BACKBONE_LAYOUTS!r}\n"
    + """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from encoder.tensorflow_import import tensorflow
tensorflow()  # as imgenc imports it
import keras
from encoder.images import ImageLoader
from encoder.tf_runtime import TensorFlowEncoder as Encoder
from encoder.settings import Settings

keras.utils.set_random_seed(int(sys.argv[4]))  # a different TF/Keras seed in each process
names = sys.argv[5:]
codes = {}
for backbone, layout in BACKBONE_LAYOUTS:
    settings = Settings.from_env(
        {"weights": "random", "backbone": backbone, "layout": layout}, environ={}
    )
    enc = Encoder(settings)
    loader = ImageLoader(sys.argv[2], enc.input_size)
    pixels = np.stack([loader.load(n).pixels for n in names])
    codes[f"{backbone}-{layout}"] = enc.encode(pixels)
np.savez(sys.argv[3], **codes)
"""
)


def test_random_weights_give_identical_codes_in_separate_processes_for_every_backbone(
    tmp_path,
):
    names = write_jpegs(tmp_path / "images", 2)
    procs = []
    for run in (1, 2):
        out = tmp_path / f"codes{run}.npz"
        command = [sys.executable, "-c", _RANDOM_WEIGHTS_SCRIPT, str(REPO)]
        command += [str(tmp_path / "images"), str(out), str(run), *names]
        procs.append((out, subprocess.Popen(command, stderr=subprocess.PIPE, text=True)))
    results = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(np.load(out))
    first, second = results
    assert sorted(first.files) == sorted(f"{b}-{layout}" for b, layout in BACKBONE_LAYOUTS)
    assert {b for b, _ in BACKBONE_LAYOUTS} == set(BACKBONES)  # every registered backbone
    for key in first.files:
        assert first[key].shape[0] == 2 and np.array_equal(first[key], second[key]), key
        assert not np.array_equal(first[key][0], first[key][1]), key  # image-dependent
    here = get_encoder(layout="pooled").encode(_pixels(tmp_path / "images", names))
    assert np.array_equal(here, first["vgg16-pooled"])  # and the same as in this process


def test_random_weights_are_recorded_in_the_spec_with_the_seed_that_draws_them():
    from encoder.random_weights import RANDOM_WEIGHTS_ID

    spec = spec_for(Settings.from_env({"weights": "random", "seed": 7}, environ={}))
    assert spec.weights == RANDOM_WEIGHTS_ID and spec.seed == 7
    other = spec_for(Settings.from_env({"weights": "random", "seed": 8}, environ={}))
    assert spec.fingerprint != other.fingerprint


def test_random_weights_depend_on_the_seed(batch):
    a = get_encoder(layout="pooled").model.get_layer("vgg16").weights[0].numpy()
    b = get_encoder(layout="pooled", seed=1).model.get_layer("vgg16").weights[0].numpy()
    assert a.shape == b.shape and not np.array_equal(a, b)


def _projection_oracle(enc, pixels: np.ndarray, center: np.ndarray | None = None):
    """The code bits computed outside the hashing layer: the backbone's raw feature map,
    flattened row-major over positions, minus the centre, times the hyperplanes, > 0."""
    import keras

    hashing = enc.model.get_layer("hyperplane_hashing")
    extractor = keras.Model(enc.model.input, hashing.input)
    features = np.asarray(extractor(pixels.astype("float32"), training=False), np.float64)
    if features.ndim == 4:
        n, h, w, c = features.shape
        features = features.reshape(n, h * w, c)
    if center is not None:
        features = features - center
    planes = hyperplanes(features.shape[-1], enc.settings.bits, enc.settings.seed)
    projection = features @ planes.astype(np.float64)
    return projection > 0, np.abs(projection)


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
def test_code_bits_equal_the_sign_of_features_times_hyperplanes_computed_outside_the_layer(
    batch, tmp_path, layout, centred
):
    center = None
    overrides = {"layout": layout}
    if centred:
        rng = np.random.RandomState(3)
        center = rng.uniform(0, 0.5, 512).astype(np.float32)
        np.save(tmp_path / "center.npy", center)
        overrides["center"] = str(tmp_path / "center.npy")
    enc = get_encoder(**overrides)
    bits = enc.bits(batch)
    expected, margin = _projection_oracle(enc, batch, center)
    assert bits.shape == expected.shape
    differ = bits.astype(bool) != expected
    # float32 in the layer against float64 here: only projections at the sign boundary
    # may round differently.
    scale = float(np.median(margin))
    assert differ.mean() < 1e-3 and (margin[differ] < 1e-4 * scale).all()
    assert 0.05 < expected.mean() < 0.95  # the bits are not all on one side


def test_weights_file_is_identified_by_its_sha256(tmp_path):
    weights = tmp_path / "vgg16.weights.h5"
    get_encoder().model.get_layer("vgg16").save_weights(weights)
    spec = spec_for(Settings.from_env({"weights": str(weights)}, environ={}))
    import hashlib

    assert spec.weights == "file:sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()


def test_imagenet_download_failure_is_one_paragraph_naming_the_other_options(monkeypatch):
    import keras

    from encoder.model import WeightsUnavailable, build_model

    def no_network(*args, **kwargs):  # the download itself is the one thing mocked
        raise Exception("URL fetch failure on https://example/vgg16.h5: None -- [Errno -2]")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", no_network)
    with pytest.raises(WeightsUnavailable) as info:
        build_model(Settings.from_env({"weights": "imagenet"}, environ={}))
    message = str(info.value)
    assert "--weights random" in message and "--weights PATH" in message
    assert "\n" not in message


def test_random_weights_print_a_warning_that_codes_carry_no_meaning(caplog):
    from encoder.model import build_model

    with caplog.at_level("WARNING", logger="imgenc"):
        build_model(Settings.from_env({"weights": "random", "backbone": "stub"}, environ={}))
    assert "no visual meaning" in caplog.text


def test_bf16_codes_mostly_agree_with_fp32_for_the_same_weights(batch, tmp_path):
    weights = tmp_path / "vgg16.weights.h5"
    get_encoder(layout="pooled").model.get_layer("vgg16").save_weights(weights)
    fp32 = get_encoder(layout="pooled", weights=str(weights)).bits(batch)
    bf16 = get_encoder(layout="pooled", weights=str(weights), precision="bf16").bits(batch)
    agreement = float((fp32 == bf16).mean())
    assert 0.9 < agreement <= 1.0, agreement


@pytest.mark.parametrize(
    "backbone,grid,size",
    [("vgg19", 49, 224), ("inception_v3", 64, 299), ("xception", 100, 299), ("stub", 49, 28)],
)
def test_every_registered_backbone_builds_with_its_own_input_size(backbone, grid, size, tmp_path):
    enc = get_encoder(backbone=backbone, bits=64)
    names = write_jpegs(tmp_path, 1)
    pixels = _pixels(tmp_path, names, enc.input_size)
    assert enc.bits(pixels).shape == (1, grid, 64)
    spec = json.loads(enc.spec.to_json())
    assert spec["input_size"] == size == enc.input_size
