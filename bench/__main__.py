"""``python -m bench [--images DIR] [-n N] [--quick] [--only STEP ...] [--json PATH]``.

Runs every measurement in one run on the same photos, prints each figure (with ratios
against references measured in the same run, and the machine beside them), and writes
the same table as JSON.  Run it from a checkout: it starts its own ``redis-server``,
Celery workers and servers with the tests' harness (``tests.helpers``), and stops them,
also on SIGINT or SIGTERM.  ``python -m bench.report PATH`` renders the JSON as Markdown.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import embeddings, pipeline, quality, scale, search_measure
from bench.core import Context, machine
from bench.images import SAMPLE_PHOTOS_NAME, SHARED_PHOTOS_NAME, NoPhotos, prepare_photos

STEPS: dict[str, Callable[[Context], None]] = {
    "ceiling": pipeline.ceiling,
    "embedded": pipeline.embedded,
    "distributed": pipeline.distributed,
    "queue": pipeline.queue,
    "search": search_measure.search,
    "flood": search_measure.flood,
    "quality": quality.quality,
    "backbones": quality.backbones,
    "embeddings": embeddings.embeddings,
    "scale": scale.scale,
}
NEEDS = {"embedded": "ceiling", "distributed": "ceiling"}  # the step a ratio divides by


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        metavar="DIR",
        help=f"folder of photos [../{SHARED_PHOTOS_NAME}/images beside the checkout, if there; "
        f"with --quick and neither, the sample photos in {SAMPLE_PHOTOS_NAME}]",
    )
    parser.add_argument("-n", type=int, help="number of photos [1000; 16 with --quick]")
    parser.add_argument("--quick", action="store_true", help="a few photos, every measurement")
    parser.add_argument(
        "--weights",
        default="random",
        help="imagenet or a weights file, for the VGG16 speed steps (speed does not depend "
        "on them; quality always uses efficientnet_lite0's ImageNet weights) [random]",
    )
    parser.add_argument("--json", default="bench-results.json", help="where to write the table")
    parser.add_argument("--only", nargs="*", choices=list(STEPS), help="run only these steps")
    parser.add_argument(
        "--scale",
        type=int,
        nargs="+",
        default=[1_000_000, 10_000_000],
        metavar="N",
        help="catalogue sizes of the scale step (not run with --quick) [1000000 10000000]",
    )
    parser.add_argument(
        "--scale-hnsw",
        type=int,
        default=1_000_000,
        metavar="N",
        help="the largest size the scale step builds an HNSW index of [1000000]",
    )
    return parser.parse_args(argv)


def cpu_seconds() -> float:
    """CPU time of this process and of the processes it has waited for."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interrupted(signum: int, _frame: object) -> None:
    """SIGTERM (and SIGINT) unwind like Ctrl-C, once: every step stops what it started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    work = Path(tempfile.mkdtemp(prefix="imgenc-bench-"))
    try:
        count = args.n or (16 if args.quick else 1000)
        try:
            photos = prepare_photos(work / "images", count, args.images, args.quick)
        except NoPhotos as problem:
            print(f"python -m bench: {problem}", file=sys.stderr)
            return 2
        ctx = Context(photos.folder, photos.files, args.quick, work, args.weights)
        ctx.scale, ctx.scale_hnsw = tuple(args.scale), args.scale_hnsw
        about = machine()
        print(
            f"machine: {about['cpu']}, {about['cores']} cores, CPU flags "
            f"{' '.join(about['flags']) or 'none'}, TensorFlow {about['tensorflow']}, "
            f"GPUs {', '.join(about['gpus']) or 'none'}\nimages: {photos.description}; "
            f"weights: {args.weights} (quality: efficientnet_lite0, ImageNet weights)"
        )
        chosen = set(args.only or STEPS)
        chosen |= {NEEDS[step] for step in chosen if step in NEEDS}
        start = time.monotonic()
        for step in (step for step in STEPS if step in chosen):
            print(f"[{step}]", flush=True)
            began, cpu = time.monotonic(), cpu_seconds()
            STEPS[step](ctx)
            print(f"  ({time.monotonic() - began:.0f} s, {cpu_seconds() - cpu:.0f} CPU-s)")
        elapsed = time.monotonic() - start
        table = {
            "machine": about,
            "images": photos.description,
            "quick": args.quick,
            "seconds": round(elapsed, 1),
            "rows": ctx.rows,
        }
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
        print(f"{len(ctx.rows)} figures in {elapsed:.0f} s, written to {Path(args.json).name}")
    except KeyboardInterrupt as stop:
        print(f"python -m bench: interrupted ({stop}); what it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
