"""The image root is one setting, read the same way by the producer and the workers; a job
whose images the workers cannot find says so in its exit code, its status and, once, in the
worker's log."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from tests.helpers import REPO, CeleryWorker, imgenc, wait_for, worker_env, write_jpegs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """/data with the catalogue under /data/a, as both sides mount it."""
    root = tmp_path_factory.mktemp("data")
    write_jpegs(root / "a", 5)
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from tests.helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop(kill=True)


@pytest.fixture(scope="module")
def rooted_worker(redis_url, data, tmp_path_factory):
    """A worker whose IMGENC_IMAGE_ROOT is /data."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = worker_env(redis_url, IMGENC_IMAGE_ROOT=str(data), IMGENC_QUEUE="rooted")
    w = CeleryWorker(env, log, extra_args=("-Q", "rooted")).start()
    yield w
    w.stop()


def producer_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "IMGENC_BROKER_URL": redis_url,
        "IMGENC_BACKBONE": "stub",
        "IMGENC_WEIGHTS": "random",
        "IMGENC_QUEUE": "rooted",
        **extra,
    }


def test_producer_and_worker_with_the_same_image_root_encode_a_subfolder(
    redis_url, data, rooted_worker, tmp_path
):
    out = tmp_path / "out"
    env = producer_env(redis_url, IMGENC_IMAGE_ROOT=str(data))
    run = imgenc("enqueue", str(data / "a"), "--out", str(out), "--wait", "--no-progress", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert (manifest.status == "ok").all() and len(manifest) == 5
    assert sorted(manifest.id) == [f"a/img_{i:05d}.jpg" for i in range(5)]  # relative to /data
    assert "problem:" not in run.stdout


def test_images_the_workers_cannot_find_fail_the_wait_and_status_names_both_roots(
    redis_url, data, rooted_worker, tmp_path
):
    """The producer has no IMGENC_IMAGE_ROOT: it sends paths relative to /data/a, while the
    worker resolves them against /data."""
    out = tmp_path / "out"
    before = len(rooted_worker.text())
    run = imgenc(
        "enqueue", str(data / "a"), "--out", str(out), "--wait", "--no-progress", "--chunk", "2",
        env=producer_env(redis_url),
    )  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "5 of 5 images were not found" in run.stdout
    job_id = run.stdout.splitlines()[0].strip()

    status = imgenc("status", job_id, "--json", env=producer_env(redis_url))
    assert status.returncode == 3  # as --wait: a setup problem, not a success
    problems = json.loads(status.stdout)["problems"]
    assert len(problems) == 1
    assert f"relative to its image root {data / 'a'}" in problems[0]
    assert f"resolved them against {data}" in problems[0] and "IMGENC_IMAGE_ROOT" in problems[0]

    log = rooted_worker.text()[before:]
    assert log.count(f"job {job_id}: images not found under this worker's image root") == 1
    assert log.count(f"job {job_id} chunk") == 3  # one line per chunk, none per image
    assert "img_00003.jpg" not in log.replace("img_00000.jpg", "")  # only the probe is named


def test_a_folder_outside_the_image_root_is_refused_before_anything_is_sent(
    redis_url, data, tmp_path
):
    write_jpegs(tmp_path / "elsewhere", 1)
    env = producer_env(redis_url, IMGENC_IMAGE_ROOT=str(data))
    run = imgenc("enqueue", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "o"), env=env)
    assert run.returncode == 2
    assert "is not inside the image root" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_a_relative_destination_names_the_producers_folder_for_the_workers_too(
    redis_url, data, rooted_worker, tmp_path
):
    """The worker runs in another working directory than the producer: ``--out rel`` must
    not split the destination between the two."""
    env = producer_env(redis_url, IMGENC_IMAGE_ROOT=str(data))
    name = f"rel-out-{tmp_path.name}"
    try:
        run = imgenc(
            "enqueue", str(data / "a"), "--out", name, "--wait", "--no-progress",
            env=env, cwd=tmp_path,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        manifest = pd.read_parquet(tmp_path / name / "manifest.parquet")
        assert (manifest.status == "ok").all() and len(manifest) == 5
        assert len(list((tmp_path / name / "codes").glob("*.npy"))) == 1
        assert not (REPO / name).exists()  # where the worker (cwd: the checkout) would write
    finally:
        shutil.rmtree(REPO / name, ignore_errors=True)


def test_the_merge_of_a_job_is_done_and_logged_once(redis_url, data, rooted_worker, tmp_path):
    before = len(rooted_worker.text())
    env = producer_env(redis_url, IMGENC_IMAGE_ROOT=str(data))
    run = imgenc(
        "enqueue", str(data / "a"), "--out", str(tmp_path / "o"), "--wait", "--no-progress",
        "--chunk", "2", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = run.stdout.splitlines()[0].strip()
    # One worker takes its queue in order: the finalize message comes after the chunks.
    wait_for(
        lambda: re.search(r"imgenc\.finalize_job\[.*\] succeeded", rooted_worker.text()[before:]),
        30,
        "the job's finalize message",
    )
    log = rooted_worker.text()[before:]
    assert log.count(f"job {job_id} complete: manifest of 5 rows merged") == 1
