"""The ``runtime`` step of ``python -m bench``: TensorFlow against OpenVINO, fp32/bf16/int8.

All on the bench's photos, VGG16, batch 32, side by side in one run:

1. ``runtime``: ``encode_folder`` from files to codes (spatial; up to 256 photos) for TF
   fp32, TF bf16, OV fp32, OV bf16 and OV int8, each against the bare TF fp32 forward
   pass of the ``ceiling`` step.  Every encoder is built once, warmed up with one batch,
   and passed to ``encode_folder``: building and converting are not in the timing.  The
   int8 model is quantized from ``calibration_sample`` over the photos (64 images).
2. ``runtime``: the OpenVINO compile settings, by measurement: the bare
   ``encoder.encode`` on a decoded batch of 32 (no file I/O) with
   ``PERFORMANCE_HINT=LATENCY`` and ``THROUGHPUT`` (one synchronous request per batch),
   and ``THROUGHPUT`` with an ``AsyncInferQueue`` of its optimal number of requests over
   slices of the batch (``AsyncQueueEncoder``, a candidate); then files -> codes for OV
   int8 with LATENCY and with the candidate.  In a fresh interpreter that loads the
   models converted in part 1 from the model cache, as a worker with a warm cache does.
3. ``runtime-fidelity``: each precision's codes against TF fp32 (pooled and spatial, up
   to 300 photos): the share of equal bits, the top-10 Hamming neighbours shared
   (tie-aware), and near-duplicate recall@1 through ``Index.query`` on the variants of
   ``bench.dedup_measure`` (catalogue and queries encoded by the same encoder).
4. ``runtime``: producer -> Redis -> one Celery worker on OpenVINO int8 (and one on TF
   fp32), against the embedded figures of part 1.
5. ``runtime-cost``: worker start-up until "model ready" with an empty model cache and a
   warm one (OV int8) against a TF fp32 worker's, the workers' peak RSS, and the
   converted models' size on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import measure
from bench.cluster import REPO, celery_worker, redis_server
from bench.measure import Context, Row, decoded_batch, seconds_per_call, settings
from encoder.images import ImageLoader, LoadResult

CONFIGS: tuple[tuple[str, str], ...] = (
    ("tensorflow", "fp32"),
    ("tensorflow", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)
REFERENCE = ("tensorflow", "fp32")
SPEED_PHOTOS = 256
FIDELITY_PHOTOS = 300
CALIBRATION_IMAGES = 64
BATCH = 32
QUERY_BATCH = 32


def label(config: tuple[str, str]) -> str:
    runtime, precision = config
    return f"{'TF' if runtime == 'tensorflow' else 'OV'} {precision}"


def key(config: tuple[str, str]) -> str:
    return f"runtime_{config[0]}_{config[1]}"


# --- the CPU and the encoders ---------------------------------------------------------------
def cpu_features() -> str:
    """Whether the CPU has the instructions int8 and bf16 inference use, in words."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass

    def has(*names: str) -> str:
        present = [n for n in names if n in flags]
        return ", ".join(present) if present else "no"

    return (
        f"CPU VNNI: {has('avx512_vnni', 'avx_vnni')}; BF16: {has('avx512_bf16')}; "
        f"AMX: {has('amx_tile', 'amx_int8', 'amx_bf16')}"
    )


def encoder_settings(
    config: tuple[str, str], layout: str, calibration: Path, cache: Path, **more: Any
) -> Any:
    runtime, precision = config
    return settings(
        layout=layout,
        runtime=runtime,
        precision=precision,
        calibration=str(calibration) if precision == "int8" else None,
        model_cache=str(cache),
        **more,
    )


def build_encoder(
    config: tuple[str, str],
    layout: str,
    calibration: Path,
    cache: Path,
    warm_up: np.ndarray,
    **more: Any,
) -> tuple[Any, Any, float]:
    """``(settings, encoder, seconds to build)``, warmed up with one batch; ``more``: other
    settings (``backbone``, ``weights``...)."""
    from encoder.runtime import load_encoder

    chosen = encoder_settings(config, layout, calibration, cache, **more)
    start = time.perf_counter()
    encoder = load_encoder(chosen)
    built = time.perf_counter() - start
    encoder.encode(warm_up)
    return chosen, encoder, built


