"""``imgenc encode``, ``imgenc show`` and ``imgenc fit-center``: work on this machine, with
the ``encoder`` library alone (no services, no Celery)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

AddModelArgs = Callable[[argparse.ArgumentParser], None]


def cmd_encode(args: argparse.Namespace) -> int:
    from encoder.folder_run import check_destination, encode_folder
    from encoder.model import WeightsUnavailable
    from encoder.openvino_runtime import RuntimeUnavailable
    from encoder.runtime import load_encoder
    from encoder.spec import SpecMismatch
    from encoder.storage import StorageError

    try:
        check_destination(args.image_dir, args.out, args.settings)
        encoder = load_encoder(args.settings)
        summary = encode_folder(
            args.image_dir,
            args.out,
            args.settings,
            resume=args.resume,
            progress=not args.no_progress,
            encoder=encoder,
            features=args.features,
            accept_deletions=args.accept_deletions,
        )
    except (
        WeightsUnavailable,
        RuntimeUnavailable,
        SpecMismatch,
        NotADirectoryError,
        FileNotFoundError,
        ValueError,
    ) as exc:
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
    if summary.features:
        print(features_line(encoder.spec, args.out))
    if summary.interrupted:
        print("interrupted: rerun with --resume to encode the rest", file=sys.stderr)
        return 130
    if not args.no_dedup_fit and (summary.processed or summary.deleted or not args.resume):
        fit_after_encode(args, encoder)  # (a resume that changed nothing leaves the fit)
    if args.strict and summary.failed:
        return 1
    return 0


def features_line(spec: object, dest: str) -> str:
    from encoder.features import feature_bytes

    size = feature_bytes(spec)
    return (
        f"features: {size // 2} float16 values ({size:,} B) per ok image in {dest}/features, "
        "row-aligned with the codes (encoder.load_features)"
    )


def fit_after_encode(args: argparse.Namespace, encoder: object) -> None:
    """Fit the destination's near-duplicate threshold with the model just used, unless a
    fit of nearly as many images is there; a failure is reported, never fatal."""
    from search import Index
    from search.duplicate_fit import TooFewImages, fit_destination, fit_is_current

    settings = args.settings
    try:
        index = Index.open(args.out)
        if fit_is_current(index):
            return
        fit = fit_destination(
            index,
            encoder,
            settings.dedup_kinds.split(","),
            settings.dedup_false_pairs,
            progress=not args.no_progress,
        )
    except TooFewImages as exc:
        print(f"near-duplicates: no threshold fitted: {exc}; imgenc dedup needs --max-distance")
        return
    except Exception as exc:  # noqa: BLE001  (the codes are written; only the fit failed)
        print(
            f"imgenc: warning: near-duplicate threshold not fitted ({type(exc).__name__}: {exc}); "
            f"retry with imgenc fit-dedup {args.out}",
            file=sys.stderr,
        )
        return
    print(f"near-duplicates: {fit.summary()}")


def cmd_show(args: argparse.Namespace) -> int:
    from encoder.show import render

    try:
        path = render(args.dest, args.image_id, args.png, image_root=args.settings.image_root)
    except (KeyError, ValueError) as exc:
        print(f"imgenc: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from encoder.calibrate import calibration_sample, save_calibration

    try:
        pixels, ids = calibration_sample(
            args.image_dir, args.settings, args.sample, not args.no_progress
        )
    except ValueError as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    save_calibration(args.out, pixels, ids)
    size = pixels.shape[1]
    print(
        f"{args.out}: {len(ids)} images at {size}x{size} for {args.settings.backbone}; use it "
        f"with --runtime openvino --precision int8 --calibration {args.out}"
    )
    return 0


def cmd_fit_planes(args: argparse.Namespace) -> int:
    from encoder.fit_planes import fit_planes
    from encoder.model import WeightsUnavailable

    try:
        fitted = fit_planes(
            args.image_dir, args.settings, args.method, args.sample, not args.no_progress
        )
    except (WeightsUnavailable, ValueError) as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    fitted.save(args.out)
    info = fitted.info
    print(
        f"{args.out}: {info.method} planes, {info.bits} bits ({(info.bits + 7) // 8} bytes per "
        f"{'position' if info.layout == 'spatial' else 'image'}) for {info.backbone} "
        f"{info.layout}, fitted on {info.images} images ({info.vectors} feature vectors); "
        f"use it with --planes {args.out}"
    )
    return 0


def cmd_fit_center(args: argparse.Namespace) -> int:
    from encoder.centering import save_center
    from encoder.fit_center import fit_center
    from encoder.model import WeightsUnavailable

    settings = args.settings
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


def add_commands(sub: argparse._SubParsersAction, add_model_args: AddModelArgs) -> None:
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
        help="skip images already ok in --out (same path, size and mtime), and record as "
        "deleted those of this folder it holds that are gone",
    )
    encode.add_argument(
        "--accept-deletions",
        action="store_true",
        help="with --resume: record the deletions even when the folder lost every image, "
        "or more than half of them (20 or more) at once; refused otherwise",
    )
    encode.add_argument(
        "--strict", action="store_true", help="exit 1 if any image failed (deleted is no failure)"
    )
    encode.add_argument(
        "--features",
        action="store_true",
        help="also keep the pooled float features, float16 features/<shard>.npy (sticks "
        "to the destination; on one without them, fills them for its ok images)",
    )
    encode.add_argument(
        "--no-dedup-fit",
        action="store_true",
        help="do not fit the near-duplicate threshold on the destination at the end",
    )
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode.set_defaults(func=cmd_encode)

    show = sub.add_parser("show", help="draw an image beside its code as a bit matrix")
    show.add_argument("dest")
    show.add_argument("image_id", help="id as in manifest.csv (or its file name)")
    show.add_argument("--png", required=True, help="output PNG file")
    show.add_argument("--image-root", help="where the images are now, if they moved")
    show.set_defaults(func=cmd_show)

    calibrate = sub.add_parser(
        "calibrate", help="keep a calibration sample for --precision int8 (OpenVINO)"
    )
    calibrate.add_argument("image_dir")
    calibrate.add_argument("--out", required=True, help="where to save the sample (.npz)")
    calibrate.add_argument("--sample", type=int, default=64, help="images in the sample [64]")
    calibrate.add_argument("--no-progress", action="store_true")
    add_model_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    planes = sub.add_parser(
        "fit-planes", help="fit the hyperplanes on a sample of the catalogue, for --planes"
    )
    planes.add_argument("image_dir", help="a sample of the catalogue (its first images are used)")
    planes.add_argument("--out", required=True, help="where to save the planes (.npz)")
    planes.add_argument(
        "--method",
        choices=("itq", "center"),
        default="itq",
        help="itq: PCA then ITQ's learned rotation; center: the seed's random planes, "
        "centred [itq]",
    )
    planes.add_argument("--sample", type=int, default=20000, help="images to fit on [20000]")
    planes.add_argument("--batch", type=int)
    planes.add_argument("--no-progress", action="store_true")
    add_model_args(planes)
    planes.set_defaults(func=cmd_fit_planes)

    fit = sub.add_parser(
        "fit-center",
        help="compute the mean feature for --center (fit-planes --method center does the "
        "same in a planes file)",
    )
    fit.add_argument("image_dir")
    fit.add_argument("--out", required=True, help="where to save the centre (.npy)")
    fit.add_argument("--sample", type=int, default=2000, help="images to average [2000]")
    fit.add_argument("--batch", type=int)
    fit.add_argument("--no-progress", action="store_true")
    add_model_args(fit)
    fit.set_defaults(func=cmd_fit_center)
