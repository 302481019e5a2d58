"""The ``search`` and ``flood`` steps of ``python -m bench``: the query half.

- ``search``: 1,000,000 synthetic pooled codes (63 bytes, like pooled VGG16 at 500 bits)
  written as a real destination, then ``search.Index`` against faiss used directly on the
  same codes (63 bytes, and padded to 64 as the index stores them); exact (and, outside ``--quick``, HNSW) search of 8-, 16-
  and 64-byte codes through the index's backend; 100,000 spatial codes (3,063 bytes).
- ``serve``: ``imgenc serve`` (``tests.helpers.SearchServer``) over the photos encoded with
  VGG16 (pooled), queried over HTTP by 1 and by 8 concurrent clients, against one
  in-process model forward plus one index search; and (the ``flood`` step, Lite0 with its
  ImageNet weights) a normal query's latency idle and while clients keep uploading a large
  lossless PNG (heavy lane on, then off), 8-client throughput, ``/healthz`` meanwhile.

Synthetic codes are drawn around random centres: each bit differs from its centre's with
probability 1/8, so codes of one cluster are about 22% of their bits apart and of
different clusters about 50%, like real codes rather than uniform noise.  ``--quick`` uses
20,000 and 5,000 codes and 8 photos.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bench.core import Context
from tests.helpers import SearchServer, smooth_png, wait_for

K = 10


class ClusteredCodes:
    """Packed codes of ``bits`` bits drawn around ``clusters`` random centres."""

    def __init__(self, bits: int, clusters: int, seed: int = 0) -> None:
        self.bits, self.bytes = bits, (bits + 7) // 8
        self.rng = np.random.default_rng(seed)
        self.centres = self._random_bytes(clusters)

    def _random_bytes(self, n: int) -> np.ndarray:
        return np.frombuffer(self.rng.bytes(n * self.bytes), np.uint8).reshape(n, self.bytes)

    def draw(self, n: int) -> np.ndarray:
        which = self.rng.integers(0, len(self.centres), n)
        flips = self._random_bytes(n) & self._random_bytes(n) & self._random_bytes(n)
        codes = self.centres[which] ^ flips
        codes[:, -1] &= (0xFF << (self.bytes * 8 - self.bits)) & 0xFF  # spare bits zero
        return codes

    def batches(self, n: int, chunk: int = 50_000) -> Iterator[np.ndarray]:
        for start in range(0, n, chunk):
            yield self.draw(min(chunk, n - start))


def write_destination(dest: Any, layout: str, batches: Iterator[np.ndarray]) -> Any:
    """The codes as ok images of a real destination (the stub backbone's spec: 63-byte
    pooled, 3,063-byte spatial codes, like VGG16's), as ``imgenc encode`` writes it."""
    from encoder.images import ImageStatus, LoadResult
    from encoder.settings import Settings
    from encoder.spec import spec_for
    from encoder.storage import open_storage
    from encoder.writer import ShardWriter, ensure_spec

    spec = spec_for(Settings(backbone="stub", layout=layout, bits=500, weights="random"))
    storage = open_storage(str(dest))
    ensure_spec(storage, spec)
    writer = ShardWriter(storage, spec, "synthetic", shard_size=50_000, flush_seconds=1e9)
    written = 0
    for codes in batches:
        names = [f"synthetic/{written + i:07d}.jpg" for i in range(len(codes))]
        writer.add(
            [LoadResult(n, "/" + n, ImageStatus.OK, width=640, height=480) for n in names], codes
        )
        written += len(codes)
    writer.flush()
    return spec


def queries_per_second(search: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    """Queries per second of ``search`` over the whole batch, after a warm-up on a few."""
    search(queries[:4])
    start = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - start)


def search(ctx: Context) -> None:
    """Exact search of pooled codes, code sizes, spatial codes, and ``imgenc serve``."""
    import faiss

    from search.backend import new_backend
    from search.faiss_backend import stored_bytes
    from search.index import Index
    from search.segments import rows_for_keys

    n, n_queries = (20_000, 100) if ctx.quick else (1_000_000, 1000)
    generator = ClusteredCodes(bits=500, clusters=max(20, n // 1000), seed=1)
    kept: list[np.ndarray] = []
    dest = ctx.work / "search-pooled"
    write_destination(dest, "pooled", (kept.append(b) or b for b in generator.batches(n)))
    queries, label = generator.draw(n_queries), f"{n:,} pooled codes"
    start = time.perf_counter()
    index = Index.open(str(dest), save=False)
    build = time.perf_counter() - start
    ctx.add("search", f"Index.open flat, {label} (build)", build, "s")
    width = stored_bytes(index.code_bytes)
    padded = np.zeros((n, width), np.uint8)
    padded[:, : index.code_bytes] = np.concatenate(kept)
    del kept[:]
    unpadded = faiss.IndexBinaryFlat(index.code_bytes * 8)  # 63 bytes: the generic kernel
    unpadded.add(np.ascontiguousarray(padded[:, : index.code_bytes]))
    rate63 = queries_per_second(lambda q, d=unpadded: d.search(q, K), queries)
    del unpadded
    direct = faiss.IndexBinaryFlat(width * 8)
    direct.add(padded)
    padded_queries = np.pad(queries, ((0, 0), (0, width - queries.shape[1])))
    rate_direct = queries_per_second(lambda q, d=direct: d.search(q, K), padded_queries)
    rate = queries_per_second(lambda q, i=index: i.search(q, K), queries)
    what = f"{n_queries} queries, k={K}, {label}"
    ctx.add("search", f"faiss IndexBinaryFlat direct, 63-byte codes, {what}", rate63, "q/s")
    name = f"faiss IndexBinaryFlat direct, {width}-byte padded codes, {what}"
    note = "64 bytes has a specialised Hamming kernel; 63 the generic one"
    ctx.add("search", name, rate_direct, "q/s", rate_direct / rate63, "63-byte codes", note)
    note = "ids, tie-breaking by id, results as Python lists"
    ratio = rate / rate_direct
    ctx.add("search", f"Index.search flat, {what}", rate, "q/s", ratio, "faiss direct", note)
    del direct, padded, index

    # Code sizes: what PCA-ITQ at 64 and 128 bits and 512 bits give, on the index's backend.
    n, n_queries = (20_000, 200) if ctx.quick else (1_000_000, 1_000)
    rates: dict[int, float] = {}
    for bits in (512, 64, 128):
        generator = ClusteredCodes(bits, clusters=max(10, n // 100), seed=bits)
        codes, queries, keys = generator.draw(n), generator.draw(n_queries), np.arange(n)
        flat = new_backend("flat", codes.shape[1])
        flat.update(rows_for_keys(keys), codes, np.zeros(0, np.int64))
        rates[bits] = queries_per_second(lambda q, b=flat: b.search(q, K), queries)
        what = f"{n:,} codes of {bits // 8} bytes, {n_queries} queries, k={K}"
        ratio = rates[bits] / rates[512] if bits != 512 else None
        ctx.add("search", f"exact search, {what}", rates[bits], "q/s", ratio, "64-byte codes")
        if ctx.quick:
            continue
        exact = flat.search(queries, K)[0]
        del flat
        hnsw, start = new_backend("hnsw", codes.shape[1]), time.perf_counter()
        hnsw.update(rows_for_keys(keys), codes, np.zeros(0, np.int64))
        build = time.perf_counter() - start
        rate = queries_per_second(lambda q, b=hnsw: b.search(q, K), queries)
        recall = float(np.mean(hnsw.search(queries, K)[0] <= exact[:, K - 1 : K]))
        note = f"built in {build:.0f} s; recall@{K} {recall:.3f} (tie-aware)"
        name = f"HNSW search (M 32, efSearch 128), {what}"
        ctx.add("search", name, rate, "q/s", rate / rates[bits], "exact search, same codes", note)
        del hnsw

    n, n_queries = (5_000, 20) if ctx.quick else (100_000, 100)
    dest = ctx.work / "search-spatial"
    generator = ClusteredCodes(49 * 500, clusters=max(20, n // 1000))
    spec = write_destination(dest, "spatial", generator.batches(n, chunk=10_000))
    start = time.perf_counter()
    index = Index.open(str(dest), save=False)
    label = f"{n:,} spatial codes ({spec.bytes_per_code:,} B)"
    ctx.add("search", f"Index.open flat, {label} (build)", time.perf_counter() - start, "s")
    rate = queries_per_second(lambda q: index.search(q, K), generator.draw(n_queries))
    note = "faiss's generic Hamming kernel (no specialised one above 64 bytes)"
    ctx.add(
        "search", f"Index.search flat, {n_queries} queries, k={K}, {label}", rate, "q/s", note=note
    )
    serve_latency(ctx)


def post_all(url: str, uploads: list[tuple[str, bytes]], latencies: list[float]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for name, data in uploads:
            start = time.perf_counter()
            answer = client.post("/search", files={"image": (name, data)}, data={"k": str(K)})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)


def clients_rate(url: str, uploads: list, clients: int, each: int, latencies: list) -> float:
    """Queries per second of ``clients`` threads sending ``each`` normal queries."""
    shares = [[uploads[(c * each + i) % len(uploads)] for i in range(each)] for c in range(clients)]
    threads = [threading.Thread(target=post_all, args=(url, s, latencies)) for s in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(latencies) != clients * each:
        raise RuntimeError(
            f"{clients * each - len(latencies)} of the {clients}-client queries failed"
        )
    return len(latencies) / (time.perf_counter() - start)


def health(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/healthz", timeout=30).json()


def ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q)) * 1000


def serving(ctx: Context, name: str, count: int, model: dict[str, str], *args: str):
    """``count`` photos encoded (pooled) with ``model``, and a started ``imgenc serve`` of
    them (stop it); returns the server, the photos as uploads, and the start-up seconds."""
    from encoder.folder_run import encode_folder

    folder, dest = ctx.work / f"{name}-photos", ctx.work / f"{name}-dest"
    if not dest.exists():
        ctx.copy_photos(count, folder.name)
        encode_folder(folder, str(dest), ctx.settings(**model, layout="pooled"), progress=False)
    env = {f"IMGENC_{key.upper()}": value for key, value in model.items()}
    server = SearchServer(
        str(dest), ctx.work / f"{name}.log", {"IMGENC_WEIGHTS": ctx.weights, **env}, *args
    )
    started = time.monotonic()
    try:
        server.start()
        startup = time.monotonic() - started
        uploads = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
        post_all(server.url, uploads[:2], [])  # warm-up
    except BaseException:
        server.stop()
        raise
    return server, uploads, startup


def serve_latency(ctx: Context) -> None:
    from encoder.images import ImageLoader
    from encoder.tf_runtime import TensorFlowEncoder
    from search.index import Index

    singles, per_client, files = (8, 2, 8) if ctx.quick else (60, 25, 200)
    server, uploads, startup = serving(ctx, "serve", files, {"backbone": "vgg16"})
    try:
        single: list[float] = []
        start = time.perf_counter()
        post_all(server.url, [uploads[i % len(uploads)] for i in range(singles)], single)
        rate1 = singles / (time.perf_counter() - start)
        before, concurrent = health(server.url), []
        rate8 = clients_rate(server.url, uploads, 8, per_client, concurrent)
        after = health(server.url)
    finally:
        server.stop()
    batches = after["batches"] - before["batches"]
    per_batch = (after["queries"] - before["queries"]) / max(batches, 1)

    # The reference: one forward of one image and one index search, in this process.
    encoder = TensorFlowEncoder(ctx.settings(layout="pooled"))
    index = Index.open(server.dest, save=False)
    pixels = ImageLoader(ctx.images, encoder.input_size).load(ctx.files[0]).pixels[None]
    timings = []
    for _ in range(8 if ctx.quick else 35):
        start = time.perf_counter()
        index.search(encoder.encode(pixels), K)
        timings.append(time.perf_counter() - start)
    reference = float(np.median(timings[3:])) * 1000
    name = "in process: one VGG16 forward (1 image) + one Index.search, p50"
    ctx.add("serve", name, reference, "ms", note="decoded 224x224 pixels in; no HTTP, no decoding")
    note = "index opened, VGG16 built and warmed up"
    ctx.add("serve", "imgenc serve start-up until /healthz answers", startup, "s", note=note)
    name = f"POST /search latency p50, 1 client ({len(uploads)} photos, VGG16 pooled)"
    ratio, what = ms(single, 50) / reference, "one in-process forward + search"
    note = "upload, decode, resize, forward, search, JSON"
    ctx.add("serve", name, ms(single, 50), "ms", ratio, what, note)
    ctx.add("serve", "POST /search latency p95, 1 client", ms(single, 95), "ms")
    ctx.add("serve", "POST /search latency p50, 8 clients", ms(concurrent, 50), "ms")
    ctx.add("serve", "POST /search latency p95, 8 clients", ms(concurrent, 95), "ms")
    ctx.add("serve", f"throughput, 1 client ({singles} queries)", rate1, "q/s")
    name = f"throughput, 8 clients ({len(concurrent)} queries)"
    ctx.add("serve", name, rate8, "q/s", rate8 / rate1, "1 client", "the clients share the cores")
    note = f"{batches} batches, from /healthz"
    ctx.add(
        "serve",
        "queries per model batch, 8 clients (micro-batching)",
        per_batch,
        "queries",
        note=note,
    )


class Flood:
    """``clients`` threads uploading ``data`` again and again until the block ends; a 503
    is retried after its ``Retry-After`` (clients that behave, not an attack)."""

    def __init__(self, url: str, data: bytes, clients: int) -> None:
        self.url, self.data = url, data
        self.counts = {"answered": 0, "refused": 0, "failed": 0}
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Flood:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(300)

    def client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self.stop.is_set():
                try:
                    answer = client.post(
                        "/search", files={"image": ("scan.png", self.data)}, data={"k": "1"}
                    )
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0
                outcome = {200: "answered", 503: "refused"}.get(status, "failed")
                with self.lock:
                    self.counts[outcome] += 1
                if status == 503:
                    self.stop.wait(float(answer.headers.get("retry-after", "1")))

    def __str__(self) -> str:
        return ", ".join(f"{value} {key}" for key, value in self.counts.items())


def flood(ctx: Context) -> None:
    """A normal photo's query, idle and while clients keep uploading a large PNG (no
    reduced-scale decode): p50 and p95 latency, 8-client throughput, and ``/healthz``."""
    import httpx

    side, flooders = (4500, 3) if ctx.quick else (9000, 10)
    n_queries, per_client, n_off = (8, 2, 3) if ctx.quick else (40, 10, 5)
    lite = {"backbone": "efficientnet_lite0", "weights": "imagenet"}
    heavy = smooth_png(side)
    server, uploads, _ = serving(ctx, "flood", 8 if ctx.quick else 100, lite)
    try:
        post_all(server.url, uploads * 2, [])  # warm-up
        idle, flooded, healthz = [], [], []
        post_all(server.url, [uploads[i % len(uploads)] for i in range(n_queries)], idle)
        rate_idle = clients_rate(server.url, uploads, 8, per_client, [])
        with Flood(server.url, heavy, flooders) as on:
            wait_for(lambda: health(server.url)["heavy_uploads_in_progress"], 120, "the flood")
            for i in range(n_queries):
                post_all(server.url, [uploads[i % len(uploads)]], flooded)
                healthz.append(httpx.get(server.url + "/healthz", timeout=30).status_code)
            rate_flood = clients_rate(server.url, uploads, 8, per_client, [])
        refused = health(server.url)["refused_uploads"]
    finally:
        server.stop()
    # The same flood with the heavy lane off: every upload decoded by the light threads at
    # normal priority (the lanes alone, as a pool sized to the cores would be).
    server, _, _ = serving(ctx, "flood", 8 if ctx.quick else 100, lite, "--heavy-mpx", "1000")
    try:
        with Flood(server.url, heavy, flooders) as off:
            wait_for(lambda: health(server.url)["uploads_in_progress"], 120, "the flood")
            lane_off: list[float] = []  # each query waits behind the flood's decodes
            post_all(server.url, uploads[:n_off], lane_off)
    finally:
        server.stop()

    what = f"{len(uploads)} photos, EfficientNet-Lite0 pooled, default flags"
    png = f"{side}x{side} PNG ({side * side / 1e6:.0f} Mpx, {len(heavy) / 2**20:.1f} MiB)"
    p50, p95 = ms(idle, 50), ms(idle, 95)
    ctx.add("serve", f"flood: normal query p50, idle ({what})", p50, "ms")
    ctx.add("serve", "flood: normal query p95, idle", p95, "ms")
    name = f"flood: normal query p50 while {flooders} clients upload a {png}"
    note = f"{n_queries} queries one after another; flood: {on} (refused: 503 + Retry-After)"
    ctx.add(
        "serve",
        name,
        ms(flooded, 50),
        "ms",
        ms(flooded, 50) / p50,
        "idle p50 (target: at most 3x)",
        note,
    )
    name = "flood: normal query p95 during the flood"
    ctx.add("serve", name, ms(flooded, 95), "ms", ms(flooded, 95) / p95, "idle p95")
    name = "flood: normal query p50 during the same flood, heavy lane off (--heavy-mpx 1000)"
    note = f"{len(lane_off)} queries; every upload decoded by the light threads; flood: {off}"
    ctx.add("serve", name, ms(lane_off, 50), "ms", ms(lane_off, 50) / p50, "idle p50", note)
    ctx.add("serve", "flood: throughput, 8 clients, idle", rate_idle, "q/s")
    name = "flood: throughput, 8 clients, during the flood"
    ctx.add("serve", name, rate_flood, "q/s", rate_flood / rate_idle, "8 clients idle")
    share = healthz.count(200) / len(healthz)
    note = f"{len(healthz)} calls; refused uploads in all: {refused}"
    ctx.add("serve", "flood: /healthz answered 200 during the flood", share, "share", note=note)
