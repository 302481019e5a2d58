"""Load: 10,000 small images through two workers (stub backbone, so it runs in seconds) and a
scan of 100,000 files.  Complete manifest, no duplicates, flat memory."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.registry import JobRegistry
from tests.helpers import (
    CeleryWorker,
    audit,
    chunk_completions,
    producer_peak_rss_kb,
    touch_files,
    wait_for,
    worker_env,
    write_jpegs,
)


@pytest.mark.parametrize(
    "n_images", [10_000, pytest.param(50_000, marks=pytest.mark.slow, id="50000-images")]
)
def test_many_images_through_two_workers_complete_once_each_with_flat_worker_memory(
    redis_server, tmp_path, reliability, n_images
):
    import producer

    folder = tmp_path / "images"
    names = write_jpegs(folder, n_images, size=(64, 48))
    env = worker_env(redis_server.url, IMGENC_DECODE_THREADS="1")
    workers = [CeleryWorker(env, tmp_path / f"w{i}.log", name=f"load{i}") for i in range(2)]
    for w in workers:
        w.start(wait=False)
    for w in workers:
        wait_for(lambda w=w: "model ready" in w.text() and " ready." in w.text(), 180, "worker")
    samples: list[tuple[int, list[float]]] = []
    stop = threading.Event()
    registry = JobRegistry.from_url(redis_server.url)
    out = tmp_path / "out"
    try:
        # The queue path is under test: the job's near-duplicate fit (a search index and
        # a model run on one worker at the end) would be memory of another kind.
        job = producer.enqueue(
            folder, str(out), broker=redis_server.url, chunk=100, backbone="stub",
            weights="random", dedup_fit=False,
        )  # fmt: skip

        def sample() -> None:
            while not stop.is_set():
                try:
                    processed = registry.status(job.id).processed
                except Exception:
                    processed = -1
                samples.append((processed, [w.child_rss_kb() for w in workers]))
                time.sleep(0.05)

        children = [w.child_pids() for w in workers]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        final = job.wait(timeout=600)
        seconds = time.monotonic() - start
        stop.set()
        sampler.join()
        # Read while the workers are alive and idle, before any of them starts shutting down,
        # and from the same pool processes that were sampled during the job.
        at_the_end = [w.child_rss_kb() for w in workers]
        assert [w.child_pids() for w in workers] == children, "a pool process was replaced"
    finally:
        stop.set()
        for w in workers:
            w.stop()
    # Per image: from the first 1,000 images to 90% of them (the last chunks may overlap
    # the merge).  The manifest merge that ends the job (Arrow runs merged by id, on one
    # worker) is reported apart: memory of another kind, and allocated once per job.
    after_first_1000 = next(rss for processed, rss in samples if processed >= 1000)
    at_nine_tenths = next(rss for processed, rss in samples if processed >= 0.9 * n_images)
    growth_mib = [
        (end - first) / 1024 for first, end in zip(after_first_1000, at_nine_tenths, strict=True)
    ]
    with_merge_mib = [
        (end - first) / 1024 for first, end in zip(after_first_1000, at_the_end, strict=True)
    ]
    figures = audit(str(out), names, registry, [job.id], [w.text() for w in workers])
    figures.update(
        test=f"load: {n_images:,} images, 2 workers (stub)",
        faults_injected=0,
        images_per_second=round(n_images / seconds),
        worker_rss_mib_after_1000=[round(v / 1024) for v in after_first_1000],
        worker_rss_growth_mib_1000_to_nine_tenths=[round(g, 1) for g in growth_mib],
        worker_rss_growth_mib_with_the_manifest_merge=[round(g, 1) for g in with_merge_mib],
    )
    reliability.append(figures)
    assert final.counts == {"ok": n_images}
    assert figures["lost"] == 0 and figures["manifest_rows"] == n_images
    assert figures["rows_written_in_parts"] == n_images and figures["images_written_twice"] == 0
    assert figures["chunk_completions_logged"] == figures["chunks"] == n_images // 100
    assert figures["chunks_completed_twice"] == 0 and figures["re_executions"] == 0
    assert all(chunk_completions([w.text()], job.id) for w in workers), "both took chunks"
    assert max(growth_mib) < 10, f"worker RSS grew by {growth_mib} MiB"


def test_scanning_100000_files_keeps_producer_memory_flat(redis_server, tmp_path, reliability):
    small = producer_peak_rss_kb(
        touch_files(tmp_path / "s", 10_000), tmp_path / "o1", redis_server.url
    )
    large = producer_peak_rss_kb(
        touch_files(tmp_path / "l", 100_000), tmp_path / "o2", redis_server.url
    )
    reliability.append(
        {
            "test": "producer scan",
            "peak_rss_mib_10000_files": round(small / 1024, 1),
            "peak_rss_mib_100000_files": round(large / 1024, 1),
        }
    )
    assert (large - small) / 1024 < 8, f"{small / 1024:.1f} -> {large / 1024:.1f} MiB"
