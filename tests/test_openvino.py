"""The OpenVINO runtime: the same model converted in-process, fp32/bf16/int8, its cache, the
calibration sample in the spec, determinism across processes, spec refusals, the
distributed path with OpenVINO workers, and a clear refusal when the runtime is missing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from encoder.codes import load_codes, read_spec
from tests.helpers import (
    REPO,
    CeleryWorker,
    imgenc,
    make_settings,
    worker_env,
    write_jpegs,
)

pytest.importorskip("openvino", reason="the openvino extra is part of the test extra")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov") / "images"
    write_jpegs(folder, 24, size=(256, 256))
    return folder


@pytest.fixture(scope="module")
def calibration(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib.npz"
    run = imgenc(
        "calibrate", str(photos), "--out", str(out), "--sample", "16", "--no-progress",
        env={"IMGENC_WEIGHTS": "random"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "16 images" in run.stdout
    return out


def pixels_of(folder, n=8, size=224):
    from encoder.images import ImageLoader

    loader = ImageLoader(folder, size)
    names = sorted(p.name for p in folder.iterdir())[:n]
    return np.stack([loader.load(name).pixels for name in names])


def test_calibrate_keeps_the_loaders_pixels_of_a_sample_of_the_folder(photos, calibration):
    from encoder.calibrate import load_calibration
    from encoder.images import ImageLoader

    pixels = load_calibration(calibration)
    assert pixels.shape == (16, 224, 224, 3) and pixels.dtype == np.uint8
    with np.load(calibration) as data:
        ids = [str(i) for i in data["ids"]]
    assert len(set(ids)) == 16
    loader = ImageLoader(photos, 224)
    assert all(np.array_equal(p, loader.load(i).pixels) for p, i in zip(pixels, ids, strict=True))


@pytest.mark.parametrize("layout", ["spatial", "pooled"])
def test_openvino_fp32_codes_agree_with_tensorflow_fp32(photos, layout):
    from encoder.runtime import load_encoder

    batch = pixels_of(photos)
    tf = load_encoder(make_settings(layout=layout))
    ov = load_encoder(make_settings(layout=layout, runtime="openvino"))
    agreement = float((tf.bits(batch) == ov.bits(batch)).mean())
    assert agreement >= 0.995, agreement
    assert ov.spec.runtime == "openvino" and ov.spec.fingerprint != tf.spec.fingerprint


def test_the_converted_model_is_cached_and_the_cache_gives_the_same_codes(photos, tmp_path):
    from encoder.runtime import load_encoder

    settings = make_settings(layout="pooled", runtime="openvino", model_cache=str(tmp_path))
    first = load_encoder(settings)
    second = load_encoder(settings)
    assert not first.cache_hit and second.cache_hit
    assert len(list(tmp_path.glob("*.xml"))) == 1 and len(list(tmp_path.glob("*.bin"))) == 1
    batch = pixels_of(photos)
    assert np.array_equal(first.encode(batch), second.encode(batch))


_INT8_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from encoder.runtime import load_encoder
from encoder.settings import Settings
settings = Settings.from_env({"weights": "imagenet", "layout": "spatial", "runtime": "openvino",
    "backbone": "efficientnet_lite0", "precision": "int8", "calibration": sys.argv[2],
    "model_cache": sys.argv[3]}, environ={})
encoder = load_encoder(settings)
assert not encoder.cache_hit  # each process quantizes for itself
np.save(sys.argv[4], encoder.encode(np.load(sys.argv[5])))
"""


def test_int8_codes_are_identical_in_two_processes_that_quantize_separately(
    photos, calibration, tmp_path
):
    np.save(tmp_path / "pixels.npy", pixels_of(photos))
    procs = []
    for run in (1, 2):
        command = [sys.executable, "-c", _INT8_SCRIPT, str(REPO), str(calibration)]
        command += [str(tmp_path / f"cache{run}"), str(tmp_path / f"codes{run}.npy")]
        command += [str(tmp_path / "pixels.npy")]
        procs.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    first, second = np.load(tmp_path / "codes1.npy"), np.load(tmp_path / "codes2.npy")
    # Lite0 with its trained weights (quantized in a fraction of VGG16's time; random
    # weights give it features alike for every photo), spatial: 7 x 7 x 500 bits packed.
    assert first.shape == (8, 3063)
    assert np.array_equal(first, second)
    assert len({c.tobytes() for c in first}) == len(first)  # image-dependent codes


def test_int8_codes_mostly_agree_with_fp32(photos, calibration):
    from encoder.runtime import load_encoder

    batch = pixels_of(photos)
    fp32 = load_encoder(make_settings(layout="pooled", runtime="openvino"))
    int8 = load_encoder(
        make_settings(layout="pooled", runtime="openvino", precision="int8",
                      calibration=str(calibration))
    )  # fmt: skip
    agreement = float((fp32.bits(batch) == int8.bits(batch)).mean())
    assert 0.9 < agreement < 1.0, agreement


