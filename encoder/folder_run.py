"""``encode_folder``: the embedded way of running (``imgenc encode``), with no services.

A folder scan hands out the ids; ``Runner`` reads, encodes and writes them with a
``ShardWriter`` that cuts shards by size and age; the manifest is merged at the end.  The
Celery worker runs the same ``Runner`` on the ids of a task message instead.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from encoder.deletions import ScannedSet, check_deletions, record_deletions, vanished
from encoder.features import feature_mapper, plan_features
from encoder.images import ImageLoader
from encoder.manifest import DELETED
from encoder.merged import merge_manifest
from encoder.progress import TqdmProgress
from encoder.resume import ResumeKeys
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
        deleted = f", {self.deleted} marked deleted (gone from the folder)" if self.deleted else ""
        lines = [
            f"{head}: {self.processed} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} img/s; {self.stage_line()}), "
            f"{self.skipped} already done{deleted}"
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
    accept_deletions: bool = False,
) -> RunSummary:
    """Encode every image under ``image_dir`` into ``dest``; see ``imgenc encode --help``.
    ``features`` also writes the pooled float features (``encoder.features``); a
    destination that has them keeps getting them.

    With ``resume``, the images the destination holds under ``image_dir`` (by the
    manifest's ``path``) that the scan no longer finds are recorded ``deleted``
    (``encoder.deletions``), after ``check_deletions`` (``accept_deletions`` lifts its
    refusal of an emptied folder)."""
    from encoder.runtime import load_encoder

    image_dir = Path(image_dir)
    check_destination(image_dir, dest, settings)
    spec = spec_for(settings)
    # Built before anything is written: a model that cannot be built (no ImageNet
    # download, a missing runtime) leaves the destination as it was.
    enc = encoder if encoder is not None else load_encoder(settings)
    storage, previous, merged = open_destination(dest, spec, settings, resume)
    skip = ResumeKeys.of(previous)
    plan = plan_features(storage, features)
    skip = plan.adjust_skip(skip)
    run_id = new_run_id()
    # The manifest's paths are the loader's: the folder's real path, then the id.
    root_prefix = os.path.realpath(image_dir).rstrip("/") + "/"
    todo, skipped = 0, 0
    scanned_paths, scanned_ids = ScannedSet(), ScannedSet()
    for entry, done in skip.split(scan_images(image_dir)):
        skipped += done
        todo += not done
        if resume:
            scanned_paths.add(root_prefix + entry.id)
        if plan.needs_filling:
            scanned_ids.add(entry.id)
    gone = None
    if resume:
        gone, known = vanished(previous, scanned_paths, root_prefix, column="path")
        check_deletions(gone.num_rows, known, accept_deletions)  # before anything is written
    if plan.needs_filling:  # images gone now need no features; the others must be here
        if gone is not None:
            plan.forget(gone["id"])
        plan.check_reachable(scanned_ids, str(image_dir))
    del scanned_paths, scanned_ids, previous
    plan.accept()
    deleted = record_deletions(storage, gone, run_id) if gone is not None else 0
    if deleted:
        log.info("%d images gone from %s marked deleted", deleted, image_dir)
    if todo == 0 and not deleted and merged:
        # Nothing changed since the last merge: no second scan, no merge, nothing written.
        return RunSummary(skipped=skipped, features=plan.on)
    writer = ShardWriter(
        storage,
        spec,
        run_id,
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
        for entry, done in skip.split(scan_images(image_dir)):
            if done:
                skipped += 1
            else:
                yield entry.id

    try:
        stats = runner.run(ids())
    finally:
        bar.close()
        try:
            info = merge_manifest(storage)
            log.info("manifest: %d rows, %s", info.rows, info.counts)
        except StorageError as exc:
            # The parts already written are consistent (each names a shard that is there);
            # load_codes reads them, and --resume goes on from them.
            log.error(
                "manifest.csv not merged (%s); the parts under %s/parts are complete "
                "and consistent",
                exc,
                dest,
            )
    if deleted:
        stats.counts[DELETED] = deleted
    return RunSummary(**vars(stats), skipped=skipped, features=plan.on)
