"""The near-duplicate threshold fitted on a destination's own images, with trained
weights (``efficientnet_lite0``): fitted at the end of ``imgenc encode`` and of a
distributed job, stored in the destination, read by ``imgenc dedup``; copies already in
the catalogue do not drag it down; a destination too small or out of reach says so.

Where the destination keeps float features (the catalogue with copies here), the fit
also stores a cosine threshold to re-score close pairs with, ``imgenc dedup`` uses it
and ``--no-features`` turns it off."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageOps

from encoder.copies import COPY_KINDS, PixelCheck, make_copy, open_picture
from search import Index
from search.duplicate_fit import read_threshold
from tests.helpers import (
    REPO,
    CeleryWorker,
    RedisServer,
    built_once,
    imgenc,
    worker_env,
)

EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))
TEST_PHOTOS = sorted((REPO / "tests" / "data" / "photos").glob("*.jpg"))
LITE0 = ("--backbone", "efficientnet_lite0", "--layout", "pooled")
# Copies as a catalogue meets them, made unlike the fit's own copies (other settings).
CATALOGUE_COPIES = {
    "jpeg": lambda p: p,  # saved at quality 35 below
    "half": lambda p: p.resize((p.width * 45 // 100, p.height * 45 // 100)),
    "bright": lambda p: ImageEnhance.Brightness(p).enhance(1.2),
    "mirror": ImageOps.mirror,
}


def _jpeg(picture: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def distinct_photos(folder: Path) -> list[str]:
    """The 16 sample photos and the 99 test photos: 115 real, distinct photos."""
    folder.mkdir(parents=True)
    for path in [*EXAMPLES, *TEST_PHOTOS]:
        shutil.copy(path, folder / path.name)
    return sorted(p.name for p in folder.iterdir())


def make_catalogues(root: Path) -> None:
    """``clean/`` (115 distinct photos), ``with-copies/`` (the same and copies of 8 sample
    photos in 4 kinds) and ``originals.json`` ({copy: original})."""
    clean = root / "clean"
    distinct_photos(clean)
    with_copies = root / "with-copies"
    shutil.copytree(clean, with_copies)
    originals = {}
    for path in EXAMPLES[::2]:
        picture = Image.open(path).convert("RGB")
        for kind, edit in CATALOGUE_COPIES.items():
            name = f"copy-{kind}-{path.name}"
            quality = 35 if kind == "jpeg" else 90
            (with_copies / name).write_bytes(_jpeg(edit(picture), quality))
            originals[name] = path.name
    (root / "originals.json").write_text(json.dumps(originals))


def encode_catalogues(root: Path) -> None:
    """Both catalogues encoded by ``imgenc encode`` into ``codes/``, which fits at the end;
    the one with copies keeps its float features as well.  Its output: ``NAME.out``."""
    make_catalogues(root)
    for name, flags in (("clean", ()), ("with-copies", ("--features",))):
        run = imgenc("encode", str(root / name), "--out", str(root / "codes" / name), *LITE0,
                     *flags, "--no-progress")  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        (root / f"{name}.out").write_text(run.stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Built once per session, shared by every test process: read it, change copies."""
    return built_once(tmp_path_factory, "dedup-catalogues", encode_catalogues)


@pytest.fixture(scope="module")
def catalogues(built):
    """(clean folder, folder with copies of 8 sample photos in 4 kinds, {copy: original})."""
    originals = json.loads((built / "originals.json").read_text())
    return built / "clean", built / "with-copies", originals


@pytest.fixture(scope="module")
def encoded(built):
    """{catalogue: (its destination, what ``imgenc encode`` printed)}."""
    return {
        name: (built / "codes" / name, (built / f"{name}.out").read_text())
        for name in ("clean", "with-copies")
    }


def fitted(dest: Path):
    index = Index.open(str(dest))
    return read_threshold(index.storage, index.spec.fingerprint)


def test_imgenc_encode_fits_the_threshold_and_says_what_it_expects_of_it(encoded):
    dest, stdout = encoded["with-copies"]
    fit = fitted(dest)
    assert f"near-duplicates: max distance {fit.max_distance} of 500 bits" in stdout
    assert 0 < fit.max_distance < 250 and fit.images == 147
    assert set(fit.found) == set(COPY_KINDS) and fit.copies_sampled >= 90
    assert fit.false_pairs <= 0.01 + 1e-9
    assert (dest / "dedup" / f"{fit.fingerprint}.json").is_file()


