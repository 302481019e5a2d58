"""``python -m bench.resume_unchanged [-n 100000] [--s3]``: what a nightly ``imgenc encode
--resume`` costs when nothing changed.

Makes ``n`` small image files (in folders of 1,000) and a destination that holds every one
of them as ``ok`` (written as ``imgenc encode`` writes it: the spec, a shard and a manifest
part per 1,024 images, the merged ``manifest.csv``; the codes are zeros, since nothing is
decoded on this path), then times:

- ``encode_folder(..., resume=True)`` in this process, with the model already built (the
  scan, the manifest read, the deletion check);
- ``imgenc encode DIR --out DEST --resume`` as a user runs it (Python and TensorFlow
  start-up and the stub model build on top).

With ``--s3`` the destination is also put in a SeaweedFS S3 server (``weed``, as the tests
start it) and the S3 requests of both runs are counted: by operation in this process
(botocore's events), in total for the command (a counting proxy in front of the server).
Nothing is asserted; the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

STUB = {"backbone": "stub", "weights": "random", "layout": "pooled", "bits": 64}
MODEL_FLAGS = ["--backbone", "stub", "--weights", "random", "--layout", "pooled", "--bits", "64"]
PER_FOLDER = 1000
SHARD = 1024


def make_files(folder: Path, n: int) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buffer, "JPEG")
    data = buffer.getvalue()
    for i in range(n):
        sub = folder / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.jpg").write_bytes(data)


def make_destination(folder: Path, dest: str) -> None:
    """The destination a full ``imgenc encode`` of ``folder`` would leave, without encoding."""
    from encoder.manifest import CODES_PREFIX, PARTS_PREFIX, merge_manifest, rows_to_csv
    from encoder.scan import scan_images
    from encoder.spec import spec_for
    from encoder.storage import open_storage
    from encoder.writer import ensure_spec, npy_bytes, shard_name
    from tests.helpers import make_settings

    spec = spec_for(make_settings(**STUB))
    storage = open_storage(dest)
    ensure_spec(storage, spec)
    root = os.path.realpath(folder).rstrip("/") + "/"
    entries = sorted(scan_images(folder), key=lambda e: e.id)
    for number, start in enumerate(range(0, len(entries), SHARD)):
        chunk = entries[start : start + SHARD]
        name = shard_name("local-bench", number)
        shard_key = f"{CODES_PREFIX}/{name}.npy"
        storage.put(shard_key, npy_bytes(np.zeros((len(chunk), spec.bytes_per_code), np.uint8)))
        rows = [
            {
                "id": e.id, "path": root + e.id, "status": "ok", "sha256": "0" * 64,
                "size": str(e.size), "mtime_ns": str(e.mtime_ns), "width": "16", "height": "16",
                "shard": shard_key, "row": str(r), "job_id": "local-bench",
                "worker_host": "bench", "encoded_at": "2026-01-01T00:00:00.000000+00:00",
            }
            for r, e in enumerate(chunk)
        ]  # fmt: skip
        storage.put(f"{PARTS_PREFIX}/{name}.csv", rows_to_csv(rows))
    merge_manifest(storage)


def count_s3_requests() -> Counter:
    """Count every S3 operation of boto3 clients made from now on in this process."""
    import boto3

    counts: Counter = Counter()
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(
        "before-call.s3", lambda model, **_: counts.update([model.name])
    )
    return counts


def time_in_process(folder: Path, dest: str) -> dict:
    from encoder.folder_run import encode_folder
    from tests.helpers import get_encoder, make_settings

    encoder = get_encoder(**STUB)
    start = time.perf_counter()
    summary = encode_folder(
        folder, dest, make_settings(**STUB), resume=True, progress=False, encoder=encoder
    )
    seconds = time.perf_counter() - start
    assert summary.processed == 0 and summary.deleted == 0, summary.lines()
    return {"seconds": round(seconds, 2), "skipped": summary.skipped}


def time_command(folder: Path, dest: str, env: dict[str, str]) -> dict:
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "imgenc", "encode", str(folder), "--out", dest, "--resume",
         "--no-progress", *MODEL_FLAGS],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    return {"seconds": round(seconds, 2), "stdout": run.stdout.strip().splitlines()[:1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume_unchanged")
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--s3", action="store_true", help="also an s3:// destination (weed)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGENC_")}
    figures: dict = {"images": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        folder, dest = Path(tmp) / "images", str(Path(tmp) / "codes")
        start = time.perf_counter()
        make_files(folder, args.n)
        make_destination(folder, dest)
        figures["setup_seconds"] = round(time.perf_counter() - start, 1)
        figures["manifest_bytes"] = os.path.getsize(Path(dest) / "manifest.csv")
        figures["local_in_process"] = time_in_process(folder, dest)
        figures["local_command"] = time_command(folder, dest, env)
        if args.s3:
            from tests.helpers import FaultyProxy, SeaweedS3

            server = SeaweedS3(Path(tmp) / "weed").start()
            try:
                server.client().create_bucket(Bucket="codes")
                os.environ.update(server.env())
                s3_dest = "s3://codes/catalogue"
                make_destination(folder, s3_dest)
                counts = count_s3_requests()
                figures["s3_in_process"] = time_in_process(folder, s3_dest)
                figures["s3_in_process"]["requests"] = dict(counts)
                with FaultyProxy(server.port, 0.0) as proxy:
                    command_env = {**env, **server.env(), "AWS_ENDPOINT_URL": (
                        f"http://127.0.0.1:{proxy.port}")}  # fmt: skip
                    figures["s3_command"] = time_command(folder, s3_dest, command_env)
                    figures["s3_command"]["requests"] = proxy.requests
            finally:
                server.stop()
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
