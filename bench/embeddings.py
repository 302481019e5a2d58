"""The ``embeddings`` step of ``python -m bench``: what the float features kept by
``--features`` are worth, on trained weights (EfficientNet-Lite0, ImageNet, pooled).

The photos and copies of 100 of them in every kind (``bench.quality.make_catalogue``)
are encoded once with ``--features``, and the near-duplicate threshold is fitted on them
(``fit_destination``: the code threshold and the re-scoring by cosine).

1. **Models on the features.**  5-fold (stratified, shuffled with seed 0) accuracy of a
   scikit-learn ``LogisticRegression`` predicting the photos' labels (``labels.csv``, less
   "Not sure", "Skip" and "Other") from the features as ``encoder.load_features`` gives
   them (standardised), against one on the 500-bit codes (bits as -1/+1), and the
   majority label's share.
2. **Re-scoring near-duplicates.**  ``find_duplicates`` at the fitted default with and
   without the features: per kind, the share of copies grouped with their photo, and the
   share of photos grouped with another photo; beside them, what the fit expected.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from bench.core import Context
from bench.quality import LITE, fitted, labels, make_catalogue, truth

FOLDS = 5


def accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
    return float(np.mean(cross_val_score(model, x, y, cv=folds)))


def classifiers(ctx: Context, dest: Any) -> None:
    from encoder import load_codes, load_features

    labelled = labels(ctx.files)
    ids, features = load_features(str(dest))
    code_ids, codes = load_codes(str(dest))
    assert list(ids) == list(code_ids)
    rows = [i for i, name in enumerate(ids.tolist()) if name in labelled]
    names = [ids[i] for i in rows]
    _, y = np.unique([labelled[n] for n in names], return_inverse=True)
    counts = np.bincount(y)
    keep = counts[y] >= FOLDS  # a label needs a photo in every fold
    if len(np.unique(y[keep])) < 2:
        print(f"  (no classifier figures: fewer than 2 labels with {FOLDS} photos)")
        return
    x_features = features[rows][keep].astype(np.float32)
    x_codes = np.unpackbits(codes[rows][keep], axis=1).astype(np.float32) * 2 - 1
    y = np.unique(y[keep], return_inverse=True)[1]
    what = f"{len(y)} labelled photos, {len(np.unique(y))} labels"
    majority = float(np.bincount(y).max() / len(y))
    ctx.add("embeddings", f"majority label ({what})", majority, "share")
    size = features.shape[1] * 2
    on_features = accuracy(x_features, y)
    name = f"{FOLDS}-fold logistic regression, pooled float features ({size:,} B/image)"
    ctx.add("embeddings", name, on_features, "share", on_features / majority, "majority")
    on_codes = accuracy(x_codes, y)
    name = f"{FOLDS}-fold logistic regression, 500-bit pooled codes ({codes.shape[1]} B/image)"
    ctx.add("embeddings", name, on_codes, "share", on_codes / on_features, "float features")


def rescoring(ctx: Context, index: Any, fit: Any, made: dict) -> None:
    photos = len(ctx.files)
    rescore = fit.rescoring()
    for label, use in (("codes alone", False), ("re-scored with features", True)):
        found, merged = truth(index, made, photos, None, features=use)
        expected = rescore.found_all if use and rescore else fit.found_all
        rule = (
            f"within {rescore.sure_distance} bits, or within {rescore.max_distance} at cosine "
            f">= {rescore.min_cosine:.3f}"
            if use and rescore
            else f"max distance {fit.max_distance} bits"
        )
        note = ", ".join(f"{k} {v:.2f}" for k, v in found.items())
        share = float(np.mean(list(found.values())))
        note = f"{rule}; the fit expected {expected:.3f}; {note}"
        name = f"copies grouped with their photo, pooled, {label}"
        ctx.add("embeddings", name, share, "share", note=note)
        false = rescore.false_pairs if use and rescore else fit.false_pairs
        note = f"of {photos}; the fit expected {false:.3f} paired"
        name = f"photos merged with another photo, pooled, {label}"
        ctx.add("embeddings", name, merged, "share", note=note)


def embeddings(ctx: Context) -> None:
    from encoder.folder_run import encode_folder
    from encoder.runtime import load_encoder
    from search.duplicate_fit import TooFewImages
    from search.index import Index

    chosen = ctx.settings(**LITE, layout="pooled")
    encoder = load_encoder(chosen)
    catalogue, made = make_catalogue(ctx, "embeddings-catalogue")
    dest = ctx.work / "embeddings"
    encode_folder(catalogue, str(dest), chosen, progress=False, encoder=encoder, features=True)
    classifiers(ctx, dest)
    index = Index.open(str(dest), save=False)
    try:
        fit = fitted(ctx, index, encoder, chosen)
    except TooFewImages as exc:
        print(f"  (no near-duplicate figures: {exc})")
    else:
        rescoring(ctx, index, fit, made)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(catalogue, ignore_errors=True)
