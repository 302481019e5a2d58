"""The measurements of ``python -m bench``: each step adds rows of figures to the table.

Every step runs in one process run, on the same photos, so ratios compare like with like
on a shared, noisy machine.  A row is a figure: a value and its unit, optionally a ratio
against a named reference measured in the same run, and a note.  Absolute figures are
printed with the machine beside them.  The speed steps use random weights (no ImageNet
download here; speed does not depend on the weights' values); figures of quality (the
``quality`` step) use the one trained backbone that installs offline, EfficientNet-Lite0
with its ImageNet weights: random features look alike for every photo, so a figure of
quality measured on them means nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.cluster import celery_worker, producer_peak_rss_kb, redis_server
from bench.images import touch_empty_jpegs, write_small_jpegs
from encoder.backbones import get_backbone
from encoder.images import ImageLoader
from encoder.planes import hyperplanes
from encoder.settings import Settings

VGG16_GFLOP = get_backbone("vgg16").gflops  # per 224x224 image, conv part
LSH_BITS = (64, 128, 256, 500, 1024)


@dataclass
class Row:
    """One figure of the table."""

    group: str
    name: str
    value: float
    unit: str
    ratio: float | None = None  # value / the figure named in `reference`
    reference: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """What every step shares: the photos, a scratch folder, and the figures so far."""

    images: Path
    files: list[str]
    quick: bool
    work: Path
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # for later steps' ratios

    def add(self, row: Row, key: str | None = None) -> Row:
        """Record and print ``row``; ``key`` keeps its value for the ratios of later steps."""
        self.rows.append(row)
        if key:
            self.figures[key] = row.value
        ratio = f"  ({row.ratio:.2f}x {row.reference})" if row.ratio is not None else ""
        print(f"  {row.group:<12} {row.name:<62} {format_value(row.value)} {row.unit}{ratio}")
        return row


def format_value(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def machine() -> dict[str, Any]:
    """The CPU model, core count and the CPU flags that decide model speed, and the stack."""
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

    relevant = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": relevant,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def seconds_per_call(fn: Callable[[], object], min_calls: int = 2) -> float:
    """Seconds per call of ``fn``, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(min_calls):
        fn()
    return (time.perf_counter() - start) / min_calls


WEIGHTS = {"weights": "random"}  # `python -m bench --weights` changes it for the whole run


def settings(**overrides: Any) -> Settings:
    """The defaults with the run's weights (random unless ``--weights``) and ``overrides``;
    this process's environment is ignored."""
    return Settings.from_env({**WEIGHTS, **overrides}, environ={})


def decoded_batch(ctx: Context, n: int, size: int = 224) -> np.ndarray:
    """``n`` decoded photos (repeated if there are fewer) as one uint8 batch."""
    loader = ImageLoader(ctx.images, size)
    pixels = [r.pixels for r in map(loader.load, ctx.files[: max(n, 1)]) if r.ok]
    repeats = -(-n // len(pixels))
    return np.stack((pixels * repeats)[:n])


# 1. compute ceiling ----------------------------------------------------------------------
def compute_ceiling(ctx: Context) -> None:
    """The machine's matmul rate, and the bare VGG16 forward pass in fp32 and bf16."""
    import keras
    import tensorflow as tf

    n = 1024 if ctx.quick else 4096
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.matmul(a, b))
    seconds = seconds_per_call(lambda: matmul().numpy(), min_calls=3 if ctx.quick else 10)
    matmul_gflops = 2 * n**3 / seconds / 1e9
    ctx.add(Row("ceiling", f"TF fp32 matmul {n}x{n}", matmul_gflops, "GFLOP/s"))

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
            seconds = seconds_per_call(
                lambda x=x, f=forward: f(x).numpy(), min_calls=1 if batch >= 64 else 2
            )
            rate = batch / seconds
            row = Row("ceiling", f"bare VGG16 forward {precision}, batch {batch}", rate, "img/s")
            if precision == "fp32":
                row.ratio = rate * VGG16_GFLOP / matmul_gflops
                row.reference = f"matmul rate ({VGG16_GFLOP} GFLOP/img)"
            ctx.add(row, f"bare_{precision}_{batch}")
    reference_batch = 4 if ctx.quick else 32
    ctx.figures["bare_fp32"] = ctx.figures[f"bare_fp32_{reference_batch}"]
    ctx.figures["bare_bf16"] = ctx.figures[f"bare_bf16_{reference_batch}"]


# 2. embedded path -------------------------------------------------------------------------
STAGE_NOTES = {
    "read": "waiting for decoded batches (decoding itself overlaps the model)",
    "encode": "model forward pass and bit packing",
    "write": "shard writes and the final flush",
}


