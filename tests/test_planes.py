"""Learned hyperplanes (``imgenc fit-planes``, ``--planes``): PCA-ITQ fitted on the
catalogue's own features with the trained backbone, one file type with ``--method
center``, the same codes on every path (TensorFlow and OpenVINO, embedded, resumed,
queries, workers), and clear refusals of planes that do not fit."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from encoder.fitted_planes import FittedPlanes, PlanesFileError
from encoder.spec import COMPAT_FIELDS, LATER_FIELDS, spec_for
from search import Index
from tests.helpers import (
    LITE0,
    CeleryWorker,
    RedisServer,
    built_once,
    catalogue_of_photos,
    imgenc,
    make_settings,
    photo_labels,
    worker_env,
)

MODEL = ("--backbone", "efficientnet_lite0", "--layout", "pooled")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return catalogue_of_photos(tmp_path_factory.mktemp("planes") / "photos")


def fit_itq32(folder) -> None:
    """``folder/itq32.npz``: 32 ITQ planes fitted on the catalogue's photos."""
    photos = catalogue_of_photos(folder / "photos")
    run = imgenc("fit-planes", str(photos), "--out", str(folder / "itq32.npz"), *MODEL,
                 "--bits", "32", "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "itq planes, 32 bits (4 bytes per image)" in run.stdout


@pytest.fixture(scope="module")
def itq32(tmp_path_factory):
    """Fitted once per session, shared by every test process (read only)."""
    return built_once(tmp_path_factory, "itq32", fit_itq32) / "itq32.npz"


def precision_at_10(dest) -> float:
    truth, index = photo_labels(), Index.open(str(dest))
    return float(
        np.mean(
            [np.mean([truth[r] == truth[q] for r in index.similar(q, 10).ids]) for q in index.ids]
        )
    )


def test_itq_codes_of_4_bytes_find_similar_items_better_than_random_planes_of_as_many_bits(
    photos, itq32, tmp_path, reliability
):
    learned, random = tmp_path / "itq", tmp_path / "random"
    for dest, extra in ((learned, ("--planes", str(itq32))), (random, ("--bits", "32"))):
        run = imgenc("encode", str(photos), "--out", str(dest), *MODEL, *extra,
                     "--no-progress", "--no-dedup-fit")  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    spec = json.loads((learned / "spec.json").read_text())
    assert spec["bytes_per_code"] == 4 and spec["planes_method"] == "itq"
    assert (learned / "planes.npz").read_bytes() == itq32.read_bytes()  # carried with the codes
    itq, plain = precision_at_10(learned), precision_at_10(random)
    reliability.append({"test": "label precision@10, 32 bits pooled, 115 photos",
                        "itq": round(itq, 3), "random_planes": round(plain, 3)})  # fmt: skip
    assert itq >= plain + 0.05, (itq, plain)


def test_the_planes_round_trip_through_a_saved_keras_model(itq32, tmp_path):
    import keras

    from encoder.model import build_model

    settings = make_settings(**LITE0, planes=str(itq32))
    model = build_model(settings)
    config = model.get_layer("hyperplane_hashing").get_config()
    assert config["learned"] is True and "planes" not in config
    model.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras")
    pixels = np.random.RandomState(0).randint(0, 256, (4, 224, 224, 3)).astype(np.float32)
    assert np.array_equal(model(pixels).numpy(), again(pixels).numpy())


def test_tensorflow_and_openvino_hash_with_the_same_fitted_planes(itq32, photos):
    from encoder.images import ImageLoader
    from encoder.runtime import load_encoder

    settings = make_settings(**LITE0, planes=str(itq32))
    loader = ImageLoader(photos, 224)
    pixels = np.stack([loader.load(p.name).pixels for p in sorted(photos.iterdir())[:16]])
    tf_bits = load_encoder(settings).bits(pixels)
    ov_bits = load_encoder(settings.replace(runtime="openvino")).bits(pixels)
    assert tf_bits.shape == (16, 32) and (tf_bits == ov_bits).mean() > 0.99


def test_queries_a_resumed_job_and_a_worker_give_the_embedded_codes(photos, itq32, tmp_path):
    import producer
    from encoder.codes import load_codes

    some = tmp_path / "some-photos"  # 32 of the photos the planes were fitted on
    some.mkdir()
    for path in sorted(photos.iterdir())[:32]:
        shutil.copy2(path, some / path.name)
    photos = some
    embedded = tmp_path / "embedded"
    imgenc("encode", str(photos), "--out", str(embedded), *MODEL, "--planes", str(itq32),
           "--no-progress", "--no-dedup-fit")  # fmt: skip
    ids, codes = load_codes(embedded)
    # A query encoder takes the planes from the destination, not from anywhere else.
    index = Index.open(str(embedded))
    first = photos / ids[0]
    answer = index.query([(ids[0], first.read_bytes())], k=1)[0]
    assert answer.results[0] == {"id": ids[0], "distance": 0}

    # Resumed: half the folder first, then the rest.
    half = tmp_path / "half"
    half.mkdir()
    for name in ids[: len(ids) // 2]:
        shutil.copy2(photos / name, half / name)
    resumed = tmp_path / "resumed"
    for folder in (half, photos):
        run = imgenc("encode", str(folder), "--out", str(resumed), *MODEL, "--planes",
                     str(itq32), "--resume", "--no-progress", "--no-dedup-fit")  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(load_codes(resumed)[1], codes)

    # A worker started with the planes (IMGENC_PLANES).
    redis = RedisServer(tmp_path / "redis").start()
    env = worker_env(redis.url, IMGENC_BACKBONE="efficientnet_lite0", IMGENC_LAYOUT="pooled",
                     IMGENC_WEIGHTS="imagenet", IMGENC_PLANES=str(itq32))  # fmt: skip
    worker = CeleryWorker(env, tmp_path / "worker.log").start()
    try:
        out = tmp_path / "distributed"
        job = producer.enqueue(photos, str(out), broker=redis.url, dedup_fit=False,
                               backbone="efficientnet_lite0", layout="pooled",
                               weights="imagenet", planes=str(itq32))  # fmt: skip
        assert job.wait(timeout=300).counts == {"ok": len(ids)}
    finally:
        worker.stop()
        redis.stop(kill=True)
    assert np.array_equal(load_codes(out)[1], codes)


def test_method_center_is_fit_center_in_the_planes_file_type(photos, tmp_path):
    from encoder.centering import load_center
    from encoder.planes import hyperplanes

    planes, center = tmp_path / "center.npz", tmp_path / "center.npy"
    assert imgenc("fit-planes", str(photos), "--out", str(planes), "--method", "center",
                  *MODEL, "--no-progress").returncode == 0  # fmt: skip
    assert imgenc("fit-center", str(photos), "--out", str(center), *MODEL,
                  "--no-progress").returncode == 0  # fmt: skip
    fitted = FittedPlanes.load(planes)
    assert fitted.info.method == "center" and fitted.info.bits == 500
    assert np.allclose(fitted.offset, load_center(center), atol=1e-5)
    assert np.array_equal(fitted.planes, hyperplanes(1280, 500, 628))


def test_destinations_made_before_fitted_planes_keep_their_fingerprint():
    spec = spec_for(make_settings(layout="pooled"))
    older = {k: getattr(spec, k) for k in COMPAT_FIELDS if k not in LATER_FIELDS or k == "runtime"}
    older.pop("runtime")
    expected = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert spec.fingerprint == expected


def test_planes_that_do_not_fit_are_refused_in_one_clear_line(photos, itq32, tmp_path):
    def error_of(*args: str) -> str:
        run = imgenc(*args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        return run.stderr.strip().splitlines()[-1]

    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(photos.iterdir())[:40]:
        shutil.copy(path, few / path.name)
    assert "needs at least 64 feature vectors" in error_of(
        "fit-planes", str(few), "--out", str(tmp_path / "p.npz"), *MODEL, "--bits", "32",
        "--no-progress",
    )  # fmt: skip
    assert "at most as many bits as the features have dimensions: 1280" in error_of(
        "fit-planes", str(photos), "--out", str(tmp_path / "p.npz"), *MODEL, "--bits", "2048",
        "--no-progress",
    )  # fmt: skip
    other = error_of("encode", str(photos), "--out", str(tmp_path / "o"), "--backbone", "stub",
                     "--weights", "random", "--layout", "spatial", "--planes", str(itq32))  # fmt: skip
    assert "backbone 'efficientnet_lite0' (planes) vs 'stub' (here)" in other
    assert "layout 'pooled' (planes) vs 'spatial' (here)" in other
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(itq32.read_bytes()[:2000])
    assert "is not a planes file" in error_of(
        "encode", str(photos), "--out", str(tmp_path / "d"), *MODEL, "--planes", str(damaged)
    )
    with pytest.raises(PlanesFileError, match="is not a planes file"):
        FittedPlanes.load(damaged)
