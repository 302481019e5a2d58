"""``--features``: the pooled float features beside the codes, float16, one row per ok
image aligned with the codes, through resume and through the Celery workers to S3; a
destination made without them is filled or refused, never left half-filled silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoder import FeaturesMissing, load_codes, load_features
from encoder.folder_run import encode_folder
from encoder.images import ImageLoader
from tests.helpers import (
    STUB,
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    get_encoder,
    imgenc,
    make_settings,
    worker_env,
    write_jpegs,
)

SPATIAL = {**STUB, "layout": "spatial"}  # features averaged over the 49 positions


def catalogue(folder: Path, n: int = 6) -> Path:
    write_jpegs(folder, n)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    return folder


def fresh(folder: Path, ids, **model) -> tuple[np.ndarray, np.ndarray]:
    """Codes and pooled features of ``ids`` encoded now, one image at a time."""
    encoder = get_encoder(**model)
    loader = ImageLoader(folder, encoder.input_size)
    pixels = np.stack([loader.load(i).pixels for i in ids])
    codes = np.concatenate([encoder.encode(p[None]) for p in pixels])
    features = encoder.features(pixels)
    return codes, features.reshape(len(ids), -1, features.shape[-1]).mean(axis=1)


def assert_aligned(dest: Path, folder: Path, **model) -> None:
    ids, codes = load_codes(dest)
    feature_ids, features = load_features(dest)
    assert list(feature_ids) == list(ids) and features.dtype == np.float16
    expected_codes, expected = fresh(folder, list(ids), **model)
    assert (codes == expected_codes).all()
    assert np.allclose(features.astype(np.float32), expected, rtol=2**-10, atol=1e-4)


def test_a_features_destination_holds_one_float16_row_per_ok_image_aligned_with_codes(tmp_path):
    folder = catalogue(tmp_path / "images")
    run = imgenc(
        "encode", str(folder), "--out", str(tmp_path / "d"), "--backbone", "stub",
        "--weights", "random", "--features", "--no-progress", "--shard-size", "4",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "features: 16 float16 values (32 B) per ok image" in run.stdout
    dest = tmp_path / "d"
    spec = json.loads((dest / "spec.json").read_text())
    assert spec["features"] is True
    assert sorted(p.name for p in (dest / "features").iterdir()) == sorted(
        p.name for p in (dest / "codes").iterdir()
    )  # a features shard beside every code shard (6 ok images in shards of 4)
    ids, features = load_features(dest)
    assert len(ids) == 6 and features.shape == (6, 16)
    assert_aligned(dest, folder, **SPATIAL)
    mapped_ids, mapped = load_features(dest, mmap=True)  # gathered once into one file
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    assert list(mapped_ids) == list(ids) and np.array_equal(mapped, features)
    assert list((dest / "cache").glob("features-*.npy")) == [Path(mapped.filename)]


def test_features_stay_out_of_the_fingerprint_so_codes_with_and_without_compare(tmp_path):
    folder = catalogue(tmp_path / "images")
    with_features, without = tmp_path / "with", tmp_path / "without"
    encode_folder(folder, str(with_features), make_settings(**STUB), progress=False, features=True)
    encode_folder(folder, str(without), make_settings(**STUB), progress=False)
    spec = [json.loads((d / "spec.json").read_text()) for d in (with_features, without)]
    assert spec[0]["fingerprint"] == spec[1]["fingerprint"]
    assert (load_codes(with_features)[1] == load_codes(without)[1]).all()


def test_after_a_resume_features_stick_and_stay_aligned_with_new_and_changed_images(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False, features=True)
    write_jpegs(folder, 2, start=50)  # new images
    (folder / "img_00001.jpg").write_bytes((folder / "img_00050.jpg").read_bytes())  # changed
    (folder / "notes.jpg").unlink()
    # no --features this time: the destination has them, so they are written anyway
    summary = encode_folder(folder, str(dest), make_settings(**STUB), resume=True, progress=False)
    # the two new images, the changed one, and the empty file again (only ok ones skip)
    assert summary.features and summary.counts["ok"] == 3 and summary.skipped == 5
    ids, features = load_features(dest)
    assert len(ids) == 8 == features.shape[0]
    assert_aligned(dest, folder, **SPATIAL)


def test_after_a_resume_with_deletions_features_hold_one_row_per_ok_image_only(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False, features=True)
    for name in ("img_00000.jpg", "img_00003.jpg"):
        (folder / name).unlink()
    write_jpegs(folder, 1, start=70)
    summary = encode_folder(folder, str(dest), make_settings(**STUB), resume=True, progress=False)
    assert summary.counts["deleted"] == 2 and summary.counts["ok"] == 1
    ids, features = load_features(dest)
    assert "img_00000.jpg" not in ids and "img_00003.jpg" not in ids
    assert len(ids) == 5 == features.shape[0]  # 4 left + 1 new
    assert_aligned(dest, folder, **SPATIAL)


def test_resume_features_on_a_featureless_destination_with_deletions_fills_the_rest(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False)
    (folder / "img_00002.jpg").unlink()  # gone: it needs no features, and is no refusal
    summary = encode_folder(
        folder, str(dest), make_settings(**STUB), resume=True, progress=False, features=True
    )
    assert summary.counts["deleted"] == 1 and summary.counts["ok"] == 5
    ids, _ = load_features(dest)
    assert len(ids) == 5 and "img_00002.jpg" not in ids
    assert_aligned(dest, folder, **SPATIAL)


def test_resume_features_on_a_destination_made_without_fills_them_for_every_ok_image(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False)
    with pytest.raises(FeaturesMissing, match="without --features.*--resume --features"):
        load_features(dest)
    summary = encode_folder(
        folder, str(dest), make_settings(**STUB), resume=True, progress=False, features=True
    )
    assert summary.counts["ok"] == 6 and summary.skipped == 0  # every ok image again
    assert json.loads((dest / "spec.json").read_text())["features"] is True
    assert_aligned(dest, folder, **SPATIAL)


def test_resume_features_is_refused_clearly_when_some_images_are_not_in_the_folder(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False)
    part = tmp_path / "part"
    part.mkdir()
    for name in ("img_00000.jpg", "img_00001.jpg"):
        shutil.copy(folder / name, part / name)
    before = sorted(p.name for p in dest.rglob("*"))
    run = imgenc(
        "encode", str(part), "--out", str(dest), "--backbone", "stub", "--weights", "random",
        "--resume", "--features", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 2
    assert "4 of its ok images without features are not under" in run.stderr
    assert sorted(p.name for p in dest.rglob("*")) == before  # nothing written
    assert json.loads((dest / "spec.json").read_text())["features"] is False


def test_an_interrupted_fill_is_named_by_load_features_not_read_half(tmp_path):
    folder = catalogue(tmp_path / "images")
    dest = tmp_path / "d"
    encode_folder(folder, str(dest), make_settings(**STUB), progress=False, features=True)
    shard = next((dest / "features").iterdir())
    shard.unlink()  # as if the features of those rows were never written
    with pytest.raises(FeaturesMissing, match="6 of the 6 ok images .* have no features"):
        load_features(dest)


def test_enqueue_features_has_the_workers_write_features_that_load_features_reads_from_s3(
    tmp_path, monkeypatch
):
    import producer

    redis = RedisServer(tmp_path / "redis").start()
    s3 = SeaweedS3(tmp_path / "weed").start()
    worker = None
    try:
        s3.client().create_bucket(Bucket="codes")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        worker = CeleryWorker(worker_env(redis.url, **s3.env()), tmp_path / "w.log").start()
        folder = catalogue(tmp_path / "images", 7)
        dest = "s3://codes/with-features"
        job = producer.enqueue(
            folder, dest, broker=redis.url, chunk=3, features=True, dedup_fit=False, **STUB
        )
        assert job.wait(timeout=120).counts == {"empty": 1, "not_an_image": 1, "ok": 7}
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="codes")["Contents"]]
        assert sum(k.startswith("with-features/features/") for k in keys) == sum(
            k.startswith("with-features/codes/") for k in keys
        )
        ids, features = load_features(dest)
        assert len(ids) == 7 and features.shape == (7, 16)
        local = tmp_path / "local"
        encode_folder(folder, str(local), make_settings(**STUB), progress=False, features=True)
        local_ids, local_features = load_features(local)
        assert list(local_ids) == list(ids)
        assert np.allclose(local_features, features, rtol=2**-10, atol=1e-3)
    finally:
        if worker is not None:
            worker.stop()
        s3.stop()
        redis.stop(kill=True)


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_both_runtimes_give_the_codes_of_encode_and_the_pooled_features_from_one_pass(
    runtime, tmp_path
):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    from encoder.runtime import load_encoder

    folder = catalogue(tmp_path / "images", 4)
    settings = make_settings(**SPATIAL, runtime=runtime)
    encoder = load_encoder(settings)
    loader = ImageLoader(folder, encoder.input_size)
    pixels = np.stack([loader.load(f"img_{i:05d}.jpg").pixels for i in range(4)])
    codes, pooled = encoder.encode_with_features(pixels)
    assert (codes == encoder.encode(pixels)).all()
    features = encoder.features(pixels)  # (4, positions, channels)
    assert pooled.shape == (4, features.shape[-1])
    assert np.allclose(pooled, features.mean(axis=1), rtol=1e-5, atol=1e-5)
    empty_codes, empty = encoder.encode_with_features(pixels[:0])
    assert empty_codes.shape == (0, encoder.spec.bytes_per_code) and len(empty) == 0