def embedded(ctx: Context) -> None:
    """``imgenc encode`` (``encode_folder``) from files to codes, and its stage timings."""
    from encoder.folder_run import encode_folder

    out = ctx.work / "embedded"
    summary = encode_folder(ctx.images, str(out), settings(), progress=False)
    rate = summary.processed / summary.seconds
    ctx.add(
        Row(
            "embedded",
            f"imgenc encode, files -> codes ({summary.processed} img)",
            rate,
            "img/s",
            rate / ctx.figures["bare_fp32"],
            "bare fp32 forward",
        ),
        "embedded",
    )
    stage_seconds = {
        "read": summary.read_seconds,
        "encode": summary.encode_seconds,
        "write": summary.write_seconds,
    }
    for stage, seconds in stage_seconds.items():
        ctx.add(
            Row(
                "embedded",
                f"imgenc encode, {stage} stage",
                seconds,
                "s",
                seconds / summary.seconds,
                "run wall clock",
                STAGE_NOTES[stage],
            )
        )
    ctx.figures["embedded_dest_bytes"] = sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file()
    )
    ctx.figures["embedded_images"] = summary.processed


# 3/4. distributed path and queue capacity ----------------------------------------------------
def _run_job(broker_url: str, folder: Path, dest: Path, backbone: str) -> tuple[float, int]:
    """Seconds from the start of enqueueing to the registry's ``finished_at`` (manifest
    merged; polling alone would add up to a poll interval), and images processed."""
    import producer

    start = time.time()
    job = producer.enqueue(
        folder, str(dest), settings=settings(), broker=broker_url, backbone=backbone
    )
    final = job.wait(timeout=7200, poll=0.2)
    return final.finished_at - start, final.processed


def distributed(ctx: Context) -> None:
    """producer -> Redis -> one VGG16 worker, then two; the worker's start-up and memory."""
    with redis_server(ctx.work / "redis-distributed") as broker:
        with celery_worker(broker, ctx.work / "worker1.log", "bench1", "vgg16") as first:
            ctx.add(
                Row("cost", "worker start-up until model ready (VGG16)", first.startup_seconds, "s")
            )
            seconds, done = _run_job(broker, ctx.images, ctx.work / "distributed1", "vgg16")
            rate = done / seconds
            ctx.add(
                Row(
                    "distributed",
                    "producer -> Redis -> 1 worker -> local dir",
                    rate,
                    "img/s",
                    rate / ctx.figures["bare_fp32"],
                    "bare fp32 forward",
                )
            )
            peak_mib = first.peak_rss_kb() / 1024
            ctx.add(Row("cost", "worker process peak RSS (VGG16, after the job)", peak_mib, "MiB"))
            with celery_worker(broker, ctx.work / "worker2.log", "bench2", "vgg16"):
                seconds, done = _run_job(broker, ctx.images, ctx.work / "distributed2", "vgg16")
        rate = done / seconds
        ctx.add(
            Row(
                "distributed",
                "same, 2 workers on this machine (total)",
                rate,
                "img/s",
                rate / ctx.figures["bare_fp32"],
                "bare fp32 forward",
                note=f"both workers share the same {os.cpu_count()} cores",
            )
        )


def queue_capacity(ctx: Context) -> None:
    """The queue path alone, the stub backbone on tiny JPEGs, and photo decoding on one core."""
    count = 600 if ctx.quick else 6000
    tiny = write_small_jpegs(ctx.work / "tiny", count, size=(64, 48))
    with redis_server(ctx.work / "redis-queue") as broker:
        # This worker resolves the paths against another root: every image is `missing`.
        with celery_worker(
            broker,
            ctx.work / "queue-alone.log",
            "queue-alone",
            "stub",
            decode_threads=1,
            image_root=str(ctx.work),
        ):
            seconds, done = _run_job(broker, tiny, ctx.work / "queue-alone", "stub")
        ctx.add(
            Row(
                "queue",
                f"queue path alone, 1 worker -c 1 ({count} paths, nothing decoded)",
                done / seconds,
                "img/s",
                note="messages, registry, shard + manifest writes; files not found",
            )
        )
        for concurrency in (1, 2):
            with celery_worker(
                broker,
                ctx.work / f"stub-c{concurrency}.log",
                f"stub-c{concurrency}",
                "stub",
                concurrency=concurrency,
                decode_threads=1,
            ):
                seconds, done = _run_job(broker, tiny, ctx.work / f"stub-c{concurrency}", "stub")
            ctx.add(
                Row(
                    "queue",
                    f"stub backbone, 1 worker -c {concurrency}, {count} small JPEGs",
                    done / seconds,
                    "img/s",
                    note="64x48 JPEGs; decode + Python per image bound one process",
                )
            )
    rate = decode_rate(ctx, 16 if ctx.quick else 200)
    ctx.add(Row("queue", "decode + resize to 224, one core, these photos", rate, "img/s"))