def compiled_note(encoder: Any) -> str:
    """The OpenVINO compiled model's streams, threads and inference precision."""
    compiled = getattr(encoder, "compiled", None)
    if compiled is None:
        return ""
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return (
        f"OV compiled: {compiled.get_property('NUM_STREAMS')} stream(s), "
        f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads, inference precision "
        f"{getattr(precision, 'to_string', lambda: precision)()}"
    )


def copy_photos(ctx: Context, files: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in files:
        shutil.copyfile(ctx.images / name, folder / name)
    return folder


# --- 1. end to end ----------------------------------------------------------------------------
def end_to_end(
    ctx: Context, photos: Path, count: int, calibration: Path, cache: Path
) -> dict[tuple[str, str], tuple[Any, Any]]:
    """Files -> codes per runtime and precision; returns the spatial encoders for part 3."""
    from encoder.folder_run import encode_folder

    warm_up = decoded_batch(ctx, min(BATCH, len(ctx.files)))
    encoders = {}
    cpu = cpu_features()
    for config in CONFIGS:
        chosen, encoder, built = build_encoder(config, "spatial", calibration, cache, warm_up)
        encoders[config] = (chosen, encoder)
        dest = ctx.work / f"runtime-e2e-{config[0]}-{config[1]}"
        summary = encode_folder(photos, str(dest), chosen, progress=False, encoder=encoder)
        rate = summary.processed / summary.seconds
        notes = [f"encoder built in {built:.1f} s, not timed"]
        if config != REFERENCE and key(REFERENCE) in ctx.figures:
            notes.append(f"{rate / ctx.figures[key(REFERENCE)]:.2f}x TF fp32 end to end")
        notes.append(compiled_note(encoder))
        if config[1] != "fp32":
            notes.append(cpu)
        if config[1] == "int8":
            notes.append(f"quantized (NNCF) on {calibration_count(calibration)} of these photos")
        ctx.add(
            Row(
                "runtime",
                f"{label(config)} files -> codes, spatial, batch {BATCH} ({summary.processed} img)",
                rate,
                "img/s",
                rate / ctx.figures["bare_fp32"],
                "bare TF fp32 forward, batch 32",
                "; ".join(n for n in notes if n),
            ),
            key(config),
        )
        shutil.rmtree(dest, ignore_errors=True)
    return encoders


def calibration_count(path: Path) -> int:
    with np.load(path, allow_pickle=False) as data:
        return len(data["ids"])


# --- 2. compile settings ----------------------------------------------------------------------
class AsyncQueueEncoder:
    """A candidate, not the project's encoder: ``OpenVinoEncoder`` compiled with
    ``THROUGHPUT``, whose ``encode`` runs slices of the batch on an ``AsyncInferQueue`` of
    the compiled model's optimal number of requests (one per stream).  Its compiled model
    is never called synchronously: a synchronous call, then the queue, on one compiled
    model, in a process that had converted the model, ended in a segfault (seen here)."""

    def __init__(self, chosen: Any) -> None:
        from encoder.openvino_runtime import OpenVinoEncoder, import_openvino

        ov = import_openvino()
        self.inner = OpenVinoEncoder(chosen, performance_hint="THROUGHPUT")
        self.compiled, self.cache_hit = self.inner.compiled, self.inner.cache_hit
        self.spec, self.empty_codes = self.inner.spec, self.inner.empty_codes
        self.input_size = self.inner.input_size
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self.results: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._keep)

    def _keep(self, request: Any, index: int) -> None:
        self.results[index] = request.get_output_tensor(0).data.copy()

    def features(self, pixels: np.ndarray) -> np.ndarray:
        self.results.clear()
        parts = np.array_split(pixels.astype(np.float32), min(self.requests, len(pixels)))
        for index, part in enumerate(parts):
            self.queue.start_async({0: part}, index)
        self.queue.wait_all()
        out = np.concatenate([self.results[i] for i in range(len(parts))])
        return out.reshape(out.shape[0], -1, out.shape[-1]) if out.ndim == 4 else out

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        from encoder.codes import pack_bits

        if pixels.shape[0] == 0:
            return self.empty_codes
        features = self.features(pixels)
        if self.inner.center is not None:
            features = features - self.inner.center
        return pack_bits(features @ self.inner.planes > 0)


