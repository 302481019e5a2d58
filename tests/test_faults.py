"""Faults, injected for real: worker processes and whole workers SIGKILLed, Redis killed,
restarted and kept down past the client's retries, the S3 server stopped and a
fault-injecting proxy in front of it, a poison image that hangs its worker, a full disk,
and SIGTERM.  Every test runs with the default delivery settings (visibility timeout,
leases, time limits).  The promise under test is about the final manifest: every image
enqueued appears exactly once, with status ok or a failure reason.

What a test checks is what was executed and written, not the merged manifest (which keeps
one row per image whatever happened): rows in the manifest parts against images
enqueued, deliveries per chunk, and each chunk's completion across the worker logs
(``tests.helpers.audit``).  Each test records its figures, printed at the end of the
pytest run.  The stub backbone stands in for the model, with ``IMGENC_STUB_DELAY`` giving
it a model's pace so that chunks are caught in flight.
"""

from __future__ import annotations

import os
import re
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
from encoder.merged import read_manifest
from jobs.registry import JobRegistry
from tests.helpers import (
    REPO,
    STUB,
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    audit,
    codes_match_a_fresh_local_encode,
    imgenc,
    unacked_chunks,
    wait_for,
    worker_env,
    write_jpegs,
    written_rows,
)

STUB_FLAGS = ("--backbone", "stub", "--weights", "random")
RECOVERY_TARGET = 60  # s from a whole worker's death to its chunk being back in work


def slow_env(redis_url: str, delay: float = 0.02, **extra: str) -> dict[str, str]:
    return worker_env(redis_url, IMGENC_STUB_DELAY=str(delay), **extra)


def enqueue(redis_url: str, folder: Path, out: str, **kw):
    import producer

    return producer.enqueue(folder, out, broker=redis_url, **{**STUB, **kw})


def received(worker: CeleryWorker) -> int:
    return worker.text().count("] received")


def models_loaded(worker: CeleryWorker) -> int:
    return worker.text().count("model ready")


def in_flight(registry: JobRegistry, job_id: str) -> dict[str, int]:
    """Chunks a worker holds (unacknowledged) and has not recorded yet: ``chunk ->
    deliveries so far``."""
    held = unacked_chunks(registry.r, job_id)
    attempts = registry.r.hgetall(f"imgenc:job:{job_id}:attempts")
    recorded = registry.r.hkeys(f"imgenc:job:{job_id}:chunks")
    return {str(c): int(attempts.get(str(c), 0)) for c in held if str(c) not in recorded}


def back_in_work(registry: JobRegistry, job_id: str, stranded: dict[str, int]) -> bool:
    """Every stranded chunk was delivered again, or recorded."""
    attempts = registry.r.hgetall(f"imgenc:job:{job_id}:attempts")
    recorded = set(registry.r.hkeys(f"imgenc:job:{job_id}:chunks"))
    return all(c in recorded or int(attempts.get(c, 0)) > n for c, n in stranded.items())


def still_running(registry: JobRegistry, job_id: str) -> bool:
    status = registry.status(job_id)
    return not status.done and status.processed < status.total


def assert_each_image_written_and_each_chunk_completed_once(figures: dict) -> None:
    assert figures["lost"] == 0 and figures["manifest_rows"] == figures["enqueued"]
    assert figures["rows_written_in_parts"] == figures["enqueued"]
    assert figures["images_written_twice"] == 0
    assert figures["chunk_completions_logged"] == figures["chunks"]
    assert figures["chunks_completed_twice"] == 0


