"""The Milvus index kind on real engines: milvus-lite 2.5 (BIN_FLAT, in-process) for the
backend's contract, and a Milvus standalone server started and killed by the tests for
BIN_IVF_FLAT, a sync cut off by a kill, two syncs at once and two search servers.

Milvus answers as exact faiss does, on real photos (EfficientNet-Lite0 codes of the sample
and test photos and their copies): the same ids at the same distances for ``search`` and
``similar``, and the same near-duplicate groups (its range search against faiss's scan).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from encoder.deletions import record_deletions
from encoder.settings import process_settings
from encoder.storage import open_storage
from search import Index
from search.duplicates import find_duplicates
from tests.helpers import REPO, MilvusServer, SearchServer, built_once, wait_for
from tests.test_duplicate_fit import encode_catalogues, fitted
from tests.test_scale import SPEC, synthetic, write

pytest.importorskip("pymilvus")


@pytest.fixture
def milvus_env(monkeypatch):
    """Point this process's settings at a Milvus (``use(uri, **settings)``)."""

    def use(uri: str, **settings: str) -> None:
        monkeypatch.setenv("IMGENC_MILVUS_URI", uri)
        for name, value in settings.items():
            monkeypatch.setenv(f"IMGENC_MILVUS_{name.upper()}", value)
        process_settings.cache_clear()

    yield use
    monkeypatch.delenv("IMGENC_MILVUS_URI", raising=False)
    process_settings.cache_clear()


@pytest.fixture
def lite(tmp_path, milvus_env) -> str:
    uri = str(tmp_path / "milvus.db")
    milvus_env(uri)
    return uri


class Spy:
    """The real client, with every write it sends recorded."""

    def __init__(self, client):
        self.client, self.upserted, self.deleted = client, [], []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def upsert(self, collection, rows, **kwargs):
        self.upserted.extend(r["key"] for r in rows)
        return self.client.upsert(collection, rows, **kwargs)

    def delete(self, collection, ids=None, **kwargs):
        self.deleted.extend(ids or [])
        return self.client.delete(collection, ids=ids, **kwargs)


def bare_env() -> dict[str, str]:
    """This environment without imgenc's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGENC_")}


def collection_keys(index: Index) -> list[int]:
    return [int(k) for keys, _ in index.backend.iter_codes(4096) for k in keys]


def contents(index: Index) -> dict[str, bytes]:
    return {i: index.code(i).tobytes() for i in index.ids}


# --- the contract, on milvus-lite ---------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Lite0 codes (and features) of 115 real photos and 32 copies, built once a session."""
    return built_once(tmp_path_factory, "dedup-catalogues", encode_catalogues) / "codes"


def test_on_real_photos_milvus_answers_search_similar_and_dedup_as_exact_faiss(
    photos, tmp_path, lite
):
    for name in ("faiss", "milvus"):
        shutil.copytree(photos / "with-copies", tmp_path / name)
        shutil.rmtree(tmp_path / name / "index", ignore_errors=True)
    faiss = Index.open(str(tmp_path / "faiss"), kind="flat")
    milvus = Index.open(str(tmp_path / "milvus"), kind="milvus")
    assert milvus.kind == "milvus" and milvus.remote and milvus.backend.index_type == "BIN_FLAT"
    ids = faiss.ids
    assert milvus.ids == ids and len(ids) == len(milvus) >= 140
    codes = faiss.codes_of(ids)
    assert np.array_equal(milvus.codes_of(ids), codes)
    for image_id in ids:
        assert milvus.similar(image_id, 10) == faiss.similar(image_id, 10), image_id
    assert milvus.search(codes, 25) == faiss.search(codes, 25)  # ties broken by id alike
    threshold = fitted(tmp_path / "faiss").max_distance
    for rescored in (False, True):
        max_distance = None if rescored else threshold
        theirs = find_duplicates(faiss, max_distance, features=rescored, method="exact")
        ours = find_duplicates(milvus, max_distance, features=rescored)
        assert len(theirs.groups) >= 8 and ours.groups == theirs.groups
        assert "range search" in ours.pairs and (ours.rescored is not None) == rescored


def test_milvus_kept_up_by_syncs_equals_a_collection_built_from_scratch(tmp_path, lite):
    dest = synthetic(tmp_path / "dest", 40)
    storage = open_storage(str(dest))
    index = Index.open(str(dest), kind="milvus")
    rng = np.random.default_rng(1)
    for step in range(3):
        written = index.backend.added
        new = [f"img_{i:05d}.jpg" for i in range(100 + 10 * step, 105 + 10 * step)]
        again = [f"img_{i:05d}.jpg" for i in rng.choice(40, 3, replace=False)]  # re-encoded
        write(storage, new + again, rng.integers(0, 256, (8, 8), np.uint8), f"step{step}")
        gone = sorted(set(index.ids) - set(again))[:2]
        record_deletions(storage, pa.table({"id": gone, "path": gone}), f"gone{step}")
        assert index.stale and index.refresh() and not index.stale
        assert index.backend.added - written == 8 and not set(gone) & set(index.ids)
        keys = collection_keys(index)
        assert len(keys) == len(set(keys)) == len(index)
    kept = contents(index)
    index.backend.drop()
    (dest / "index" / "meta.json").unlink()
    fresh = Index.open(str(dest), kind="milvus")
    assert fresh.origin == "built" and contents(fresh) == kept