def decode_rate(ctx: Context, n: int) -> float:
    """Photos decoded and resized to 224 per second, one at a time (one core)."""
    loader = ImageLoader(ctx.images, 224)
    files = ctx.files[:n]
    start = time.perf_counter()
    for name in files:
        loader.load(name)
    return len(files) / (time.perf_counter() - start)


# 5. the notebook's pipeline ------------------------------------------------------------------
def notebook(ctx: Context) -> None:
    """The notebook's ImageDataGenerator + predict pipeline, and imgenc encode against it."""
    from bench.notebook import KERAS3_CHANGES, build_notebook_model, run_notebook_pipeline

    model = build_notebook_model()
    batch = 8 if ctx.quick else 128
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints "Found N validated..."
        run_notebook_pipeline(ctx.images, ctx.files[:batch], model, batch)  # warm-up
        start = time.perf_counter()
        out = run_notebook_pipeline(ctx.images, ctx.files, model, batch)
        rate = len(ctx.files) / (time.perf_counter() - start)
    if out.shape[1:] != (49, 500):
        raise RuntimeError(f"the notebook's pipeline returned shape {out.shape}")
    ctx.add(
        Row(
            "notebook",
            f"ImageDataGenerator + predict, batch {batch}",
            rate,
            "img/s",
            note=KERAS3_CHANGES,
        )
    )
    ctx.add(
        Row("notebook", "imgenc encode / notebook pipeline", ctx.figures["embedded"] / rate, "x")
    )


# 6/7. precision fidelity --------------------------------------------------------------------
def features(ctx: Context, encoder: Any) -> np.ndarray:
    """``encoder.features`` of every photo, in ``ctx.files`` order, in batches of 32."""
    loader = ImageLoader(ctx.images, encoder.input_size)
    batches = []
    for start in range(0, len(ctx.files), 32):
        results = [loader.load(name) for name in ctx.files[start : start + 32]]
        bad = [f"{r.id} ({r.status})" for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"photos that do not decode: {', '.join(bad)}")
        batches.append(encoder.features(np.stack([r.pixels for r in results])))
    return np.concatenate(batches)


