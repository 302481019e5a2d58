"""The ``scale`` step of ``python -m bench`` (not run with ``--quick``): what each path
costs as a catalogue grows, on synthetic destinations in the writer's own layout.

For each N of ``--scale`` (1M and 10M by default), a destination of N images is written by
``ShardWriter`` as ``imgenc encode`` writes one (1,024-row shards, CSV parts), with the
spec of pooled EfficientNet-Lite0 codes (500 bits, 63 bytes): uniform random codes, 1% of
them copies of an earlier image with 0 to 72 of their bits flipped, and float16 features
(1,280 per image, copies near their original) up to ``FEATURES_UP_TO`` images.  Then, each
in a fresh process (its wall time, and its peak RSS from ``wait4``): the manifest merge,
``load_codes``, ``iter_codes``, the flat index build (and HNSW up to ``--scale-hnsw``), a
cold ``imgenc similar``, one new shard plus 10 deletions applied by the next open, a cold
``imgenc dedup --max-distance 72`` (and the share of planted copies it groups with their
original), and with features ``load_features(mmap=True)`` and a re-scored dedup.  Last,
the pair search at 200,000 codes against the exact scan (uniform and clustered codes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from bench.core import Context
from tests.helpers import REPO

RADIUS = 72
FEATURES_UP_TO = 1_000_000
CHANNELS = 1280
BATCH = 16 * 1024
PLANTED_SHARE = 0.01


def synthesize(dest: Path, n: int, features: bool, seed: int = 7) -> dict[int, int]:
    """Write ``n`` images; returns ``copy -> original`` of the planted near-duplicates."""
    from encoder.features import Encoded
    from encoder.images import ImageStatus, LoadResult
    from encoder.settings import Settings
    from encoder.spec import spec_for
    from encoder.storage import open_storage
    from encoder.writer import ShardWriter, ensure_spec

    settings = Settings(backbone="efficientnet_lite0", layout="pooled", bits=500)
    spec = spec_for(settings)
    if features:
        data = spec.to_dict()
        data["features"] = True
        spec = type(spec).from_dict(data)
    storage = open_storage(str(dest))
    ensure_spec(storage, spec)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 63), dtype=np.uint8)
    codes[:, -1] &= 0xF0  # 500 bits: the last 4 are padding
    copies = np.flatnonzero(rng.random(n) < PLANTED_SHARE)
    copies = copies[copies > 0]
    originals = (rng.random(len(copies)) * copies).astype(np.int64)
    for copy, original in zip(copies.tolist(), originals.tolist(), strict=True):
        bits = np.unpackbits(codes[original])
        flip = rng.choice(500, int(rng.integers(0, RADIUS + 1)), replace=False)
        bits[flip] ^= 1
        codes[copy] = np.packbits(bits)
    writer = ShardWriter(storage, spec, "synthetic", 1024, 1e9, features=features)
    base = rng.standard_normal((1000, CHANNELS)).astype(np.float32) if features else None
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        results = [
            LoadResult(
                f"catalogue/{i % 1000:03d}/{i:08d}.jpg",
                f"/data/catalogue/{i % 1000:03d}/{i:08d}.jpg",
                ImageStatus.OK,
                width=640,
                height=480,
                size=50_000 + i % 1000,
                mtime_ns=1_700_000_000_000_000_000 + i,
            )  # fmt: skip
            for i in range(start, stop)
        ]
        batch, feats = codes[start:stop], None
        if features and base is not None:
            rows = np.arange(start, stop)
            planted = np.isin(rows, copies)
            source = rows.copy()
            source[planted] = originals[np.searchsorted(copies, rows[planted])]
            feats = base[source % 1000] + np.sin(source[:, None] * 0.001 + np.arange(CHANNELS))
            feats[planted] += 0.3 * rng.standard_normal((int(planted.sum()), CHANNELS))
            feats = feats.astype(np.float16)
        for at in range(0, stop - start, 1024):  # 1,024 rows a shard, as imgenc encode cuts
            piece = slice(at, at + 1024)
            writer.add(
                results[piece],
                batch[piece] if feats is None else Encoded(batch[piece], feats[piece]),
            )
    writer.flush()
    return dict(zip(copies.tolist(), originals.tolist(), strict=True))


PEAK = """
def _peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def child(code: str) -> tuple[float, float, dict]:
    """Run ``code`` in a fresh Python: wall seconds, its peak RSS (MiB: ``VmHWM``, the
    high-water mark of its own memory since it started), and the JSON it prints last."""
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", PEAK + textwrap.dedent(code)], cwd=REPO, capture_output=True,
        text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"scale step failed: {run.stderr[-2000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    figures = json.loads(lines[-1])
    return seconds, figures.pop("peak_mib"), figures


