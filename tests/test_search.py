"""The query half as a library and on the command line: exact search against a brute-force
Hamming ranking, padding, persistence and incremental updates, similar items, query
images through the loader, spec refusals, near-duplicate groups without chaining, HNSW,
and an S3 destination."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoder.codes import hamming, load_codes
from encoder.images import ImageStatus, LoadResult
from encoder.spec import SpecMismatch, spec_for
from encoder.storage import open_storage
from encoder.writer import ShardWriter, ensure_spec
from search import Index, find_duplicates
from search.index import META_KEY
from tests.helpers import (
    STUB,
    SeaweedS3,
    imgenc,
    make_settings,
    photo_like,
    write_jpegs,
)


def encode(folder: Path, dest: Path | str, **model) -> None:
    from encoder.folder_run import encode_folder

    encode_folder(folder, str(dest), make_settings(**{**STUB, **model}), progress=False)


@pytest.fixture
def catalogue(tmp_path) -> tuple[Path, Path]:
    """60 generated images encoded with the stub backbone, pooled 64-bit codes."""
    folder = tmp_path / "images"
    write_jpegs(folder, 60, size=(96, 96))
    dest = tmp_path / "codes"
    encode(folder, dest, layout="pooled", bits=64)
    return folder, dest


def brute_force(codes: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int):
    distances = hamming(query, codes)[0]
    ranked = sorted(zip(distances.tolist(), ids.tolist(), strict=True))[:k]
    return [i for _, i in ranked], [d for d, _ in ranked]


@pytest.mark.parametrize("layout,bits", [("pooled", 64), ("pooled", 500), ("spatial", 64)])
def test_exact_search_equals_a_brute_force_hamming_ranking_ties_broken_by_id(
    tmp_path, layout, bits
):
    folder = tmp_path / "images"
    write_jpegs(folder, 80, size=(64, 64))
    dest = tmp_path / "codes"
    encode(folder, dest, layout=layout, bits=bits)
    ids, codes = load_codes(dest)
    index = Index.open(str(dest))
    for q in range(0, 80, 7):
        found = index.search(codes[q], k=15)[0]
        assert (found.ids, found.distances) == brute_force(codes, ids, codes[q], 15)
        assert found.ids[0] == ids[q] and found.distances[0] == 0


def test_pooled_63_byte_codes_are_padded_to_64_without_changing_any_distance(tmp_path):
    folder = tmp_path / "images"
    write_jpegs(folder, 30, size=(64, 64))
    dest = tmp_path / "codes"
    encode(folder, dest, layout="pooled", bits=500)
    index = Index.open(str(dest))
    assert (index.code_bytes, index.backend.stored_bytes) == (63, 64)
    ids, codes = load_codes(dest)
    found = index.search(codes[:3], k=30)
    for q in range(3):
        expected = dict(zip(ids.tolist(), hamming(codes[q], codes)[0].tolist(), strict=True))
        assert {i: expected[i] for i in found[q].ids} == dict(
            zip(found[q].ids, found[q].distances, strict=True)
        )
    assert np.array_equal(index.code(ids[5]), codes[5])


def test_the_index_persists_and_a_second_open_loads_it_without_rebuilding(catalogue):
    _, dest = catalogue
    first = Index.open(str(dest))
    assert first.origin == "built" and (dest / META_KEY).exists()
    files = {p: p.stat().st_mtime_ns for p in (dest / "index").iterdir()}
    second = Index.open(str(dest))
    assert second.origin == "loaded" and second.generation == first.generation
    assert {p: p.stat().st_mtime_ns for p in (dest / "index").iterdir()} == files
    meta = json.loads((dest / META_KEY).read_text())
    assert meta["fingerprint"] == second.spec.fingerprint and meta["count"] == 60
    assert len(meta["parts"]) == len(list((dest / "parts").glob("*.csv")))


def test_new_shards_are_added_incrementally_and_the_index_is_never_silently_stale(catalogue):
    folder, dest = catalogue
    index = Index.open(str(dest))
    before = index.ids
    write_jpegs(folder, 10, start=500, size=(96, 96))
    encode(folder, dest, layout="pooled", bits=64)  # a second run adds shards
    assert index.stale
    assert index.refresh() and not index.stale
    assert len(index) == 70 and index.ids[:60] == before  # appended, not rebuilt
    reopened = Index.open(str(dest))
    assert reopened.origin == "loaded" and len(reopened) == 70
    ids, codes = load_codes(dest)
    new = list(ids).index("img_00505.jpg")
    assert reopened.search(codes[new], 1)[0].ids == ["img_00505.jpg"]


def test_an_image_encoded_again_after_a_change_is_searched_with_its_new_code(catalogue):
    folder, dest = catalogue
    Index.open(str(dest))
    photo_like(4242, (96, 96)).save(folder / "img_00003.jpg")
    from encoder.folder_run import encode_folder

    encode_folder(
        folder, str(dest), make_settings(**STUB, layout="pooled", bits=64), resume=True,
        progress=False,
    )  # fmt: skip
    index = Index.open(str(dest))
    assert index.origin == "updated" and len(index) == 60
    ids, codes = load_codes(dest)
    new_code = codes[list(ids).index("img_00003.jpg")]
    assert np.array_equal(index.code("img_00003.jpg"), new_code)


def test_similar_returns_the_nearest_other_images_and_unknown_ids_are_refused(catalogue):
    _, dest = catalogue
    index = Index.open(str(dest))
    ids, codes = load_codes(dest)
    found = index.similar("img_00007.jpg", k=5)
    assert "img_00007.jpg" not in found.ids and len(found.ids) == 5
    expected = brute_force(codes, ids, codes[7], 6)
    assert found.ids == [i for i in expected[0] if i != "img_00007.jpg"][:5]
    with pytest.raises(KeyError):
        index.similar("nope.jpg")


def test_query_images_go_through_the_loader_and_a_bad_one_gets_its_status(catalogue, tmp_path):
    folder, dest = catalogue
    index = Index.open(str(dest))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    answers = index.query(
        [str(folder / "img_00011.jpg"), str(broken), str(tmp_path / "absent.jpg"),
         ("upload.jpg", (folder / "img_00012.jpg").read_bytes()), str(tmp_path),
         str(tmp_path / "empty.jpg")],
        k=3,
    )  # fmt: skip
    statuses = [a.status for a in answers]
    assert statuses == ["ok", "not_an_image", "missing", "ok", "not_a_file", "empty"]
    assert answers[0].results[0] == {"id": "img_00011.jpg", "distance": 0}
    assert answers[3].results[0] == {"id": "img_00012.jpg", "distance": 0}
    assert all(a.results == [] and a.error for a in answers if a.status != "ok")


def test_a_query_encoder_of_another_spec_is_refused_naming_the_fields(catalogue):
    _, dest = catalogue
    index = Index.open(str(dest))

    class OtherEncoder:
        spec = spec_for(make_settings(**STUB, layout="pooled", bits=128))

        def encode(self, images):
            raise AssertionError("never called")

    with pytest.raises(SpecMismatch, match="n_bits"):
        index.query([("x.jpg", b"")], encoder=OtherEncoder())


def test_codes_made_with_a_weights_file_need_that_file_to_encode_queries(tmp_path):
    from search.query_encoder import EmbeddedQueryEncoder
    from tests.helpers import get_encoder

    weights = tmp_path / "stub.weights.h5"
    get_encoder(backbone="stub").model.get_layer("stub").save_weights(weights)
    folder = tmp_path / "images"
    write_jpegs(folder, 3)
    dest = tmp_path / "codes"
    encode(folder, dest, weights=str(weights))
    storage, spec = open_storage(str(dest)), Index.open(str(dest)).spec
    with pytest.raises(SpecMismatch, match="weights file"):
        EmbeddedQueryEncoder(storage, spec, make_settings())
    other = tmp_path / "other.weights.h5"
    other.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(SpecMismatch, match="weights"):
        EmbeddedQueryEncoder(storage, spec, make_settings(), weights=str(other))
    encoder = EmbeddedQueryEncoder(storage, spec, make_settings(), weights=str(weights))
    assert encoder.spec.fingerprint == spec.fingerprint


# --- near-duplicate groups -----------------------------------------------------------------
def synthetic_destination(tmp_path: Path, codes: dict[str, list[int]], sizes=None) -> Path:
    """A destination of stub pooled 64-bit codes given bit by bit: {id: [positions of 1s]}."""
    dest = tmp_path / "synthetic"
    spec = spec_for(make_settings(**STUB, layout="pooled", bits=64))
    storage = open_storage(str(dest))
    ensure_spec(storage, spec)
    writer = ShardWriter(storage, spec, "synthetic", shard_size=0)
    results, packed = [], []
    for image_id, ones in codes.items():
        bits = np.zeros(64, np.uint8)
        bits[ones] = 1
        width, height = (sizes or {}).get(image_id, (100, 100))
        results.append(LoadResult(image_id, image_id, ImageStatus.OK, width=width, height=height))
        packed.append(np.packbits(bits))
    writer.add(results, np.stack(packed))
    writer.flush()
    return dest


def test_near_duplicates_do_not_chain_every_member_is_within_the_threshold_of_the_kept_one(
    tmp_path,
):
    # A chain a-b-c-d-e, 4 bits a step (a-c is 8): with max distance 5 it is not one group.
    # b, c and d have two neighbours each; b comes first (ties by id) and keeps a and c; d
    # keeps e.  Every member is within 5 bits of its group's kept image.
    chain = {name: list(range(4 * n)) for n, name in enumerate("abcde")}
    dest = synthetic_destination(
        tmp_path, {f"{k}.jpg": v for k, v in chain.items()} | {"far.jpg": list(range(30, 60))}
    )
    groups = find_duplicates(Index.open(str(dest)), max_distance=5)
    assert groups.groups == [
        [("b.jpg", 0), ("a.jpg", 4), ("c.jpg", 4)],
        [("d.jpg", 0), ("e.jpg", 4)],
    ]


def test_the_kept_image_is_the_centre_an_original_among_its_copies(tmp_path):
    # The original o has three copies, each 3 bits from it and 6 from one another; with max
    # distance 4 the original, not a larger copy, is the image the group forms around.
    dest = synthetic_destination(
        tmp_path,
        {"o.jpg": [], "c1.jpg": [0, 1, 2], "c2.jpg": [10, 11, 12], "c3.jpg": [20, 21, 22]},
        sizes={"c1.jpg": (400, 400)},
    )
    groups = find_duplicates(Index.open(str(dest)), max_distance=4)
    assert groups.groups == [[("o.jpg", 0), ("c1.jpg", 3), ("c2.jpg", 3), ("c3.jpg", 3)]]


def test_groups_keep_the_largest_image_and_list_the_others_as_removable(tmp_path):
    dest = synthetic_destination(
        tmp_path,
        {"small.jpg": [1], "large.jpg": [1, 2], "medium.jpg": [2], "other.jpg": list(range(20, 50))},
        sizes={"small.jpg": (50, 50), "large.jpg": (400, 300), "medium.jpg": (200, 100)},
    )  # fmt: skip
    groups = find_duplicates(Index.open(str(dest)), max_distance=2)
    assert groups.groups == [[("large.jpg", 0), ("medium.jpg", 1), ("small.jpg", 1)]]
    assert groups.removable == ["medium.jpg", "small.jpg"]
    assert groups.to_csv().splitlines() == [
        "group,id,distance", "0,large.jpg,0", "0,medium.jpg,1", "0,small.jpg,1",
    ]  # fmt: skip


def test_a_crowd_of_copies_beyond_k_neighbours_is_still_one_group(tmp_path):
    copies = {f"copy{i:03d}.jpg": [i % 3] for i in range(50)}  # 50 images within 2 bits
    copies["alone.jpg"] = list(range(30, 64))
    dest = synthetic_destination(tmp_path, copies)
    groups = find_duplicates(Index.open(str(dest)), max_distance=2)
    assert len(groups.groups) == 1 and len(groups.groups[0]) == 50
    again = find_duplicates(Index.open(str(dest)), max_distance=2)
    assert again.groups == groups.groups  # deterministic


def test_dedup_on_the_command_line_writes_the_groups_csv(tmp_path):
    dest = synthetic_destination(
        tmp_path, {"a.jpg": [], "b.jpg": [3], "c.jpg": list(range(10, 40))}
    )
    out = tmp_path / "groups.csv"
    run = imgenc("dedup", str(dest), "--max-distance", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "1 groups of near-duplicates" in run.stdout and "1 files could go" in run.stdout
    import pandas as pd

    groups = pd.read_csv(out)
    assert list(groups.columns) == ["group", "id", "distance"]
    assert groups.to_dict("records") == [
        {"group": 0, "id": "a.jpg", "distance": 0},
        {"group": 0, "id": "b.jpg", "distance": 1},
    ]


def test_search_and_similar_on_the_command_line_print_json_lines(catalogue, tmp_path):
    folder, dest = catalogue
    flags = ("--json", "-k", "3")
    run = imgenc(
        "search", str(dest), str(folder / "img_00004.jpg"), str(tmp_path / "no.jpg"), *flags
    )
    assert run.returncode == 1  # one query could not be read
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [x["status"] for x in lines] == ["ok", "missing"]
    assert lines[0]["results"][0] == {"id": "img_00004.jpg", "distance": 0}
    similar = imgenc("similar", str(dest), "img_00004.jpg", *flags)
    assert similar.returncode == 0 and len(json.loads(similar.stdout)["results"]) == 3
    unknown = imgenc("similar", str(dest), "nope.jpg")
    assert unknown.returncode == 2 and "no image 'nope.jpg'" in unknown.stderr


def test_hnsw_finds_nearly_all_exact_neighbours(tmp_path):
    rng = np.random.RandomState(5)
    centres = rng.randint(0, 2, (200, 64))
    codes = {}
    for i in range(2000):  # clustered codes, as real collections are
        bits = centres[i % 200].copy()
        bits[rng.choice(64, 6, replace=False)] ^= 1
        codes[f"{i:05d}.jpg"] = list(np.flatnonzero(bits))
    dest = synthetic_destination(tmp_path, codes)
    exact = Index.open(str(dest), kind="flat", save=False)
    approx = Index.open(str(dest), kind="hnsw", save=False)
    ids, packed = load_codes(dest)
    queries = packed[::40]
    hits = 0
    for e, a in zip(exact.search(queries, 10), approx.search(queries, 10), strict=True):
        cutoff = e.distances[-1]
        hits += sum(d <= cutoff for d in a.distances)  # tie-aware: any id at the same distance
    assert hits / (10 * len(queries)) >= 0.9


def test_index_command_builds_an_hnsw_index_that_later_opens_reuse(catalogue):
    _, dest = catalogue
    run = imgenc("index", str(dest), "--kind", "hnsw")
    assert run.returncode == 0 and "hnsw index" in run.stdout
    index = Index.open(str(dest))
    assert index.kind == "hnsw" and index.origin == "loaded"


def test_an_s3_destination_is_indexed_and_its_index_persisted_in_the_bucket(tmp_path, monkeypatch):
    s3 = SeaweedS3(tmp_path / "weed").start()
    try:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="codes")
        folder = tmp_path / "images"
        write_jpegs(folder, 20)
        encode(folder, "s3://codes/cat", layout="pooled", bits=64)
        index = Index.open("s3://codes/cat")
        assert len(index) == 20 and index.origin == "built"
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="codes")["Contents"]]
        assert "cat/index/meta.json" in keys and sum(k.endswith(".faiss") for k in keys) == 1
        again = Index.open("s3://codes/cat")
        assert again.origin == "loaded"
        answer = again.query([str(folder / "img_00002.jpg")], k=1)[0]
        assert answer.results == [{"id": "img_00002.jpg", "distance": 0}]
    finally:
        s3.stop()


def test_a_damaged_saved_index_is_rebuilt_instead_of_failing(catalogue):
    _, dest = catalogue
    Index.open(str(dest))
    (saved,) = (dest / "index" / "segments").glob("*.faiss")
    saved.write_bytes(saved.read_bytes()[:100])
    index = Index.open(str(dest))
    assert index.origin == "built" and len(index) == 60
    assert index.similar("img_00001.jpg", 1).ids
    run = imgenc("similar", str(dest), "img_00001.jpg", "-k", "2")
    assert run.returncode == 0, run.stderr


def test_a_code_shard_missing_from_the_destination_is_a_one_line_error(catalogue):
    _, dest = catalogue
    for shard in (dest / "codes").glob("*.npy"):
        shard.unlink()
    shutil.rmtree(dest / "index", ignore_errors=True)
    run = imgenc("similar", str(dest), "img_00001.jpg")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "which is not there" in run.stderr


def test_arguments_out_of_range_are_usage_errors_not_tracebacks(catalogue):
    folder, dest = catalogue
    query = str(folder / "img_00001.jpg")
    for args in (
        ("search", str(dest), query, "-k", "0"),
        ("similar", str(dest), "img_00001.jpg", "-k", "-5"),
        ("dedup", str(dest), "--max-distance", "-5"),
        ("dedup", str(dest), "--max-distance", "2147483647"),  # beyond faiss's int too
        ("dedup", str(dest), "--max-distance", "33"),  # over half of the 64 bits
        ("search", str(dest), query, "--weights", "/no/such/weights.h5"),
        ("serve", str(dest), "--port", "99999"),
    ):
        run = imgenc(*args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (args, run.stderr)
        assert "error" in run.stderr, args
    assert find_duplicates(Index.open(str(dest)), 32).max_distance == 32  # half is allowed
