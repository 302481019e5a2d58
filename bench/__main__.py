"""``python -m bench [--images DIR] [-n N] [--quick] [--only STEP ...] [--json PATH]``.

Runs every measurement in one run on the same photos, prints each figure (with ratios
against references measured in the same run, and the machine beside them), and writes
the same table as JSON.  Run it from a checkout: it starts its own ``redis-server`` and
Celery workers, and stops them.  ``python -m bench.report PATH`` renders the JSON as
Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import measure
from bench.images import SAMPLE_PHOTOS_NAME, SHARED_PHOTOS_NAME, NoPhotos, prepare_photos


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
        help="imagenet or a weights file, for the speed steps that encode photos (speed "
        "does not depend on them; the quality step always uses efficientnet_lite0's "
        "ImageNet weights) [random]",
    )
    parser.add_argument("--json", default="bench-results.json", help="where to write the table")
    parser.add_argument(
        "--only", nargs="*", choices=list(measure.STEPS), help="run only these steps"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    measure.WEIGHTS["weights"] = args.weights
    work = Path(tempfile.mkdtemp(prefix="imgenc-bench-"))
    try:
        count = args.n or (16 if args.quick else 1000)
        try:
            photos = prepare_photos(work / "images", count, args.images, args.quick)
        except NoPhotos as problem:
            print(f"python -m bench: {problem}", file=sys.stderr)
            return 2
        ctx = measure.Context(images=photos.folder, files=photos.files, quick=args.quick, work=work)
        machine = measure.machine()
        print(
            f"machine: {machine['cpu']}, {machine['cores']} cores, "
            f"CPU flags {' '.join(machine['flags']) or 'none'}, "
            f"TensorFlow {machine['tensorflow']}, GPUs {', '.join(machine['gpus']) or 'none'}"
        )
        print(
            f"images: {photos.description}; weights: {args.weights} (speed does not depend "
            "on the weights' values; quality: efficientnet_lite0, ImageNet weights)"
        )
        start = time.monotonic()
        for step in measure.steps_to_run(args.only):
            print(f"[{step}]", flush=True)
            measure.STEPS[step](ctx)
        elapsed = time.monotonic() - start
        table = {
            "machine": machine,
            "images": photos.description,
            "quick": args.quick,
            "seconds": round(elapsed, 1),
            "rows": [row.to_dict() for row in ctx.rows],
        }
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
        shown = Path(args.json).name if os.path.isabs(args.json) else args.json
        print(f"{len(ctx.rows)} figures in {elapsed:.0f} s, written to {shown}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
