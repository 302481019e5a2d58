"""``imgenc enqueue``, ``imgenc status`` and ``imgenc jobs``: the distributed path, through the
producer (Celery is imported only when one of these commands runs)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime

from encoder.settings import DEFAULT_BROKER_URL

AddModelArgs = Callable[[argparse.ArgumentParser], None]

EXIT_CODES = (
    "exit status with --wait: 0 when the job completed, 1 under --strict if any image "
    "failed, 3 when images could not be encoded for a setup reason (not found by the "
    "workers, or refused by workers of another spec), 130 when interrupted"
)


def broker_unreachable(func: Callable[[argparse.Namespace], int]):
    """Run a queue command; a broker that cannot be reached is one line, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from kombu.utils.url import maybe_sanitize_url
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            return func(args)
        except (ConnectionError, TimeoutError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            url = maybe_sanitize_url(args.settings.broker_url)
            print(f"imgenc: error: cannot reach the broker at {url}: {reason}", file=sys.stderr)
            return 2

    return run


def _print_status(status, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(status.to_dict(), indent=2))
        return
    for line in status.lines():
        print(line)


def cmd_enqueue(args: argparse.Namespace) -> int:
    from encoder.spec import SpecMismatch
    from producer.enqueue import EnqueueInterrupted, enqueue

    stop = threading.Event()  # Ctrl-C / SIGTERM: stop at the next chunk boundary
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        job = enqueue(
            args.image_dir,
            args.out,
            settings=args.settings,
            resume=args.resume,
            accept_deletions=args.accept_deletions,
            stop=stop,
            dedup_fit=not args.no_dedup_fit,
            features=args.features,
        )
    except (SpecMismatch, NotADirectoryError, FileNotFoundError, ValueError) as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    except EnqueueInterrupted as interrupted:
        print(interrupted.job_id, flush=True)
        print(
            f"interrupted: job {interrupted.job_id} holds the {interrupted.enqueued} images "
            "enqueued so far and will complete with them; run the same command with "
            "--resume to enqueue the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(job.id, flush=True)
    if not args.wait:
        return 0
    try:
        status = job.wait(progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"stopped waiting; job {job.id} goes on (imgenc status {job.id})", file=sys.stderr)
        return 130
    _print_status(status)
    return status.exit_code(args.strict)


def cmd_status(args: argparse.Namespace) -> int:
    from jobs.registry import JobRegistry

    try:
        status = JobRegistry.from_url(args.settings.broker_url).status(args.job_id)
    except KeyError as exc:
        print(f"imgenc: error: {exc.args[0]}", file=sys.stderr)
        return 2
    _print_status(status, args.json)
    return status.exit_code()  # 3, as --wait, once images could not be encoded for a setup reason


def cmd_jobs(args: argparse.Namespace) -> int:
    from jobs.registry import JobRegistry

    registry = JobRegistry.from_url(args.settings.broker_url)
    for job_id in registry.recent(args.limit):
        try:
            s = registry.status(job_id)
        except KeyError:
            continue
        state = "done" if s.done else ("enqueueing" if s.scanning else "running")
        created = datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M:%S")
        flag = "  PROBLEM" if s.problems() else ""
        print(
            f"{job_id}  {created}  {state:<10} {s.processed:>8}/{s.total:<8} "
            f"failed {s.failed:<6} {s.dest}{flag}"
        )
    return 0


def _add_broker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        dest="broker_url",
        help=f"Redis URL [IMGENC_BROKER_URL or {DEFAULT_BROKER_URL}]",
    )


def add_commands(sub: argparse._SubParsersAction, add_model_args: AddModelArgs) -> None:
    enqueue = sub.add_parser(
        "enqueue", help="enqueue a folder for the Celery workers", epilog=EXIT_CODES
    )
    enqueue.add_argument("image_dir")
    enqueue.add_argument("--out", required=True, help="destination directory or s3://bucket/prefix")
    _add_broker(enqueue)
    enqueue.add_argument("--chunk", type=int, help="images per task message [256]")
    enqueue.add_argument("--queue", help="Celery queue [imgenc]")
    enqueue.add_argument(
        "--image-root",
        help="root the paths are sent relative to [IMGENC_IMAGE_ROOT, else IMAGE_DIR]",
    )
    enqueue.add_argument(
        "--resume",
        action="store_true",
        help="enqueue only images the destination's manifest does not show ok, and record "
        "as deleted those under this folder it holds that are gone",
    )
    enqueue.add_argument(
        "--accept-deletions",
        action="store_true",
        help="with --resume: record the deletions even when the folder lost every image, "
        "or more than half of them (20 or more) at once; refused otherwise",
    )
    enqueue.add_argument("--wait", action="store_true", help="follow the job until it is done")
    enqueue.add_argument(
        "--features",
        action="store_true",
        help="the workers also keep the pooled float features, float16 features/<shard>.npy",
    )
    enqueue.add_argument(
        "--strict",
        action="store_true",
        help="with --wait: exit 1 if any image failed (deleted is no failure)",
    )
    enqueue.add_argument(
        "--no-dedup-fit",
        action="store_true",
        help="do not fit the near-duplicate threshold on the destination at the end",
    )
    enqueue.add_argument("--no-progress", action="store_true")
    add_model_args(enqueue)
    enqueue.set_defaults(func=broker_unreachable(cmd_enqueue))

    status = sub.add_parser("status", help="progress of a job, and what went wrong")
    status.add_argument("job_id")
    _add_broker(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=broker_unreachable(cmd_status))

    jobs = sub.add_parser("jobs", help="recent jobs")
    _add_broker(jobs)
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=broker_unreachable(cmd_jobs))