@pytest.mark.parametrize(
    "n_images,child_kills",
    [(400, 3), pytest.param(3000, 10, marks=pytest.mark.slow, id="3000-images-10-kills")],
)
def test_killed_pool_processes_and_whole_workers_lose_nothing_and_recover_within_a_minute(
    redis_server, tmp_path, reliability, n_images, child_kills
):
    """Default settings.  The pool's child is killed (the parent requeues its chunk at
    once), then the whole worker, parent and child, twice while chunks are in flight,
    restarted each time (an OOM kill or a lost host): the stranded chunk must be back in
    work within a minute, not after Redis' hour."""
    folder = tmp_path / "images"
    names = write_jpegs(folder, n_images, size=(64, 48))
    out = tmp_path / "out"
    registry = JobRegistry.from_url(redis_server.url)
    w = CeleryWorker(slow_env(redis_server.url, delay=0.15), tmp_path / "worker.log").start()
    faults, recoveries = [], []
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        for _ in range(child_kills):
            seen, loaded = received(w), models_loaded(w)
            wait_for(lambda seen=seen: received(w) > seen, 60, "a chunk in flight")
            time.sleep(0.1)
            os.kill(w.child_pids()[0], signal.SIGKILL)
            faults.append("child SIGKILL")
            wait_for(lambda loaded=loaded: models_loaded(w) > loaded, 90, "a new child's model")
        for _ in range(2):
            seen = received(w)
            wait_for(lambda seen=seen: received(w) > seen, 60, "a chunk in flight")
            time.sleep(0.2)
            stranded = in_flight(registry, job.id)
            assert stranded and still_running(registry, job.id)
            w.stop(kill=True)  # the whole worker, parent and child
            killed_at = time.monotonic()
            faults.append("whole worker SIGKILL")
            w.start()
            wait_for(lambda s=stranded: back_in_work(registry, job.id, s), 120, "recovery")
            recoveries.append(round(time.monotonic() - killed_at, 1))
        final = job.wait(timeout=300)
    finally:
        w.stop()
    figures = audit(str(out), names, registry, [job.id], [w.text()])
    figures.update(
        test="worker killed (default settings)",
        faults_injected=len(faults),
        seconds_from_whole_worker_kill_to_chunk_back_in_work=recoveries,
    )
    reliability.append(figures)
    assert final.counts == {"ok": n_images}
    assert_each_image_written_and_each_chunk_completed_once(figures)
    assert figures["re_executions"] >= child_kills + 2
    assert max(recoveries) < RECOVERY_TARGET, recoveries
    assert codes_match_a_fresh_local_encode(str(out), folder, **STUB)


def test_a_whole_worker_killed_mid_chunk_has_its_chunk_taken_by_a_healthy_worker_in_time(
    redis_server, tmp_path, reliability
):
    """Default settings, two workers; one is SIGKILLed whole and stays dead.  The other,
    idle once the queue is empty, must get the dead worker's chunk within a minute."""
    folder = tmp_path / "images"
    names = write_jpegs(folder, 60, size=(64, 48))
    out = tmp_path / "out"
    registry = JobRegistry.from_url(redis_server.url)
    env = slow_env(redis_server.url, delay=0.1)
    doomed = CeleryWorker(env, tmp_path / "doomed.log", name="doomed").start()
    healthy = CeleryWorker(env, tmp_path / "healthy.log", name="healthy").start()
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        wait_for(lambda: received(doomed) >= 1 and received(healthy) >= 1, 60, "both busy")
        stranded = {}
        wait_for(
            lambda: stranded.update(in_flight(registry, job.id)) or len(stranded) >= 2,
            60,
            "two chunks in flight",
        )
        doomed.stop(kill=True)
        killed_at = time.monotonic()
        wait_for(lambda: back_in_work(registry, job.id, stranded), 120, "recovery")
        recovered = time.monotonic() - killed_at
        final = job.wait(timeout=120)
    finally:
        healthy.stop()
        doomed.stop()
    figures = audit(str(out), names, registry, [job.id], [doomed.text(), healthy.text()])
    figures.update(
        test="whole worker SIGKILLed, not restarted; a healthy worker beside it",
        faults_injected=1,
        seconds_from_kill_to_chunk_back_in_work=round(recovered, 1),
    )
    reliability.append(figures)
    assert final.counts == {"ok": 60}
    assert_each_image_written_and_each_chunk_completed_once(figures)
    assert recovered < RECOVERY_TARGET


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_live_workers_chunk_longer_than_the_visibility_timeout_is_not_handed_out_twice(
    redis_server, tmp_path, reliability, pool
):
    """A chunk that runs 2.5x the visibility timeout on a live worker, an idle worker
    beside it: the lease keeps the message with its holder, so it is delivered once."""
    folder = tmp_path / "images"
    names = write_jpegs(folder, 10, size=(64, 48))
    out = tmp_path / "out"
    registry = JobRegistry.from_url(redis_server.url)
    env = slow_env(redis_server.url, delay=1.5, IMGENC_VISIBILITY_TIMEOUT="6")
    busy = CeleryWorker(env, tmp_path / "busy.log", name="busy", extra_args=("--pool", pool))
    busy.start()
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        wait_for(lambda: received(busy) >= 1, 60, "the chunk to start")
        idle = CeleryWorker(env, tmp_path / "idle.log", name="idle").start()
        try:
            final = job.wait(timeout=120)
        finally:
            idle.stop()
    finally:
        busy.stop()
    figures = audit(str(out), names, registry, [job.id], [busy.text(), idle.text()])
    figures.update(test=f"chunk of 15 s on a live worker ({pool} pool), visibility timeout 6 s")
    reliability.append(figures)
    assert final.counts == {"ok": 10} and final.reruns == 0
    assert_each_image_written_and_each_chunk_completed_once(figures)
    assert figures["re_executions"] == 0 and "Task imgenc.encode_chunk" not in idle.text()
    assert "Restoring" not in busy.text() + idle.text()