def test_a_deleted_image_leaves_milvus_at_the_next_sync_and_no_other_row_is_written(tmp_path, lite):
    dest = synthetic(tmp_path / "dest", 30)
    index = Index.open(str(dest), kind="milvus")
    spy = Spy(index.backend.client)
    index.backend._client = spy
    gone = "img_00007.jpg"
    record_deletions(open_storage(str(dest)), pa.table({"id": [gone], "path": [gone]}), "gone")
    assert index.refresh()
    assert spy.upserted == [] and len(spy.deleted) == 1  # one key deleted, nothing written
    assert len(index) == 29 and gone not in index and gone not in index.ids
    with pytest.raises(KeyError):
        index.similar(gone)
    codes = index.codes_of(index.ids)
    assert all(gone not in hit.ids for hit in index.search(codes, 29))
    reopened = Index.open(str(dest))  # the persisted kind: milvus, reconnected, nothing read
    assert reopened.kind == "milvus" and reopened.origin == "loaded" and gone not in reopened


def test_imgenc_index_moves_a_destination_onto_milvus_and_says_what_it_needs(tmp_path):
    dest = synthetic(tmp_path / "dest", 20)
    env = bare_env()
    bare = subprocess.run(
        [sys.executable, "-m", "imgenc", "index", str(dest), "--kind", "milvus"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert bare.returncode == 2 and "IMGENC_MILVUS_URI" in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1, bare.stderr
    env["IMGENC_MILVUS_URI"] = str(tmp_path / "m.db")
    moved = subprocess.run(
        [sys.executable, "-m", "imgenc", "index", str(dest), "--kind", "milvus"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert moved.returncode == 0 and "20 images in the Milvus collection" in moved.stdout, moved.stderr


def test_a_finished_job_syncs_the_destinations_milvus_collection(tmp_path, lite):
    from worker.tasks import sync_search_engine

    dest = synthetic(tmp_path / "dest", 20)
    index = Index.open(str(dest), kind="milvus")
    storage = open_storage(str(dest))
    write(storage, ["late_1.jpg", "late_2.jpg"], np.ones((2, 8), np.uint8), "job")
    sync_search_engine("job", storage)
    assert not index.stale and len(index) == 22 and "late_2.jpg" in index


# --- a Milvus standalone server ---------------------------------------------------------------
# `-m slow`: under the suite's load (four test processes on two cores) the 2.3.5-lite
# standalone server now and then never finishes starting (3 minutes), so these run apart
# (`pytest -m slow tests/test_milvus.py`, about 1 minute on a quiet machine).
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    milvus = MilvusServer(tmp_path_factory.mktemp("milvus")).start()
    yield milvus
    milvus.stop()


def sync(dest: Path, uri: str, **env: str) -> subprocess.Popen:
    """``imgenc index DEST --kind milvus`` in a process of its own."""
    environ = bare_env()
    environ.update(IMGENC_MILVUS_URI=uri, IMGENC_MILVUS_NLIST="16", IMGENC_MILVUS_TIMEOUT="10")
    environ.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "imgenc", "index", str(dest), "--kind", "milvus"],
        cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.xdist_group("milvus")
def test_on_a_server_ivf_searches_exactly_when_asked_and_dedup_by_range_equals_faiss(
    tmp_path, server, milvus_env
):
    milvus_env(server.uri, nlist="16", nprobe="16")
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (1500, 8), np.uint8)
    copies = base[:100] ^ np.packbits(rng.random((100, 64)) < 0.05, axis=1)  # ~3 bits off
    for name in ("faiss", "milvus"):
        storage = open_storage(str(tmp_path / name))
        from encoder.writer import ensure_spec

        ensure_spec(storage, SPEC)
        names = [f"img_{i:05d}.jpg" for i in range(1600)]
        write(storage, names, np.concatenate([base, copies]), "run")
    faiss = Index.open(str(tmp_path / "faiss"), kind="flat")
    milvus = Index.open(str(tmp_path / "milvus"), kind="milvus")
    assert milvus.backend.index_type == "BIN_IVF_FLAT" and milvus.backend.exact  # nprobe = nlist
    codes = faiss.codes_of(faiss.ids[:200])
    assert milvus.search(codes, 10, exact=True) == faiss.search(codes, 10)
    theirs = find_duplicates(faiss, 12, method="exact")
    ours = find_duplicates(milvus, 12)
    assert len(theirs.groups) >= 90 and ours.groups == theirs.groups


@pytest.mark.slow
@pytest.mark.xdist_group("milvus")
@pytest.mark.parametrize(
    "killed",
    [
        "sync",
        # Milvus 2.3.5-lite (the `milvus` wheel) killed while upserts are in flight stalls
        # in its recovery on this machine (no answer after 3 minutes): not in CI.
        pytest.param("server", marks=pytest.mark.slow),
    ],
)
def test_a_sync_cut_off_by_a_kill_is_completed_by_the_next_and_two_at_once_agree(
    tmp_path, server, killed
):
    milvus = MilvusServer(tmp_path / "milvus").start() if killed == "server" else server
    dest = synthetic(tmp_path / "dest", 500)
    assert sync(dest, milvus.uri).wait(180) == 0
    storage = open_storage(str(dest))
    rng = np.random.default_rng(2)
    new = [f"new_{i:05d}.jpg" for i in range(10_000)]
    write(storage, new, rng.integers(0, 256, (10_000, 8), np.uint8), "big")  # 625 parts
    gone = [f"img_{i:05d}.jpg" for i in range(0, 500, 5)]
    record_deletions(storage, pa.table({"id": gone, "path": gone}), "gone")
    expected = {f"img_{i:05d}.jpg" for i in range(500)} - set(gone) | set(new)

    from pymilvus import MilvusClient

    collection = json.loads((dest / "index" / "meta.json").read_text())["backend"]["collection"]
    watcher = MilvusClient(milvus.uri)
    cut = sync(dest, milvus.uri)

    def written() -> int:
        rows = watcher.query(
            collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])

    wait_for(lambda: written() > 500, 120, "the sync to be under way", interval=0.02)
    if killed == "server":
        milvus.stop(kill=True)
        try:  # the sync fails with its server (its calls give up after IMGENC_MILVUS_TIMEOUT)
            assert cut.wait(60) != 0
        except subprocess.TimeoutExpired:
            cut.kill()
        milvus.start()
    else:
        cut.kill()
    cut.wait()
    assert 500 < written() < len(expected)  # cut off half-way
    first, second = sync(dest, milvus.uri), sync(dest, milvus.uri)  # two syncs at once
    assert first.wait(300) == 0 and second.wait(300) == 0, first.stdout.read()
    index = Index.open(str(dest))
    assert not index.stale and index.origin == "loaded"
    keys = collection_keys(index)
    assert len(keys) == len(set(keys)) == len(expected)  # every ok image once
    assert set(index.ids) == expected  # and no deleted one
    if killed == "server":
        milvus.stop()


@pytest.mark.slow
@pytest.mark.xdist_group("milvus")
def test_two_search_servers_on_one_collection_answer_alike_without_reading_a_code(tmp_path, server):
    dest = synthetic(tmp_path / "dest", 300)
    assert sync(dest, server.uri).wait(180) == 0
    exact = Index.open(str(shutil.copytree(dest, tmp_path / "faiss")), kind="flat")
    (dest / "codes").rename(tmp_path / "no-codes-here")  # a server that read one would fail
    env = {"IMGENC_MILVUS_URI": server.uri}
    servers = [SearchServer(str(dest), tmp_path / f"serve{n}.log", env).start() for n in (1, 2)]
    try:
        for image_id in ("img_00000.jpg", "img_00123.jpg", "img_00299.jpg"):
            answers = [
                httpx.get(f"{s.url}/similar/{image_id}", params={"k": 8}, timeout=30).json()
                for s in servers
            ]
            assert answers[0] == answers[1]
            found = exact.similar(image_id, 8)
            assert [r["id"] for r in answers[0]["results"]] == found.ids
            assert [r["distance"] for r in answers[0]["results"]] == found.distances
    finally:
        for s in servers:
            s.stop()
    assert "rebuild" not in servers[0].text() + servers[1].text()


def test_the_sync_lock_lets_one_process_in_at_a_time(tmp_path):
    from search.sync_lock import SyncBusy, sync_lock

    storage = open_storage(str(tmp_path / "dest"))
    script = (
        "import sys, time\nfrom encoder.storage import open_storage\n"
        "from search.sync_lock import sync_lock\n"
        "with sync_lock(open_storage(sys.argv[1])):\n    print('held', flush=True)\n"
        "    time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "dest")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(SyncBusy), sync_lock(storage, wait=0.6):
            pass
        assert time.monotonic() - started >= 0.5
    finally:
        holder.kill()
        holder.wait()
    with sync_lock(storage, wait=5):  # the kernel let go of the killed holder's lock
        pass
