"""``imgenc enqueue``, ``imgenc status`` and ``imgenc jobs``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime

from encoder.settings import DEFAULT_BROKER_URL


def _broker(args: argparse.Namespace) -> str:
    return args.broker or os.environ.get("IMGENC_BROKER_URL") or DEFAULT_BROKER_URL


def _exit_code(status, strict: bool) -> int:
    return 1 if strict and status.failed else 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    from encoder.cli import settings_from_args
    from encoder.spec import SpecMismatch
    from producer.enqueue import EnqueueInterrupted, enqueue

    args.broker_url = _broker(args)
    settings = settings_from_args(args)
    stop = threading.Event()  # Ctrl-C / SIGTERM: stop at the next chunk boundary
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        job = enqueue(
            args.image_dir,
            args.out,
            settings=settings,
            resume=args.resume,
            image_root=args.image_root,
            stop=stop,
        )
    except (SpecMismatch, NotADirectoryError, FileNotFoundError, ValueError) as exc:
        print(f"imgenc: error: {exc}", file=sys.stderr)
        return 2
    except EnqueueInterrupted as interrupted:
        print(interrupted.job_id, flush=True)
        print(
            f"interrupted: job {interrupted.job_id} holds the {interrupted.enqueued} images "
            "enqueued so "
            "far and will complete with them; run the same command with --resume to "
            "enqueue the rest",
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
    for line in status.lines():
        print(line)
    return _exit_code(status, args.strict)


def cmd_status(args: argparse.Namespace) -> int:
    from producer.enqueue import Job

    try:
        status = Job(args.job_id, _broker(args)).status()
    except KeyError as exc:
        print(f"imgenc: error: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        for line in status.lines():
            print(line)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from worker.registry import JobRegistry

    registry = JobRegistry.from_url(_broker(args))
    for job_id in registry.recent(args.limit):
        try:
            s = registry.status(job_id)
        except KeyError:
            continue
        state = "done" if s.done else ("enqueueing" if s.scanning else "running")
        created = datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{job_id}  {created}  {state:<10} {s.processed:>8}/{s.total:<8} "
            f"failed {s.failed:<6} {s.dest}"
        )
    return 0


def add_producer_commands(
    sub: argparse._SubParsersAction, add_model_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    enqueue = sub.add_parser("enqueue", help="enqueue a folder for the Celery workers")
    enqueue.add_argument("image_dir")
    enqueue.add_argument("--out", required=True, help="destination directory or s3://bucket/prefix")
    enqueue.add_argument("--broker", help=f"Redis URL [IMGENC_BROKER_URL or {DEFAULT_BROKER_URL}]")
    enqueue.add_argument("--chunk", type=int, help="images per task message [256]")
    enqueue.add_argument("--queue", help="Celery queue [imgenc]")
    enqueue.add_argument("--image-root", help="root the paths are sent relative to [IMAGE_DIR]")
    enqueue.add_argument(
        "--resume",
        action="store_true",
        help="enqueue only images the destination's manifest does not show ok",
    )
    enqueue.add_argument("--wait", action="store_true", help="follow the job until it is done")
    enqueue.add_argument(
        "--strict", action="store_true", help="with --wait: exit 1 if any image failed"
    )
    enqueue.add_argument("--no-progress", action="store_true")
    add_model_args(enqueue)
    enqueue.set_defaults(func=cmd_enqueue)

    status = sub.add_parser("status", help="progress of a job")
    status.add_argument("job_id")
    status.add_argument("--broker")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--broker")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)
