"""Catalogues of millions on one machine, checked small: the streaming manifest merge keeps
the merge rule in bounded memory, keys never change, the index takes new parts, deletions
and re-encodes without a rebuild (and ends where a fresh build does), and the LSH pair
search finds what the exact scan finds."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from encoder import image_key, image_keys, iter_codes, load_codes, read_manifest
from encoder.deletions import record_deletions
from encoder.images import ImageStatus, LoadResult
from encoder.manifest import PARTS_PREFIX, rows_to_csv
from encoder.merged import merge_manifest
from encoder.settings import Settings
from encoder.spec import spec_for
from encoder.storage import LocalStorage, open_storage
from encoder.writer import ShardWriter, ensure_spec
from search import Index
from search.near_pairs import close_pairs
from search.segments import TIER
from tests.helpers import REPO

SPEC = spec_for(Settings(backbone="stub", layout="pooled", bits=64, weights="random"))


def reference_merge(parts: list[list[dict]]) -> dict[str, dict]:
    """The merge rule as the manifest's docstring states it, one row at a time."""
    best: dict[str, list] = {}
    for rows in parts:
        for row in rows:
            slot = best.setdefault(row["id"], [None, None])
            t = row["encoded_at"]
            if row["status"] in ("ok", "deleted"):
                if slot[0] is None or t >= slot[0][0]:
                    slot[0] = (t, row["status"] == "ok", row)
            elif slot[1] is None or t >= slot[1][0]:
                slot[1] = (t, row)
    out = {}
    for image_id, (presence, failure) in best.items():
        if presence and (presence[1] or failure is None or failure[0] <= presence[0]):
            out[image_id] = presence[2]
        else:
            out[image_id] = failure[1]
    return out


def random_parts(rng: random.Random, storage: LocalStorage, day: int = 1) -> list[list[dict]]:
    parts = []
    for p in range(rng.randint(3, 14)):
        rows = []
        for r in range(rng.randint(0, 30)):
            stamp = f"2026-01-{day:02d}T00:00:{rng.randint(0, 9):02d}.{rng.randint(0, 3):06d}+00:00"
            status = rng.choice(["ok", "ok", "deleted", "failed", "corrupt"])
            rows.append(
                {"id": f"img{rng.randrange(60):03d}", "status": status, "encoded_at": stamp,
                 "error": f"d{day}p{p}r{r}", "shard": "codes/x.npy", "row": str(r)}
            )  # fmt: skip
        parts.append(rows)
        storage.put(f"{PARTS_PREFIX}/d{day:02d}-{p:03d}.csv", rows_to_csv(rows))
    return parts


def as_merged(storage: LocalStorage) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["status"], r["error"]) for r in read_manifest(storage).to_pylist()}


def test_the_streaming_merge_keeps_the_rule_whatever_the_run_and_batch_sizes(tmp_path, monkeypatch):
    import encoder.merged as merged

    for trial in range(12):
        rng = random.Random(trial)
        monkeypatch.setattr(merged, "MERGE_RUN_BYTES", rng.choice([300, 2000, 1 << 30]))
        monkeypatch.setattr(merged, "MERGE_BATCH_ROWS", rng.choice([3, 7, 1000]))
        monkeypatch.setattr(merged, "MERGE_FAN_IN", rng.choice([2, 3, 32]))
        storage = LocalStorage(tmp_path / f"t{trial}")
        parts = random_parts(rng, storage)
        expected = reference_merge(parts)
        info = merge_manifest(storage)
        got = read_manifest(storage).to_pylist()
        assert [r["id"] for r in got] == sorted(expected)  # one row per id, in id order
        assert as_merged(storage) == {i: (r["status"], r["error"]) for i, r in expected.items()}
        assert info.rows == len(expected) and sum(info.counts.values()) == len(expected)


def test_a_merge_of_new_later_parts_reads_only_them_and_equals_a_full_merge(tmp_path):
    rng = random.Random(5)
    storage = LocalStorage(tmp_path / "dest")
    parts = random_parts(rng, storage, day=1)
    merge_manifest(storage)
    parts += random_parts(rng, storage, day=2)  # later rows only: an incremental merge
    read: list[str] = []
    original_get = storage.get
    storage.get = lambda key: read.append(key) or original_get(key)  # type: ignore[method-assign]
    merge_manifest(storage)
    assert read and all(k.startswith(f"{PARTS_PREFIX}/d02-") for k in read if "parts" in k)
    incremental = as_merged(storage)
    (tmp_path / "dest" / "manifest.json").unlink()  # forget it: a full merge
    merge_manifest(storage)
    expected = reference_merge(parts)
    assert (
        incremental
        == as_merged(storage)
        == {i: (r["status"], r["error"]) for i, r in expected.items()}
    )


