"""Near-duplicates re-scored by float features, on trained weights (``efficientnet_lite0``,
pooled) and the repository's 115 distinct photos with copies planted among them: the fit
stores a cosine threshold beside the code threshold, ``imgenc dedup`` uses it where the
destination keeps features and ``--no-features`` turns it off."""

from __future__ import annotations

import pandas as pd
import pytest

from search import Index
from search.duplicate_fit import read_threshold
from tests.helpers import imgenc
from tests.test_duplicate_fit import LITE0, catalogues  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def encoded_with_features(catalogues, tmp_path_factory):  # noqa: F811
    _, with_copies, originals = catalogues
    dest = tmp_path_factory.mktemp("features") / "d"
    run = imgenc("encode", str(with_copies), "--out", str(dest), *LITE0, "--features",
                 "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return dest, run.stdout, originals


def fitted(dest):
    index = Index.open(str(dest))
    return read_threshold(index.storage, index.spec.fingerprint)


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
    encoded_with_features,
):
    dest, stdout, _ = encoded_with_features
    fit = fitted(dest)
    rescore = fit.rescoring()
    assert rescore is not None and -1 <= rescore.min_cosine <= 1
    assert rescore.sure_distance <= fit.max_distance <= rescore.max_distance
    assert rescore.false_pairs <= fit.target + 1e-9 and fit.false_pairs <= fit.target + 1e-9
    assert rescore.found_all >= fit.found_all
    assert "re-scored with float features" in stdout  # reported beside the code threshold


def test_dedup_with_features_groups_at_least_the_copies_codes_alone_do_and_no_features_turns_it_off(
    encoded_with_features, tmp_path
):
    dest, _, originals = encoded_with_features
    with_features, groups = grouped(dest, tmp_path)
    codes_only, code_groups = grouped(dest, tmp_path, "--no-features")
    summary, code_summary = with_features.splitlines()[-1], codes_only.splitlines()[-1]
    assert "cosine >=" in summary and "cosine >=" not in code_summary
    assert "re-scored with float features" in with_features  # both expectations reported
    assert copies_found(groups, originals) >= copies_found(code_groups, originals)
    assert copies_found(groups, originals) >= 0.9 * len(originals)
    distinct = [i for i in groups if i not in originals and i not in originals.values()]
    assert len(distinct) <= 0.05 * 115