def timed(call: str, dest: Path, setup: str = "", result: str = "{}") -> str:
    return f"""
        import json, sys, time
        {setup}
        D = {str(dest)!r}
        t = time.perf_counter()
        {call}
        print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mib": _peak_mib(), **{result}}}))
    """


def cli(*args: str) -> str:
    return (
        "import json, sys; from imgenc.cli import main\n"
        f"code = main({list(args)!r})\n"
        'print(json.dumps({"peak_mib": _peak_mib()})); sys.exit(code)'
    )


def scale(ctx: Context) -> None:
    """The scale table; see the module docstring."""
    if ctx.quick:
        print("  (the scale step runs without --quick only)")
        return
    for n in ctx.scale:
        one_catalogue(ctx, n)
    pair_search_against_exact(ctx, 200_000)


def one_catalogue(ctx: Context, n: int) -> None:
    label = f"{n / 1e6:g}M images"
    dest = ctx.work / f"scale-{n}"
    features = n <= FEATURES_UP_TO
    began = time.perf_counter()
    planted = synthesize(dest, n, features)
    ctx.add("scale", f"write the synthetic destination, {label}", time.perf_counter() - began, "s")

    def add(what: str, seconds: float, peak: float, note: str = "") -> None:
        ctx.add("scale", f"{what}, {label}", seconds, "s", note=note)
        ctx.add("scale", f"{what}, {label}: peak RSS", peak, "MiB",
                note=f"{peak * 2**20 / n:,.0f} B per image")  # fmt: skip

    s, peak, got = child(timed(
        "info = merge_manifest(open_storage(D))", dest,
        "from encoder.merged import merge_manifest; from encoder.storage import open_storage",
        '{"rows": info.rows}',
    ))  # fmt: skip
    add("merge the manifest parts (streaming)", got["seconds"], peak, f"{got['rows']:,} rows")
    s, peak, got = child(
        timed("ids, codes = load_codes(D)", dest, "from encoder import load_codes")
    )
    add("load_codes", got["seconds"], peak)
    s, peak, got = child(timed(
        "total = sum(len(i) for i, _ in iter_codes(D))", dest, "from encoder import iter_codes",
    ))  # fmt: skip
    add("iter_codes (streamed)", got["seconds"], peak)
    for kind in ("flat", "hnsw") if n <= ctx.scale_hnsw else ("flat",):
        s, peak, got = child(timed(
            f"index = Index.open(D, kind={kind!r}, save={kind == 'flat'})", dest,
            "from search import Index", '{"segments": index.describe()["segments"]}',
        ))  # fmt: skip
        add(f"index build, {kind}", got["seconds"], peak, f"{got['segments']} segments")
    probe = "catalogue/123/00000123.jpg"
    s, peak, _ = child(cli("similar", str(dest), probe, "-k", "10"))
    add("cold imgenc similar (whole command)", s, peak)

    update(dest, n)
    s, peak, got = child(timed(
        "index = Index.open(D)", dest, "from search import Index",
        '{"origin": index.origin, "added": index.backend.added, "images": len(index)}',
    ))  # fmt: skip
    note = (
        f"{got['origin']}: {got['added']} codes written (the new shard), {got['images']:,} images"
    )
    add("one new shard + 10 deletions applied by the next open", got["seconds"], peak, note)
    s, peak, _ = child(cli("similar", str(dest), probe, "-k", "10"))
    add("cold imgenc similar after the update", s, peak)

    groups = dest / "groups.csv"
    args = ("dedup", str(dest), "--max-distance", str(RADIUS), "--out", str(groups))
    s, peak, _ = child(cli(*args))
    add(f"imgenc dedup --max-distance {RADIUS}", s, peak, grouped_share(groups, planted))
    if features:
        s, peak, got = child(timed(
            "ids, x = load_features(D, mmap=True)", dest, "from encoder import load_features",
            '{"shape": list(x.shape)}',
        ))  # fmt: skip
        add("load_features(mmap=True)", got["seconds"], peak, f"{got['shape']} float16")
        write_fit(dest)
        s, peak, _ = child(cli("dedup", str(dest), "--out", str(groups)))
        add(
            "imgenc dedup re-scored by features (fitted rule)",
            s,
            peak,
            grouped_share(groups, planted),
        )
    shutil.rmtree(dest, ignore_errors=True)