def test_the_merged_manifest_is_parquet_with_each_image_key_and_pandas_reads_it(tmp_path):
    import pandas as pd

    dest = synthetic(tmp_path / "dest", 50)
    manifest = pd.read_parquet(dest / "manifest.parquet")
    assert len(manifest) == 50 and manifest["id"].is_monotonic_increasing
    assert list(manifest["key"]) == list(image_keys(list(manifest["id"])))
    assert manifest["width"].dtype == "int64" and str(manifest["encoded_at"].dt.tz) == "UTC"
    info = json.loads((dest / "manifest.json").read_text())
    assert info["rows"] == 50 and set(info["parts"]) == {
        f"{PARTS_PREFIX}/{p.name}" for p in (dest / "parts").iterdir()
    }
    ids, codes = load_codes(dest)
    streamed = {
        i: c.tobytes() for batch in iter_codes(dest, 16) for i, c in zip(*batch, strict=True)
    }
    assert streamed == {i: c.tobytes() for i, c in zip(ids, codes, strict=True)}


def test_an_image_key_is_a_hash_of_its_id_alone():
    digest = hashlib.blake2b(b"shoes/123.jpg", digest_size=8).digest()
    assert image_key("shoes/123.jpg") == int.from_bytes(digest, "little") & (2**63 - 1)
    assert list(image_keys(["shoes/123.jpg", "é/ü.png"])) == [
        image_key("shoes/123.jpg"),
        image_key("é/ü.png"),
    ]


def merge_peak(dest: Path, parts: int) -> tuple[int, int, int]:
    """Rows, peak Arrow memory of a merge of ``parts`` parts of 1,000 rows (small runs,
    batches and fan-in) in a fresh process, and the size of the merged table."""
    storage = LocalStorage(dest)
    order = np.random.default_rng(0).permutation(parts * 1000)  # ids in no order
    for p in range(parts):
        rows = [
            {"id": f"catalogue/{order[p * 1000 + r]:010d}.jpg", "path": "/data/x.jpg",
             "status": "ok", "sha256": "ab" * 32, "shard": f"codes/{p}.npy", "row": str(r),
             "encoded_at": "2026-01-01T00:00:00.000000+00:00"}
            for r in range(1000)
        ]  # fmt: skip
        storage.put(f"{PARTS_PREFIX}/{p:04d}.csv", rows_to_csv(rows))
    script = (
        "import sys, pyarrow as pa, encoder.merged as m;"
        "from encoder.storage import LocalStorage;"
        "m.MERGE_RUN_BYTES = 1 << 18; m.MERGE_BATCH_ROWS = 512; m.ROW_GROUP_ROWS = 4096;"
        "m.MERGE_FAN_IN = 4;"
        "info = m.merge_manifest(LocalStorage(sys.argv[1]));"
        "print(info.rows, pa.default_memory_pool().max_memory())"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(dest)], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows, peak = map(int, run.stdout.split())
    return rows, peak, read_manifest(dest).nbytes


def test_the_merge_peak_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    """Runs, batches and fan-in bound the merge: twice the rows, the same peak of Arrow
    memory, a small share of the merged table."""
    rows, peak, whole = merge_peak(tmp_path / "a", 40)
    rows2, peak2, whole2 = merge_peak(tmp_path / "b", 80)
    assert (rows, rows2) == (40_000, 80_000) and whole2 > 1.9 * whole
    assert peak2 < 1.3 * peak and peak2 < whole2 / 4, (peak, peak2, whole2)


# --- the index ------------------------------------------------------------------------------
def synthetic(dest: Path, n: int, start: int = 0, run: str = "run", seed: int = 0) -> Path:
    storage = open_storage(str(dest))
    ensure_spec(storage, SPEC)
    codes = np.random.default_rng(seed).integers(0, 256, (n, SPEC.bytes_per_code), np.uint8)
    write(storage, [f"img_{i:05d}.jpg" for i in range(start, start + n)], codes, run)
    merge_manifest(storage)
    return dest


def write(storage, names: list[str], codes: np.ndarray, run: str) -> None:
    writer = ShardWriter(storage, SPEC, run, shard_size=16, flush_seconds=1e9)
    results = [LoadResult(x, f"/data/{x}", ImageStatus.OK, width=64, height=48) for x in names]
    writer.add(results, codes)
    writer.flush()


