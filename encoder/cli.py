"""``imgenc``: the command line.  ``encode`` and ``show`` live here; ``enqueue``, ``status``
and ``jobs`` come from the producer package.  Every model flag can also be given as an
``IMGENC_*`` environment variable (flag > environment > default)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from encoder.backbones import BACKBONES
from encoder.settings import LAYOUTS, PRECISIONS, Settings

MODEL_FLAGS = ("backbone", "layout", "bits", "seed", "weights", "precision", "center")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags that decide the code spec; the same names everywhere."""
    group = parser.add_argument_group("model (also IMGENC_<NAME> environment variables)")
    group.add_argument("--backbone", choices=sorted(BACKBONES), help="feature extractor [vgg16]")
    group.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="one code per feature-map position "
        "(spatial, the notebook's) or one per image (pooled) [spatial]",
    )
    group.add_argument("--bits", type=int, help="hyperplanes, bits per code [500]")
    group.add_argument("--seed", type=int, help="seed of the hyperplanes [628]")
    group.add_argument(
        "--weights",
        help="imagenet (downloaded once, 58 MB for VGG16), "
        "random (tests; codes carry no visual meaning) or a weights file [imagenet]",
    )
    group.add_argument(
        "--precision", choices=PRECISIONS, help="fp32, or bf16 mixed precision [fp32]"
    )
    group.add_argument(
        "--center",
        help="centre file from `imgenc fit-center` (subtracted from the features before hashing)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            *MODEL_FLAGS,
            "batch",
            "decode_threads",
            "shard_size",
            "broker_url",
            "chunk",
            "queue",
            "image_root",
        )
    }
    return Settings.from_env(overrides)


def cmd_encode(args: argparse.Namespace) -> int:
    from encoder.local_run import encode_folder
    from encoder.model import WeightsUnavailable
    from encoder.spec import SpecMismatch
    from encoder.storage import StorageError

    settings = settings_from_args(args)
    try:
        summary = encode_folder(
            args.image_dir, args.out, settings, resume=args.resume, progress=not args.no_progress
        )
    except (WeightsUnavailable, SpecMismatch, NotADirectoryError, FileNotFoundError) as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(
            f"imgenc: error: {exc}. Every shard written so far is complete and listed in "
            f"{args.out}/parts; free space and rerun with --resume.",
            file=sys.stderr,
        )
        return 2
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        print("interrupted: rerun with --resume to encode the rest", file=sys.stderr)
        return 130
    if args.strict and summary.failed:
        return 1
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from encoder.show import render

    try:
        path = render(args.dest, args.image_id, args.png, image_root=args.image_root)
    except (KeyError, ValueError) as exc:
        print(f"imgenc: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgenc",
        description="Encode image collections into LSH binary codes (VGG16 + hyperplanes).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    encode = sub.add_parser("encode", help="encode a folder on this machine (no services needed)")
    encode.add_argument("image_dir")
    encode.add_argument("--out", required=True, help="destination directory or s3://bucket/prefix")
    add_model_args(encode)
    encode.add_argument("--batch", type=int, help="images per model call [32]")
    encode.add_argument("--decode-threads", type=int, help="image decoding threads [2]")
    encode.add_argument("--shard-size", type=int, help="codes per shard file [1024]")
    encode.add_argument(
        "--resume",
        action="store_true",
        help="skip images already ok in --out (same path, size and mtime)",
    )
    encode.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode.set_defaults(func=cmd_encode)

    show = sub.add_parser("show", help="draw an image beside its code as a bit matrix")
    show.add_argument("dest")
    show.add_argument("image_id", help="id as in manifest.csv (or its file name)")
    show.add_argument("--png", required=True, help="output PNG file")
    show.add_argument("--image-root", help="where the images are now, if they moved")
    show.set_defaults(func=cmd_show)

    try:
        from producer.cli import add_producer_commands
    except ImportError:
        pass
    else:
        add_producer_commands(sub, add_model_args)
    try:
        from encoder.fit_center import add_fit_center_command
    except ImportError:
        pass
    else:
        add_fit_center_command(sub, add_model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="imgenc: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
