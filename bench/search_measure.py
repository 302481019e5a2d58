"""The ``search`` step of ``python -m bench``: the query half's speed and memory.

Groups:

- ``search``: 1,000,000 synthetic pooled codes (63 bytes, like pooled VGG16 at 500 bits)
  written as a real destination, then ``search.Index`` against faiss used directly on the
  same codes (64-byte padded and 63-byte unpadded) and a numpy popcount scan; the HNSW
  index (build time, recall@10 against the exact results, speed at two efSearch); and
  100,000 spatial codes (3,063 bytes) in a flat index.
- ``serve``: ``imgenc serve`` over the photos encoded with VGG16 (pooled, random weights),
  queried over HTTP by 1 and by 8 concurrent clients, against one in-process model forward
  plus one index search; and (the ``flood`` step) a normal query's latency, idle and
  while clients keep uploading a large lossless PNG (with the heavy lane on, then off),
  8-client throughput, and ``/healthz`` during the flood (EfficientNet-Lite0, ImageNet).

Every speed is measured in this run, side by side.  ``--quick`` uses 20,000 and 5,000
codes and the 8 photos.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.cluster import REPO, _free_loopback_port, _stop_process_group, _wait_until
from bench.measure import Context, Row, settings
from bench.synthetic import (
    ClusteredCodes,
    reset_peak_rss,
    rss_kb,
    stub_spec,
    write_destination,
)

K = 10
HNSW_EF_SEARCH = (64, 256)


def queries_per_second(search: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    """Queries per second of ``search`` over the whole batch, after a warm-up on a few."""
    search(queries[: min(4, len(queries))])
    start = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - start)


def pad(codes: np.ndarray, width: int) -> np.ndarray:
    padded = np.zeros((codes.shape[0], width), np.uint8)
    padded[:, : codes.shape[1]] = codes
    return padded


def numpy_scan(codes: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest rows of ``codes`` to each query, by a popcount scan in numpy."""
    found = np.empty((len(queries), k), np.int64)
    for i, query in enumerate(queries):
        distances = np.bitwise_count(query ^ codes).sum(axis=1)
        found[i] = np.argpartition(distances, k)[:k]
    return found


def recall_at_k(found: list[Any], exact: list[Any], k: int) -> float:
    """Tie-aware recall@k: a returned id is a hit when its distance is within the exact
    k-th distance (any of several codes tied there is as good as the one exact search
    listed)."""
    hits = [
        sum(d <= truth.distances[k - 1] for d in got.distances[:k]) / k
        for got, truth in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits))


def _mib(kb: float) -> float:
    return kb / 1024