def _compiled_figure(encoder: Any, what: str, precision: str, setting: str) -> dict[str, Any]:
    return {
        "what": what,
        "precision": precision,
        "setting": setting,
        "streams": encoder.compiled.get_property("NUM_STREAMS"),
        "threads": encoder.compiled.get_property("INFERENCE_NUM_THREADS"),
        "cache_hit": encoder.cache_hit,
    }


def compile_settings_figures(
    pixels: np.ndarray, calibration: str, cache: str, calls: int, photos: str, work: str
) -> list[dict[str, Any]]:
    """Run in a fresh interpreter: the bare ``encode`` rate per compile setting (OV int8
    and fp32), then files -> codes for OV int8 with LATENCY and with the async queue."""
    from encoder.folder_run import encode_folder
    from encoder.openvino_runtime import OpenVinoEncoder

    figures = []
    settings_of = {
        precision: encoder_settings(
            ("openvino", precision), "spatial", Path(calibration), Path(cache)
        )
        for precision in ("int8", "fp32")
    }
    latency_setting = "LATENCY, 1 sync request per batch"
    for precision, chosen in settings_of.items():
        reference = None
        candidates: list[tuple[str, Callable[[], Any]]] = [
            (latency_setting, lambda c=chosen: OpenVinoEncoder(c, performance_hint="LATENCY")),
            (
                "THROUGHPUT, 1 sync request per batch",
                lambda c=chosen: OpenVinoEncoder(c, performance_hint="THROUGHPUT"),
            ),
            (
                "THROUGHPUT, AsyncInferQueue over slices of the batch",
                lambda c=chosen: AsyncQueueEncoder(c),
            ),
        ]
        for setting, make in candidates:
            encoder = make()
            # Two more warm-up calls than seconds_per_call's one: an AsyncInferQueue's
            # first calls ran at a third of its later speed (its requests' first use).
            encoder.encode(pixels)
            encoder.encode(pixels)
            seconds = seconds_per_call(lambda e=encoder: e.encode(pixels), calls)
            codes = encoder.encode(pixels)
            reference = codes if reference is None else reference
            figure = _compiled_figure(encoder, "bare", precision, setting)
            figure["rate"] = len(pixels) / seconds
            figure["equal_bits"] = float(np.mean(np.unpackbits(codes) == np.unpackbits(reference)))
            figure["requests"] = getattr(encoder, "requests", 1)
            figures.append(figure)
            del encoder
    chosen = settings_of["int8"]
    for number, (setting, make) in enumerate(
        [
            (latency_setting, lambda: OpenVinoEncoder(chosen, performance_hint="LATENCY")),
            (
                "THROUGHPUT, AsyncInferQueue over slices of the batch",
                lambda: AsyncQueueEncoder(chosen),
            ),
        ]
    ):
        encoder = make()
        encoder.encode(pixels)  # warm-up
        dest = Path(work) / f"runtime-compile-{number}"
        summary = encode_folder(photos, str(dest), chosen, progress=False, encoder=encoder)
        figure = _compiled_figure(encoder, "files", "int8", setting)
        figure["rate"] = summary.processed / summary.seconds
        figure["images"] = summary.processed
        figure["requests"] = getattr(encoder, "requests", 1)
        figures.append(figure)
        shutil.rmtree(dest, ignore_errors=True)
        del encoder
    return figures


_COMPILE_SETTINGS = """
import json, sys
import numpy as np
from bench import measure
from bench.runtime_measure import compile_settings_figures

pixels_path, calibration, cache, weights, calls, photos, work = sys.argv[1:8]
measure.WEIGHTS["weights"] = weights
figures = compile_settings_figures(
    np.load(pixels_path), calibration, cache, int(calls), photos, work
)
print(json.dumps(figures))
"""


