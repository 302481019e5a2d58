"""``imgenc encode`` end to end, as a user runs it: a subprocess, random weights, no services."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from encoder.codes import load_codes, read_spec
from encoder.manifest import csv_to_rows
from encoder.random_weights import RANDOM_WEIGHTS_ID
from tests.helpers import REPO, imgenc, photo_like, write_jpegs, written_rows


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "catalogue"
    write_jpegs(folder, 4)
    write_jpegs(folder / "sub dir", 2, start=10)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    data = (folder / "img_00000.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    return folder


def test_encode_writes_shards_manifest_and_spec_and_continues_past_bad_files(mixed_dir, tmp_path):
    out = tmp_path / "codes"
    run = imgenc(
        "encode", str(mixed_dir), "--out", str(out), "--weights", "random", "--no-progress"
    )
    assert run.returncode == 0, run.stderr
    assert "no visual meaning" in run.stderr
    assert "ok             6" in run.stdout
    for status in ("empty", "not_an_image", "truncated"):
        assert f"{status:<14} 1" in run.stdout

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert {"path", "sha256", "status", "error", "shard", "row"} <= set(manifest.columns)
    assert len(manifest) == 9 and written_rows(str(out)) == Counter(manifest["id"])
    assert (manifest.status == "ok").sum() == 6
    assert manifest.loc[manifest.status != "ok", "error"].notna().all()

    ids, codes = load_codes(out)
    assert codes.shape == (6, 3063) and codes.dtype == np.uint8
    assert list(ids) == sorted(manifest.loc[manifest.status == "ok", "id"])
    assert "sub dir/img_00010.jpg" in ids
    spec = read_spec(out)
    assert (spec.backbone, spec.layout, spec.n_bits, spec.seed, spec.weights) == (
        "vgg16",
        "spatial",
        500,
        628,
        RANDOM_WEIGHTS_ID,
    )


def test_strict_exits_non_zero_when_any_image_failed(mixed_dir, tmp_path):
    run = imgenc(
        "encode",
        str(mixed_dir),
        "--out",
        str(tmp_path / "o"),
        "--weights",
        "random",
        "--backbone",
        "stub",
        "--strict",
        "--no-progress",
    )
    assert run.returncode == 1
    assert "ok             6" in run.stdout


def test_flags_can_come_from_imgenc_environment_variables(jpeg_dir, tmp_path):
    out = tmp_path / "o"
    run = imgenc(
        "encode",
        str(jpeg_dir),
        "--out",
        str(out),
        "--no-progress",
        env={"IMGENC_WEIGHTS": "random", "IMGENC_LAYOUT": "pooled", "IMGENC_BITS": "128"},
    )
    assert run.returncode == 0, run.stderr
    ids, codes = load_codes(out)
    assert codes.shape == (6, 16)


def test_resume_encodes_only_new_or_changed_images_and_the_changed_one_gets_its_new_code(
    jpeg_dir, tmp_path
):
    out = tmp_path / "o"
    common = ("--weights", "random", "--layout", "pooled", "--no-progress")
    assert imgenc("encode", str(jpeg_dir), "--out", str(out), *common).returncode == 0
    first = dict(zip(*load_codes(out), strict=True))

    write_jpegs(jpeg_dir, 2, start=100)  # two new images
    changed = jpeg_dir / "img_00001.jpg"
    photo_like(999).save(changed)  # a changed one (new content, size and mtime)
    run = imgenc("encode", str(jpeg_dir), "--out", str(out), "--resume", *common)
    assert run.returncode == 0, run.stderr
    assert "done: 3 images" in run.stdout and "5 already done" in run.stdout
    written = [
        r for part in sorted((out / "parts").glob("*.csv")) for r in csv_to_rows(part.read_bytes())
    ]
    assert len(written) == 6 + 3  # the first run's rows, then only the three new or changed
    assert [r["id"] for r in written].count("img_00001.jpg") == 2

    ids, codes = load_codes(out)
    resumed = dict(zip(ids, codes, strict=True))
    assert len(resumed) == 8
    fresh_out = tmp_path / "fresh"
    assert imgenc("encode", str(jpeg_dir), "--out", str(fresh_out), *common).returncode == 0
    fresh = dict(zip(*load_codes(fresh_out), strict=True))
    assert resumed.keys() == fresh.keys()
    assert all(np.array_equal(resumed[i], fresh[i]) for i in fresh)  # the changed one too
    assert not np.array_equal(resumed["img_00001.jpg"], first["img_00001.jpg"])
    assert all(np.array_equal(resumed[i], first[i]) for i in first if i != "img_00001.jpg")


def test_destination_with_another_spec_is_refused(jpeg_dir, tmp_path):
    out = tmp_path / "o"
    assert (
        imgenc(
            "encode",
            str(jpeg_dir),
            "--out",
            str(out),
            "--weights",
            "random",
            "--backbone",
            "stub",
            "--no-progress",
        ).returncode
        == 0
    )
    run = imgenc(
        "encode",
        str(jpeg_dir),
        "--out",
        str(out),
        "--weights",
        "random",
        "--backbone",
        "stub",
        "--bits",
        "64",
        "--no-progress",
    )
    assert run.returncode == 2
    assert "different code spec" in run.stderr and "n_bits" in run.stderr


CTRL_C_IMAGES = 200


def default_sigint() -> None:
    """In the child, before it runs: SIGINT as a terminal gives it.  A background job of a
    shell without job control (``pytest ... &`` in a script, some CI runners) starts with
    SIGINT ignored, every child inherits that, and Python then keeps ignoring it: the run
    would finish, untouched by the interrupt, with status 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_only_whole_shards_in_the_manifest_and_resume_finishes(tmp_path):
    """The run is interrupted once 2 shards are written; at a model's pace of 0.1 s per
    image the rest would take 20 s, so a slow machine cannot finish it first."""
    images = tmp_path / "many"
    write_jpegs(images, CTRL_C_IMAGES)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgenc",
            "encode",
            str(images),
            "--out",
            str(out),
            "--backbone",
            "stub",
            "--weights",
            "random",
            "--batch",
            "4",
            "--shard-size",
            "4",
            "--no-progress",
            "--no-dedup-fit",
        ],
        cwd=REPO,
        env={**os.environ, "IMGENC_STUB_DELAY": "0.1"},  # a model's pace: 0.1 s per image
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    started = time.monotonic()
    while proc.poll() is None and len(list((out / "parts").glob("*.csv"))) < 2:
        assert time.monotonic() < started + 300, "no shard written in 300 s"
        time.sleep(0.2)
    parts = len(list((out / "parts").glob("*.csv")))
    finished_first = proc.poll() is not None
    seen = (
        f"{parts} parts after {time.monotonic() - started:.1f} s; finished first: {finished_first}"
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{seen}\n{err}"
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert 0 < len(manifest) < CTRL_C_IMAGES
    ids, codes = load_codes(out)  # every row named in the manifest has its code on disk
    assert len(ids) == len(manifest)
    assert not list(out.rglob("*.tmp"))

    run = imgenc(
        "encode",
        str(images),
        "--out",
        str(out),
        "--backbone",
        "stub",
        "--weights",
        "random",
        "--batch",
        "8",
        "--resume",
        "--no-progress",
    )
    assert run.returncode == 0, run.stderr
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == CTRL_C_IMAGES and (manifest.status == "ok").all()
    written = written_rows(str(out))  # the interrupted run's rows, then the rest: none twice
    assert sum(written.values()) == CTRL_C_IMAGES and set(written.values()) == {1}


def test_show_draws_the_image_beside_its_bit_matrix(jpeg_dir, tmp_path):
    out = tmp_path / "o"
    assert (
        imgenc(
            "encode",
            str(jpeg_dir),
            "--out",
            str(out),
            "--weights",
            "random",
            "--backbone",
            "stub",
            "--no-progress",
        ).returncode
        == 0
    )
    png = tmp_path / "shown.png"
    run = imgenc("show", str(out), "img_00002.jpg", "--png", str(png))
    assert run.returncode == 0, run.stderr
    from PIL import Image

    picture = Image.open(png)
    assert picture.width > 1000 and picture.height >= 392
    missing = imgenc("show", str(out), "nope.jpg", "--png", str(png))
    assert missing.returncode == 2 and "matches 0 images" in missing.stderr


def test_a_missing_image_folder_is_a_clear_error(tmp_path):
    run = imgenc(
        "encode",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
        "--weights",
        "random",
        "--backbone",
        "stub",
    )
    assert run.returncode == 2 and "is not a directory" in run.stderr


def test_imagenet_download_failure_exits_with_one_paragraph_not_a_traceback(jpeg_dir, tmp_path):
    # The real download code runs; a dead proxy and an empty KERAS_HOME make it fail anywhere.
    dead = "http://127.0.0.1:9"
    run = imgenc(
        "encode",
        str(jpeg_dir),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        env={
            "KERAS_HOME": str(tmp_path / "keras"),
            "HTTPS_PROXY": dead,
            "https_proxy": dead,
            "HTTP_PROXY": dead,
            "http_proxy": dead,
        },
    )
    assert run.returncode == 2
    error = [line for line in run.stderr.splitlines() if line.startswith("imgenc: error:")]
    assert len(error) == 1 and "--weights PATH" in error[0] and "--weights random" in error[0]
    assert "Traceback" not in run.stderr
    # Nothing was written, so the alternative the message names works on the same --out.
    assert not (tmp_path / "o").exists()
    again = imgenc(
        "encode", str(jpeg_dir), "--out", str(tmp_path / "o"), "--weights", "random",
        "--no-progress",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]


TF_START_UP = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit",
               "cpu_feature_guard", "rebuild TensorFlow")  # fmt: skip


def test_imgenc_encode_prints_no_tensorflow_start_up_line(tmp_path):
    folder = tmp_path / "images"
    write_jpegs(folder, 1)
    run = imgenc("encode", str(folder), "--out", str(tmp_path / "out"), "--backbone", "stub",
                 "--weights", "random", "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    noise = [line for line in run.stderr.splitlines() if any(s in line for s in TF_START_UP)]
    assert noise == []
    assert "imgenc: manifest: 1 rows" in run.stderr  # the command's own lines still show


def test_the_start_up_filter_lets_every_other_stderr_line_through(tmp_path):
    script = (
        "import os; from encoder.tensorflow_import import known_noise_filtered\n"
        "with known_noise_filtered():\n"
        "    os.write(2, b'I0000 00:00:1.2 42 port.cc:153] oneDNN custom operations are on\\n')\n"
        "    os.write(2, b'W0000 00:00:1.2 42 op_kernel.cc:9] a real warning\\n')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["W0000 00:00:1.2 42 op_kernel.cc:9] a real warning"]