def contents(index: Index) -> dict[str, bytes]:
    return {i: index.code(i).tobytes() for i in index.ids}


def test_an_index_kept_up_by_refreshes_equals_one_built_from_scratch(tmp_path):
    dest = synthetic(tmp_path / "dest", 40)
    storage = open_storage(str(dest))
    index = Index.open(str(dest))
    rng = np.random.default_rng(1)
    for step in range(6):
        written = index.backend.added
        new = [f"img_{i:05d}.jpg" for i in range(100 + 10 * step, 105 + 10 * step)]
        again = [f"img_{i:05d}.jpg" for i in rng.choice(40, 3, replace=False)]  # re-encoded
        write(storage, new + again, rng.integers(0, 256, (8, 8), np.uint8), f"step{step}")
        gone = sorted(set(index.ids) - set(again))[:2]
        record_deletions(storage, pa.table({"id": gone, "path": gone}), f"gone{step}")
        assert index.refresh()
        # 8 codes written (5 new, 3 encoded again), nothing rebuilt or copied.
        assert index.backend.added - written == 8 and not set(gone) & set(index.ids)
        fresh = Index.open(str(dest), save=False)
        if fresh.origin != "built":  # what index.refresh saved: build one from nothing
            (dest / "index" / "meta.json").unlink()
            fresh = Index.open(str(dest), save=False)
        assert fresh.origin == "built" and contents(fresh) == contents(index)
        for image_id in list(index.ids)[:5]:
            assert index.similar(image_id, 5) == fresh.similar(image_id, 5)


def test_many_small_updates_keep_few_segments_and_search_stays_exact(tmp_path):
    dest = synthetic(tmp_path / "dest", 30)
    storage = open_storage(str(dest))
    index = Index.open(str(dest))
    for step in range(3 * TIER):
        names = [f"new_{step:03d}_{i}.jpg" for i in range(4)]
        write(
            storage,
            names,
            np.random.default_rng(step).integers(0, 256, (4, 8), np.uint8),
            f"u{step}",
        )
        index.refresh()
    segments = index.describe()["segments"]
    assert len(index) == 30 + 12 * TIER and segments < 2 * TIER, segments
    ids, codes = load_codes(dest)
    distances = np.bitwise_count(codes[:, None, :] ^ codes[None, :, :]).sum(axis=-1)
    for q in range(0, len(ids), 17):
        expected = sorted(zip(distances[q].tolist(), ids.tolist(), strict=True))[:7]
        found = index.search(codes[q], 7)[0]
        assert list(zip(found.distances, found.ids, strict=True)) == expected
    reopened = Index.open(str(dest))
    assert reopened.origin == "loaded" and contents(reopened) == contents(index)


# --- pairs without an all-pairs scan ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["uniform", "clustered"])
def test_lsh_pairs_are_all_within_the_radius_and_at_least_99_percent_of_the_exact_ones(layout):
    rng = np.random.default_rng(11)
    n, radius = 30_000, 72
    if layout == "uniform":
        codes = rng.integers(0, 256, (n, 63), np.uint8)
    else:
        centres = rng.integers(0, 256, (30, 63), np.uint8)
        noise = [rng.integers(0, 256, (n, 63), np.uint8) for _ in range(3)]
        codes = centres[rng.integers(0, 30, n)] ^ (noise[0] & noise[1] & noise[2])
    codes[:, -1] &= 0xF0
    for copy in rng.choice(n, 600, replace=False).tolist():  # copies 0-72 bits away
        bits = np.unpackbits(codes[(copy * 7919) % n])
        bits[rng.choice(500, int(rng.integers(0, radius + 1)), replace=False)] ^= 1
        codes[copy] = np.packbits(bits)
    exact = close_pairs(codes, radius, 500, method="exact")
    lsh = close_pairs(codes, radius, 500, method="lsh")
    truth = set(zip(exact.a.tolist(), exact.b.tolist(), strict=True))
    found = set(zip(lsh.a.tolist(), lsh.b.tolist(), strict=True))
    assert len(truth) >= 550 and found <= truth  # nothing beyond the radius
    assert len(found) >= 0.99 * len(truth), (len(found), len(truth), lsh.describe())
    d = np.bitwise_count(codes[lsh.a] ^ codes[lsh.b]).sum(axis=1)
    assert np.array_equal(d, lsh.distance) and lsh.miss <= 0.005
