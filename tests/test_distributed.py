"""Producer -> Redis -> Celery workers -> local disk or S3, with real processes: a private
redis-server with a password, ``celery -A worker worker`` subprocesses (stub backbone:
the queue path is what is under test here), and a SeaweedFS S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from encoder.codes import load_codes
from encoder.manifest import csv_to_rows
from tests.helpers import (
    REPO,
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    chunk_completions,
    imgenc,
    make_settings,
    wait_for,
    worker_env,
    write_jpegs,
    written_rows,
)

STUB = {"backbone": "stub", "weights": "random"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("weed")).start()
    server.client().create_bucket(Bucket="codes")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(redis_server, s3, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = CeleryWorker(worker_env(redis_server.url, **s3.env()), log).start()
    yield w
    w.stop()


@pytest.fixture
def aws_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)


def send_chunk(broker_url: str, **kwargs) -> None:
    """Publish an ``imgenc.encode_chunk`` message by name, as the producer does."""
    from jobs.celery_app import make_app
    from jobs.messages import ENCODE_CHUNK

    app = make_app(make_settings(broker_url=broker_url))
    app.send_task(ENCODE_CHUNK, kwargs=kwargs, queue="imgenc")


def images(tmp_path: Path, n: int, bad: bool = True) -> Path:
    folder = tmp_path / "images"
    write_jpegs(folder, n)
    if bad:
        (folder / "broken.jpg").write_bytes(b"")
        (folder / "notes.jpg").write_text("not an image")
    return folder


def test_job_to_a_local_directory_gives_a_complete_manifest_that_matches_the_status(
    redis_server, worker, tmp_path
):
    import producer

    folder = images(tmp_path, 10)
    out = tmp_path / "out"
    job = producer.enqueue(folder, str(out), broker=redis_server.url, chunk=4, **STUB)
    final = job.wait(timeout=120)
    assert final.done and final.total == 12 and final.chunks == 3
    assert final.counts == {"empty": 1, "not_an_image": 1, "ok": 10}

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 12
    assert written_rows(str(out)) == dict.fromkeys(manifest["id"], 1)  # each image written once
    assert chunk_completions([worker.text()], job.id) == {0: 1, 1: 1, 2: 1}
    assert manifest.status.value_counts().to_dict() == final.counts
    assert (manifest.job_id == job.id).all() and manifest.worker_host.notna().all()
    ids, codes = load_codes(out)
    assert len(ids) == 10 and codes.shape == (10, 3063)


def test_job_to_s3_writes_shards_and_manifest_that_load_codes_reads(
    redis_server, worker, s3, aws_env, tmp_path
):
    import producer

    folder = images(tmp_path, 7, bad=False)
    dest = "s3://codes/run1"
    job = producer.enqueue(folder, dest, broker=redis_server.url, chunk=3, **STUB)
    job.wait(timeout=120)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="codes")["Contents"]]
    assert "run1/manifest.parquet" in keys and "run1/spec.json" in keys
    assert sum(k.startswith("run1/codes/") for k in keys) == 3
    ids, codes = load_codes(dest)
    assert len(ids) == 7 and codes.shape == (7, 3063)
    local = tmp_path / "local"
    from encoder.folder_run import encode_folder

    encode_folder(folder, str(local), make_settings(**STUB), progress=False)
    local_ids, local_codes = load_codes(local)
    assert list(local_ids) == list(ids) and (local_codes == codes).all()


def test_two_workers_share_a_job_without_any_image_twice(redis_server, s3, tmp_path):
    import producer

    env = worker_env(redis_server.url, IMGENC_QUEUE="pair")
    workers = [
        CeleryWorker(env, tmp_path / f"w{i}.log", name=f"pair{i}", extra_args=("-Q", "pair"))
        for i in range(2)
    ]
    for w in workers:
        w.start(wait=False)
    try:
        for w in workers:
            wait_for(lambda w=w: "model ready" in w.text() and " ready." in w.text(), 180, "worker")
        folder = images(tmp_path, 60, bad=False)
        out = tmp_path / "out"
        job = producer.enqueue(
            folder, str(out), broker=redis_server.url, chunk=2, queue="pair", **STUB
        )
        final = job.wait(timeout=180)
        manifest = pd.read_parquet(out / "manifest.parquet")
        assert len(manifest) == 60 and final.counts == {"ok": 60}
        assert written_rows(str(out)) == dict.fromkeys(manifest["id"], 1)
        completions = chunk_completions([w.text() for w in workers], job.id)
        assert completions == dict.fromkeys(range(30), 1)  # no chunk ran twice
        parts = list((out / "parts").glob("*.csv"))
        assert len(parts) == 30
        assert all(chunk_completions([w.text()], job.id) for w in workers), "both took chunks"
    finally:
        for w in workers:
            w.stop()


def test_resume_enqueues_only_what_a_partial_job_left_undone(redis_server, worker, tmp_path):
    import producer
    from jobs.registry import JobRegistry

    folder = images(tmp_path, 12, bad=False)
    out = tmp_path / "out"
    client = redis_server.client()
    # A job whose messages partly vanished (a Redis restart without persistence, say):
    # enqueue on a queue no worker reads, drop half its messages, then move the rest over.
    job = producer.enqueue(
        folder, str(out), broker=redis_server.url, chunk=3, queue="parked", **STUB
    )
    assert client.llen("parked") == 5  # 4 chunks + the finalize message
    client.ltrim("parked", 0, 1)  # keep 2 of 5 messages
    while client.llen("parked"):
        client.lmove("parked", "imgenc", "LEFT", "RIGHT")
    wait_for(lambda: JobRegistry(client).status(job.id).chunks_done >= 1, 60, "partial job")
    time.sleep(1)
    partial = JobRegistry(client).status(job.id)
    assert not partial.done and 0 < partial.processed < 12

    resumed = producer.enqueue(
        folder, str(out), broker=redis_server.url, chunk=3, resume=True, **STUB
    )
    final = resumed.wait(timeout=120)
    assert final.total == 12 - partial.processed
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 12 and (manifest.status == "ok").all()
    assert written_rows(str(out)) == dict.fromkeys(manifest["id"], 1)  # none encoded twice
    assert set(manifest.job_id) == {job.id, resumed.id}


def test_paths_escaping_the_image_root_are_refused_with_their_own_status(
    redis_server, worker, tmp_path
):
    import producer

    folder = images(tmp_path, 2, bad=False)
    secret = tmp_path / "secret.jpg"
    write_jpegs(tmp_path / "elsewhere", 1)
    (tmp_path / "elsewhere" / "img_00000.jpg").rename(secret)
    (folder / "escape.jpg").symlink_to(secret)
    out = tmp_path / "out"
    job = producer.enqueue(folder, str(out), broker=redis_server.url, chunk=10, **STUB)
    job.wait(timeout=60)
    send_chunk(
        redis_server.url,
        job_id=job.id,
        chunk=99,
        dest=str(out),
        fingerprint=job.registry.job(job.id)["fingerprint"],
        paths=["../secret.jpg", str(secret), "sub/../../secret.jpg", "img_00000.jpg"],
    )
    part = out / "parts" / f"{job.id}-000099.csv"
    wait_for(part.exists, 60, "the hostile chunk's part")
    rows = {r["id"]: r for r in csv_to_rows(part.read_bytes())}
    assert [rows[p]["status"] for p in ("../secret.jpg", str(secret), "sub/../../secret.jpg")] == [
        "outside_root"
    ] * 3
    assert rows["img_00000.jpg"]["status"] == "ok"
    first = {r["id"]: r for r in pd.read_parquet(out / "manifest.parquet").to_dict("records")}
    assert first["escape.jpg"]["status"] == "outside_root"


def test_pickle_message_is_refused_and_never_deserialized(redis_server, worker, tmp_path):
    from kombu import Connection, Exchange, Producer

    canary = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    before = worker.text()
    with Connection(redis_server.url) as conn:
        Producer(conn).publish(
            {"job_id": Exploit()},
            exchange=Exchange("imgenc", type="direct"),
            routing_key="imgenc",
            serializer="pickle",
            headers={
                "task": "imgenc.encode_chunk",
                "id": "evil-1",
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
            declare=[Exchange("imgenc", type="direct")],
        )
    wait_for(
        lambda: (
            "ContentDisallowed" in worker.text()[len(before) :]
            or "disallowed" in worker.text()[len(before) :].lower()
        ),
        30,
        "the refusal in the log",
    )
    assert not canary.exists()
    assert redis_server.client().llen("imgenc") == 0  # not left to loop on the queue


def test_worker_with_another_spec_refuses_the_jobs_chunks(redis_server, worker, tmp_path):
    import producer

    folder = images(tmp_path, 3, bad=False)
    out = tmp_path / "out"
    job = producer.enqueue(folder, str(out), broker=redis_server.url, bits=64, **STUB)
    final = job.wait(timeout=60)
    assert final.counts == {"spec_mismatch": 3}
    assert not list((out / "codes").glob("*.npy")) if (out / "codes").exists() else True
    assert f"job {job.id} chunk 0: refusing 3 images" in worker.text()
    assert "n_bits: job 64, worker 500" in worker.text()


def test_oversized_argument_list_is_refused_and_logged(redis_server, worker, tmp_path):
    from jobs.messages import MAX_PATHS_PER_CHUNK

    send_chunk(
        redis_server.url,
        job_id="abc123",
        chunk=0,
        dest=str(tmp_path / "o"),
        fingerprint="x",
        paths=["a.jpg"] * (MAX_PATHS_PER_CHUNK + 1),
    )
    wait_for(lambda: "refusing malformed chunk message" in worker.text(), 30, "the refusal")
    assert not (tmp_path / "o").exists()


def test_cli_enqueue_wait_status_and_jobs_never_print_the_password(redis_server, worker, tmp_path):
    folder = images(tmp_path, 5)
    out = tmp_path / "out"
    env = {
        "IMGENC_BROKER_URL": redis_server.url,
        "IMGENC_WEIGHTS": "random",
        "IMGENC_BACKBONE": "stub",
    }
    run = imgenc("enqueue", str(folder), "--out", str(out), "--wait", "--chunk", "2", env=env)
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.splitlines()[0].strip()
    assert "7/7 images, 2 failed" in run.stdout and "ok             5" in run.stdout
    strict = imgenc(
        "enqueue",
        str(folder),
        "--out",
        str(tmp_path / "o2"),
        "--wait",
        "--strict",
        "--no-progress",
        env=env,
    )
    assert strict.returncode == 1

    status = imgenc("status", job_id, "--json", env=env)
    data = json.loads(status.stdout)
    assert data["done"] and data["processed"] == 7 and data["counts"]["ok"] == 5
    jobs = imgenc("jobs", env=env)
    assert job_id in jobs.stdout
    everything = run.stdout + run.stderr + status.stdout + jobs.stdout + worker.text()
    assert redis_server.password not in everything
    manifest = pd.read_parquet(out / "manifest.parquet").astype(str).to_csv()
    assert "img_" in manifest and redis_server.password not in manifest


def test_flower_shows_the_tasks_with_readable_names_and_arguments_behind_basic_auth(
    redis_server, worker, tmp_path
):
    import base64
    import urllib.error
    import urllib.request

    import producer
    from tests.helpers import BIN, free_port

    port = free_port()
    env = worker_env(redis_server.url)
    with open(tmp_path / "flower.log", "ab") as log:
        flower = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                "--basic-auth=admin:flower-pw",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:flower-pw").decode()}

    def get(path, headers=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def flower_up():
        try:
            get("/api/workers", auth)
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for(flower_up, 60, "flower", interval=0.5)
        with pytest.raises(urllib.error.HTTPError) as denied:
            get("/api/workers")
        assert denied.value.code == 401
        time.sleep(1)  # let flower's event consumer attach
        job = producer.enqueue(
            images(tmp_path, 4, bad=False),
            str(tmp_path / "out"),
            broker=redis_server.url,
            chunk=2,
            **STUB,
        )
        job.wait(timeout=60)

        def seen():
            tasks = get("/api/tasks", auth)
            return [t for t in tasks.values() if job.id in (t.get("kwargs") or "")]

        tasks = wait_for(seen, 30, "flower to list the job's tasks", interval=0.5)
        assert {t["name"] for t in tasks} >= {"imgenc.encode_chunk"}
        assert any("'chunk': 1" in t["kwargs"] and "img_0000" in t["kwargs"] for t in tasks)
        assert redis_server.password not in (tmp_path / "flower.log").read_text()
    finally:
        os.killpg(flower.pid, 15)
        flower.wait(20)


def test_killed_worker_process_gets_its_chunk_redelivered_and_nothing_is_lost(
    redis_server, tmp_path
):
    import signal

    import producer

    env = worker_env(
        redis_server.url,
        IMGENC_BACKBONE="vgg16",
        IMGENC_LAYOUT="pooled",
        IMGENC_QUEUE="vgg",
        IMGENC_BATCH="4",
    )
    w = CeleryWorker(env, tmp_path / "vgg.log", name="vgg", extra_args=("-Q", "vgg")).start()
    try:
        folder = images(tmp_path, 24, bad=False)
        job = producer.enqueue(
            folder,
            str(tmp_path / "out"),
            broker=redis_server.url,
            chunk=8,
            queue="vgg",
            backbone="vgg16",
            layout="pooled",
            weights="random",
        )
        from jobs.registry import JobRegistry

        # Killed once its try is counted (a try killed before that is not a rerun).
        attempts = f"imgenc:job:{job.id}:attempts"
        registry = JobRegistry.from_url(redis_server.url)
        wait_for(lambda: registry.r.hlen(attempts) >= 1, 120, "a chunk to start")
        children = w.child_pids()
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        final = job.wait(timeout=300)
        assert final.counts == {"ok": 24}
        manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
        assert len(manifest) == 24
        assert written_rows(str(tmp_path / "out")) == dict.fromkeys(manifest["id"], 1)
        assert chunk_completions([w.text()], job.id) == {0: 1, 1: 1, 2: 1}
        assert final.reruns >= 1
        log = w.text()
        assert "WorkerLostError" in log or "exited with 'signal 9" in log
        assert "lost deliveries; encoding one image at a time" in log
    finally:
        w.stop()
