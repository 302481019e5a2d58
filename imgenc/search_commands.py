"""``imgenc search``, ``similar``, ``dedup``, ``index`` and ``serve``: the query half, over
a destination that ``imgenc encode`` or the workers wrote."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable
from typing import Any

AddModelArgs = Callable[[argparse.ArgumentParser], None]


def _bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` from ``low`` to ``high`` (inclusive)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {span}")
        return value

    return parse


def _open_index(args: argparse.Namespace) -> Any:
    from search import Index

    return Index.open(args.dest, kind=getattr(args, "kind", None))


def _error(message: object) -> int:
    print(f"imgenc: error: {message}", file=sys.stderr)
    return 2


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A destination without codes, a spec mismatch or a storage error is one line."""

    def run(args: argparse.Namespace) -> int:
        from encoder.model import WeightsUnavailable
        from encoder.spec import SpecMismatch
        from encoder.storage import StorageError

        try:
            return func(args)
        except KeyError as exc:
            return _error(f"{args.dest} holds no codes (no spec.json): {exc.args[0]}")
        except (SpecMismatch, WeightsUnavailable, StorageError, ValueError) as exc:
            return _error(exc)
        except FileNotFoundError as exc:  # a --weights file that is not there
            return _error(exc.args[0] if exc.args else exc)
        except Exception as exc:  # a search engine that refused or went away
            from search.milvus_backend import MilvusUnavailable

            if isinstance(exc, MilvusUnavailable) or type(exc).__module__.startswith(
                ("pymilvus", "grpc")
            ):
                return _error(f"Milvus: {exc}")
            raise

    return run


def _print_neighbours(query: str, status: str, error: str, results: list[dict]) -> None:
    print(f"{query}: {status}" + (f" ({error})" if error else ""))
    for rank, r in enumerate(results, 1):
        print(f"  {rank:>3}  {r['distance']:>6}  {r['id']}")


def cmd_search(args: argparse.Namespace) -> int:
    index = _open_index(args)
    encoder = index.embedded_encoder(weights=args.query_weights)
    answers = index.query(args.images, args.k, encoder=encoder)
    for answer in answers:
        if args.json:
            print(json.dumps(answer.to_json(), ensure_ascii=False))
        else:
            _print_neighbours(answer.query, answer.status, answer.error, answer.results)
    return 0 if all(a.status == "ok" for a in answers) else 1


def cmd_similar(args: argparse.Namespace) -> int:
    index = _open_index(args)
    if args.image_id not in index:
        return _error(f"no image {args.image_id!r} among the {len(index)} ok images of {args.dest}")
    found = index.similar(args.image_id, args.k).to_json()
    if args.json:
        print(
            json.dumps(
                {"query": args.image_id, "status": "ok", "results": found}, ensure_ascii=False
            )
        )
    else:
        _print_neighbours(args.image_id, "ok", "", found)
    return 0


def _fit(args: argparse.Namespace, index: Any) -> Any:
    """Fit ``index``'s near-duplicate threshold with its own model, built here."""
    from search.duplicate_fit import fit_destination

    settings = args.settings
    encoder = index.embedded_encoder(weights=getattr(args, "query_weights", None)).encoder
    return fit_destination(
        index,
        encoder,
        settings.dedup_kinds.split(","),
        settings.dedup_false_pairs,
        image_root=settings.image_root,
        progress=not args.no_progress,
    )