@pytest.mark.parametrize("how", ["kill -9, no persistence", "clean restart, AOF"])
def test_redis_restart_mid_job_workers_reconnect_and_the_job_completes(tmp_path, reliability, how):
    persist = how.endswith("AOF")
    redis = RedisServer(tmp_path / "redis", persist=persist).start()
    folder = tmp_path / "images"
    names = write_jpegs(folder, 300, size=(64, 48))
    out = tmp_path / "out"
    registry = JobRegistry.from_url(redis.url)
    w = CeleryWorker(slow_env(redis.url, delay=0.03), tmp_path / "worker.log").start()
    pid_before = w.proc.pid
    try:
        job = enqueue(redis.url, folder, str(out), chunk=10)
        wait_for(lambda: received(w) >= 3, 60, "a few chunks done")
        assert still_running(registry, job.id), "the job ended before the fault"
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
        figures = audit(str(out), names, registry, jobs, [w.text()])
        redis.stop(kill=True)
    figures.update(test=f"redis {how}", faults_injected=1, resumed=not persist)
    reliability.append(figures)
    assert final.failed == 0
    assert figures["lost"] == 0 and figures["manifest_rows"] == 300
    assert figures["rows_written_in_parts"] == 300 and figures["images_written_twice"] == 0
    if persist:  # without persistence the first job's registry, chunks included, is gone
        assert figures["chunks_completed_twice"] == 0
    assert codes_match_a_fresh_local_encode(str(out), folder, **STUB)


def test_redis_down_longer_than_the_client_retries_requeues_the_chunk_and_the_job_completes(
    tmp_path, reliability
):
    """Redis (with AOF) stays down past the registry client's ~24 s of retries: the chunk
    in hand cannot be recorded, so the worker requeues it instead of
    acknowledging it, and it is done again once Redis is back.  (Whether its first try was
    counted depends on when Redis went: at the start of the chunk or in the middle.)"""
    redis = RedisServer(tmp_path / "redis", persist=True).start()
    folder = tmp_path / "images"
    names = write_jpegs(folder, 60, size=(64, 48))
    out = tmp_path / "out"
    registry = JobRegistry.from_url(redis.url)
    w = CeleryWorker(slow_env(redis.url, delay=0.2), tmp_path / "worker.log").start()
    try:
        job = enqueue(redis.url, folder, str(out), chunk=10)
        wait_for(lambda: received(w) >= 2, 60, "a chunk in flight")
        assert still_running(registry, job.id), "the job ended before the fault"
        redis.stop()
        wait_for(lambda: "requeueing the chunk" in w.text(), 90, "the requeue")
        time.sleep(5)
        redis.start()
        final = job.wait(timeout=240)
    finally:
        w.stop()
        figures = audit(str(out), names, registry, [job.id], [w.text()])
        redis.stop(kill=True)
    figures.update(test="redis down past the client's retries (AOF)", faults_injected=1)
    reliability.append(figures)
    assert final.counts == {"ok": 60}
    text = w.text()
    requeued = re.search(r"chunk (\d+): registry unreachable .*; requeueing the chunk", text)
    assert requeued, text[-3000:]
    assert f"chunk {requeued.group(1)}: recorded" in text[requeued.end() :]  # done again
    assert figures["lost"] == 0 and figures["rows_written_in_parts"] == 60
    assert figures["images_written_twice"] == 0 and figures["chunks_completed_twice"] == 0


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
    figures = audit(dest, names, JobRegistry.from_url(redis_server.url), [job.id], [text])
    figures.update(
        test="S3 stopped and restarted",
        faults_injected=1,
        storage_retries_logged=text.count("retrying in"),
    )
    reliability.append(figures)
    assert final.counts == {"ok": 200}
    assert_each_image_written_and_each_chunk_completed_once(figures)
    ids, codes = load_codes(dest)  # every part names a shard that is really there
    assert len(ids) == 200
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in text
    manifest = read_manifest(dest).to_pandas().astype(str).to_csv()  # every cell, as text
    assert "ok" in manifest and s3.env()["AWS_SECRET_ACCESS_KEY"] not in manifest


def test_s3_failing_a_share_of_requests_is_retried_and_nothing_partial_lands(
    redis_server, s3, tmp_path, reliability, monkeypatch
):
    from tests.helpers import FaultyProxy

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
        figures = audit(dest, names, JobRegistry.from_url(redis_server.url), [job.id], [w.text()])
        figures.update(
            test="S3 proxy failing 25% of requests",
            faults_injected=proxy.failed,
            s3_requests=proxy.requests,
        )
    reliability.append(figures)
    assert proxy.failed > 5
    assert final.counts == {"ok": 200}
    assert_each_image_written_and_each_chunk_completed_once(figures)
    ids, codes = load_codes(dest)
    assert len(ids) == 200 and codes.shape == (200, 3063)


