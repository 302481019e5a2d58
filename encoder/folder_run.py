"""``encode_folder``: the embedded way of running (``imgenc encode``), with no services.

A folder scan hands out the ids; ``Runner`` reads, encodes and writes them with a
``ShardWriter`` that cuts shards by size and age; the manifest is merged at the end.  The
Celery worker runs the same ``Runner`` on the ids of a task message instead.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from encoder.features import feature_mapper, plan_features
from encoder.images import ImageLoader
from encoder.manifest import merge_manifest, status_counts
from encoder.progress import TqdmProgress
from encoder.runner import Runner, RunStats
from encoder.scan import scan_images
from encoder.settings import Settings
from encoder.spec import spec_for
from encoder.storage import StorageError, open_storage
from encoder.writer import ShardWriter, check_spec, open_destination

log = logging.getLogger("imgenc")


@dataclass
class RunSummary(RunStats):
    skipped: int = 0  # already done in DEST (--resume)
    features: bool = False  # the pooled float features were written too

    def lines(self) -> list[str]:
        head = "interrupted" if self.interrupted else "done"
        lines = [
            f"{head}: {self.processed} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} img/s; {self.stage_line()}), "
            f"{self.skipped} already done"
        ]
        return lines + self.count_lines()


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"local-{stamp}-{secrets.token_hex(2)}"


def check_destination(image_dir: str | Path, dest: str, settings: Settings) -> None:
    """Refuse, before a model is built, a folder that is not one or a destination of
    another spec (read-only: nothing is written)."""
    if not Path(image_dir).is_dir():
        raise NotADirectoryError(f"{image_dir} is not a directory")
    check_spec(open_storage(dest), spec_for(settings))


def encode_folder(
    image_dir: str | Path,
    dest: str,
    settings: Settings,
    resume: bool = False,
    progress: bool = True,
    encoder: Any | None = None,
    features: bool = False,
) -> RunSummary:
    """Encode every image under ``image_dir`` into ``dest``; see ``imgenc encode --help``.
    ``features`` also writes the pooled float features (``encoder.features``); a
    destination that has them keeps getting them."""
    from encoder.runtime import load_encoder

    image_dir = Path(image_dir)
    check_destination(image_dir, dest, settings)
    spec = spec_for(settings)
    # Built before anything is written: a model that cannot be built (no ImageNet
    # download, a missing runtime) leaves the destination as it was.
    enc = encoder if encoder is not None else load_encoder(settings)
    storage, skip = open_destination(dest, spec, settings, resume)
    plan = plan_features(storage, features)
    if plan.lacking:
        plan.check_reachable({e.id for e in scan_images(image_dir)}, str(image_dir))
        skip = plan.adjust_skip(skip)
    plan.accept()
    todo = sum(1 for e in scan_images(image_dir) if e.resume_key not in skip)
    writer = ShardWriter(
        storage,
        spec,
        new_run_id(),
        settings.shard_size,
        settings.flush_seconds,
        features=plan.on,
    )
    bar = TqdmProgress(todo, progress)
    mapper, empty = feature_mapper(enc) if plan.on else (enc.encode, enc.empty_codes)
    runner = Runner(
        ImageLoader(image_dir, enc.input_size),
        mapper,
        writer,
        empty,
        settings.batch,
        settings.decode_threads,
        bar,
    )
    skipped = 0

    def ids() -> Iterator[str]:
        nonlocal skipped
        for entry in scan_images(image_dir):
            if entry.resume_key in skip:
                skipped += 1
            else:
                yield entry.id

    try:
        stats = runner.run(ids())
    finally:
        bar.close()
        try:
            rows = merge_manifest(storage)
            log.info("manifest: %d rows, %s", len(rows), status_counts(rows))
        except StorageError as exc:
            # The parts already written are consistent (each names a shard that is there);
            # load_codes reads them, and --resume goes on from them.
            log.error(
                "manifest.csv not merged (%s); the parts under %s/parts are complete "
                "and consistent",
                exc,
                dest,
            )
    return RunSummary(**vars(stats), skipped=skipped, features=plan.on)