def hamming_topk(codes: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows of the 0/1 ``codes`` (``(n, ...)``) by Hamming
    distance, ties broken by position (as the index breaks them by id, for ids in order).
    The distances come from one matrix product: no ``n x n x bytes`` array."""
    x = codes.reshape(len(codes), -1).astype(np.float32)  # exact up to 2**24 bits
    ones = x.sum(axis=1)
    dist = ones[:, None] + ones[None, :] - 2 * (x @ x.T)
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def cosine_topk(features: np.ndarray, k: int) -> np.ndarray:
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def fidelity(ctx: Context) -> None:
    """bf16 against fp32: speed, code bits and neighbours (pooled).  ``--weights random``
    is seeded, so the fp32 and bf16 models hold the same weights.  (Recall of the codes
    against the float features is measured with trained weights by the ``quality`` step.)"""
    from encoder.tf_runtime import TensorFlowEncoder as Encoder

    fp32 = features(ctx, Encoder(settings(layout="pooled", precision="fp32")))
    bf16 = features(ctx, Encoder(settings(layout="pooled", precision="bf16")))
    k = min(10, len(fp32) - 1)

    speed = ctx.figures["bare_bf16"] / ctx.figures["bare_fp32"]
    ctx.add(Row("bf16", "bf16 / fp32 speed (bare forward)", speed, "x"))
    planes = hyperplanes(fp32.shape[1], 500, 628)
    bits32, bits16 = (fp32 @ planes > 0), (bf16 @ planes > 0)
    equal = float((bits32 == bits16).mean())
    ctx.add(Row("bf16", "code bits equal, bf16 vs fp32 (pooled, 500 bits)", equal, "share"))
    shared = overlap(hamming_topk(bits32, k), hamming_topk(bits16, k))
    ctx.add(Row("bf16", f"top-{k} Hamming neighbours shared, bf16 vs fp32", shared, "share"))


# 8. cost ------------------------------------------------------------------------------------
def cost(ctx: Context) -> None:
    """Bytes per code and per image at the destination, and the producer's memory."""
    from encoder.spec import spec_for

    for layout in ("spatial", "pooled"):
        spec = spec_for(settings(layout=layout))
        ctx.add(
            Row("cost", f"code bytes per image, {layout} VGG16 500 bits", spec.bytes_per_code, "B")
        )
    if "embedded_dest_bytes" in ctx.figures:
        per_image = ctx.figures["embedded_dest_bytes"] / ctx.figures["embedded_images"]
        ctx.add(
            Row(
                "cost", "destination bytes per image, spatial (codes+manifest+spec)", per_image, "B"
            )
        )
    ctx.add(Row("cost", "notebook's int32 array per image (49 x 500 x 4)", 49 * 500 * 4, "B"))
    sizes = (2_000, 20_000) if ctx.quick else (10_000, 100_000)
    with redis_server(ctx.work / "redis-producer") as broker:
        peaks_mib = [
            producer_peak_rss_kb(
                touch_empty_jpegs(ctx.work / f"empty{n}", n), ctx.work / f"parked{n}", broker
            )
            / 1024
            for n in sizes
        ]
    ctx.add(
        Row(
            "cost",
            f"producer peak RSS, scanning + enqueueing {sizes[0]:,} files",
            peaks_mib[0],
            "MiB",
        )
    )
    ctx.add(
        Row(
            "cost",
            f"producer peak RSS, scanning + enqueueing {sizes[1]:,} files",
            peaks_mib[1],
            "MiB",
            peaks_mib[1] / peaks_mib[0],
            f"the {sizes[0]:,}-file run",
        )
    )


# 9/10. the query half -------------------------------------------------------------------------
def search(ctx: Context) -> None:
    """Index build, search speed (against faiss direct and numpy), HNSW, spatial codes,
    and ``imgenc serve`` over HTTP: groups ``search`` and ``serve``."""
    from bench.search_measure import search as measure_search

    measure_search(ctx)


def flood(ctx: Context) -> None:
    """``imgenc serve`` while clients keep uploading a large lossless PNG: a normal query's
    p50 and p95 idle and during the flood, 8-client throughput, ``/healthz`` (group
    ``serve``; EfficientNet-Lite0 with its ImageNet weights)."""
    from bench.search_measure import serve_flood

    serve_flood(ctx)


def dedup(ctx: Context) -> None:
    """Near-duplicate groups at scale (synthetic codes): group ``dedup``.  Near-duplicates
    of real photos, with trained weights, are measured by the ``quality`` step."""
    from bench.dedup_measure import dedup as measure_dedup

    measure_dedup(ctx)


# 11. runtimes and precisions ---------------------------------------------------------------
def runtime(ctx: Context) -> None:
    """TensorFlow against OpenVINO in fp32, bf16 and int8: speed from files to codes, the
    compile settings, code fidelity and near-duplicate recall, the distributed path on
    OpenVINO int8 workers and their start-up and memory: groups ``runtime``,
    ``runtime-fidelity`` and ``runtime-cost``."""
    from bench.runtime_measure import runtime as measure_runtime

    measure_runtime(ctx)


# 12/13. quality with trained weights, and the backbones' speed ------------------------------
def quality(ctx: Context) -> None:
    """EfficientNet-Lite0 (ImageNet weights) on the labelled photos: label precision@10 of
    float features and codes, near-duplicates found and photos merged at the fitted
    threshold, copies within reach per hashing method: groups ``quality``, ``methods`` and
    ``near-dup``."""
    from bench.quality import quality as measure_quality

    measure_quality(ctx)


def backbones(ctx: Context) -> None:
    """Files -> codes, EfficientNet-Lite0 against VGG16 on TF fp32, OV fp32 and OV int8,
    and what limits Lite0 (decode threads, decoding on one core): group ``backbones``."""
    from bench.quality import backbones as measure_backbones

    measure_backbones(ctx)


def embeddings(ctx: Context) -> None:
    """Float features for models and for re-scoring near-duplicates: ``bench.embeddings``."""
    from bench.embeddings import embeddings as measure_embeddings

    measure_embeddings(ctx)


STEPS: dict[str, Callable[[Context], None]] = {
    "ceiling": compute_ceiling,
    "embedded": embedded,
    "notebook": notebook,
    "distributed": distributed,
    "queue": queue_capacity,
    "fidelity": fidelity,
    "cost": cost,
    "search": search,
    "flood": flood,
    "dedup": dedup,
    "runtime": runtime,
    "quality": quality,
    "backbones": backbones,
    "embeddings": embeddings,
}
NEEDS: dict[str, tuple[str, ...]] = {  # figures a step divides by come from these steps
    "embedded": ("ceiling",),
    "notebook": ("ceiling", "embedded"),
    "distributed": ("ceiling",),
    "fidelity": ("ceiling",),
    "runtime": ("ceiling",),
}


def steps_to_run(chosen: list[str] | None) -> list[str]:
    """``chosen`` (all steps when None) with the steps they need, in the table's order."""
    wanted = set(chosen or STEPS)
    for step in list(wanted):
        wanted.update(NEEDS.get(step, ()))
    return [step for step in STEPS if step in wanted]
