"""The measurements of ``python -m bench``, each a function returning rows for the table.

Every measurement runs in one process run, on the same images, so ratios compare like with
like on a shared, noisy machine.  Absolute figures are printed with the machine beside them.
Random weights are used throughout (no ImageNet download here); speed does not depend on
the weights' values, and recall against the float features does not need trained weights.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.backbones import get_backbone
from encoder.images import ImageLoader
from encoder.planes import hyperplanes
from encoder.settings import Settings

VGG16_GFLOP = get_backbone("vgg16").gflops  # per 224x224 image, conv part


@dataclass
class Row:
    group: str
    name: str
    value: float | None
    unit: str
    ratio: float | None = None  # against the measurement named in `of`
    of: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Context:
    images: Path
    files: list[str]
    quick: bool
    work: Path
    rows: list[Row] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)

    def add(self, row: Row, key: str | None = None) -> Row:
        self.rows.append(row)
        if key and row.value is not None:
            self.values[key] = row.value
        print(
            f"  {row.group:<12} {row.name:<52} {_fmt(row.value)} {row.unit}"
            + (f"  ({row.ratio:.2f}x {row.of})" if row.ratio is not None else ""),
            flush=True,
        )
        return row


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def machine() -> dict[str, Any]:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import tensorflow as tf

    interesting = sorted(
        f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": interesting,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def _timed(fn, min_calls: int = 2, min_seconds: float = 0.0) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({"weights": "random", **overrides}, environ={})


def decoded_batch(ctx: Context, n: int, size: int = 224) -> np.ndarray:
    loader = ImageLoader(ctx.images, size)
    pixels = [r.pixels for r in (loader.load(f) for f in ctx.files[: max(n, 1)]) if r.ok]
    reps = -(-n // len(pixels))
    return np.stack((pixels * reps)[:n])


# 1. compute ceiling ----------------------------------------------------------------------
def compute_ceiling(ctx: Context) -> None:
    import keras
    import tensorflow as tf

    n = 1024 if ctx.quick else 4096
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.matmul(a, b))
    seconds = _timed(lambda: matmul().numpy(), min_calls=3 if ctx.quick else 10)
    gflops = 2 * n**3 / seconds / 1e9
    ctx.add(Row("ceiling", f"TF fp32 matmul {n}x{n}", gflops, "GFLOP/s"), "matmul_gflops")

    batches = (2, 4) if ctx.quick else (16, 32, 128)
    for precision in ("fp32", "bf16"):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32")
        try:
            backbone = keras.applications.VGG16(
                include_top=False, weights=None, input_shape=(224, 224, 3)
            )
        finally:
            keras.config.set_dtype_policy(previous)
        forward = tf.function(lambda x, m=backbone: m(x, training=False))
        for batch in batches:
            x = tf.constant(decoded_batch(ctx, batch).astype("float32"))
            seconds = _timed(lambda x=x, f=forward: f(x).numpy(), min_calls=1 if batch >= 64 else 2)
            rate = batch / seconds
            row = Row("ceiling", f"bare VGG16 forward {precision}, batch {batch}", rate, "img/s")
            if precision == "fp32":
                row.ratio = rate * VGG16_GFLOP / ctx.values["matmul_gflops"]
                row.of = "matmul rate (30.7 GFLOP/img)"
            ctx.add(row, f"bare_{precision}_{batch}")
    ref = 4 if ctx.quick else 32
    ctx.values["bare_fp32"] = ctx.values[f"bare_fp32_{ref}"]
    ctx.values["bare_bf16"] = ctx.values[f"bare_bf16_{ref}"]


# 2. embedded path -------------------------------------------------------------------------
def embedded(ctx: Context) -> None:
    from encoder.local_run import encode_folder

    out = ctx.work / "embedded"
    summary = encode_folder(ctx.images, str(out), settings(), progress=False)
    rate = summary.processed / summary.seconds
    ctx.add(
        Row(
            "embedded",
            f"imgenc encode, files -> codes ({summary.processed} img)",
            rate,
            "img/s",
            rate / ctx.values["bare_fp32"],
            "bare fp32 forward",
            ">= 0.9",
            rate / ctx.values["bare_fp32"] >= 0.9,
        ),
        "embedded",
    )
    ctx.values["embedded_dir_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    ctx.values["embedded_n"] = summary.processed


# 3/4. distributed path and queue capacity ----------------------------------------------------
def _run_job(redis_url: str, folder: Path, out: Path, **model: Any) -> tuple[float, int]:
    """Seconds from the start of enqueueing to the registry's ``finished_at`` (merge done):
    polling alone would add up to a poll interval to jobs that last seconds."""
    import producer

    start = time.time()
    job = producer.enqueue(folder, str(out), broker=redis_url, **model)
    final = job.wait(timeout=7200, poll=0.2)
    return final.finished_at - start, final.processed


def distributed(ctx: Context) -> None:
    from tests.services import CeleryWorker, RedisServer, worker_env

    redis = RedisServer(ctx.work / "redis").start()
    try:
        env = worker_env(redis.url, IMGENC_BACKBONE="vgg16")
        first = CeleryWorker(env, ctx.work / "w1.log", name="bench1")
        started = time.monotonic()
        first.start()
        startup = time.monotonic() - started
        ctx.add(Row("cost", "worker start-up until model ready (VGG16)", startup, "s"))
        seconds, n = _run_job(
            redis.url, ctx.images, ctx.work / "dist1", backbone="vgg16", weights="random"
        )
        rate = n / seconds
        ratio = rate / ctx.values["bare_fp32"]
        ctx.add(
            Row(
                "distributed",
                "producer -> Redis -> 1 worker -> local dir",
                rate,
                "img/s",
                ratio,
                "bare fp32 forward",
                ">= 0.9",
                ratio >= 0.9,
            ),
            "dist1",
        )
        rss = _peak_rss_kb(first)
        ctx.add(Row("cost", "worker process peak RSS (VGG16, after the job)", rss / 1024, "MiB"))
        second = CeleryWorker(env, ctx.work / "w2.log", name="bench2").start()
        try:
            seconds, n = _run_job(
                redis.url, ctx.images, ctx.work / "dist2", backbone="vgg16", weights="random"
            )
        finally:
            second.stop()
            first.stop()
        rate = n / seconds
        ctx.add(
            Row(
                "distributed",
                "same, 2 workers on this machine (total)",
                rate,
                "img/s",
                rate / ctx.values["bare_fp32"],
                "bare fp32 forward",
                note="both workers share the same 2 cores",
            )
        )
    finally:
        redis.stop(kill=True)


def _peak_rss_kb(worker: Any) -> float:
    peaks = []
    for pid in [worker.proc.pid, *worker.child_pids()]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(float(line.split()[1]))
        except OSError:
            pass
    return max(peaks) if peaks else float("nan")


def queue_capacity(ctx: Context) -> None:
    from tests.imagegen import write_jpegs
    from tests.services import CeleryWorker, RedisServer, worker_env

    n = 600 if ctx.quick else 6000
    folder = ctx.work / "tiny"
    write_jpegs(folder, n, size=(64, 48))
    redis = RedisServer(ctx.work / "redis-q").start()
    try:
        env = worker_env(redis.url, IMGENC_DECODE_THREADS="1", IMGENC_IMAGE_ROOT=str(ctx.work))
        w = CeleryWorker(env, ctx.work / "bare-queue.log", name="bare").start()
        try:  # the worker resolves the paths against another root: every image is `missing`
            seconds, done = _run_job(
                redis.url, folder, ctx.work / "queue-alone", backbone="stub", weights="random"
            )
        finally:
            w.stop()
        ctx.add(
            Row(
                "queue",
                f"queue path alone, 1 worker -c 1 ({n} paths, nothing decoded)",
                done / seconds,
                "img/s",
                note="messages, registry, shard + manifest writes; files not found",
            )
        )
        for concurrency in (1, 2):
            env = worker_env(redis.url, IMGENC_DECODE_THREADS="1")
            w = CeleryWorker(
                env,
                ctx.work / f"stub{concurrency}.log",
                name=f"stub{concurrency}",
                extra_args=("-c", str(concurrency)),
            ).start()
            try:
                seconds, done = _run_job(
                    redis.url,
                    folder,
                    ctx.work / f"stub-out{concurrency}",
                    backbone="stub",
                    weights="random",
                )
            finally:
                w.stop()
            rate = done / seconds
            ctx.add(
                Row(
                    "queue",
                    f"stub backbone, 1 worker -c {concurrency}, {n} small JPEGs",
                    rate,
                    "img/s",
                    target=">= 2000",
                    met=rate >= 2000,
                    note="64x48 JPEGs; decode + Python per image bound one process",
                )
            )
    finally:
        redis.stop(kill=True)
    loader = ImageLoader(ctx.images, 224)
    files = ctx.files[: (16 if ctx.quick else 200)]
    start = time.perf_counter()
    for f in files:
        loader.load(f)
    rate = len(files) / (time.perf_counter() - start)
    ctx.add(Row("queue", "decode + resize to 224, one core, these photos", rate, "img/s"), "decode")


# 5. the notebook's pipeline ------------------------------------------------------------------
def notebook(ctx: Context) -> None:
    from bench.notebook import KERAS3_CHANGES, build_notebook_model, run_notebook_pipeline

    model = build_notebook_model()
    batch = 8 if ctx.quick else 128
    run_notebook_pipeline(ctx.images, ctx.files[:batch], model, batch)  # warm-up
    start = time.perf_counter()
    out = run_notebook_pipeline(ctx.images, ctx.files, model, batch)
    rate = len(ctx.files) / (time.perf_counter() - start)
    assert out.shape[1:] == (49, 500)
    ctx.add(
        Row(
            "notebook",
            f"ImageDataGenerator + predict, batch {batch}",
            rate,
            "img/s",
            note=KERAS3_CHANGES,
        ),
        "notebook",
    )
    ratio = ctx.values["embedded"] / rate
    ctx.add(
        Row(
            "notebook",
            "imgenc encode / notebook pipeline",
            ratio,
            "x",
            target=">= 2",
            met=ratio >= 2,
        )
    )


# 6/7. precision and LSH fidelity -------------------------------------------------------------
def _features(ctx: Context, precision: str, weights: str) -> np.ndarray:
    from encoder.model import Encoder
    from encoder.pipeline import encode_stream

    enc = Encoder(settings(layout="pooled", precision=precision, weights=weights))
    loader = ImageLoader(ctx.images, 224)
    chunks = [f for _, f in encode_stream(ctx.files, loader, enc.features, 32)]
    return np.concatenate(chunks)


def _hamming_topk(codes: np.ndarray, k: int) -> np.ndarray:
    packed = np.packbits(codes, axis=1)
    dist = np.bitwise_count(packed[:, None, :] ^ packed[None, :, :]).sum(-1)
    np.fill_diagonal(dist, np.iinfo(dist.dtype).max)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def _cosine_topk(features: np.ndarray, k: int) -> np.ndarray:
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def fidelity(ctx: Context) -> None:
    weights = ctx.work / "vgg16-random.weights.h5"
    from encoder.model import Encoder

    Encoder(settings(layout="pooled")).model.get_layer("vgg16").save_weights(weights)
    fp32 = _features(ctx, "fp32", str(weights))
    bf16 = _features(ctx, "bf16", str(weights))
    k = min(10, len(fp32) - 1)

    ratio = ctx.values["bare_bf16"] / ctx.values["bare_fp32"]
    ctx.add(Row("bf16", "bf16 / fp32 speed (bare forward)", ratio, "x"))
    planes = hyperplanes(fp32.shape[1], 500, 628)
    bits32, bits16 = (fp32 @ planes > 0), (bf16 @ planes > 0)
    ctx.add(
        Row(
            "bf16",
            "code bits equal, bf16 vs fp32 (pooled, 500 bits)",
            float((bits32 == bits16).mean()),
            "share",
        )
    )
    ctx.add(
        Row(
            "bf16",
            f"top-{k} Hamming neighbours shared, bf16 vs fp32",
            _overlap(_hamming_topk(bits32, k), _hamming_topk(bits16, k)),
            "share",
        )
    )

    exact = _cosine_topk(fp32, k)
    mean = fp32.mean(axis=0)
    recalls = {}
    for bits in (64, 128, 256, 500, 1024):
        planes = hyperplanes(fp32.shape[1], bits, 628)
        for centred in (False, True):
            x = fp32 - mean if centred else fp32
            recall = _overlap(_hamming_topk(x @ planes > 0, k), exact)
            recalls[(bits, centred)] = recall
            ctx.add(
                Row(
                    "lsh",
                    f"recall@{k}, pooled {bits} bits, {'centred' if centred else 'raw'}",
                    recall,
                    "share",
                    note="random weights; exact = cosine on float features",
                )
            )
    wins = sum(recalls[(b, True)] > recalls[(b, False)] for b in (64, 128, 256, 500, 1024))
    ctx.values["centering_wins"] = wins


# 8. cost ------------------------------------------------------------------------------------
def cost(ctx: Context) -> None:
    from encoder.spec import spec_for

    for layout in ("spatial", "pooled"):
        spec = spec_for(settings(layout=layout))
        ctx.add(
            Row("cost", f"code bytes per image, {layout} VGG16 500 bits", spec.bytes_per_code, "B")
        )
    if "embedded_dir_bytes" in ctx.values:
        ctx.add(
            Row(
                "cost",
                "destination bytes per image, spatial (codes+manifest+spec)",
                ctx.values["embedded_dir_bytes"] / ctx.values["embedded_n"],
                "B",
            )
        )
    ctx.add(Row("cost", "notebook's int32 array per image (49 x 500 x 4)", 49 * 500 * 4, "B"))
    sizes = (2_000, 20_000) if ctx.quick else (10_000, 100_000)
    peaks = [_producer_peak_rss(ctx, n) for n in sizes]
    for n, peak in zip(sizes, peaks, strict=True):
        ctx.add(
            Row("cost", f"producer peak RSS, scanning + enqueueing {n:,} files", peak / 1024, "MiB")
        )
    ctx.add(
        Row(
            "cost",
            f"producer RSS growth {sizes[0]:,} -> {sizes[1]:,} files",
            (peaks[1] - peaks[0]) / 1024,
            "MiB",
            target="flat",
        )
    )


def _producer_peak_rss(ctx: Context, n: int) -> float:
    from tests.services import RedisServer, producer_peak_rss_kb, touch_files

    folder = touch_files(ctx.work / f"scan{n}", n)
    redis = RedisServer(ctx.work / f"redis-scan{n}").start()
    try:
        return producer_peak_rss_kb(folder, ctx.work / f"p{n}", redis.url)
    finally:
        redis.stop(kill=True)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="imgenc-bench-"))
