"""``imgenc``: the parser, the flags shared by every command, and ``main``.

Every setting flag can also be given as an ``IMGENC_*`` environment variable (flag >
environment > default): the command builds its ``Settings`` once, from this process's
environment with the flags on top.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from encoder.backbones import BACKBONES
from encoder.settings import LAYOUTS, PRECISIONS, RUNTIMES, Settings, process_settings
from imgenc import local_commands, queue_commands, search_commands


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
    group.add_argument(
        "--seed", type=int, help="seed of the hyperplanes (and of --weights random) [628]"
    )
    group.add_argument(
        "--weights",
        help="imagenet (downloaded once, 58 MB for VGG16), "
        "random (tests; codes carry no visual meaning) or a weights file [imagenet]",
    )
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="tensorflow, or openvino for CPU workers (pip install 'imgenc[openvino]') "
        "[tensorflow]",
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, bf16, or int8 (openvino, with --calibration) [fp32]",
    )
    group.add_argument("--calibration", help="int8: the calibration sample from `imgenc calibrate`")
    group.add_argument(
        "--center",
        help="centre file from `imgenc fit-center` (subtracted from the features before hashing)",
    )
    group.add_argument(
        "--planes",
        help="hyperplanes fitted by `imgenc fit-planes` (their bits, offset and planes)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """This process's settings: the environment's, with the command's flags on top."""
    return process_settings().override(vars(args), ignore_unknown=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgenc",
        description="Encode image collections into LSH binary codes (VGG16 + hyperplanes).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    local_commands.add_commands(sub, add_model_args)
    queue_commands.add_commands(sub, add_model_args)
    search_commands.add_commands(sub, add_model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="imgenc: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.settings = settings_from_args(args)
    except ValueError as exc:  # a bad flag or IMGENC_* value
        parser.error(str(exc))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
