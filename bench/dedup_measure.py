"""The ``dedup`` step of ``python -m bench``: near-duplicate groups at scale.

``find_duplicates`` over 10,000 and 100,000 synthetic pooled codes (``--quick``: 2,000 and
10,000) with planted groups (5% of the originals have 1 to 3 copies, each 1 to 8 bits
from its original), at a max distance of ``MAX_DISTANCE`` bits, each size in a fresh
interpreter so that its peak RSS (VmHWM) is its own: seconds, peak RSS and their growth
with the size, and the share of the planted groups found exactly.

How far copies of real photos land, and what the fitted threshold finds, depend on
trained weights: the ``quality`` step measures them (``bench.quality``).  The photo
variants below (``write_variants``) serve the ``runtime`` step's fidelity figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps, ImageStat

from bench.cluster import REPO
from bench.measure import Context, Row
from bench.synthetic import SHARD_SIZE, plant_copies, stub_spec, write_destination

MAX_DISTANCE = 7  # bits: synthetic codes have no fitted threshold (7 = the old 1.4% of 500)


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

dest, out, max_distance = sys.argv[1], sys.argv[2], int(sys.argv[3])
baseline = kb("VmRSS")
start = time.perf_counter()
index = Index.open(dest, save=False)
opened = time.perf_counter() - start
start = time.perf_counter()
groups = find_duplicates(index, max_distance)
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
        [sys.executable, "-c", _DEDUP_AND_REPORT, str(dest), str(out), str(MAX_DISTANCE)],
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
        f"5% of originals with 1-3 copies 1-8 bits away; max distance "
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


# --- photo variants (for the runtime step's fidelity) ----------------------------------------
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


def dedup(ctx: Context) -> None:
    """The ``dedup`` group (see the module docstring)."""
    dedup_scale(ctx)