def test_an_int8_destination_records_runtime_precision_and_calibration_and_carries_the_file(
    photos, calibration, tmp_path
):
    out = tmp_path / "codes"
    common = ("--weights", "random", "--layout", "pooled", "--runtime", "openvino")
    run = imgenc(
        "encode", str(photos), "--out", str(out), *common, "--precision", "int8",
        "--calibration", str(calibration), "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    spec = read_spec(out)
    assert (spec.runtime, spec.precision) == ("openvino", "int8")
    import hashlib

    assert spec.calibration_sha256 == hashlib.sha256(calibration.read_bytes()).hexdigest()
    assert (out / "calibration.npz").read_bytes() == calibration.read_bytes()
    ids, codes = load_codes(out)
    assert len(ids) == 24

    # Another runtime, precision or calibration into the same destination: refused.
    tf_run = imgenc("encode", str(photos), "--out", str(out), "--weights", "random",
                    "--layout", "pooled", "--no-progress")  # fmt: skip
    assert tf_run.returncode == 2 and "runtime" in tf_run.stderr
    other = tmp_path / "other.npz"
    from encoder.calibrate import load_calibration, save_calibration

    save_calibration(other, load_calibration(calibration)[:8], ["x"] * 8)
    other_run = imgenc(
        "encode", str(photos), "--out", str(out), *common, "--precision", "int8",
        "--calibration", str(other), "--no-progress",
    )  # fmt: skip
    assert other_run.returncode == 2 and "calibration_sha256" in other_run.stderr

    # Queries are encoded with the same quantized model, from the destination's own file.
    from search import Index

    answer = Index.open(str(out)).query([str(photos / "img_00005.jpg")], k=1)[0]
    assert answer.results == [{"id": "img_00005.jpg", "distance": 0}]


def test_int8_needs_openvino_and_a_calibration_sample(tmp_path, photos, calibration):
    with pytest.raises(ValueError, match="openvino"):
        make_settings(precision="int8")
    out = tmp_path / "o"
    int8 = ("--weights", "random", "--runtime", "openvino", "--precision", "int8")
    run = imgenc("encode", str(photos), "--out", str(out), *int8, "--no-progress")
    assert run.returncode == 2 and "--calibration" in run.stderr and "Traceback" not in run.stderr
    # Refused before anything was written, so the right command (as in the test above, with
    # --calibration) works on the same --out.
    assert not out.exists()


def test_a_file_that_is_no_calibration_sample_is_refused_in_one_line(tmp_path, photos):
    junk = tmp_path / "junk.npz"
    junk.write_text("hi\n")
    stub = tmp_path / "stub.npz"  # a real sample, of the stub's 28-pixel input
    run = imgenc("calibrate", str(photos), "--out", str(stub), "--sample", "2",
                 "--backbone", "stub", "--no-progress", env={"IMGENC_WEIGHTS": "random"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    int8 = ("--weights", "random", "--runtime", "openvino", "--precision", "int8")
    for sample, says in ((junk, "is not a calibration sample"), (stub, "28-pixel images")):
        out = tmp_path / f"out-{sample.stem}"
        run = imgenc(
            "encode", str(photos), "--out", str(out), *int8, "--calibration", str(sample),
            "--no-progress",
        )  # fmt: skip
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr
        assert not out.exists()


def test_enqueue_refuses_int8_without_a_calibration_sample_before_sending_anything(
    tmp_path, photos
):
    out = tmp_path / "o"
    run = imgenc(
        "enqueue", str(photos), "--out", str(out), "--weights", "random",
        "--runtime", "openvino", "--precision", "int8",
        env={"IMGENC_BROKER_URL": "redis://127.0.0.1:9/0"},  # nothing listens: never reached
    )  # fmt: skip
    assert run.returncode == 2 and "--calibration" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_a_missing_openvino_is_a_one_line_refusal_naming_the_extra(tmp_path, photos):
    fake = tmp_path / "no-openvino"
    fake.mkdir()
    (fake / "openvino.py").write_text("raise ImportError('No module named openvino')\n")
    env = {"PYTHONPATH": str(fake)}
    run = imgenc(
        "encode", str(photos), "--out", str(tmp_path / "o"), "--weights", "random",
        "--runtime", "openvino", "--no-progress", env=env,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "pip install 'imgenc[openvino]'" in run.stderr


def test_openvino_int8_workers_encode_a_job_like_the_embedded_path(
    redis_server, photos, calibration, tmp_path
):
    import producer

    # The stub backbone (28-pixel input) needs a calibration sample of its own size.
    stub_calib = tmp_path / "stub-calib.npz"
    run = imgenc("calibrate", str(photos), "--out", str(stub_calib), "--sample", "8",
                 "--backbone", "stub", "--no-progress", env={"IMGENC_WEIGHTS": "random"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    model = {"backbone": "stub", "weights": "random", "layout": "pooled", "runtime": "openvino",
             "precision": "int8", "calibration": str(stub_calib)}  # fmt: skip
    env = worker_env(
        redis_server.url,
        IMGENC_LAYOUT="pooled",
        IMGENC_RUNTIME="openvino",
        IMGENC_PRECISION="int8",
        IMGENC_CALIBRATION=str(stub_calib),
        IMGENC_MODEL_CACHE=str(tmp_path / "worker-cache"),
    )
    worker = CeleryWorker(env, tmp_path / "worker.log").start()
    try:
        job = producer.enqueue(photos, str(tmp_path / "dist"), broker=redis_server.url, **model)
        final = job.wait(timeout=300)
    finally:
        worker.stop()
    assert final.counts == {"ok": 24}
    from encoder.folder_run import encode_folder

    encode_folder(photos, str(tmp_path / "local"), make_settings(**model), progress=False)
    ids_d, codes_d = load_codes(tmp_path / "dist")
    ids_l, codes_l = load_codes(tmp_path / "local")
    assert list(ids_d) == list(ids_l) and np.array_equal(codes_d, codes_l)
    assert "model ready" in worker.text() and "openvino" in worker.text()
