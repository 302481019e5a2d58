"""``python -m bench [--images DIR] [-n N] [--quick] [--json PATH]``.

Runs every measurement in one run on the same images, prints one table of figures and
ratios with the machine beside them, and writes the same table as JSON.  Run it from a
checkout (it starts its own Redis and Celery workers with the test helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import measure  # noqa: E402

SHARED_IMAGES = REPO.parent / "shared" / "data" / "clothing-1k" / "images"
STEPS = {
    "ceiling": measure.compute_ceiling,
    "embedded": measure.embedded,
    "notebook": measure.notebook,
    "distributed": measure.distributed,
    "queue": measure.queue_capacity,
    "fidelity": measure.fidelity,
    "cost": measure.cost,
}


def pick_images(args: argparse.Namespace, work: Path) -> tuple[Path, list[str], str]:
    from encoder.scan import scan_images
    from tests.imagegen import write_jpegs

    n = args.n or (8 if args.quick else 1000)
    source = Path(args.images) if args.images else SHARED_IMAGES
    if source.is_dir():
        files = sorted(e.id for e in scan_images(source))[:n]
        folder = work / "images"
        folder.mkdir()
        for f in files:  # a folder of exactly these images, so every step sees the same set
            shutil.copyfile(source / f, folder / Path(f).name)
        return folder, sorted(Path(f).name for f in files), f"{len(files)} photos from {source}"
    folder = work / "images"
    files = write_jpegs(folder, n, size=(500, 700))
    return folder, files, f"{n} generated 500x700 JPEGs (no {SHARED_IMAGES})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--images", help=f"image folder [{SHARED_IMAGES} if present]")
    parser.add_argument("-n", type=int, help="number of images [1000; 8 with --quick]")
    parser.add_argument("--quick", action="store_true", help="a few images, every measurement")
    parser.add_argument("--json", default="bench-results.json", help="where to write the table")
    parser.add_argument("--only", nargs="*", choices=sorted(STEPS), help="run only these steps")
    args = parser.parse_args(argv)

    work = measure.workdir()
    try:
        folder, files, described = pick_images(args, work)
        ctx = measure.Context(images=folder, files=files, quick=args.quick, work=work)
        info = measure.machine()
        print(
            f"machine: {info['cpu']}, {info['cores']} cores, flags {' '.join(info['flags'])}, "
            f"TF {info['tensorflow']}, GPUs {info['gpus'] or 'none'}"
        )
        print(
            f"images: {described}; weights: random (no ImageNet download here; speed does not "
            "depend on the weights' values)"
        )
        steps = args.only or list(STEPS)
        if "embedded" in steps or "notebook" in steps or "distributed" in steps:
            steps = ["ceiling", *[s for s in steps if s != "ceiling"]]
        if "notebook" in steps and "embedded" not in steps:
            steps.insert(steps.index("notebook"), "embedded")
        start = time.monotonic()
        for step in STEPS:
            if step in steps:
                print(f"[{step}]", flush=True)
                STEPS[step](ctx)
        elapsed = time.monotonic() - start
        print(f"\n{len(ctx.rows)} figures in {elapsed:.0f} s")
        missed = [r for r in ctx.rows if r.met is False]
        for row in missed:
            print(f"TARGET MISSED: {row.name}: {row.value:.3g} {row.unit} (target {row.target})")
        if "centering_wins" in ctx.values:
            print(
                f"centring beat raw features at {int(ctx.values['centering_wins'])} of 5 code lengths"
            )
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "images": described,
                    "quick": args.quick,
                    "seconds": round(elapsed, 1),
                    "rows": [r.to_dict() for r in ctx.rows],
                },
                indent=2,
            )
        )
        print(f"table written to {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
