"""The ``dedup`` step of ``python -m bench``: near-duplicate groups at scale, and the
measurement behind the default ``--max-distance``.

1. ``find_duplicates`` over 10,000 and 100,000 synthetic pooled codes (``--quick``: 2,000
   and 10,000) with planted groups (5% of the originals have 1 to 3 copies, each 1 to 8
   bits from its original), each size in a fresh interpreter so that its peak RSS (VmHWM)
   is its own: seconds, peak RSS and their growth with the size, and the share of the
   planted groups found exactly.
2. The photos (up to 300; ``--quick``: the 8) and five variants of each, written as files:
   JPEG recompressed at quality 40, resized to half, cropped by 6% (3% off each edge),
   rotated by 3 degrees, brightened by 25%.  Encoded with VGG16 (random weights), pooled
   and spatial: how far a photo's variants are from it (95th percentile), how far the
   nearest *other* photo is (1st percentile and minimum), both as a share of the code's
   bits, and near-duplicate recall@1 through ``Index.query`` (a variant's top result must
   be its original; the catalogue holds the originals only).  A default threshold belongs
   between the two percentiles.  The same again with centred codes (the originals' mean
   feature, as ``imgenc fit-center`` computes it, passed as ``--center``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, ImageStat

from bench.cluster import REPO
from bench.measure import Context, Row, settings
from bench.synthetic import SHARD_SIZE, plant_copies, stub_spec, write_destination

QUERY_BATCH = 32  # variant images per Index.query call


# --- 1. dedup at scale ---------------------------------------------------------------------
# Run in a fresh interpreter: VmHWM starts again at exec, so it is this dedup's own peak.
_DEDUP_AND_REPORT = """
import json, sys, time
import faiss  # imported before the baseline, like the rest of the code
from search.duplicates import find_duplicates
from search.index import Index

def kb(field):
    with open("/proc/self/status") as status:
        return float(next(line.split()[1] for line in status if line.startswith(field + ":")))

dest, out = sys.argv[1:3]
baseline = kb("VmRSS")
start = time.perf_counter()
index = Index.open(dest, save=False)
opened = time.perf_counter() - start
start = time.perf_counter()
groups = find_duplicates(index)
seconds = time.perf_counter() - start
peak = kb("VmHWM")
with open(out, "w") as f:
    json.dump([[image_id for image_id, _ in group] for group in groups.groups], f)
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak, "open_seconds": opened,
                  "seconds": seconds, "max_distance": groups.max_distance}))