def update(dest: Path, n: int) -> None:
    """One more shard of 1,024 new images, and 10 images recorded deleted."""
    import pyarrow as pa

    from encoder.deletions import record_deletions
    from encoder.images import ImageStatus, LoadResult
    from encoder.storage import open_storage
    from encoder.writer import ShardWriter
    from search.index import read_spec

    storage = open_storage(str(dest))
    spec = read_spec(storage)
    writer = ShardWriter(storage, spec, "update", 0, 1e9, features=spec.features)
    names = [f"new/{i:06d}.jpg" for i in range(1024)]
    codes = np.random.default_rng(n).integers(0, 256, (1024, 63), dtype=np.uint8)
    results = [LoadResult(x, "/data/" + x, ImageStatus.OK, width=640, height=480) for x in names]
    if spec.features:
        from encoder.features import Encoded

        writer.add(results, Encoded(codes, np.ones((1024, CHANNELS), np.float16)))
    else:
        writer.add(results, codes)
    writer.flush()
    gone = [f"catalogue/{i % 1000:03d}/{i:08d}.jpg" for i in range(1000, 1010)]
    record_deletions(storage, pa.table({"id": gone, "path": ["/data/" + g for g in gone]}), "gone")


def write_fit(dest: Path) -> None:
    """A fitted threshold with a re-scoring (what ``imgenc encode`` fits on real photos),
    so that ``imgenc dedup`` re-scores pairs near it by the features."""
    from encoder.codes import read_spec
    from search.duplicate_fit import DuplicateThreshold, save_threshold
    from search.rescore import Rescore

    spec = read_spec(str(dest))
    rescore = Rescore(40, 90, 0.8, 0.01, {"synthetic": 1.0})
    fit = DuplicateThreshold(RADIUS, 500, spec.fingerprint, 0.01, 0.01, {}, [], 0, 0, 0, 0,
                             "false pairs", rescore=rescore.__dict__)  # fmt: skip
    from encoder.storage import open_storage

    save_threshold(open_storage(str(dest)), fit)


def grouped_share(groups: Path, planted: dict[int, int]) -> str:
    """The share of planted copies that share a group with their original."""
    import pandas as pd

    rows = pd.read_csv(groups)
    group_of = dict(zip(rows["id"], rows["group"], strict=True))

    def name(i: int) -> str:
        return f"catalogue/{i % 1000:03d}/{i:08d}.jpg"

    deleted = {name(i) for i in range(1000, 1010)}
    pairs = [
        (name(c), name(o))
        for c, o in planted.items()
        if name(c) not in deleted and name(o) not in deleted
    ]
    found = sum(group_of.get(c, -1) == group_of.get(o, -2) for c, o in pairs)
    return f"{found / max(1, len(pairs)):.2%} of {len(pairs):,} planted copies grouped with their original"


def pair_search_against_exact(ctx: Context, n: int) -> None:
    """LSH pairs against the exact scan's on ``n`` codes, uniform and clustered."""
    from search.near_pairs import close_pairs

    rng = np.random.default_rng(3)
    for name in ("uniform", "clustered"):
        if name == "uniform":
            codes = rng.integers(0, 256, (n, 63), dtype=np.uint8)
        else:  # bits flipped with p = 1/8 around 200 centres: clusters ~22% of bits wide
            centres = rng.integers(0, 256, (n // 1000, 63), dtype=np.uint8)
            noise = [rng.integers(0, 256, (n, 63), dtype=np.uint8) for _ in range(3)]
            codes = centres[rng.integers(0, len(centres), n)] ^ (noise[0] & noise[1] & noise[2])
        codes[:, -1] &= 0xF0
        copies = rng.choice(n, n // 100, replace=False)
        for copy in copies.tolist():
            bits = np.unpackbits(codes[(copy * 7919) % n])
            bits[rng.choice(500, int(rng.integers(0, RADIUS + 1)), replace=False)] ^= 1
            codes[copy] = np.packbits(bits)
        t = time.perf_counter()
        exact = close_pairs(codes, RADIUS, 500, method="exact")
        t_exact = time.perf_counter() - t
        t = time.perf_counter()
        lsh = close_pairs(codes, RADIUS, 500, method="lsh")
        t_lsh = time.perf_counter() - t
        truth = set(zip(exact.a.tolist(), exact.b.tolist(), strict=True))
        found = truth & set(zip(lsh.a.tolist(), lsh.b.tolist(), strict=True))
        what = f"{n:,} {name} codes, 1% planted copies"
        ctx.add("scale", f"pairs within {RADIUS} bits, exact scan, {what}", t_exact, "s",
                note=f"{len(truth):,} pairs")  # fmt: skip
        ctx.add("scale", f"pairs within {RADIUS} bits, LSH, {what}", t_lsh, "s",
                t_lsh / t_exact, "exact scan", lsh.describe())  # fmt: skip
        ctx.add("scale", f"LSH pairs found of the exact scan's, {what}",
                len(found) / max(1, len(truth)), "share")  # fmt: skip