# --- 1M synthetic pooled codes -------------------------------------------------------------
def pooled_search(ctx: Context) -> None:
    import faiss

    from search.faiss_backend import stored_bytes
    from search.index import Index

    n = 20_000 if ctx.quick else 1_000_000
    n_queries = 100 if ctx.quick else 1000
    n_scan = 5 if ctx.quick else 20
    spec = stub_spec("pooled")
    generator = ClusteredCodes(bits=500, clusters=max(20, n // 1000), seed=1)
    dest = ctx.work / "search-pooled"
    codes = []

    def keep(batches: Any) -> Any:
        for batch in batches:
            codes.append(batch)
            yield batch

    start = time.perf_counter()
    write_destination(dest, spec, keep(generator.batches(n)))
    written = time.perf_counter() - start
    unpadded = np.concatenate(codes)
    del codes[:]
    queries = generator.draw(n_queries)
    label = f"{n:,} pooled codes"

    before = rss_kb()
    peak_known = reset_peak_rss()
    start = time.perf_counter()
    index = Index.open(str(dest), save=False)
    build = time.perf_counter() - start
    grown = rss_kb() - before
    peak = rss_kb("VmHWM") - before if peak_known else grown
    ctx.add(
        Row(
            "search",
            f"Index.open flat, {label} (build)",
            build,
            "s",
            note=f"manifest parts + shards read back; written in {written:.1f} s",
        ),
        "search_flat_build",
    )
    code_mib = n * stored_bytes(index.code_bytes) / 2**20
    ctx.add(
        Row(
            "search",
            f"RSS growth, Index.open flat of {label}",
            _mib(grown),
            "MiB",
            _mib(grown) / code_mib,
            f"the padded codes ({code_mib:.0f} MiB)",
            note="VmRSS after - before: the ids, a few numbers per image, and the memory "
            "the parsing of a million manifest rows left to the allocator",
        )
    )
    ctx.add(
        Row(
            "search",
            f"peak RSS growth during Index.open flat of {label}",
            _mib(peak),
            "MiB",
            _mib(peak) / code_mib,
            f"the padded codes ({code_mib:.0f} MiB)",
            note="VmHWM reset before the build" if peak_known else "VmHWM reset refused: VmRSS",
        )
    )

    # faiss directly on the same codes: 63-byte (generic kernel) and 64-byte padded.
    padded = pad(unpadded, stored_bytes(index.code_bytes))
    padded_queries = pad(queries, stored_bytes(index.code_bytes))
    direct63 = faiss.IndexBinaryFlat(unpadded.shape[1] * 8)
    direct63.add(unpadded)
    direct64 = faiss.IndexBinaryFlat(stored_bytes(index.code_bytes) * 8)
    direct64.add(padded)
    rate63 = queries_per_second(lambda q, d=direct63: d.search(q, K), queries)
    del direct63
    rate64 = queries_per_second(lambda q, d=direct64: d.search(q, K), padded_queries)
    rate_index = queries_per_second(lambda q, i=index: i.search(q, K), queries)
    exact = index.search(queries, K)
    rate_numpy = queries_per_second(lambda q, c=unpadded: numpy_scan(c, q, K), queries[:n_scan])
    what = f"{n_queries} queries, k={K}, {label}"
    ctx.add(Row("search", f"faiss IndexBinaryFlat direct, 63-byte codes, {what}", rate63, "q/s"))
    ctx.add(
        Row(
            "search",
            f"faiss IndexBinaryFlat direct, 64-byte padded codes, {what}",
            rate64,
            "q/s",
            rate64 / rate63,
            "faiss on the unpadded 63-byte codes",
            note="64 bytes has a specialised Hamming kernel; 63 the generic one",
        )
    )
    ctx.add(
        Row(
            "search",
            f"Index.search flat, {what}",
            rate_index,
            "q/s",
            rate_index / rate64,
            "faiss direct on the padded codes",
            note="ids, tie-breaking by id, results as Python lists",
        ),
        "search_flat_qps",
    )
    ctx.add(
        Row(
            "search",
            f"numpy popcount scan (bitwise_count + argpartition), {n_scan} queries, {label}",
            rate_numpy,
            "q/s",
            rate_numpy / rate_index,
            "Index.search flat",
            note="one query at a time over the 63-byte codes",
        )
    )
    del direct64, padded, unpadded, index

    before = rss_kb()
    start = time.perf_counter()
    hnsw = Index.open(str(dest), kind="hnsw", save=False)
    build = time.perf_counter() - start
    ctx.add(
        Row(
            "search",
            f"Index.open hnsw (M={hnsw.hnsw_m}), {label} (build)",
            build,
            "s",
            build / ctx.figures["search_flat_build"],
            "the flat build",
            note=f"RSS growth {_mib(rss_kb() - before):.0f} MiB",
        )
    )
    for ef in HNSW_EF_SEARCH:
        hnsw.ef_search = ef
        rate = queries_per_second(lambda q, h=hnsw: h.search(q, K), queries)
        recall = recall_at_k(hnsw.search(queries, K), exact, K)
        ctx.add(
            Row(
                "search",
                f"HNSW recall@{K}, efSearch {ef}, {what}",
                recall,
                "share",
                note="tie-aware: a hit is within the exact 10th distance",
            )
        )
        ctx.add(
            Row(
                "search",
                f"Index.search hnsw, efSearch {ef}, {what}",
                rate,
                "q/s",
                rate / ctx.figures["search_flat_qps"],
                "Index.search flat",
            )
        )
    del hnsw
    shutil.rmtree(dest, ignore_errors=True)


def spatial_search(ctx: Context) -> None:
    from search.index import Index

    n = 5_000 if ctx.quick else 100_000
    n_queries = 20 if ctx.quick else 100
    spec = stub_spec("spatial")
    generator = ClusteredCodes(bits=int(np.prod(spec.code_shape)), clusters=max(20, n // 1000))
    dest = ctx.work / "search-spatial"
    write_destination(dest, spec, generator.batches(n, chunk=10_000))
    start = time.perf_counter()
    index = Index.open(str(dest), save=False)
    build = time.perf_counter() - start
    label = f"{n:,} spatial codes ({spec.bytes_per_code:,} B)"
    ctx.add(Row("search", f"Index.open flat, {label} (build)", build, "s"))
    queries = generator.draw(n_queries)
    rate = queries_per_second(lambda q, i=index: i.search(q, K), queries)
    ctx.add(
        Row(
            "search",
            f"Index.search flat, {n_queries} queries, k={K}, {label}",
            rate,
            "q/s",
            note="faiss's generic Hamming kernel (no specialised one above 64 bytes)",
        )
    )
    del index
    shutil.rmtree(dest, ignore_errors=True)


# --- imgenc serve over HTTP ----------------------------------------------------------------
def _server_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", "AWS_"))}
    env.update(
        IMGENC_WEIGHTS="random",
        IMGENC_BACKBONE="vgg16",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    return env


def _percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q)) * 1000


def _post_all(base: str, uploads: list[tuple[str, bytes]], latencies: list[float]) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=300) as client:
        for name, data in uploads:
            start = time.perf_counter()
            answer = client.post("/search", files={"image": (name, data)}, data={"k": str(K)})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)


def _health(base: str) -> dict[str, Any]:
    import httpx

    return httpx.get(base + "/healthz", timeout=30).json()


def serve_latency(ctx: Context) -> None:
    from encoder.folder_run import encode_folder
    from encoder.images import ImageLoader
    from encoder.tf_runtime import TensorFlowEncoder as Encoder
    from search.index import Index

    files = ctx.files[: 8 if ctx.quick else 200]
    folder = ctx.work / "serve-photos"
    folder.mkdir()
    for name in files:
        shutil.copyfile(ctx.images / name, folder / name)
    dest = ctx.work / "serve-dest"
    pooled = settings(layout="pooled")
    encode_folder(folder, str(dest), pooled, progress=False)
    uploads = [(name, (folder / name).read_bytes()) for name in files]
    single_queries = 16 if ctx.quick else 60
    per_client = 4 if ctx.quick else 25
    clients = 8

    port = _free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    log = ctx.work / "serve.log"
    command = [sys.executable, "-m", "imgenc", "serve", str(dest), "--port", str(port)]
    started = time.monotonic()
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=_server_environment(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def healthy() -> bool:
            import httpx

            if process.poll() is not None:
                text = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"imgenc serve exited with {process.returncode}:\n{text}")
            try:
                return httpx.get(base + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(healthy, 300, "imgenc serve")
        startup = time.monotonic() - started
        _post_all(base, uploads[:2], [])  # warm-up
        single: list[float] = []
        start = time.perf_counter()
        _post_all(base, [uploads[i % len(uploads)] for i in range(single_queries)], single)
        rate1 = single_queries / (time.perf_counter() - start)

        before = _health(base)
        concurrent: list[float] = []
        shares = [
            [uploads[(c * per_client + i) % len(uploads)] for i in range(per_client)]
            for c in range(clients)
        ]
        threads = [
            threading.Thread(target=_post_all, args=(base, share, concurrent)) for share in shares
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate8 = clients * per_client / (time.perf_counter() - start)
        after = _health(base)
    finally:
        _stop_process_group(process, grace_seconds=30)
    if len(concurrent) != clients * per_client:
        raise RuntimeError(
            f"{clients * per_client - len(concurrent)} of the 8-client queries failed"
        )
    batches = after["batches"] - before["batches"]
    per_batch = (after["queries"] - before["queries"]) / max(batches, 1)

    # The reference: one forward of one image and one index search, in this process.
    encoder = Encoder(pooled)
    index = Index.open(str(dest), save=False)
    loader = ImageLoader(folder, encoder.input_size)
    pixels = loader.load(files[0]).pixels[None]
    timings = []
    for _ in range(3 if ctx.quick else 5):
        index.search(encoder.encode(pixels), K)  # warm-up
    for _ in range(10 if ctx.quick else 30):
        start = time.perf_counter()
        index.search(encoder.encode(pixels), K)
        timings.append(time.perf_counter() - start)
    reference_ms = float(np.median(timings)) * 1000
    del encoder, index

    catalogue = f"{len(files)} photos, VGG16 pooled"
    ctx.add(
        Row(
            "serve",
            "in process: one VGG16 forward (1 image) + one Index.search, p50",
            reference_ms,
            "ms",
            note="decoded 224x224 pixels in; no HTTP, no decoding",
        )
    )
    ctx.add(
        Row(
            "serve",
            "imgenc serve start-up until /healthz answers",
            startup,
            "s",
            note="index opened, VGG16 built and warmed up",
        )
    )
    p50_single = _percentile_ms(single, 50)
    ctx.add(
        Row(
            "serve",
            f"POST /search latency p50, 1 client ({catalogue})",
            p50_single,
            "ms",
            p50_single / reference_ms,
            "one in-process forward + search",
            note="upload, decode, resize, forward, search, JSON",
        )
    )
    ctx.add(Row("serve", "POST /search latency p95, 1 client", _percentile_ms(single, 95), "ms"))
    ctx.add(
        Row("serve", "POST /search latency p50, 8 clients", _percentile_ms(concurrent, 50), "ms")
    )
    ctx.add(
        Row("serve", "POST /search latency p95, 8 clients", _percentile_ms(concurrent, 95), "ms")
    )
    ctx.add(Row("serve", f"throughput, 1 client ({single_queries} queries)", rate1, "q/s"))
    ctx.add(
        Row(
            "serve",
            f"throughput, 8 clients ({clients * per_client} queries)",
            rate8,
            "q/s",
            rate8 / rate1,
            "1 client",
            note=f"the clients run on the same {os.cpu_count()} cores as the server",
        )
    )
    ctx.add(
        Row(
            "serve",
            "queries per model batch, 8 clients (micro-batching)",
            per_batch,
            "queries",
            note=f"{batches} batches, from /healthz",
        )
    )


def code_sizes(ctx: Context) -> None:
    """Exact (and, without ``--quick``, HNSW) search of 8-, 16- and 64-byte codes (what
    PCA-ITQ at 64 and 128 bits and 512 bits give) in one run, on the search backend the
    index uses, over the same number of clustered codes."""
    from search.backend import new_backend

    n, n_queries = (20_000, 200) if ctx.quick else (1_000_000, 1_000)
    rates: dict[int, float] = {}
    for bits in (512, 64, 128):
        generator = ClusteredCodes(bits, clusters=max(10, n // 100), seed=bits)
        codes, queries = generator.draw(n), generator.draw(n_queries)
        keys = np.arange(n, dtype=np.int64)
        flat = new_backend("flat", codes.shape[1])
        flat.add(keys, codes)
        rates[bits] = queries_per_second(lambda q, b=flat: b.search(q, K), queries)
        what = f"{n:,} codes of {bits // 8} bytes, {n_queries} queries, k={K}"
        ratio = rates[bits] / rates[512] if bits != 512 else None
        ctx.add(Row("search", f"exact search, {what}", rates[bits], "q/s", ratio, "64-byte codes"))
        if ctx.quick:
            continue
        exact_distances = flat.search(queries, K)[0]
        del flat
        hnsw = new_backend("hnsw", codes.shape[1])
        start = time.perf_counter()
        hnsw.add(keys, codes)
        build = time.perf_counter() - start
        rate = queries_per_second(lambda q, b=hnsw: b.search(q, K), queries)
        found = hnsw.search(queries, K)[0]
        recall = float(np.mean(found <= exact_distances[:, K - 1 : K]))
        note = f"built in {build:.0f} s; recall@{K} {recall:.3f} (tie-aware)"
        ctx.add(
            Row(
                "search",
                f"HNSW search (M 32, efSearch 128), {what}",
                rate,
                "q/s",
                rate / rates[bits],
                "exact search, same codes",
                note,
            )
        )
        del hnsw


def search(ctx: Context) -> None:
    """The ``search`` and ``serve`` groups (see the module docstring)."""
    pooled_search(ctx)
    code_sizes(ctx)
    spatial_search(ctx)
    serve_latency(ctx)


# --- imgenc serve under a flood of large lossless uploads -------------------------------------
FLOOD_BACKBONE = {"backbone": "efficientnet_lite0", "weights": "imagenet", "layout": "pooled"}


def _start_server(
    dest: Any, log: Any, env: dict[str, str], *args: str
) -> tuple[subprocess.Popen, str, float]:
    """``imgenc serve DEST ARGS`` on a free port: the process, its URL, its start-up seconds."""
    import httpx

    port = _free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "imgenc", "serve", str(dest), "--port", str(port), *args]
    started = time.monotonic()
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy() -> bool:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"imgenc serve exited with {process.returncode}:\n{text}")
        try:
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_until(healthy, 300, "imgenc serve")
    except BaseException:
        _stop_process_group(process, grace_seconds=30)
        raise
    return process, base, time.monotonic() - started


class Flood:
    """``clients`` threads uploading ``data`` again and again until ``stop``; a 503 is
    retried after its ``Retry-After`` (clients that behave, not an attack)."""

    def __init__(self, base: str, data: bytes, clients: int) -> None:
        self.base, self.data = base, data
        self.answered = self.refused = self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def _client(self, i: int) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=300) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(
                        "/search", files={"image": (f"scan{i}.png", self.data)}, data={"k": "1"}
                    )
                except httpx.HTTPError:
                    with self._lock:
                        self.failed += 1
                    continue
                with self._lock:
                    if answer.status_code == 503:
                        self.refused += 1
                    elif answer.status_code == 200:
                        self.answered += 1
                    else:
                        self.failed += 1
                if answer.status_code == 503:
                    self._stop.wait(float(answer.headers.get("retry-after", "1")))


def _clients_rate(base: str, uploads: list[tuple[str, bytes]], clients: int, each: int) -> float:
    """Queries per second of ``clients`` threads sending ``each`` normal queries."""
    done: list[float] = []
    shares = [[uploads[(c * each + i) % len(uploads)] for i in range(each)] for c in range(clients)]
    threads = [threading.Thread(target=_post_all, args=(base, s, done)) for s in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(done) != clients * each:
        raise RuntimeError(f"{clients * each - len(done)} of the {clients}-client queries failed")
    return len(done) / (time.perf_counter() - start)


def serve_flood(ctx: Context) -> None:
    """A normal photo's query, idle and while clients keep uploading a large PNG (no
    reduced-scale decode): p50 and p95 latency, 8-client throughput, and ``/healthz``."""
    from bench.images import smooth_png
    from encoder.folder_run import encode_folder

    side, flooders = (4500, 3) if ctx.quick else (9000, 10)
    n_queries, per_client, clients = (8, 2, 8) if ctx.quick else (40, 10, 8)
    files = ctx.files[: 8 if ctx.quick else 100]
    folder = ctx.work / "flood-photos"
    folder.mkdir()
    for name in files:
        shutil.copyfile(ctx.images / name, folder / name)
    dest = ctx.work / "flood-dest"
    encode_folder(folder, str(dest), settings(**FLOOD_BACKBONE), progress=False)
    uploads = [(name, (folder / name).read_bytes()) for name in files]
    heavy = smooth_png(side)
    env = {
        **_server_environment(),
        "IMGENC_BACKBONE": FLOOD_BACKBONE["backbone"],
        "IMGENC_WEIGHTS": FLOOD_BACKBONE["weights"],
    }
    process, base, _ = _start_server(dest, ctx.work / "flood.log", env)
    healthz: list[int] = []
    try:
        import httpx

        _post_all(base, [uploads[i % len(uploads)] for i in range(10)], [])  # warm-up
        idle: list[float] = []
        _post_all(base, [uploads[i % len(uploads)] for i in range(n_queries)], idle)
        rate_idle = _clients_rate(base, uploads, clients, per_client)
        with Flood(base, heavy, flooders) as flood:
            _wait_until(
                lambda: _health(base)["heavy_uploads_in_progress"] > 0, 120, "the flood to start"
            )
            flooded: list[float] = []
            for i in range(n_queries):
                _post_all(base, [uploads[i % len(uploads)]], flooded)
                healthz.append(httpx.get(base + "/healthz", timeout=30).status_code)
            rate_flood = _clients_rate(base, uploads, clients, per_client)
        figures = _health(base)
    finally:
        _stop_process_group(process, grace_seconds=30)

    # The same flood with the heavy lane off: every upload light, decoded by the light
    # threads at normal priority (the lanes alone, as a pool sized to the cores would be).
    off = ("--heavy-mpx", "1000")
    process, base, _ = _start_server(dest, ctx.work / "flood-off.log", env, *off)
    try:
        _post_all(base, [uploads[i % len(uploads)] for i in range(10)], [])  # warm-up
        with Flood(base, heavy, flooders) as flood_off:
            _wait_until(lambda: _health(base)["uploads_in_progress"] > 0, 120, "the flood to start")
            lane_off: list[float] = []
            n_off = 3 if ctx.quick else 5  # each waits behind the flood's decodes
            _post_all(base, [uploads[i % len(uploads)] for i in range(n_off)], lane_off)
    finally:
        _stop_process_group(process, grace_seconds=30)

    what = f"{len(files)} photos, EfficientNet-Lite0 pooled, default flags"
    png = f"{side}x{side} PNG ({side * side / 1e6:.0f} Mpx, {len(heavy) / 2**20:.1f} MiB)"
    p50_idle = _percentile_ms(idle, 50)
    ctx.add(Row("serve", f"flood: normal query p50, idle ({what})", p50_idle, "ms"))
    ctx.add(Row("serve", "flood: normal query p95, idle", _percentile_ms(idle, 95), "ms"))
    ctx.add(
        Row(
            "serve",
            f"flood: normal query p50 while {flooders} clients upload a {png}",
            _percentile_ms(flooded, 50),
            "ms",
            _percentile_ms(flooded, 50) / p50_idle,
            "idle p50 (target: at most 3x)",
            note=f"{n_queries} queries one after another; flood: {flood.answered} answered, "
            f"{flood.refused} refused with 503 + Retry-After, {flood.failed} failed",
        )
    )
    ctx.add(
        Row(
            "serve",
            "flood: normal query p95 during the flood",
            _percentile_ms(flooded, 95),
            "ms",
            _percentile_ms(flooded, 95) / _percentile_ms(idle, 95),
            "idle p95",
        )
    )
    ctx.add(
        Row(
            "serve",
            "flood: normal query p50 during the same flood, heavy lane off (--heavy-mpx 1000)",
            _percentile_ms(lane_off, 50),
            "ms",
            _percentile_ms(lane_off, 50) / p50_idle,
            "idle p50",
            note=f"{len(lane_off)} queries; every upload decoded by the light threads at "
            f"normal priority; flood: {flood_off.answered} answered, {flood_off.refused} refused",
        )
    )
    ctx.add(Row("serve", f"flood: throughput, {clients} clients, idle", rate_idle, "q/s"))
    ctx.add(
        Row(
            "serve",
            f"flood: throughput, {clients} clients, during the flood",
            rate_flood,
            "q/s",
            rate_flood / rate_idle,
            f"{clients} clients idle",
        )
    )
    ctx.add(
        Row(
            "serve",
            "flood: /healthz answered 200 during the flood",
            healthz.count(200) / max(len(healthz), 1),
            "share",
            note=f"{len(healthz)} calls; refused uploads in all: {figures['refused_uploads']}",
        )
    )