def compile_settings(ctx: Context, photos: Path, calibration: Path, cache: Path) -> None:
    batch = 8 if ctx.quick else BATCH
    pixels_path = ctx.work / "runtime-batch.npy"
    np.save(pixels_path, decoded_batch(ctx, batch))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", "AWS_"))}
    finished = subprocess.run(
        [
            *(sys.executable, "-c", _COMPILE_SETTINGS, str(pixels_path), str(calibration)),
            *(str(cache), measure.WEIGHTS["weights"], "1" if ctx.quick else "5"),
            *(str(photos), str(ctx.work)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"compile-settings subprocess exited with {finished.returncode}:\n"
            f"{finished.stderr[-3000:]}"
        )
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    latency = {
        (f["what"], f["precision"]): f["rate"]
        for f in figures
        if f["setting"].startswith("LATENCY")
    }
    for figure in figures:
        is_latency = figure["setting"].startswith("LATENCY")
        setting = figure["setting"]
        if figure["requests"] > 1:
            setting = setting.replace("AsyncInferQueue", f"AsyncInferQueue of {figure['requests']}")
        note = (
            f"{figure['streams']} stream(s), {figure['threads']} threads; fresh interpreter, "
            f"IR {'from the model cache' if figure['cache_hit'] else 'converted'}"
        )
        if figure["what"] == "bare":
            name = f"OV {figure['precision']} bare encode, {setting} (decoded batch of {batch})"
            if not is_latency:
                note += f"; codes equal to LATENCY's: {figure['equal_bits']:.4f} of bits"
            ratio = figure["rate"] / (
                ctx.figures["bare_fp32"] if is_latency else latency[("bare", figure["precision"])]
            )
            reference = (
                "bare TF fp32 forward, batch 32"
                if is_latency
                else f"LATENCY, 1 sync request, OV {figure['precision']}"
            )
        else:
            name = f"OV int8 files -> codes, {setting} ({figure['images']} img)"
            note += "; decode threads compete with inference, as in imgenc encode"
            ratio = figure["rate"] / (
                ctx.figures[key(("openvino", "int8"))] if is_latency else latency[("files", "int8")]
            )
            reference = (
                "OV int8 files -> codes in the bench process (LATENCY)"
                if is_latency
                else "LATENCY files -> codes, same interpreter"
            )
        ctx.add(Row("runtime", name, figure["rate"], "img/s", ratio, reference, note))


# --- 3. fidelity --------------------------------------------------------------------------
class SameEncoderQueries:
    """``Index.query``'s query encoder around an encoder already built (so the variants
    are encoded by the encoder that wrote the catalogue)."""

    def __init__(self, encoder: Any, root: Path) -> None:
        self.encoder = encoder
        self.spec = encoder.spec
        self.loader = ImageLoader(root, encoder.input_size)

    def encode(self, images: list[tuple[str, bytes]]) -> tuple[list[LoadResult], np.ndarray]:
        results = [self.loader.load_bytes(data, name) for name, data in images]
        pixels = [r.pixels for r in results if r.ok]
        codes = self.encoder.encode(np.stack(pixels)) if pixels else self.encoder.empty_codes
        for r in results:
            r.pixels = None
        return results, codes


def distances(codes: np.ndarray) -> np.ndarray:
    """All Hamming distances between ``codes``, with each code's own set to the maximum."""
    from encoder.codes import hamming

    out = np.empty((len(codes), len(codes)), np.int64)
    for start in range(0, len(codes), 32):
        out[start : start + 32] = hamming(codes[start : start + 32], codes)
    np.fill_diagonal(out, np.iinfo(np.int64).max)
    return out


def shared_neighbours(reference: np.ndarray, other: np.ndarray, k: int) -> tuple[float, float]:
    """``(tie-aware, strict)`` share of ``other``'s top-``k`` in ``reference``'s: tie-aware
    counts a neighbour whose distance in ``reference`` is at most the k-th distance there."""
    ranked = np.argsort(other, axis=1, kind="stable")[:, :k]
    kth = np.sort(reference, axis=1)[:, k - 1 : k]
    tie_aware = float(np.mean(np.take_along_axis(reference, ranked, axis=1) <= kth))
    exact = np.argsort(reference, axis=1, kind="stable")[:, :k]
    strict = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ranked, exact, strict=True)]))
    return tie_aware, strict


