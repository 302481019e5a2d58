"""``imgenc fit-center``: the mean feature vector of a sample of the collection, for ``--center``.

The backbone's features are ReLU outputs, all non-negative, so random hyperplanes through
the origin see them all on one side of most planes and many bits come out (nearly) the
same for every image.  Subtracting the collection's mean feature first (the notebook's
commented-out ``K.mean(input, axis=0) - input``) centres the cloud on the origin; the
benchmark measures what it does to recall.  For the spatial layout the mean is taken over
images and positions, one value per channel.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from encoder.centering import save_center
from encoder.images import ImageLoader
from encoder.pipeline import encode_stream
from encoder.scan import scan_images
from encoder.settings import Settings


def fit_center(
    image_dir: str | Path,
    settings: Settings,
    sample: int = 2000,
    progress: bool = True,
    encoder: object | None = None,
) -> tuple[np.ndarray, int]:
    """Mean feature vector over the first ``sample`` decodable images; returns (centre, n)."""
    from tqdm import tqdm

    from encoder.model import Encoder

    if encoder is None:
        encoder = Encoder(settings.replace(center=None))
    loader = ImageLoader(image_dir, encoder.input_size)
    ids = (e.id for e in itertools.islice(scan_images(image_dir), sample))
    total, count = None, 0
    bar = tqdm(total=sample, unit="img", disable=not progress, file=sys.stderr, desc="fit-center")
    for results, features in encode_stream(
        ids, loader, encoder.features, settings.batch, settings.decode_threads
    ):
        bar.update(len(results))
        if features.shape[0] == 0:
            continue
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        total = flat.sum(axis=0) if total is None else total + flat.sum(axis=0)
        count += features.shape[0]
        positions = flat.shape[0] // features.shape[0]
    bar.close()
    if count == 0 or total is None:
        raise ValueError(f"no decodable image under {image_dir}")
    return (total / (count * positions)).astype(np.float32), count


def cmd_fit_center(args: argparse.Namespace) -> int:
    from encoder.cli import settings_from_args
    from encoder.model import WeightsUnavailable

    settings = settings_from_args(args)
    try:
        center, n = fit_center(args.image_dir, settings, args.sample, not args.no_progress)
    except (WeightsUnavailable, ValueError) as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    save_center(args.out, center)
    print(
        f"{args.out}: mean of {n} images' {settings.backbone} features ({center.shape[0]} "
        f"values); use it with --center {args.out}"
    )
    return 0


def add_fit_center_command(
    sub: argparse._SubParsersAction, add_model_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    parser = sub.add_parser("fit-center", help="compute the mean feature for --center")
    parser.add_argument("image_dir")
    parser.add_argument("--out", required=True, help="where to save the centre (.npy)")
    parser.add_argument("--sample", type=int, default=2000, help="images to average [2000]")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--no-progress", action="store_true")
    add_model_args(parser)
    parser.set_defaults(func=cmd_fit_center)
