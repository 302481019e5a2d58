"""``imgenc encode``: the embedded way of running, with no services.

The folder scan hands out the work; ``encode_stream`` decodes and encodes; ``ShardWriter``
writes.  The Celery worker shares all of it except the scan.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from encoder.images import ImageLoader
from encoder.manifest import StatusTotals, merge_manifest, status_counts
from encoder.pipeline import encode_stream
from encoder.scan import scan_images
from encoder.settings import Settings
from encoder.spec import spec_for
from encoder.storage import StorageError
from encoder.writer import ShardWriter, open_destination

log = logging.getLogger("imgenc")


@dataclass
class RunSummary(StatusTotals):
    counts: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # already done in DEST (--resume)
    seconds: float = 0.0
    interrupted: bool = False

    def lines(self) -> list[str]:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        head = "interrupted" if self.interrupted else "done"
        lines = [
            f"{head}: {self.processed} images in {self.seconds:.1f} s ({rate:.2f} img/s), "
            f"{self.skipped} already done"
        ]
        return lines + self.count_lines()


def new_run_id() -> str:
    return (
        "local-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
    )


def encode_folder(
    image_dir: str | Path,
    dest: str,
    settings: Settings,
    resume: bool = False,
    progress: bool = True,
    encoder: object | None = None,
) -> RunSummary:
    """Encode every image under ``image_dir`` into ``dest``; see ``imgenc encode --help``."""
    from tqdm import tqdm

    from encoder.model import Encoder

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"{image_dir} is not a directory")
    spec = spec_for(settings)
    storage, skip = open_destination(dest, spec, settings.center, resume)
    todo = sum(1 for e in scan_images(image_dir) if e.resume_key not in skip)
    enc = encoder if encoder is not None else Encoder(settings)
    loader = ImageLoader(image_dir, enc.input_size)
    writer = ShardWriter(storage, spec, new_run_id(), settings.shard_size, settings.flush_seconds)
    summary = RunSummary()

    def ids():
        for entry in scan_images(image_dir):
            if entry.resume_key in skip:
                summary.skipped += 1
                continue
            yield entry.id

    bar = tqdm(
        total=todo,
        unit="img",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    )
    start = time.monotonic()
    failed = 0
    try:
        for results, codes in encode_stream(
            ids(),
            loader,
            enc.encode,
            settings.batch,
            settings.decode_threads,
            bytes_per_code=spec.bytes_per_code,
        ):
            writer.add(results, codes)
            bar.update(len(results))
            failed += sum(1 for r in results if not r.ok)
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
        writer.flush()
    except KeyboardInterrupt:
        # Whole batches already encoded are kept; the batch in flight is dropped.
        summary.interrupted = True
        writer.flush()
    finally:
        bar.close()
        summary.seconds = time.monotonic() - start
        summary.counts = dict(writer.counts)
        try:
            rows = merge_manifest(storage)
            log.info("manifest: %d rows, %s", len(rows), status_counts(rows))
        except StorageError as exc:
            # The parts already written are consistent (each names a shard that exists);
            # load_codes reads them, and --resume goes on from them.
            log.error(
                "manifest.csv not merged (%s); the parts under %s/parts are complete "
                "and consistent",
                exc,
                dest,
            )
    return summary