def catalogue_and_queries(
    ctx: Context,
    chosen: Any,
    encoder: Any,
    originals: Path,
    files: list[str],
    uploads: list[tuple[str, bytes]],
    made: dict[str, tuple[str, str]],
    dest: Path,
) -> tuple[np.ndarray, list[bool], list[str], float]:
    """Encode the originals into ``dest`` and query it with the variants: the originals'
    codes (in ``files`` order), whether each variant's top result is its original, the
    variants' kinds, and the seconds it took."""
    from encoder.folder_run import encode_folder
    from search.index import Index

    start = time.perf_counter()
    encode_folder(originals, str(dest), chosen, progress=False, encoder=encoder)
    index = Index.open(str(dest), save=False)
    codes = np.stack([index.code(name) for name in files])
    queries = SameEncoderQueries(encoder, ctx.work)
    answers = []
    for first in range(0, len(uploads), QUERY_BATCH):
        answers += index.query(uploads[first : first + QUERY_BATCH], k=1, encoder=queries)
    seconds = time.perf_counter() - start
    failed = [a.query for a in answers if a.status != "ok"]
    if failed:
        raise RuntimeError(f"variant queries failed: {failed[:5]}")
    hits = [a.results[0]["id"] == made[a.query][0] for a in answers]
    kinds = [made[a.query][1] for a in answers]
    del index
    shutil.rmtree(dest, ignore_errors=True)
    return codes, hits, kinds, seconds


def fidelity(
    ctx: Context,
    spatial: dict[tuple[str, str], tuple[Any, Any]],
    calibration: Path,
    cache: Path,
) -> None:
    from bench.dedup_measure import VARIANTS, write_variants

    files = ctx.files[: 8 if ctx.quick else FIDELITY_PHOTOS]
    originals, variants = ctx.work / "runtime-originals", ctx.work / "runtime-variants"
    made = write_variants(ctx.images, originals, variants, files)
    uploads = [(name, (variants / name).read_bytes()) for name in sorted(made)]
    k = min(10, len(files) - 1)
    warm_up = decoded_batch(ctx, min(BATCH, len(ctx.files)))
    what = f"{len(files)} photos x {len(VARIANTS)} variants"
    for layout in ("spatial", "pooled"):
        found: dict[tuple[str, str], tuple[np.ndarray, list[bool], list[str], float]] = {}
        for config in CONFIGS:
            if layout == "spatial":
                chosen, encoder = spatial.pop(config)
            else:
                chosen, encoder, _ = build_encoder(config, layout, calibration, cache, warm_up)
            dest = ctx.work / f"runtime-catalogue-{layout}-{config[0]}-{config[1]}"
            found[config] = catalogue_and_queries(
                ctx, chosen, encoder, originals, files, uploads, made, dest
            )
            del chosen, encoder
        reference_codes, reference_hits, _, _ = found[REFERENCE]
        reference_distances = distances(reference_codes)
        from encoder.spec import spec_for

        bits = int(np.prod(spec_for(settings(layout=layout)).code_shape))
        reference_recall = float(np.mean(reference_hits))
        for config in CONFIGS:
            codes, hits, kinds, seconds = found[config]
            if config != REFERENCE:
                equal = np.unpackbits(codes, axis=1, count=bits) == np.unpackbits(
                    reference_codes, axis=1, count=bits
                )
                ctx.add(
                    Row(
                        "runtime-fidelity",
                        f"code bits equal, {label(config)} vs TF fp32 "
                        f"({layout}, {bits:,} bits, {len(files)} photos)",
                        float(equal.mean()),
                        "share",
                        note=f"photos with every bit equal: {np.mean(equal.all(axis=1)):.3f}",
                    )
                )
                tie_aware, strict = shared_neighbours(reference_distances, distances(codes), k)
                ctx.add(
                    Row(
                        "runtime-fidelity",
                        f"top-{k} Hamming neighbours shared, {label(config)} vs TF fp32 "
                        f"({layout}, tie-aware)",
                        tie_aware,
                        "share",
                        note=f"shared if within TF fp32's {k}th distance; strict overlap "
                        f"{strict:.3f}",
                    )
                )
            recall = float(np.mean(hits))
            by_kind = ", ".join(
                f"{kind} {np.mean([h for h, x in zip(hits, kinds, strict=True) if x == kind]):.2f}"
                for kind in VARIANTS
            )
            ctx.add(
                Row(
                    "runtime-fidelity",
                    f"near-duplicate recall@1 through Index.query, {label(config)} "
                    f"({layout}, {what})",
                    recall,
                    "share",
                    recall / reference_recall if reference_recall else None,
                    "TF fp32 recall@1" if reference_recall else "",
                    note=f"difference from TF fp32: {recall - reference_recall:+.3f}; by "
                    f"variant: {by_kind}; catalogue + queries encoded in {seconds:.0f} s",
                )
            )