def _poison_png(path: Path) -> None:
    """Within Pillow's pixel limit, but slow to decode (16-bit RGBA, 9400 x 9400, composited
    on white: 2.7 s on a 2-core AVX-512 Xeon), so a 1 s image time limit kills whichever
    process decodes it."""
    width = height = 9400  # 88.4 Mpx, just under MAX_IMAGE_PIXELS
    data = zlib.compress((b"\x00" + bytes(width * 8)) * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)  # 16-bit RGBA
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
    env = worker_env(redis_server.url, IMGENC_IMAGE_TIME_LIMIT="1")
    w = CeleryWorker(env, tmp_path / "worker.log").start()
    out = tmp_path / "out"
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        final = job.wait(timeout=240)
    finally:
        w.stop()
    registry = JobRegistry.from_url(redis_server.url)
    figures = audit(str(out), names, registry, [job.id], [w.text()])
    deliveries = int(registry.r.hget(f"imgenc:job:{job.id}:attempts", "0"))
    figures.update(
        test="poison image (decodes past the 1 s image time limit)",
        faults_injected=deliveries - 1,
        deliveries=deliveries,
    )
    reliability.append(figures)
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("id")
    assert manifest.loc["poison.png", "status"] == "failed"
    assert "died 2 times" in manifest.loc["poison.png", "error"]
    assert final.counts == {"failed": 1, "ok": 9}
    assert_each_image_written_and_each_chunk_completed_once(figures)
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
            statuses = read_manifest(str(out), ["status"])["status"].to_pylist()
            ids, codes = load_codes(out)  # readable and consistent while the disk is full
            assert len(ids) == statuses.count("ok")
            assert not list(out.rglob("*.tmp"))  # no half-written file left behind
            filler.unlink()
            final = job.wait(timeout=120)
        finally:
            w.stop()
        registry = JobRegistry.from_url(redis_server.url)
        figures = audit(str(out), names, registry, [job.id], [w.text()])
        figures.update(
            test="local disk full, then space freed",
            faults_injected=1,
            full_disk_errors_logged=w.text().count("disk full"),
        )
        reliability.append(figures)
        assert final.counts == {"ok": 150}
        assert_each_image_written_and_each_chunk_completed_once(figures)
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
            "--shard-size",
            "32",
            "--no-progress",
            *STUB_FLAGS,
        )
        assert run.returncode == 2, run.stderr[-2000:]
        assert "disk full" in run.stderr and "Traceback" not in run.stderr
        ids, _ = load_codes(out)  # what was written is consistent
        assert 0 < len(ids) < 400
        assert not list(out.rglob("*.tmp"))
        assert "rerun with --resume" in run.stderr
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        resumed = imgenc(
            "encode", str(folder), "--out", str(out), "--resume", "--no-progress", *STUB_FLAGS
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"{len(ids)} already done" in resumed.stdout
        manifest = pd.read_parquet(out / "manifest.parquet")
        assert len(manifest) == 400 and (manifest.status == "ok").all()
        written = written_rows(str(out))  # what the full run kept, then only the rest
        assert sum(written.values()) == 400 and set(written.values()) == {1}
        assert codes_match_a_fresh_local_encode(str(out), folder, **STUB)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_sigterm_lets_the_worker_finish_its_chunk_and_nothing_is_redone(
    redis_server, tmp_path, reliability
):
    folder = tmp_path / "images"
    names = write_jpegs(folder, 100, size=(64, 48))
    out = tmp_path / "out"
    w = CeleryWorker(slow_env(redis_server.url, delay=0.05), tmp_path / "worker.log").start()
    registry = JobRegistry.from_url(redis_server.url)
    try:
        job = enqueue(redis_server.url, folder, str(out), chunk=10)
        wait_for(lambda: received(w) >= 2, 60, "a chunk in flight")
        in_hand = in_flight(registry, job.id)
        assert in_hand and still_running(registry, job.id), "no chunk in hand at the SIGTERM"
        w.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the chunk in hand
        assert w.proc.wait(120) == 0
        assert all(c in registry.r.hkeys(f"imgenc:job:{job.id}:chunks") for c in in_hand)
        w.start()
        final = job.wait(timeout=120)
    finally:
        w.stop()
    figures = audit(str(out), names, registry, [job.id], [w.text()])
    figures.update(test="worker SIGTERM (warm shutdown), restarted", faults_injected=1)
    reliability.append(figures)
    assert final.counts == {"ok": 100}
    assert_each_image_written_and_each_chunk_completed_once(figures)
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
            "imgenc",
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