"""


def _dedup_in_fresh_process(dest: Path, out: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", "AWS_"))}
    finished = subprocess.run(
        [sys.executable, "-c", _DEDUP_AND_REPORT, str(dest), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if finished.returncode != 0:
        raise RuntimeError(f"dedup subprocess failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def dedup_scale(ctx: Context) -> None:
    sizes = (2_000, 10_000) if ctx.quick else (10_000, 100_000)
    spec = stub_spec("pooled")
    figures = []
    for n in sizes:
        codes, names, planted = plant_copies(n, bits=500, seed=n)
        dest = ctx.work / f"dedup-{n}"
        chunks = (codes[i : i + SHARD_SIZE] for i in range(0, n, SHARD_SIZE))
        write_destination(dest, spec, chunks, names)
        out = ctx.work / f"dedup-{n}.json"
        result = _dedup_in_fresh_process(dest, out)
        found = {frozenset(group) for group in json.loads(out.read_text())}
        result["exact"] = len(set(planted) & found) / len(planted)
        result["planted"] = len(planted)
        result["unplanted"] = len(found - set(planted))
        figures.append(result)
        shutil.rmtree(dest, ignore_errors=True)
    small, large = figures
    label = [f"{n:,} pooled codes" for n in sizes]
    note = (
        f"5% of originals with 1-3 copies 1-8 bits away; default max distance "
        f"{large['max_distance']} bits; Index.open took {small['open_seconds']:.1f} s and "
        f"{large['open_seconds']:.1f} s"
    )
    ctx.add(Row("dedup", f"find_duplicates, {label[0]}", small["seconds"], "s", note=note))
    ctx.add(
        Row(
            "dedup",
            f"find_duplicates, {label[1]}",
            large["seconds"],
            "s",
            large["seconds"] / small["seconds"],
            f"{label[0]} ({sizes[1] // sizes[0]}x fewer)",
            note="exact k-NN of every code: time grows as N^2 / (faiss's speed)",
        )
    )
    for figure, text in zip(figures, label, strict=True):
        peak = figure["peak_kb"] / 1024
        growth = (figure["peak_kb"] - figure["baseline_kb"]) / 1024
        row = Row(
            "dedup",
            f"peak RSS, index + find_duplicates of {text} (fresh process)",
            peak,
            "MiB",
            note=f"{growth:.0f} MiB above the interpreter with its imports "
            f"({figure['baseline_kb'] / 1024:.0f} MiB)",
        )
        if figure is large:
            row.ratio, row.reference = peak / (small["peak_kb"] / 1024), f"the {label[0]} run"
        ctx.add(row)
    small_growth = (small["peak_kb"] - small["baseline_kb"]) / 1024
    large_growth = (large["peak_kb"] - large["baseline_kb"]) / 1024
    ctx.add(
        Row(
            "dedup",
            f"peak RSS growth above the imports, {label[1]}",
            large_growth,
            "MiB",
            large_growth / small_growth,
            f"the {label[0]} run (codes x{sizes[1] // sizes[0]})",
            note="linear growth gives about the size ratio; N x N would give its square",
        )
    )
    for figure, text in zip(figures, label, strict=True):
        ctx.add(
            Row(
                "dedup",
                f"planted groups found exactly, {text}",
                figure["exact"],
                "share",
                note=f"{figure['planted']} planted groups; {figure['unplanted']} other groups found",
            )
        )


# --- 2. the default threshold ----------------------------------------------------------------
def _border_colour(picture: Image.Image) -> tuple[int, ...]:
    """The mean colour of the picture's outer pixels: rotation fills its corners with it."""
    width, height = picture.size
    frame = Image.new("L", picture.size, 255)
    frame.paste(0, (2, 2, max(3, width - 2), max(3, height - 2)))
    return tuple(int(round(c)) for c in ImageStat.Stat(picture, frame).mean)


def _crop(picture: Image.Image, share: float = 0.06) -> Image.Image:
    width, height = picture.size
    dx, dy = round(width * share / 2), round(height * share / 2)
    return picture.crop((dx, dy, width - dx, height - dy))


VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {  # (edit, quality)
    "jpeg-q40": (lambda p: p, 40),
    "half-size": (lambda p: p.resize((max(1, p.width // 2), max(1, p.height // 2))), 90),
    "crop-6pct": (_crop, 90),
    "rotate-3deg": (
        lambda p: p.rotate(3, Image.Resampling.BICUBIC, fillcolor=_border_colour(p)),
        90,
    ),
    "brighten-25pct": (lambda p: ImageEnhance.Brightness(p).enhance(1.25), 90),
}


def write_variants(source: Path, originals: Path, variants: Path, files: list[str]) -> dict:
    """Copy ``files`` to ``originals`` and write their variants to ``variants``; returns
    ``{variant file name: (original file name, variant kind)}``."""
    originals.mkdir(parents=True)
    variants.mkdir(parents=True)
    made = {}
    for name in files:
        shutil.copyfile(source / name, originals / name)
        with Image.open(source / name) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGB")
        for kind, (edit, quality) in VARIANTS.items():
            variant = f"{Path(name).stem}__{kind}.jpg"
            edit(picture).save(variants / variant, "JPEG", quality=quality)
            made[variant] = (name, kind)
    return made


def _nearest_other(codes: np.ndarray) -> np.ndarray:
    """Each code's Hamming distance to its nearest other code."""
    from encoder.codes import hamming

    nearest = np.empty(len(codes), np.int64)
    for start in range(0, len(codes), 32):
        block = hamming(codes[start : start + 32], codes)
        for row in range(len(block)):
            block[row, start + row] = np.iinfo(np.int64).max
        nearest[start : start + 32] = block.min(axis=1)
    return nearest


def threshold(ctx: Context) -> None:
    from encoder.centering import save_center
    from encoder.fit_center import fit_center

    files = ctx.files[: 8 if ctx.quick else 300]
    originals, variants = ctx.work / "dedup-originals", ctx.work / "dedup-variants"
    made = write_variants(ctx.images, originals, variants, files)
    uploads = [(name, (variants / name).read_bytes()) for name in sorted(made)]
    for layout in ("pooled", "spatial"):
        _threshold_for(ctx, layout, None, originals, uploads, made, len(files))
    # Centred codes (``imgenc fit-center`` + ``--center``): the mean feature of the originals
    # (one vector: the pooled mean is the mean over images and positions, as for spatial).
    center, _ = fit_center(originals, settings(layout="pooled"), sample=len(files), progress=False)
    center_path = ctx.work / "dedup-center.npy"
    save_center(center_path, center)
    for layout in ("pooled", "spatial"):
        _threshold_for(ctx, layout, str(center_path), originals, uploads, made, len(files))


def _threshold_for(
    ctx: Context,
    layout: str,
    center: str | None,
    originals: Path,
    uploads: list[tuple[str, bytes]],
    made: dict[str, tuple[str, str]],
    photos: int,
) -> None:
    """The rows of one layout, raw or centred (see the module docstring)."""
    from encoder.folder_run import encode_folder
    from search.duplicates import DEFAULT_MAX_DISTANCE_SHARE
    from search.index import Index

    kinds = list(VARIANTS)
    config = f"{layout}, centred" if center else layout
    dest = ctx.work / f"dedup-catalogue-{layout}{'-centred' if center else ''}"
    start = time.perf_counter()
    encode_folder(originals, str(dest), settings(layout=layout, center=center), progress=False)
    index = Index.open(str(dest), save=False)
    bits = int(np.prod(index.spec.code_shape))
    answers = []
    for first in range(0, len(uploads), QUERY_BATCH):
        answers += index.query(uploads[first : first + QUERY_BATCH], k=len(index))
    seconds = time.perf_counter() - start
    failed = [a.query for a in answers if a.status != "ok"]
    if failed:
        raise RuntimeError(f"variant queries failed: {failed[:5]}")
    variant_distance = {kind: [] for kind in kinds}
    top_hits = []
    for answer in answers:
        original, kind = made[answer.query]
        distances = {r["id"]: r["distance"] for r in answer.results}
        variant_distance[kind].append(distances[original])
        top_hits.append(answer.results[0]["id"] == original)
    all_variants = np.concatenate([variant_distance[k] for k in kinds])
    nearest = _nearest_other(index.padded_codes(0, len(index)))
    default = DEFAULT_MAX_DISTANCE_SHARE[layout]
    p95_variants = float(np.percentile(all_variants, 95)) / bits
    p1_others = float(np.percentile(nearest, 1)) / bits
    per_kind = ", ".join(f"{k} {np.percentile(variant_distance[k], 95) / bits:.3f}" for k in kinds)
    what = f"{config}, {photos} photos x {len(kinds)} variants"
    ctx.add(
        Row(
            "dedup",
            f"distance photo <-> its variants, p95 ({what})",
            p95_variants,
            "share",
            note=f"of {bits:,} bits ({p95_variants * bits:.0f}); p95 by variant: {per_kind}",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"distance photo <-> its variants, max ({config})",
            float(all_variants.max()) / bits,
            "share",
            note=f"{all_variants.max()} of {bits:,} bits",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"distance photo <-> nearest other photo, p1 ({config}, {photos} photos)",
            p1_others,
            "share",
            note=f"{p1_others * bits:.0f} of {bits:,} bits; median {np.median(nearest) / bits:.3f}",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"distance photo <-> nearest other photo, min ({config})",
            float(nearest.min()) / bits,
            "share",
            note=f"{nearest.min()} of {bits:,} bits",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"midpoint of the two percentiles ({config})",
            (p95_variants + p1_others) / 2,
            "share",
            note="a default threshold between them"
            if p95_variants < p1_others
            else "no gap: the variants' p95 is beyond the others' p1",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"variants within the current default ({default:.2f} of the bits, {config})",
            float(np.mean(all_variants <= round(default * bits))),
            "share",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"photos with another photo within the current default ({config})",
            float(np.mean(nearest <= round(default * bits))),
            "share",
            note="distinct photos a dedup at the default would group",
        )
    )
    ctx.add(
        Row(
            "dedup",
            f"near-duplicate recall@1 through Index.query ({config})",
            float(np.mean(top_hits)),
            "share",
            note=f"variant's top result is its original; catalogue + queries "
            f"encoded in {seconds:.0f} s",
        )
    )
    del index
    shutil.rmtree(dest, ignore_errors=True)


def dedup(ctx: Context) -> None:
    """The ``dedup`` group (see the module docstring)."""
    dedup_scale(ctx)
    threshold(ctx)