# --- 4/5. the distributed path and the workers' cost -----------------------------------------
def model_ready_seconds(log: Path) -> float | None:
    """The model load time the worker logs ("model ready in X s")."""
    found = re.findall(r"model ready in ([0-9.]+) s", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def run_job(broker: str, folder: Path, dest: Path, **model: Any) -> float:
    """Images per second from the start of enqueueing to the registry's ``finished_at``."""
    import producer

    start = time.time()
    job = producer.enqueue(
        folder, str(dest), settings=settings(), broker=broker, backbone="vgg16", **model
    )
    final = job.wait(timeout=7200, poll=0.2)
    if final.processed == 0:
        raise RuntimeError(f"job {job.id} processed nothing: {final}")
    return final.processed / (final.finished_at - start)


def distributed_and_cost(ctx: Context, photos: Path, count: int, calibration: Path) -> None:
    int8 = {"runtime": "openvino", "precision": "int8", "calibration": str(calibration)}
    worker_cache = ctx.work / "runtime-worker-cache"  # empty at the first start
    figures: dict[str, float] = {}
    notes: dict[str, str] = {}
    with redis_server(ctx.work / "redis-runtime") as broker:
        with celery_worker(
            broker,
            ctx.work / "runtime-int8-cold.log",
            "rt-int8-cold",
            "vgg16",
            model_cache=str(worker_cache),
            **int8,
        ) as worker:
            figures["cold"] = worker.startup_seconds
            figures["cold_rss"] = worker.peak_rss_kb() / 1024
            notes["cold"] = f"model load {model_ready_seconds(worker.log) or 0:.1f} s in its log"
        cached = sorted(p.name for p in worker_cache.glob("*.xml"))
        with celery_worker(
            broker,
            ctx.work / "runtime-int8-warm.log",
            "rt-int8-warm",
            "vgg16",
            model_cache=str(worker_cache),
            **int8,
        ) as worker:
            figures["warm"] = worker.startup_seconds
            notes["warm"] = f"model load {model_ready_seconds(worker.log) or 0:.1f} s in its log"
            figures["int8_rate"] = run_job(
                broker, photos, ctx.work / "runtime-distributed-int8", weights="random", **int8
            )
            figures["int8_rss"] = worker.peak_rss_kb() / 1024
        with celery_worker(broker, ctx.work / "runtime-tf.log", "rt-tf", "vgg16") as worker:
            figures["tf"] = worker.startup_seconds
            notes["tf"] = f"model load {model_ready_seconds(worker.log) or 0:.1f} s in its log"
            figures["tf_rate"] = run_job(
                broker, photos, ctx.work / "runtime-distributed-tf", weights="random"
            )
            figures["tf_rss"] = worker.peak_rss_kb() / 1024

    for config, rate in ((("openvino", "int8"), "int8_rate"), (REFERENCE, "tf_rate")):
        ctx.add(
            Row(
                "runtime",
                f"producer -> Redis -> 1 {label(config)} worker -> local dir ({count} img)",
                figures[rate],
                "img/s",
                figures[rate] / ctx.figures[key(config)],
                f"embedded {label(config)} files -> codes",
                note="celery -A worker worker, -c 1; start-up not in the timing",
            )
        )
    cost = "runtime-cost"
    tf_start = "TF fp32 worker start-up"
    ctx.add(
        Row(
            cost,
            "worker start-up until model ready, OV int8, empty model cache",
            figures["cold"],
            "s",
            figures["cold"] / figures["tf"],
            tf_start,
            f"converts + quantizes on {calibration_count(calibration)} calibration images, "
            f"then caches the IR ({', '.join(cached) or 'nothing cached!'}); {notes['cold']}",
        )
    )
    ctx.add(
        Row(
            cost,
            "worker start-up until model ready, OV int8, warm model cache",
            figures["warm"],
            "s",
            figures["warm"] / figures["tf"],
            tf_start,
            f"reads the cached IR; {figures['cold'] / figures['warm']:.1f}x faster than the "
            f"empty cache; {notes['warm']}",
        )
    )
    ctx.add(
        Row(
            cost, "worker start-up until model ready, TF fp32", figures["tf"], "s", note=notes["tf"]
        )
    )
    tf_rss = "TF fp32 worker peak RSS"
    ctx.add(
        Row(
            cost,
            f"worker process peak RSS, OV int8, warm cache (after {count} img)",
            figures["int8_rss"],
            "MiB",
            figures["int8_rss"] / figures["tf_rss"],
            tf_rss,
            "largest VmHWM of the worker's processes",
        )
    )
    ctx.add(
        Row(
            cost,
            "worker process peak RSS, OV int8, empty cache (converting, no job)",
            figures["cold_rss"],
            "MiB",
            figures["cold_rss"] / figures["tf_rss"],
            tf_rss,
            "the conversion and quantization peak",
        )
    )
    ctx.add(
        Row(
            cost,
            f"worker process peak RSS, TF fp32 (after {count} img)",
            figures["tf_rss"],
            "MiB",
        )
    )


def model_sizes(ctx: Context, cache: Path) -> None:
    sizes = {
        kind: sum(p.stat().st_size for p in cache.glob(f"vgg16-spatial-{kind}-*.bin")) / 2**20
        for kind in ("fp32", "int8")
    }
    ctx.add(
        Row("runtime-cost", "converted model on disk, OV fp32 IR (VGG16)", sizes["fp32"], "MiB")
    )
    ctx.add(
        Row(
            "runtime-cost",
            "converted model on disk, OV int8 IR (VGG16)",
            sizes["int8"],
            "MiB",
            sizes["int8"] / sizes["fp32"] if sizes["fp32"] else None,
            "the fp32 IR" if sizes["fp32"] else "",
        )
    )


# --- the step ----------------------------------------------------------------------------------
def runtime(ctx: Context) -> None:
    """The groups ``runtime``, ``runtime-fidelity`` and ``runtime-cost`` (see the module
    docstring)."""
    from encoder.calibrate import calibration_sample, save_calibration

    files = ctx.files[:SPEED_PHOTOS]
    photos = copy_photos(ctx, files, ctx.work / "runtime-photos")
    calibration = ctx.work / "runtime-calib.npz"
    pixels, ids = calibration_sample(
        ctx.images,
        settings(),
        sample=8 if ctx.quick else CALIBRATION_IMAGES,
        progress=False,
    )
    save_calibration(calibration, pixels, ids)
    cache = ctx.work / "runtime-model-cache"
    spatial = end_to_end(ctx, photos, len(files), calibration, cache)
    compile_settings(ctx, photos, calibration, cache)
    fidelity(ctx, spatial, calibration, cache)
    model_sizes(ctx, cache)
    distributed_and_cost(ctx, photos, len(files), calibration)
