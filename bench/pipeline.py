"""The encoding steps of ``python -m bench``: the bare model (``ceiling``), ``imgenc encode``
(``embedded``, and the code sizes: ``cost``), producer -> Redis -> Celery workers
(``distributed``) and the queue path alone (``queue``).  Redis and the workers are the
tests' own harness (``tests.helpers``), stopped at the end of each step, also when the run
is interrupted."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

from bench.core import Context, decode_rate, decoded_batch, seconds_per_call
from bench.images import write_small_jpegs
from encoder.backbones import get_backbone
from tests.helpers import CeleryWorker, RedisServer, worker_env


def ceiling(ctx: Context) -> None:
    """The bare VGG16 forward pass in fp32 (Keras, no pipeline), the reference of the ratios."""
    import keras
    import tensorflow as tf

    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    forward = tf.function(lambda x: model(x, training=False))
    for batch in (2, 4) if ctx.quick else (16, 32, 128):
        x = tf.constant(decoded_batch(ctx, batch).astype("float32"))
        rate = batch / seconds_per_call(lambda x=x: forward(x).numpy(), 1 if batch >= 64 else 2)
        gflops = f"{get_backbone('vgg16').gflops} GFLOP/img"
        ctx.add("ceiling", f"bare VGG16 forward fp32, batch {batch}", rate, "img/s", note=gflops)
        ctx.figures[f"bare_fp32_{batch}"] = rate
    ctx.figures["bare_fp32"] = ctx.figures[f"bare_fp32_{4 if ctx.quick else 32}"]


STAGE_NOTES = {
    "read": "waiting for decoded batches (decoding itself overlaps the model)",
    "encode": "model forward pass and bit packing",
    "write": "shard writes and the final flush",
}


def embedded(ctx: Context) -> None:
    """``imgenc encode`` (``encode_folder``) from files to codes, its stage timings, and
    the bytes per image of codes and of the destination."""
    from encoder.folder_run import encode_folder
    from encoder.spec import spec_for

    out = ctx.work / "embedded"
    run = encode_folder(ctx.images, str(out), ctx.settings(), progress=False)
    rate, bare = run.processed / run.seconds, ctx.figures["bare_fp32"]
    name = f"imgenc encode, files -> codes ({run.processed} img)"
    ctx.add("embedded", name, rate, "img/s", rate / bare, "bare fp32 forward", key="embedded")
    for stage, note in STAGE_NOTES.items():
        seconds = getattr(run, f"{stage}_seconds")
        name = f"imgenc encode, {stage} stage"
        ctx.add("embedded", name, seconds, "s", seconds / run.seconds, "run wall clock", note)
    for layout in ("spatial", "pooled"):
        size = spec_for(ctx.settings(layout=layout)).bytes_per_code
        ctx.add("cost", f"code bytes per image, {layout} VGG16 500 bits", size, "B")
    stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / run.processed
    ctx.add("cost", "destination bytes per image, spatial (codes+manifest+spec)", stored, "B")


def run_job(ctx: Context, broker: str, folder: Path, dest: str, backbone: str) -> float:
    """Images per second from the start of enqueueing to the registry's ``finished_at``
    (manifest merged; polling alone would add up to a poll interval)."""
    import producer

    chosen = ctx.settings(backbone=backbone)
    start = time.time()
    job = producer.enqueue(folder, str(ctx.work / dest), settings=chosen, broker=broker)
    final = job.wait(timeout=7200, poll=0.2)
    return final.processed / (final.finished_at - start)


def start_worker(stack: ExitStack, ctx: Context, broker: str, name: str, *args: str, **env: str):
    """A Celery worker for the rest of ``stack``, as ``tests.helpers`` starts one."""
    worker = CeleryWorker(worker_env(broker, **env), ctx.work / f"{name}.log", name, args)
    stack.callback(worker.stop)
    return worker.start()


def redis(stack: ExitStack, ctx: Context, name: str) -> str:
    server = RedisServer(ctx.work / name)
    stack.callback(server.stop)
    return server.start().url


def distributed(ctx: Context) -> None:
    """producer -> Redis -> one VGG16 worker, then two; the worker's start-up and memory.
    Under ``--quick``, 8 photos a job."""
    bare, vgg = ctx.figures["bare_fp32"], {"IMGENC_BACKBONE": "vgg16"}
    photos = ctx.copy_photos(8, "distributed-photos") if ctx.quick else ctx.images
    with ExitStack() as stack:
        broker = redis(stack, ctx, "redis-distributed")
        started = time.monotonic()
        first = start_worker(stack, ctx, broker, "bench1", **vgg)
        startup = time.monotonic() - started
        ctx.add("cost", "worker start-up until model ready (VGG16)", startup, "s")
        rate = run_job(ctx, broker, photos, "distributed1", "vgg16")
        name = "producer -> Redis -> 1 worker -> local dir"
        ctx.add("distributed", name, rate, "img/s", rate / bare, "bare fp32 forward")
        peak = first.child_peak_rss_kb() / 1024
        ctx.add("cost", "worker process peak RSS (VGG16, after the job)", peak, "MiB")
        start_worker(stack, ctx, broker, "bench2", **vgg)
        rate = run_job(ctx, broker, photos, "distributed2", "vgg16")
    note = f"both workers share the same {os.cpu_count()} cores"
    name = "same, 2 workers on this machine (total)"
    ctx.add("distributed", name, rate, "img/s", rate / bare, "bare fp32 forward", note)


def queue(ctx: Context) -> None:
    """The queue path alone, the stub backbone on tiny JPEGs, and photo decoding on one core."""
    count = 600 if ctx.quick else 6000
    tiny = write_small_jpegs(ctx.work / "tiny", count, size=(64, 48))
    with ExitStack() as stack:
        broker = redis(stack, ctx, "redis-queue")
        # This worker resolves the paths against another root: every image is `missing`.
        one_thread = {"IMGENC_DECODE_THREADS": "1"}
        alone = {**one_thread, "IMGENC_IMAGE_ROOT": str(ctx.work)}
        with ExitStack() as worker:
            start_worker(worker, ctx, broker, "queue-alone", **alone)
            rate = run_job(ctx, broker, tiny, "queue-alone", "stub")
        name = f"queue path alone, 1 worker -c 1 ({count} paths, nothing decoded)"
        note = "messages, registry, shard + manifest writes; files not found"
        ctx.add("queue", name, rate, "img/s", note=note)
        for c in (1, 2):
            with ExitStack() as worker:
                start_worker(worker, ctx, broker, f"stub-c{c}", "-c", str(c), **one_thread)
                rate = run_job(ctx, broker, tiny, f"stub-c{c}", "stub")
            name = f"stub backbone, 1 worker -c {c}, {count} small JPEGs"
            note = "64x48 JPEGs; decode + Python per image bound one process"
            ctx.add("queue", name, rate, "img/s", note=note)
    rate = decode_rate(ctx, 16 if ctx.quick else 200)
    ctx.add("queue", "decode + resize to 224, one core, these photos", rate, "img/s")
