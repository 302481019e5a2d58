"""Counting what a job did: images enqueued, manifest rows, lost, duplicated, re-executed,
and whether every code in the destination is the code of the image its row names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from encoder.codes import load_codes
from encoder.manifest import PARTS_PREFIX, csv_to_rows, read_manifest
from encoder.storage import open_storage


def audit(dest: str, enqueued: list[str], registry, job_ids: list[str]) -> dict:
    storage = open_storage(dest)
    rows = read_manifest(storage)
    ids = [r["id"] for r in rows]
    part_rows = 0
    for key in storage.list(PARTS_PREFIX):
        part_rows += len(csv_to_rows(storage.get(key)))
    attempts = chunks = 0
    for job_id in job_ids:
        attempts += sum(int(v) for v in registry.r.hvals(f"imgenc:job:{job_id}:attempts"))
        chunks += int(registry.r.hget(f"imgenc:job:{job_id}", "chunks") or 0)
    return {
        "enqueued": len(enqueued),
        "manifest_rows": len(rows),
        "lost": len(set(enqueued) - set(ids)),
        "duplicate_rows": len(ids) - len(set(ids)),
        "rows_written_in_parts": part_rows,
        "re_executions": attempts - chunks,
        "statuses": sorted({r["status"] for r in rows}),
    }


def codes_match_a_fresh_local_encode(dest: str, image_dir: Path, **model) -> bool:
    """Every stored code equals the code the embedded path computes for the same image."""
    from encoder.local_run import encode_folder
    from encoder.settings import Settings

    ids, codes = load_codes(dest)
    local = image_dir.parent / (image_dir.name + "-reference")
    encode_folder(image_dir, str(local), Settings.from_env(model, environ={}), progress=False)
    ref_ids, ref_codes = load_codes(local)
    position = {i: n for n, i in enumerate(ref_ids)}
    return bool(len(ids)) and all(
        np.array_equal(codes[n], ref_codes[position[i]]) for n, i in enumerate(ids)
    )
