"""Faults, injected for real: worker processes SIGKILLed, Redis killed and restarted, the S3
server stopped and a fault-injecting proxy in front of it, a poison image that hangs its
worker, a full disk, and SIGTERM.  The promise under test is about the final manifest:
every image enqueued appears exactly once, with status ok or a failure reason.

Each test records its figures (enqueued, faults injected, lost, duplicated, re-executions),
printed at the end of the pytest run.  The stub backbone stands in for the model, with
``IMGENC_STUB_DELAY`` giving it a model's pace so that chunks are caught in flight.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest

from encoder.codes import load_codes
from encoder.manifest import deduplicate, read_parts
from encoder.storage import LocalStorage
from tests.audit import audit, codes_match_a_fresh_local_encode
from tests.imagegen import write_jpegs
from tests.services import REPO, CeleryWorker, RedisServer, SeaweedS3, wait_for, worker_env
from tests.test_cli_encode import imgenc
from worker.registry import JobRegistry

STUB = {"backbone": "stub", "weights": "random"}
VISIBILITY = 10  # s, short on purpose: a dead worker's chunk comes back after this
FAST_FAULTS = {"IMGENC_VISIBILITY_TIMEOUT": str(VISIBILITY), "IMGENC_TASK_TIME_LIMIT": "8"}


def slow_env(redis_url: str, delay: float = 0.02, **extra: str) -> dict[str, str]:
    return worker_env(redis_url, IMGENC_STUB_DELAY=str(delay), **FAST_FAULTS, **extra)


def enqueue(redis_url: str, folder: Path, out: str, **kw):
    import producer

    return producer.enqueue(folder, out, broker=redis_url, **{**STUB, **kw})


def received(worker: CeleryWorker) -> int:
    return worker.text().count("] received")


def models_loaded(worker: CeleryWorker) -> int:
    return worker.text().count("model ready")


@pytest.mark.parametrize(
    "n_images,child_kills",
    [(300, 3), pytest.param(3000, 10, marks=pytest.mark.slow, id="3000-images-10-kills")],
)
def test_killing_worker_processes_mid_job_loses_and_duplicates_nothing(
    redis_server, tmp_path, reliability, n_images, child_kills
):
    folder = tmp_path / "images"
    names = write_jpegs(folder, n_images, size=(64, 48))
    out = tmp_path / "out"
    log = tmp_path / "worker.log"
    w = CeleryWorker(slow_env(redis_server.url), log).start()
    faults = []
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        for _ in range(child_kills):  # the pool's child: the parent restarts it
            seen, loaded = received(w), models_loaded(w)
            wait_for(lambda seen=seen: received(w) > seen, 60, "a chunk in flight")
            time.sleep(0.1)
            os.kill(w.child_pids()[0], signal.SIGKILL)
            faults.append("child SIGKILL")
            wait_for(lambda loaded=loaded: models_loaded(w) > loaded, 90, "a new child's model")
        seen = received(w)
        wait_for(lambda: received(w) > seen, 60, "a chunk in flight")
        w.stop(kill=True)  # the whole worker, parent and child, with a chunk reserved
        faults.append("whole worker SIGKILL")
        killed_at = time.monotonic()
        w.start()
        final = job.wait(timeout=VISIBILITY + 120)
        drained = time.monotonic() - killed_at
    finally:
        w.stop()
    figures = audit(str(out), names, JobRegistry.from_url(redis_server.url), [job.id])
    figures.update(
        test="worker killed",
        faults_injected=len(faults),
        seconds_from_last_kill_to_done=round(drained, 1),
    )
    reliability.append(figures)
    assert final.counts == {"ok": n_images}
    assert figures["lost"] == 0 and figures["duplicate_rows"] == 0
    assert figures["manifest_rows"] == n_images and figures["re_executions"] >= child_kills + 1
    assert drained < VISIBILITY + 45
    assert codes_match_a_fresh_local_encode(str(out), folder, **STUB)


@pytest.mark.parametrize("how", ["kill -9, no persistence", "clean restart, AOF"])
def test_redis_restart_mid_job_workers_reconnect_and_the_job_completes(tmp_path, reliability, how):
    persist = how.endswith("AOF")
    redis = RedisServer(tmp_path / "redis", persist=persist).start()
    folder = tmp_path / "images"
    names = write_jpegs(folder, 300, size=(64, 48))
    out = tmp_path / "out"
    w = CeleryWorker(slow_env(redis.url, delay=0.03), tmp_path / "worker.log").start()
    pid_before = w.proc.pid
    try:
        job = enqueue(redis.url, folder, str(out), chunk=10)
        wait_for(lambda: received(w) >= 3, 60, "a few chunks done")
        redis.stop(kill=not persist)
        time.sleep(2)
        redis.start()
        wait_for(
            lambda: w.text().count("Connected to redis://") >= 2, 90, "the worker to reconnect"
        )
        jobs = [job.id]
        if persist:
            final = job.wait(timeout=180)
        else:
            # Everything Redis held is gone: the queue and the job's registry entry.
            # The destination's parts say what was done; --resume enqueues the rest.
            resumed = enqueue(redis.url, folder, str(out), chunk=10, resume=True)
            jobs.append(resumed.id)
            final = resumed.wait(timeout=180)
        assert w.proc.pid == pid_before and w.proc.poll() is None, "worker was not restarted"
    finally:
        w.stop()
        figures = audit(str(out), names, JobRegistry.from_url(redis.url), jobs)
        redis.stop(kill=True)
    figures.update(test=f"redis {how}", faults_injected=1, resumed=not persist)
    reliability.append(figures)
    assert figures["lost"] == 0 and figures["duplicate_rows"] == 0
    assert figures["manifest_rows"] == 300 and final.failed == 0
    assert codes_match_a_fresh_local_encode(str(out), folder, **STUB)


@pytest.fixture
def s3(tmp_path):
    server = SeaweedS3(tmp_path / "weed").start()
    server.client().create_bucket(Bucket="codes")
    yield server
    server.stop()


def test_s3_stopped_mid_job_is_retried_with_backoff_and_the_job_completes_when_it_is_back(
    redis_server, s3, tmp_path, reliability, monkeypatch
):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "images"
    names = write_jpegs(folder, 200, size=(64, 48))
    w = CeleryWorker(
        slow_env(redis_server.url, delay=0.03, **s3.env()), tmp_path / "worker.log"
    ).start()
    dest = "s3://codes/stopped"
    try:
        job = enqueue(redis_server.url, folder, dest, chunk=10)
        wait_for(lambda: received(w) >= 3, 60, "a few chunks done")
        s3.stop()
        wait_for(lambda: "retrying in" in w.text(), 60, "a storage retry")
        time.sleep(3)
        s3.start()
        final = job.wait(timeout=240)
    finally:
        w.stop()
    text = w.text()
    figures = audit(dest, names, JobRegistry.from_url(redis_server.url), [job.id])
    figures.update(
        test="S3 stopped and restarted",
        faults_injected=1,
        storage_retries_logged=text.count("retrying in"),
    )
    reliability.append(figures)
    assert final.counts == {"ok": 200} and figures["lost"] == 0
    assert figures["duplicate_rows"] == 0 and figures["manifest_rows"] == 200
    ids, codes = load_codes(dest)  # every part names a shard that is really there
    assert len(ids) == 200
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in text
    manifest = s3.client().get_object(Bucket="codes", Key="stopped/manifest.csv")["Body"].read()
    assert s3.env()["AWS_SECRET_ACCESS_KEY"].encode() not in manifest


def test_s3_failing_a_share_of_requests_is_retried_and_nothing_partial_lands(
    redis_server, s3, tmp_path, reliability, monkeypatch
):
    from tests.faults import FaultyProxy

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "images"
    names = write_jpegs(folder, 200, size=(64, 48))
    with FaultyProxy(s3.port, failure_rate=0.25) as proxy:
        env = slow_env(redis_server.url, delay=0.0, **s3.env())
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        w = CeleryWorker(env, tmp_path / "worker.log").start()
        dest = "s3://codes/flaky"
        try:
            job = enqueue(redis_server.url, folder, dest, chunk=10)
            final = job.wait(timeout=240)
        finally:
            w.stop()
        figures = audit(dest, names, JobRegistry.from_url(redis_server.url), [job.id])
        figures.update(
            test="S3 proxy failing 25% of requests",
            faults_injected=proxy.failed,
            s3_requests=proxy.requests,
        )
    reliability.append(figures)
    assert proxy.failed > 5
    assert final.counts == {"ok": 200} and figures["lost"] == 0
    assert figures["duplicate_rows"] == 0
    ids, codes = load_codes(dest)
    assert len(ids) == 200 and codes.shape == (200, 3063)


def _poison_png(path: Path) -> None:
    """Within Pillow's pixel limit, but slow to decode (16-bit RGB, 9400 x 9400: about 2 s
    here), so a 1 s image time limit kills whichever process decodes it."""
    width = height = 9400  # 88.4 Mpx, just under MAX_IMAGE_PIXELS
    data = zlib.compress((b"\x00" + bytes(width * 6)) * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_a_poison_image_that_hangs_its_worker_ends_failed_and_the_rest_completes(
    redis_server, tmp_path, reliability
):
    folder = tmp_path / "images"
    names = write_jpegs(folder, 9, size=(64, 48))
    _poison_png(folder / "poison.png")
    names.append("poison.png")
    env = worker_env(redis_server.url, IMGENC_IMAGE_TIME_LIMIT="1", **FAST_FAULTS)
    w = CeleryWorker(env, tmp_path / "worker.log").start()
    out = tmp_path / "out"
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        final = job.wait(timeout=240)
    finally:
        w.stop()
    registry = JobRegistry.from_url(redis_server.url)
    figures = audit(str(out), names, registry, [job.id])
    deliveries = int(registry.r.hget(f"imgenc:job:{job.id}:attempts", "0"))
    figures.update(
        test="poison image (decodes past the 1 s image time limit)",
        faults_injected=deliveries - 1,
        deliveries=deliveries,
    )
    reliability.append(figures)
    manifest = pd.read_csv(out / "manifest.csv").set_index("id")
    assert manifest.loc["poison.png", "status"] == "failed"
    assert "died 2 times" in manifest.loc["poison.png", "error"]
    assert final.counts == {"failed": 1, "ok": 9} and figures["lost"] == 0
    assert deliveries <= 2 + 2  # one fast try, then one careful try per strike (2)
    assert "over the 1 s image time limit; killing this worker process" in w.text()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_full_disk_gives_a_clear_error_and_a_consistent_manifest_then_completes(
    redis_server, tmp_path, reliability
):
    mount = tmp_path / "small-disk"
    if not _mount_tmpfs(mount, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (1900 * 1024))  # leave ~150 KB: room for a few shards
        folder = tmp_path / "images"
        names = write_jpegs(folder, 150, size=(64, 48))
        out = mount / "out"
        w = CeleryWorker(slow_env(redis_server.url, delay=0.0), tmp_path / "worker.log").start()
        try:
            job = enqueue(redis_server.url, folder, str(out), chunk=10)
            wait_for(lambda: "disk full" in w.text(), 60, "the disk-full error in the log")
            rows = deduplicate(read_parts(LocalStorage(out)))
            ids, codes = load_codes(out)  # readable and consistent while the disk is full
            assert len(ids) == sum(r["status"] == "ok" for r in rows)
            assert not list(out.rglob("*.tmp"))  # no half-written file left behind
            filler.unlink()
            final = job.wait(timeout=120)
        finally:
            w.stop()
        figures = audit(str(out), names, JobRegistry.from_url(redis_server.url), [job.id])
        figures.update(
            test="local disk full, then space freed",
            faults_injected=1,
            full_disk_errors_logged=w.text().count("disk full"),
        )
        reliability.append(figures)
        assert final.counts == {"ok": 150} and figures["lost"] == 0
        assert figures["duplicate_rows"] == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_embedded_encode_into_a_full_disk_exits_with_a_clear_error_and_resume_finishes(tmp_path):
    mount = tmp_path / "small-disk"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        folder = tmp_path / "images"
        write_jpegs(folder, 400, size=(64, 48))
        out = mount / "out"
        run = imgenc(
            "encode",
            str(folder),
            "--out",
            str(out),
            "--backbone",
            "stub",
            "--weights",
            "random",
            "--shard-size",
            "32",
            "--no-progress",
        )
        assert run.returncode == 2, run.stderr[-2000:]
        assert "disk full" in run.stderr and "Traceback" not in run.stderr
        ids, _ = load_codes(out)  # what was written is consistent
        assert 0 < len(ids) < 400
        assert not list(out.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_sigterm_lets_the_worker_finish_its_chunk_and_nothing_is_redone(
    redis_server, tmp_path, reliability
):
    folder = tmp_path / "images"
    names = write_jpegs(folder, 100, size=(64, 48))
    out = tmp_path / "out"
    w = CeleryWorker(slow_env(redis_server.url, delay=0.05), tmp_path / "worker.log").start()
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        wait_for(lambda: received(w) >= 2, 60, "a chunk in flight")
        w.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the chunk in hand
        assert w.proc.wait(120) == 0
        w.start()
        final = job.wait(timeout=120)
    finally:
        w.stop()
    figures = audit(str(out), names, JobRegistry.from_url(redis_server.url), [job.id])
    figures.update(test="worker SIGTERM (warm shutdown), restarted", faults_injected=1)
    reliability.append(figures)
    assert final.counts == {"ok": 100} and figures["lost"] == 0
    assert figures["re_executions"] == 0 and "lost deliveries" not in w.text()


def test_sigterm_to_the_producer_leaves_a_complete_smaller_job_and_says_how_to_resume(
    redis_server, tmp_path
):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(20000):
        (folder / f"{i:06d}.jpg").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGENC_")}
    env.update(
        IMGENC_BROKER_URL=redis_server.url,
        IMGENC_WEIGHTS="random",
        IMGENC_BACKBONE="stub",
        IMGENC_QUEUE="parked",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "encoder",
            "enqueue",
            str(folder),
            "--out",
            str(tmp_path / "o"),
            "--chunk",
            "1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis_server.client()
    wait_for(lambda: client.llen("parked") > 200, 60, "enqueueing under way")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    job_id = out.split()[0]
    status = JobRegistry(client).status(job_id)
    assert not status.scanning and 200 < status.total < 20000
    assert status.chunks == status.total  # every image sent was registered, none half-sent
    assert client.llen("parked") == status.total + 1  # the chunks + the finalize message
    assert "--resume" in err