def test_dedup_at_its_default_groups_the_copies_with_their_originals(encoded, catalogues, tmp_path):
    _, _, originals = catalogues
    dest, _ = encoded["with-copies"]
    out = tmp_path / "groups.csv"
    run = imgenc("dedup", str(dest), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    fit = fitted(dest)
    assert f"threshold: max distance {fit.max_distance}" in run.stdout
    assert "expected to find" in run.stdout and "distinct images" in run.stdout
    groups = pd.read_csv(out)
    group_of = dict(zip(groups["id"], groups["group"], strict=True))
    found = [
        copy in group_of and group_of.get(original) == group_of[copy]
        for copy, original in originals.items()
    ]
    assert sum(found) >= 0.9 * len(found), f"{sum(found)} of {len(found)} copies grouped"
    # Distinct images (everything but the copies and their originals) are rarely paired.
    distinct = [i for i in group_of if i not in originals and i not in originals.values()]
    assert len(distinct) <= 0.05 * 115


def test_copies_already_in_the_catalogue_do_not_drag_the_threshold_down(encoded):
    clean, with_copies = fitted(encoded["clean"][0]), fitted(encoded["with-copies"][0])
    assert with_copies.copies_in_catalogue >= 8  # the copies it found and passed over
    assert with_copies.max_distance >= 0.8 * clean.max_distance, (
        clean.max_distance,
        with_copies.max_distance,
    )


def test_a_destination_too_small_to_fit_says_so_and_dedup_needs_a_max_distance(tmp_path):
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    run = imgenc("encode", str(tmp_path / "images"), "--out", str(tmp_path / "out"), *LITE0)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no threshold fitted: 16 images are too few" in run.stdout
    assert not (tmp_path / "out" / "dedup").exists()
    run = imgenc("dedup", str(tmp_path / "out"))
    assert run.returncode == 2 and "--max-distance" in run.stderr
    assert run.stderr.count("imgenc: error") == 1 and "Traceback" not in run.stderr
    assert imgenc("dedup", str(tmp_path / "out"), "--max-distance", "60").returncode == 0


def test_an_older_destination_is_fitted_by_dedup_or_told_the_command_that_fits_it(
    encoded, tmp_path
):
    dest = tmp_path / "older"
    shutil.copytree(encoded["clean"][0], dest)
    shutil.rmtree(dest / "dedup")
    # The images are where the manifest says.  One kind of copy keeps the fit short; that
    # a fit is deterministic is shown by the distributed test (the worker's fit is the
    # embedded one).
    run = imgenc("dedup", str(dest), "--dedup-kinds", "jpeg", "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fitting one" in run.stderr
    fit = fitted(dest)
    assert f"threshold: max distance {fit.max_distance}" in run.stdout
    assert fit.kinds == ["jpeg"] and fit.images == 115 and fit.copies_sampled >= 90

    shutil.rmtree(dest / "dedup")
    for part in (dest / "parts").glob("*.csv"):
        rows = pd.read_csv(part)
        rows["path"] = "/nowhere/" + rows["id"]
        rows.to_csv(part, index=False)
    shutil.rmtree(dest / "index", ignore_errors=True)
    run = imgenc("dedup", str(dest))
    assert run.returncode == 2
    assert "imgenc fit-dedup" in run.stderr and "--image-root" in run.stderr
    assert run.stderr.count("\n") == 1


def test_fit_dedup_refits_on_request_with_the_kinds_the_catalogue_counts(encoded, tmp_path):
    dest = tmp_path / "refit"
    shutil.copytree(encoded["with-copies"][0], dest)
    run = imgenc("fit-dedup", str(dest), "--dedup-kinds", "half,bright", "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    fit = fitted(dest)
    assert set(fit.found) == {"half", "bright"} and "expected to find" in run.stdout
    assert imgenc("fit-dedup", str(dest), "--dedup-kinds", "sepia").returncode == 2


def test_a_distributed_job_fits_on_the_worker_as_the_embedded_encode_does(
    encoded, catalogues, tmp_path
):
    import producer

    _, folder, _ = catalogues
    redis = RedisServer(tmp_path / "redis").start()
    env = worker_env(
        redis.url,
        IMGENC_BACKBONE="efficientnet_lite0",
        IMGENC_LAYOUT="pooled",
        IMGENC_WEIGHTS="imagenet",
    )
    worker = CeleryWorker(env, tmp_path / "worker.log").start()
    try:
        out = tmp_path / "distributed"
        job = producer.enqueue(
            folder, str(out), broker=redis.url, backbone="efficientnet_lite0", layout="pooled",
            weights="imagenet", features=True,
        )  # fmt: skip
        final = job.wait(timeout=300)
        assert final.done and final.counts == {"ok": 147}
    finally:
        worker.stop()
        redis.stop(kill=True)
    embedded = json.loads(
        (encoded["with-copies"][0] / "dedup" / f"{fitted(out).fingerprint}.json").read_text()
    )
    on_worker = json.loads((out / "dedup" / f"{fitted(out).fingerprint}.json").read_text())
    for record in (embedded, on_worker):
        record.pop("fitted_at")
    assert on_worker == embedded


def test_the_pixel_check_knows_each_kind_of_copy_and_tells_different_photos_apart():
    check = PixelCheck(list(COPY_KINDS))
    pictures = [open_picture(p.read_bytes()) for p in EXAMPLES]
    variants = [check.variants(p) for p in pictures]
    for i, (picture, own) in enumerate(zip(pictures, variants, strict=True)):
        for kind in list(COPY_KINDS)[i % 2 :: 2]:  # every kind, each on half the photos
            copy = check.variants(open_picture(make_copy(picture, kind)))
            assert check.same_picture(own, copy), kind
    different = [check.similarity(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]
    assert max(different) < 0.975


# --- re-scoring with float features ------------------------------------------------------
def grouped(dest, tmp_path, *flags: str) -> tuple[str, dict[str, int]]:
    out = tmp_path / f"groups{len(flags)}.csv"
    run = imgenc("dedup", str(dest), "--out", str(out), *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    groups = pd.read_csv(out)
    return run.stdout, dict(zip(groups["id"], groups["group"], strict=True))


def copies_found(group_of: dict[str, int], originals: dict[str, str]) -> int:
    return sum(
        copy in group_of and group_of.get(original) == group_of[copy]
        for copy, original in originals.items()
    )


def test_the_fit_stores_a_cosine_threshold_that_finds_at_least_as_many_copies_at_the_same_rate(
    encoded,
):
    dest, stdout = encoded["with-copies"]
    fit = fitted(dest)
    rescore = fit.rescoring()
    assert rescore is not None and -1 <= rescore.min_cosine <= 1
    assert rescore.sure_distance <= fit.max_distance <= rescore.max_distance
    assert rescore.false_pairs <= fit.target + 1e-9 and fit.false_pairs <= fit.target + 1e-9
    assert rescore.found_all >= fit.found_all
    assert "re-scored with float features" in stdout  # reported beside the code threshold


def test_dedup_with_features_groups_at_least_the_copies_codes_alone_do_and_no_features_turns_it_off(
    encoded, catalogues, tmp_path
):
    dest, _ = encoded["with-copies"]
    _, _, originals = catalogues
    with_features, groups = grouped(dest, tmp_path)
    codes_only, code_groups = grouped(dest, tmp_path, "--no-features")
    summary, code_summary = with_features.splitlines()[-1], codes_only.splitlines()[-1]
    assert "cosine >=" in summary and "cosine >=" not in code_summary
    assert "re-scored with float features" in with_features  # both expectations reported
    assert copies_found(groups, originals) >= copies_found(code_groups, originals)
    assert copies_found(groups, originals) >= 0.9 * len(originals)
    distinct = [i for i in groups if i not in originals and i not in originals.values()]
    assert len(distinct) <= 0.05 * 115


@pytest.mark.parametrize("rescored", [False, True])
def test_on_real_codes_the_lsh_pair_search_gives_the_exact_scans_groups(encoded, rescored):
    """Lite0 codes of real photos and their copies cluster, unlike random codes: the
    groups from LSH candidates are the exact scan's at the fitted threshold (with and
    without the re-scoring, which looks farther)."""
    from search.duplicates import find_duplicates

    index = Index.open(str(encoded["with-copies"][0]))
    max_distance = None if rescored else fitted(encoded["with-copies"][0]).max_distance
    exact = find_duplicates(index, max_distance, features=rescored, method="exact")
    lsh = find_duplicates(index, max_distance, features=rescored, method="lsh")
    assert len(exact.groups) >= 8 and lsh.groups == exact.groups
    assert (lsh.rescored is not None) == rescored and "LSH" in lsh.pairs
