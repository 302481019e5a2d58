"""A catalogue changes: ``--resume`` (embedded and distributed) records the images gone
from the folder as ``deleted``, encodes the new and the replaced ones, refuses an emptied
folder unless told, and the search (``Index``, ``similar``, near-duplicates) never names a
deleted image again.  Distributed checks run a real redis-server and Celery worker."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from encoder.deletions import (
    MIN_DELETED_REFUSED,
    ScannedSet,
    TooManyDeletions,
    check_deletions,
    vanished,
)
from encoder.manifest import StatusTotals
from encoder.merged import merged_rows, read_manifest
from search import Index, find_duplicates
from tests.helpers import (
    STUB,
    CeleryWorker,
    RedisServer,
    get_encoder,
    imgenc,
    make_settings,
    photo_like,
    worker_env,
    write_jpegs,
)

POOLED = {**STUB, "layout": "pooled", "bits": 64}


def row(image_id: str, status: str, at: str, **extra: str) -> dict[str, str]:
    return {"id": image_id, "status": status, "encoded_at": at, "path": f"/c/{image_id}", **extra}


def merged(*rows: dict[str, str]) -> dict[str, str]:
    """The winning row, checked to be the same whatever the order of the parts."""
    winners = {tuple(sorted(merged_rows(list(p))[0].items())) for p in itertools.permutations(rows)}
    assert len(winners) == 1, f"the merge depends on the order of the rows: {winners}"
    return merged_rows(list(rows))[0]


def manifest_table(rows: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k, "") for k in ("id", "path", "status")} for r in rows])


def scanned(*values: str) -> ScannedSet:
    found = ScannedSet()
    for value in values:
        found.add(value)
    return found


# --- the merge rule --------------------------------------------------------------------------
def test_a_deletion_after_the_encoding_beats_the_ok_row():
    won = merged(row("a", "ok", "2026-01-01T00"), row("a", "deleted", "2026-01-02T00"))
    assert won["status"] == "deleted"


def test_an_ok_row_after_the_deletion_beats_it_the_photo_came_back():
    won = merged(
        row("a", "ok", "2026-01-01T00", sha256="old"),
        row("a", "deleted", "2026-01-02T00"),
        row("a", "ok", "2026-01-03T00", sha256="new"),
    )
    assert (won["status"], won["sha256"]) == ("ok", "new")


def test_a_failure_never_beats_an_ok_row_even_a_later_one():
    won = merged(row("a", "ok", "2026-01-01T00"), row("a", "corrupt", "2026-01-05T00"))
    assert won["status"] == "ok"


def test_a_failure_after_a_deletion_wins_and_failures_among_themselves_go_by_time():
    # Deleted, then back but unreadable: the old code must not come back with it.
    won = merged(
        row("a", "ok", "2026-01-01T00"),
        row("a", "deleted", "2026-01-02T00"),
        row("a", "corrupt", "2026-01-03T00"),
    )
    assert won["status"] == "corrupt"
    won = merged(row("b", "empty", "2026-01-01T00"), row("b", "corrupt", "2026-01-02T00"))
    assert won["status"] == "corrupt"
    won = merged(row("c", "corrupt", "2026-01-01T00"), row("c", "deleted", "2026-01-02T00"))
    assert won["status"] == "deleted"


def test_deleted_is_counted_apart_never_as_a_failure():
    totals = StatusTotals()
    totals.counts = {"ok": 5, "corrupt": 1, "deleted": 3}
    assert (totals.processed, totals.failed, totals.deleted) == (6, 1, 3)


# --- which images vanished, and when to refuse ------------------------------------------------
def test_only_ids_under_the_scanned_folder_count_as_vanished():
    previous = [
        row("catalogue/shoes/a.jpg", "ok", "t"),
        row("catalogue/shoes/b.jpg", "corrupt", "t"),
        row("catalogue/shoes/c.jpg", "deleted", "t"),
        row("catalogue/shoes2/d.jpg", "ok", "t"),
        row("catalogue/hats/e.jpg", "ok", "t"),
    ]
    previous = manifest_table(previous)
    gone, known = vanished(previous, scanned(), "catalogue/shoes", column="id")
    assert gone["id"].to_pylist() == ["catalogue/shoes/a.jpg", "catalogue/shoes/b.jpg"]
    assert known == 2
    gone, known = vanished(previous, scanned("catalogue/shoes/a.jpg"), "", column="id")
    assert gone.num_rows == 3 and known == 4


def test_ids_read_under_another_root_than_the_images_still_found_do_not_count():
    # Two folders enqueued into one destination without a common image root: both have
    # bare ids; the workers read them under /a and /b.
    previous = [
        {**row("x.jpg", "ok", "t"), "path": "/a/x.jpg"},
        {**row("y.jpg", "ok", "t"), "path": "/a/y.jpg"},
        {**row("z.jpg", "ok", "t"), "path": "/b/z.jpg"},
    ]
    previous = manifest_table(previous)
    gone, known = vanished(previous, scanned("x.jpg"), "", column="id", same_root=True)
    assert gone["id"].to_pylist() == ["y.jpg"] and known == 2
    gone, known = vanished(previous, scanned(), "", column="id", same_root=True)
    assert gone.num_rows == 3 and known == 3  # nothing found: all count, and the rule refuses


def test_an_empty_folder_or_most_images_gone_at_once_is_refused_unless_accepted():
    with pytest.raises(TooManyDeletions) as refused:
        check_deletions(3, 3, accept=False)
    message = str(refused.value)
    assert "3 of 3" in message and "--accept-deletions" in message and "\n" not in message
    n = MIN_DELETED_REFUSED
    with pytest.raises(TooManyDeletions, match=f"{n + 1} of {2 * n}"):
        check_deletions(n + 1, 2 * n, accept=False)
    check_deletions(n, 2 * n, accept=False)  # half: accepted
    check_deletions(n - 1, n + 1, accept=False)  # most, but fewer than the minimum
    check_deletions(3, 3, accept=True)
    check_deletions(n + 1, 2 * n, accept=True)
    check_deletions(0, 0, accept=False)


# --- embedded: imgenc encode --resume -----------------------------------------------------------
def encode(folder: Path, dest: Path, **kwargs):
    from encoder.folder_run import encode_folder

    return encode_folder(
        folder, str(dest), make_settings(**POOLED), progress=False,
        encoder=get_encoder(**POOLED), **kwargs,
    )  # fmt: skip


def change_catalogue(folder: Path) -> dict[str, str]:
    """2 photos deleted (one a near-copy of a photo kept), 1 added, 1 replaced in place."""
    (folder / "img_00001.jpg").unlink()
    (folder / "copy_of_3.jpg").unlink()
    write_jpegs(folder, 1, start=100, size=(96, 96))
    replaced = folder / "img_00005.jpg"
    old = replaced.stat()
    photo_like(4242, (120, 90)).save(replaced, quality=80)
    os.utime(replaced, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    return {"deleted": "img_00001.jpg copy_of_3.jpg", "added": "img_00100.jpg"}


def manifest_of(dest: Path | str) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in read_manifest(str(dest)).to_pylist()}


def assert_search_never_names(index: Index, gone: set[str]) -> None:
    assert not gone & set(index.ids)
    for image_id in index.ids:
        assert not gone & set(index.similar(image_id, k=len(index)).ids)
    groups = find_duplicates(index, max_distance=int(index.spec.code_shape[-1]) // 4)
    assert not gone & {i for g in groups.groups for i, _ in g}


def test_embedded_resume_records_deletions_encodes_new_and_replaced_photos_and_search_drops_them(
    tmp_path,
):
    folder, dest = tmp_path / "images", tmp_path / "codes"
    write_jpegs(folder, 8, size=(96, 96))
    shutil.copy(folder / "img_00003.jpg", folder / "copy_of_3.jpg")
    encode(folder, dest)
    index = Index.open(str(dest))
    assert {"img_00001.jpg", "copy_of_3.jpg"} <= set(index.ids)
    assert any("copy_of_3.jpg" in {i for i, _ in g} for g in find_duplicates(index, 8).groups)
    before = manifest_of(dest)

    change_catalogue(folder)
    summary = encode(folder, dest, resume=True)
    assert summary.deleted == 2 and summary.failed == 0 and summary.processed == 2
    assert "2 marked deleted" in summary.lines()[0]

    after = manifest_of(dest)
    gone = {"img_00001.jpg", "copy_of_3.jpg"}
    for image_id in gone:
        assert after[image_id]["status"] == "deleted" and not after[image_id]["shard"]
        assert after[image_id]["encoded_at"] > before[image_id]["encoded_at"]
    assert after["img_00100.jpg"]["status"] == "ok"
    new, old = after["img_00005.jpg"], before["img_00005.jpg"]
    assert new["status"] == "ok" and new["sha256"] != old["sha256"]
    assert new["encoded_at"] > old["encoded_at"]
    assert after["img_00002.jpg"] == before["img_00002.jpg"]  # unchanged: not encoded again

    assert index.stale  # the index opened before sees the destination moved on
    assert index.refresh() and not index.stale
    assert_search_never_names(index, gone)
    reopened = Index.open(str(dest))
    assert reopened.origin == "loaded" and sorted(reopened.ids) == sorted(index.ids)
    assert len(reopened) == 8 and "img_00100.jpg" in reopened

    # A resume with nothing changed writes nothing; a photo restored is encoded again.
    parts = sorted(p.name for p in (dest / "parts").iterdir())
    merged_at = (dest / "manifest.parquet").stat().st_mtime_ns
    unchanged = encode(folder, dest, resume=True)
    assert (unchanged.processed, unchanged.deleted, unchanged.skipped) == (0, 0, 8)
    assert sorted(p.name for p in (dest / "parts").iterdir()) == parts
    assert (dest / "manifest.parquet").stat().st_mtime_ns == merged_at  # not even merged again
    write_jpegs(folder, 1, start=1, size=(96, 96))
    assert encode(folder, dest, resume=True).processed == 1
    assert manifest_of(dest)["img_00001.jpg"]["status"] == "ok"
    assert "img_00001.jpg" in Index.open(str(dest))


def test_embedded_resume_only_looks_at_the_folder_it_scans(tmp_path):
    catalogue, dest = tmp_path / "catalogue", tmp_path / "codes"
    write_jpegs(catalogue / "shoes", 3, size=(96, 96))
    write_jpegs(catalogue / "hats", 3, start=10, size=(96, 96))
    encode(catalogue / "shoes", dest)
    encode(catalogue / "hats", dest)
    (catalogue / "shoes" / "img_00000.jpg").unlink()
    assert encode(catalogue / "shoes", dest, resume=True).deleted == 1
    statuses = {r["path"]: r["status"] for r in manifest_of(dest).values()}
    assert statuses[str((catalogue / "shoes" / "img_00000.jpg").resolve())] == "deleted"
    assert sum(s == "ok" for s in statuses.values()) == 5


def test_an_emptied_folder_deletes_nothing_without_the_flag(tmp_path):
    folder, dest = tmp_path / "images", tmp_path / "codes"
    write_jpegs(folder, 3, size=(96, 96))
    encode(folder, dest)
    parts = sorted((dest / "parts").iterdir())
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(TooManyDeletions, match="3 of 3"):
        encode(folder, dest, resume=True)
    assert sorted((dest / "parts").iterdir()) == parts  # nothing written
    assert {r["status"] for r in manifest_of(dest).values()} == {"ok"}


def test_the_command_refuses_an_emptied_folder_and_the_flag_lets_it_through_under_strict(
    tmp_path,
):
    folder, dest = tmp_path / "images", tmp_path / "codes"
    write_jpegs(folder, 3, size=(96, 96))
    encode(folder, dest)
    shutil.rmtree(folder)
    folder.mkdir()
    model = ["--backbone", "stub", "--weights", "random", "--layout", "pooled", "--bits", "64"]
    args = ["encode", str(folder), "--out", str(dest), "--resume", "--no-progress", *model]
    refused = imgenc(*args, "--no-dedup-fit")
    assert refused.returncode == 2
    assert "3 of 3 images deleted" in refused.stderr and "--accept-deletions" in refused.stderr
    assert "Traceback" not in refused.stderr
    accepted = imgenc(*args, "--no-dedup-fit", "--accept-deletions", "--strict")
    assert accepted.returncode == 0, accepted.stderr  # deleted is not a failure
    assert "3 marked deleted" in accepted.stdout and "deleted" in accepted.stdout
    assert {r["status"] for r in manifest_of(dest).values()} == {"deleted"}
    assert len(Index.open(str(dest))) == 0


# --- distributed: imgenc enqueue --resume -------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def worker(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = CeleryWorker(worker_env(redis_server.url), log).start()
    yield w
    w.stop()


def test_enqueue_resume_records_deletions_and_reencodes_new_and_replaced_photos(
    redis_server, worker, tmp_path
):
    import producer

    folder, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(folder, 8, size=(96, 96))
    shutil.copy(folder / "img_00003.jpg", folder / "copy_of_3.jpg")
    first = producer.enqueue(folder, str(out), broker=redis_server.url, chunk=4, **STUB)
    first.wait(timeout=120)
    index = Index.open(str(out))
    before = manifest_of(out)

    change_catalogue(folder)
    job = producer.enqueue(folder, str(out), broker=redis_server.url, chunk=4, resume=True, **STUB)
    final = job.wait(timeout=120)
    assert final.total == 2 and final.counts == {"ok": 2, "deleted": 2}
    assert (final.deleted, final.failed, final.exit_code(strict=True)) == (2, 0, 0)
    assert "2 marked deleted" in "\n".join(final.lines())
    assert final.to_dict()["deleted"] == 2

    after = manifest_of(out)
    gone = {"img_00001.jpg", "copy_of_3.jpg"}
    assert {after[i]["status"] for i in gone} == {"deleted"}
    assert after["img_00100.jpg"]["status"] == "ok"
    assert after["img_00005.jpg"]["sha256"] != before["img_00005.jpg"]["sha256"]
    assert after["img_00005.jpg"]["status"] == "ok"
    assert index.refresh()
    assert_search_never_names(index, gone)
    assert_search_never_names(Index.open(str(out)), gone)


def test_enqueueing_shoes_never_deletes_the_hats_and_an_emptied_folder_is_refused(
    redis_server, worker, tmp_path
):
    import producer

    root, out = tmp_path / "root", tmp_path / "out"
    shoes, hats = root / "catalogue" / "shoes", root / "catalogue" / "hats"
    write_jpegs(shoes, 3, size=(96, 96))
    write_jpegs(hats, 3, start=10, size=(96, 96))
    for folder in (shoes, hats):
        producer.enqueue(folder, str(out), broker=redis_server.url, image_root=root, **STUB).wait(
            timeout=120
        )
    (shoes / "img_00000.jpg").unlink()
    job = producer.enqueue(
        shoes, str(out), broker=redis_server.url, image_root=root, resume=True, **STUB
    )
    assert job.wait(timeout=120).deleted == 1
    statuses = {i: r["status"] for i, r in manifest_of(out).items()}
    assert statuses.pop("catalogue/shoes/img_00000.jpg") == "deleted"
    assert set(statuses.values()) == {"ok"} and len(statuses) == 5

    for path in shoes.iterdir():
        path.unlink()
    parts = sorted((out / "parts").iterdir())
    with pytest.raises(TooManyDeletions, match="2 of 2"):
        producer.enqueue(
            shoes, str(out), broker=redis_server.url, image_root=root, resume=True, **STUB
        )
    assert sorted((out / "parts").iterdir()) == parts
    accepted = producer.enqueue(
        shoes, str(out), broker=redis_server.url, image_root=root, resume=True,
        accept_deletions=True, **STUB,
    )  # fmt: skip
    assert accepted.wait(timeout=120).deleted == 2
    statuses = {i: r["status"] for i, r in manifest_of(out).items()}
    assert [i for i, s in statuses.items() if s == "ok"] == [
        f"catalogue/hats/img_{n:05d}.jpg" for n in (10, 11, 12)
    ]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_drops_a_deleted_image_at_its_next_refresh_without_writing_a_code(tmp_path, kind):
    from encoder.deletions import record_deletions
    from encoder.storage import open_storage

    folder, dest = tmp_path / "images", tmp_path / "codes"
    write_jpegs(folder, 6, size=(96, 96))
    encode(folder, dest)
    index = Index.open(str(dest), kind=kind)
    generation, written = index.generation, index.backend.added
    storage = open_storage(str(dest))
    gone = pa.table({"id": ["img_00002.jpg"], "path": [manifest_of(dest)["img_00002.jpg"]["path"]]})
    record_deletions(storage, gone, "test-run")
    assert index.stale
    assert index.refresh() and not index.stale and index.generation != generation
    assert index.backend.added == written  # a tombstone: no code written, nothing rebuilt
    assert index.kind == kind and len(index) == 5 and "img_00002.jpg" not in index
    with pytest.raises(KeyError):
        index.similar("img_00002.jpg")
    assert_search_never_names(index, {"img_00002.jpg"})
    assert "img_00002.jpg" not in Index.open(str(dest))


def test_both_commands_take_accept_deletions_with_resume():
    from imgenc.cli import build_parser

    parser = build_parser()
    for command in ("encode", "enqueue"):
        args = parser.parse_args([command, "d", "--out", "o", "--resume", "--accept-deletions"])
        assert args.resume and args.accept_deletions


def test_the_service_stops_showing_deleted_images_at_its_next_refresh(tmp_path):
    import httpx
    from PIL import Image

    from tests.helpers import REPO, SearchServer, wait_for

    folder, dest = tmp_path / "catalogue", tmp_path / "codes"
    shutil.copytree(REPO / "examples" / "images", folder)
    names = sorted(p.name for p in folder.iterdir())
    Image.open(folder / names[2]).save(folder / "copy.jpg", quality=70)
    model = {**STUB, "layout": "pooled"}
    from encoder.folder_run import encode_folder

    encode_folder(folder, str(dest), make_settings(**model), progress=False)
    env = {"IMGENC_BACKBONE": "stub", "IMGENC_WEIGHTS": "random"}
    server = SearchServer(str(dest), tmp_path / "s.log", env, "--refresh-seconds", "1").start()
    try:
        url = server.url
        groups = httpx.get(url + "/duplicates?max_distance=7").json()["groups"]
        assert any("copy.jpg" in {m["id"] for m in g} for g in groups)
        gone = {"copy.jpg", names[5]}
        photo = (folder / names[5]).read_bytes()
        for name in gone:
            (folder / name).unlink()
        summary = encode_folder(folder, str(dest), make_settings(**model), resume=True,
                                progress=False)  # fmt: skip
        assert summary.deleted == 2
        wait_for(lambda: httpx.get(url + "/healthz").json()["images"] == 15, 30, "refresh")
        for name in gone:
            assert httpx.get(f"{url}/similar/{name}").status_code == 404
            assert httpx.get(f"{url}/thumb/{name}").status_code == 404
        for name in set(names) - gone:
            found = httpx.get(f"{url}/similar/{name}", params={"k": 20}).json()["results"]
            assert not gone & {r["id"] for r in found}
        groups = httpx.get(url + "/duplicates?max_distance=7").json()["groups"]
        assert not gone & {m["id"] for g in groups for m in g}
        answer = httpx.post(
            url + "/search", files={"image": ("q.jpg", photo)}, data={"k": "20"}, timeout=60
        ).json()
        assert answer["status"] == "ok" and not gone & {r["id"] for r in answer["results"]}
    finally:
        server.stop()