def cmd_fit_dedup(args: argparse.Namespace) -> int:
    from search.catalogue import CatalogueImages
    from search.duplicate_fit import MIN_IMAGES

    index = _open_index(args)
    if len(index) >= MIN_IMAGES:
        images = CatalogueImages(index, args.settings.image_root)
        first = index.first_id()
        if first is not None and not images.reachable(first):
            loader = images.loader(first)
            where = loader.root if loader else "(no image root recorded)"
            return _error(
                f"the images of {args.dest} are not where its manifest says ({first!r} under "
                f"{where}): pass --image-root DIR where they are now"
            )
    fit = _fit(args, index)
    print(f"{args.dest}: {fit.summary()}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from search.catalogue import CatalogueImages
    from search.duplicate_fit import NoThreshold, TooFewImages
    from search.duplicates import find_duplicates

    index = _open_index(args)
    engine = index.remote  # pairs by the engine's range search, an image at a time
    bar = tqdm(  # shown only for a search of more than 2 s
        desc="dedup: " + ("images searched" if engine else "LSH tables"),
        unit="image" if engine else "table",
        total=len(index) if engine else None,
        disable=args.no_progress,
        leave=False,
        delay=2,
    )

    def groups_of() -> Any:
        features = not args.no_features
        return find_duplicates(index, args.max_distance, features=features, progress=bar.update)

    try:
        groups = groups_of()
    except NoThreshold:
        # An older destination, or one fitted for other codes: fit now if its images and
        # its model can be reached, else say how.
        first = index.first_id()
        if first is None or not CatalogueImages(index, args.settings.image_root).reachable(first):
            return _error(
                f"{args.dest} has no near-duplicate threshold fitted for its codes, and its "
                f"images cannot be read here to fit one: run `imgenc fit-dedup {args.dest} "
                "--image-root DIR` where they are, or pass --max-distance"
            )
        print(
            f"no near-duplicate threshold fitted for {args.dest} yet: fitting one", file=sys.stderr
        )
        try:
            _fit(args, index)
        except TooFewImages as exc:
            return _error(f"{exc}; pass --max-distance")
        groups = groups_of()
    finally:
        bar.close()
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            f.write(groups.to_csv())
        print(f"groups written to {args.out}")
    if groups.threshold is not None:
        print(f"threshold: {groups.threshold.summary()}")
    print(groups.summary())
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    index = _open_index(args)
    d = index.describe()
    if index.remote:
        backend = index.backend
        print(
            f"{args.dest}: {d['images']} images in the Milvus collection "
            f"{backend.collection} at {backend.uri} ({backend.index_type}, "
            f"{d['code_bytes']}-byte codes), in step with the manifest"
        )
        return 0
    print(
        f"{args.dest}: {d['images']} images in a {d['kind']} index "
        f"({d['code_bytes']}-byte codes, {d['segments']} segments, {d['deleted']} deleted "
        f"images remembered), saved under {args.dest}/index/"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from search.admission import DecodeLanes
    from search.service import SearchService, create_app, is_loopback, serve

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            return _error("--auth takes USER:PASSWORD")
        auth = (user, password)
    elif not is_loopback(args.host) and not args.no_auth:
        return _error(
            f"--host {args.host} serves beyond this machine: add --auth USER:PASSWORD "
            "(or --no-auth if something in front of it authenticates)"
        )
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        return _error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    index = _open_index(args)
    settings = args.settings
    if args.workers:
        from producer.remote_encoder import RemoteQueryEncoder

        encoder: Any = RemoteQueryEncoder(settings, index.spec, timeout=args.query_timeout)
    else:
        encoder = index.embedded_encoder(weights=args.query_weights)
        encoder.warm_up()
    lanes = DecodeLanes(
        threads=args.decode_threads, heavy_mpx=args.heavy_mpx, heavy_uploads=args.heavy_uploads
    )
    service = SearchService(
        index,
        encoder,
        image_root=settings.image_root,
        refresh_seconds=args.refresh_seconds,
        lanes=lanes,
    )
    app = create_app(
        service,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        auth=auth,
        query_timeout=args.query_timeout + 5,
        max_images=args.max_images,
    )
    mode = "Celery workers" if args.workers else "this process"
    print(
        f"serving {len(index)} images of {args.dest} on http://{args.host}:{args.port}/ "
        f"(queries encoded by {mode})",
        file=sys.stderr,
        flush=True,
    )
    serve(app, args.host, args.port)
    return 0


def add_commands(sub: argparse._SubParsersAction, add_model_args: AddModelArgs) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("dest", help="destination directory or s3://bucket/prefix")
        parser.add_argument("-k", type=_bounded(int, 1), default=10, help="results per query [10]")
        parser.add_argument("--json", action="store_true", help="JSON Lines, one per query")

    def query_weights(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--weights",
            dest="query_weights",
            help="the weights file the codes were made with, when they were made with one",
        )

    def fit_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dedup-kinds",
            help="the kinds of copy that count as duplicates "
            "[jpeg,half,crop,rotate,bright,grey,mirror]",
        )
        parser.add_argument(
            "--dedup-false-pairs",
            type=_bounded(float, 0.0001, 0.49),
            help="the share of distinct images the fitted threshold may pair [0.01]",
        )
        parser.add_argument("--image-root", help="where the images are, if they moved")
        parser.add_argument("--no-progress", action="store_true")
        query_weights(parser)

    search = sub.add_parser("search", help="the nearest catalogue images to query photos")
    common(search)
    search.add_argument("images", nargs="+", metavar="IMAGE")
    query_weights(search)
    search.set_defaults(func=_guarded(cmd_search))

    similar = sub.add_parser("similar", help="the nearest images to a catalogue image")
    common(similar)
    similar.add_argument("image_id", help="id as in manifest.csv")
    similar.set_defaults(func=_guarded(cmd_similar))

    dedup = sub.add_parser("dedup", help="near-duplicate groups, and the files that could go")
    dedup.add_argument("dest")
    dedup.add_argument(
        "--max-distance",
        type=_bounded(int, 0),
        help="most bits two copies may differ by [the threshold fitted on DEST's own images]",
    )
    dedup.add_argument("--out", help="CSV of the groups: group, id, distance to the kept image")
    dedup.add_argument(
        "--no-features",
        action="store_true",
        help="codes alone: do not re-score the pairs near the threshold with DEST's float "
        "features (kept with --features)",
    )
    fit_flags(dedup)
    dedup.set_defaults(func=_guarded(cmd_dedup))

    fit = sub.add_parser(
        "fit-dedup",
        help="fit DEST's near-duplicate threshold on its own images (with its own model)",
    )
    fit.add_argument("dest")
    fit_flags(fit)
    fit.set_defaults(func=_guarded(cmd_fit_dedup))

    index = sub.add_parser("index", help="build or update the search index of a destination")
    index.add_argument("dest")
    index.add_argument(
        "--kind",
        choices=("flat", "hnsw", "milvus"),
        help="exact (flat) or HNSW faiss segments under DEST/index/, or a Milvus collection "
        "(IMGENC_MILVUS_URI) [the kind DEST has, else flat]",
    )
    index.set_defaults(func=_guarded(cmd_index))

    serve = sub.add_parser("serve", help="the search service and its results page")
    serve.add_argument("dest")
    serve.add_argument("--host", default="127.0.0.1", help="[127.0.0.1: this machine only]")
    serve.add_argument("--port", type=_bounded(int, 1, 65535), default=8000)
    serve.add_argument("--auth", metavar="USER:PASSWORD", help="HTTP basic auth")
    serve.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host bare")
    serve.add_argument(
        "--workers",
        action="store_true",
        help="encode query images on the Celery workers (IMGENC_BROKER_URL) instead of here",
    )
    serve.add_argument(
        "--max-upload-mb", type=_bounded(float, 0.001), default=20.0, help="upload cap [20]"
    )
    serve.add_argument(
        "--max-images",
        type=_bounded(int, 1, 64),
        default=32,
        help="images per POST /encode request [32]",
    )
    serve.add_argument(
        "--query-timeout", type=_bounded(float, 0.1), default=30.0, help="s to wait for a worker"
    )
    serve.add_argument("--image-root", help="where the catalogue images are, for thumbnails")
    serve.add_argument(
        "--refresh-seconds",
        type=_bounded(float, 0),
        default=30.0,
        help="how often to take in what new jobs added to DEST [30; 0: never]",
    )
    serve.add_argument(
        "--decode-threads",
        type=_bounded(int, 1, 256),
        help="threads decoding uploads (heavy ones get half, at least 1) [the core count]",
    )
    serve.add_argument(
        "--heavy-mpx",
        type=_bounded(float, 0.01),
        default=16.0,
        help="an upload decoding more megapixels than this (PNG, TIFF...; JPEGs decode at "
        "reduced scale) takes the heavy lane [16]",
    )
    serve.add_argument(
        "--heavy-uploads",
        type=_bounded(int, 1, 1024),
        default=4,
        help="heavy uploads decoding or waiting at most; beyond, 503 with Retry-After [4]",
    )
    query_weights(serve)
    serve.set_defaults(func=_guarded(cmd_serve))
