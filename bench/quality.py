"""The ``quality`` and ``backbones`` steps of ``python -m bench``: what the codes are worth
with trained weights (EfficientNet-Lite0, ImageNet: its weights install offline), and what
that backbone costs against VGG16.

1. ``quality``: label precision@10, leave one out, over the photos with a label
   (``labels.csv`` beside the shared or the sample photos, less "Not sure", "Skip" and
   "Other"; the others stay in the destinations but are never queries nor results), with
   the chance level.  The reference ranks the pooled float features (``Encoder.features``,
   computed once) by cosine; codes are hashed from them in NumPy as the hashing layer does
   (``(x - centre) @ hyperplanes(channels, bits, 628) > 0``; centre: the mean pooled
   feature, as ``imgenc fit-center`` computes it), Hamming ties broken by id as the index
   does.  Pooled codes also with learned planes: PCA-ITQ (``encoder.fit_planes``, faiss's
   ``ITQTransform``) fitted on the pooled features of every photo, as ``imgenc fit-planes``
   fits them on a catalogue.  Pooled and spatial 500 bits again through ``encode_folder`` +
   ``Index.similar``.
2. ``near-dup``: the photos plus copies of 100 of them in every kind of ``COPY_KINDS``, made
   with other parameters than the fit's own (``BENCH_COPIES``), encoded pooled and spatial;
   the threshold fitted on that catalogue (``fit_destination``) and on the photos alone;
   ``find_duplicates`` at the fitted default and at 0.8x and 1.2x of it.  The truth: per
   kind, the share of copies grouped with their photo, and the share of photos grouped with
   another photo (or its copy); beside them, what the fit expected.
   ``methods``: per hashing method and bit count, the share of copies within reach of their
   photo at a 1% false-pair rate (the distance at which 1% of the photos have another photo
   that near), on the pooled features of the photos and of their copies, in NumPy.
3. ``backbones``: files -> codes (``encode_folder``, spatial, batch 32, up to 256 photos,
   best of two runs) for VGG16 (random weights: speed does not depend on them) and Lite0
   side by side on TF fp32, OV fp32 (not under ``--quick``) and OV int8 (quantized from 64
   of the photos; Lite0 alone under ``--quick``), every encoder built and warmed up first;
   for Lite0, the bare encode of a decoded batch, 1 and 4 decode threads (2 is the
   default), and decoding + resizing on one core.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bench.core import (
    Context,
    cosine_topk,
    decode_rate,
    decoded_batch,
    features,
    hamming_distances,
    hamming_topk,
    overlap,
    seconds_per_call,
)
from bench.images import SAMPLE_PHOTOS, SHARED_PHOTOS
from encoder.copies import COPY_KINDS, _crop, open_picture
from encoder.planes import hyperplanes
from encoder.settings import LAYOUTS

LSH_BITS = (64, 128, 256, 500, 1024)
SPEED_PHOTOS = 256
LITE = {"backbone": "efficientnet_lite0", "weights": "imagenet"}
K = 10
DROPPED_LABELS = ("Not sure", "Skip", "Other")
COPIED = 100  # photos copied in every kind
# (what, edit, JPEG quality): the fit's kinds with other parameters than its own (quality 30,
# half size, 90% crop, 5 degrees with the border colour, 25% brighter, quality 95).
BENCH_COPIES: dict[str, tuple[str, Callable[[Image.Image], Image.Image], int]] = {
    "jpeg": ("JPEG q35", lambda p: p, 35),
    "half": ("45% size", lambda p: p.resize((p.width * 45 // 100, p.height * 45 // 100)), 90),
    "crop": ("88% centre crop", lambda p: _crop(p, 0.88), 90),
    "rotate": ("4°, white corners", lambda p: p.rotate(4, Image.BICUBIC, fillcolor="white"), 90),
    "bright": ("20% brighter", lambda p: ImageEnhance.Brightness(p).enhance(1.2), 90),
    "grey": ("greyscale", lambda p: ImageOps.grayscale(p).convert("RGB"), 90),
    "mirror": ("mirrored", ImageOps.mirror, 90),
}
assert set(BENCH_COPIES) == set(COPY_KINDS), "a copy kind without a bench copy"


def labels(files: list[str]) -> dict[str, str]:
    """Bench file name (``NNNNN-<image>.jpg``) -> label, for the photos with a usable one."""
    known: dict[str, str] = {}
    for source in (SAMPLE_PHOTOS, SHARED_PHOTOS):
        if (source.parent / "labels.csv").is_file():
            with (source.parent / "labels.csv").open(newline="") as f:
                known.update((row["image"], row["label"]) for row in csv.DictReader(f))
    found = {name: known.get(Path(name.split("-", 1)[-1]).stem, "") for name in files}
    return {name: label for name, label in found.items() if label and label not in DROPPED_LABELS}


def hash_bits(x: np.ndarray, bits: int, centre: np.ndarray | None = None) -> np.ndarray:
    """``HyperplaneHashing`` in NumPy: ``(n, ..., channels)`` features to ``(n, code bits)``."""
    x = x if centre is None else x - centre
    return (x @ hyperplanes(x.shape[-1], bits, 628) > 0).reshape(len(x), -1)


def precision(top: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(y[top] == y[:, None]))


# --- 1. label precision ---------------------------------------------------------------------
def label_precision(ctx: Context, encoder: Any, names: list[str], y: np.ndarray) -> dict:
    """The precision rows of the NumPy hashing; returns, per layout, the 500-bit raw
    ``(bits, top-k, precision)`` for the product path to compare with."""
    spatial = features(ctx, encoder, ctx.images, ctx.files)  # (photos, positions, channels)
    pooled = spatial.mean(axis=1)  # GlobalAveragePooling2D
    centre = pooled.mean(axis=0)
    keep = [ctx.files.index(name) for name in names]
    k = min(K, len(names) - 1)
    counts = np.bincount(y)
    chance = float(np.mean((counts[y] - 1) / (len(y) - 1)))
    what = f"chance level ({len(y)} labelled photos, {len(counts)} labels)"
    ctx.add("quality", f"label precision@{k}, {what}", chance, "share")
    exact = cosine_topk(pooled[keep], k)
    ref = precision(exact, y)
    name = f"label precision@{k}, pooled float features (cosine)"
    ctx.add("quality", name, ref, "share", ref / chance, "chance level", "leave one out")
    kept = {}
    for layout, x, sizes in (("pooled", pooled[keep], LSH_BITS), ("spatial", spatial[keep], [500])):
        for bits, centred in ((bits, centred) for bits in sizes for centred in (False, True)):
            codes = hash_bits(x, bits, centre if centred else None)
            top = hamming_topk(codes, k)
            value = precision(top, y)
            name = f"label precision@{k}, {layout} {bits} bits, {'centred' if centred else 'raw'}"
            note = f"recall@{k} of the float features' neighbours {overlap(top, exact):.3f}"
            ctx.add("quality", name, value, "share", value / ref, "float features", note)
            if bits == 500 and not centred:
                kept[layout] = (layout, codes, top, value)
    for bits, (offset, planes) in itq_planes(pooled).items():
        top = hamming_topk((pooled[keep] - offset) @ planes > 0, k)
        value = precision(top, y)
        name = f"label precision@{k}, pooled {bits} bits, PCA-ITQ ({bits // 8} B per image)"
        note = f"fitted on the {len(pooled)} photos' pooled features"
        ctx.add("quality", name, value, "share", value / ref, "float features", note)
    return kept


def itq_planes(pooled: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{bits: (offset, planes)}`` of PCA-ITQ for the bit counts these features allow."""
    from encoder.fit_planes import MIN_VECTORS_PER_BIT, planes_from_features

    fitted = {}
    for bits in (64, 128, 256, 512):
        if bits <= pooled.shape[1] and MIN_VECTORS_PER_BIT * bits <= len(pooled):
            fitted[bits] = planes_from_features(pooled, "itq", bits, 628)
    return fitted


def methods_for_copies(ctx: Context, encoder: Any, catalogue: Path, made: dict) -> None:
    """Copies within reach at a 1% false-pair rate, per hashing method (``methods``)."""
    x = features(ctx, encoder, catalogue, ctx.files + list(made)).mean(axis=1)
    photos, copies = x[: len(ctx.files)], x[len(ctx.files) :]
    source = np.array([ctx.files.index(photo) for photo, _ in made.values()])
    cases = {
        f"random {bits} bits, raw": (None, hyperplanes(x.shape[1], bits, 628))
        for bits in (128, 500)
    }
    centre = photos.mean(axis=0)
    cases.update(
        {
            f"random {bits} bits, centred": (centre, hyperplanes(x.shape[1], bits, 628))
            for bits in (128, 500)
        }
    )
    cases.update({f"PCA-ITQ {b} bits": fit for b, fit in itq_planes(photos).items()})
    for what, (offset, planes) in cases.items():
        shifted = (lambda v: v) if offset is None else (lambda v, o=offset: v - o)
        a, b = shifted(photos) @ planes > 0, shifted(copies) @ planes > 0
        dist = hamming_distances(a)
        reach = np.quantile(dist.min(axis=1), 0.01)  # 1% of photos have another this near
        copy_dist = (a[source] != b).sum(axis=1)
        found = float(np.mean(copy_dist < reach))
        name = f"copies within reach at 1% false pairs, pooled {what}"
        note = f"reach {reach:.0f} bits; {len(copies)} copies of {len(set(source))} photos"
        ctx.add("methods", name, found, "share", note=note)


def through_product(ctx: Context, index: Any, names: list[str], y: np.ndarray, case: tuple) -> None:
    """Precision of a NumPy ``case`` through the destination's index (``Index.similar``)."""
    layout, codes, numpy_top, numpy_value = case
    k, position = numpy_top.shape[1], {n: i for i, n in enumerate(names)}
    similar = [index.similar(name, k + len(index) - len(names)).ids for name in names]
    top = np.array([[position[i] for i in ids if i in position][:k] for ids in similar])
    stored = np.unpackbits(np.stack([index.code(n) for n in names]), axis=1, count=codes.shape[1])
    value = precision(top, y)
    name = f"label precision@{k}, {layout} 500 bits raw, through imgenc encode + Index.similar"
    note = (
        f"code bits equal to the NumPy hashing's {np.mean(stored == codes):.4f}; queries "
        f"with the same top-{k} {np.mean((top == numpy_top).all(axis=1)):.3f}"
    )
    ctx.add("quality", name, value, "share", value / numpy_value, "the NumPy hashing", note)


# --- 2. near-duplicates ---------------------------------------------------------------------
def make_catalogue(ctx: Context, name: str) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The photos and the copies of ``COPIED`` of them in the folder ``name``; returns the
    folder and ``{copy: (its photo, kind)}``."""
    folder = ctx.work / name
    shutil.copytree(ctx.images, folder)
    made = {}
    for name in ctx.files[:: max(1, len(ctx.files) // COPIED)][:COPIED]:
        picture = open_picture((ctx.images / name).read_bytes())
        for kind, (_, edit, quality) in BENCH_COPIES.items():
            copy = f"{Path(name).stem}__{kind}.jpg"
            edit(picture).save(folder / copy, "JPEG", quality=quality)
            made[copy] = (name, kind)
    return folder, made


def truth(
    index: Any,
    made: dict[str, tuple[str, str]],
    photos: int,
    max_distance: int | None,
    features: bool = True,
):
    """``find_duplicates`` at ``max_distance`` (None: the fitted default, re-scored by
    float features where the destination has them and ``features``): per kind, the share
    of copies grouped with their photo; the share of photos grouped with another photo or
    another photo's copy."""
    from search.duplicates import find_duplicates

    groups = find_duplicates(index, max_distance, features=features).groups
    group_of = {image: g for g, group in enumerate(groups) for image, _ in group}
    found: dict[str, list[bool]] = {kind: [] for kind in BENCH_COPIES}
    for copy, (photo, kind) in made.items():
        found[kind].append(copy in group_of and group_of[copy] == group_of.get(photo))
    merged: set[str] = set()
    for group in groups:
        sources = {made.get(image, (image,))[0] for image, _ in group}
        merged |= sources if len(sources) > 1 else set()
    return {kind: float(np.mean(v)) for kind, v in found.items()}, len(merged) / photos


def fitted(ctx: Context, index: Any, encoder: Any, chosen: Any) -> Any:
    """``fit_destination``; under ``--quick``, from copies of 16 images, not 100."""
    from search.duplicate_fit import COPIES_SAMPLE, fit_destination

    kinds, target = chosen.dedup_kinds.split(","), chosen.dedup_false_pairs
    sample = 16 if ctx.quick else COPIES_SAMPLE
    return fit_destination(index, encoder, kinds, target, progress=False, copies_sample=sample)


def near_duplicates(ctx: Context, encoder: Any, clean_index: Any, catalogue: Path, made: dict):
    from encoder.folder_run import encode_folder
    from search.duplicate_fit import TooFewImages
    from search.index import Index

    chosen, layout = encoder.settings, encoder.settings.layout
    dest = ctx.work / f"quality-catalogue-{layout}"
    encode_folder(catalogue, str(dest), chosen, progress=False, encoder=encoder)
    index = Index.open(str(dest), save=False)
    try:
        fit = fitted(ctx, index, encoder, chosen)
    except TooFewImages as exc:  # fewer than 100 images: a few photos, -n 8
        print(f"  (no near-duplicate figures for {layout} codes: {exc})")
        return
    bits, photos, at_fit = fit.bits, len(ctx.files), f"fitted ({fit.max_distance} bits)"
    try:
        clean = fitted(ctx, clean_index, encoder, chosen)
        name = f"fitted max distance, {layout}, the photos alone ({len(clean_index)})"
        note = (
            f"{clean.max_distance / bits:.2%} of the bits, limited by {clean.limited_by}; "
            f"{clean.copies_in_catalogue} close neighbours passed over as copies"
        )
        ctx.add("near-dup", name, clean.max_distance, "bits", note=note)
    except TooFewImages as exc:
        clean = None
        print(f"  (no fit on the {len(clean_index)} photos alone: {exc})")
    name = f"fitted max distance, {layout}, photos + copies ({len(index)} images)"
    ratio = fit.max_distance / clean.max_distance if clean and clean.max_distance else None
    note = (
        f"{fit.max_distance / bits:.2%} of {bits:,} bits, limited by {fit.limited_by}; "
        f"{fit.copies_in_catalogue} close neighbours passed over as copies; the fit expects "
        f"to find {fit.found_all:.3f} of copies and pair {fit.false_pairs:.3f} of images"
    )
    ctx.add("near-dup", name, fit.max_distance, "bits", ratio, "the photos alone", note)
    found, merged = truth(index, made, photos, None)
    for kind, share in found.items():
        name = f"{kind} copies ({BENCH_COPIES[kind][0]}) grouped with their photo, {layout}"
        expected, own = fit.found.get(kind, 0), COPY_KINDS[kind].description
        note = f"at the fitted {fit.max_distance} bits; the fit expected {expected:.2f} ({own})"
        ctx.add("near-dup", name, share, "share", note=note)
    others = {round(fit.max_distance * 0.8), round(fit.max_distance * 1.2)} - {fit.max_distance}
    for distance in [fit.max_distance, *sorted(others)]:
        if distance != fit.max_distance:
            found, merged = truth(index, made, photos, min(distance, bits // 2))
        at = at_fit if distance == fit.max_distance else f"{distance} bits"
        note = ", ".join(f"{k} {v:.2f}" for k, v in found.items())
        name = f"copies grouped with their photo, {layout}, {at}"
        ctx.add("near-dup", name, float(np.mean(list(found.values()))), "share", note=note)
        name = f"photos merged with another photo, {layout}, {at}"
        note = f"of {photos}; the fit expected {fit.false_pairs:.3f} paired at its threshold"
        ctx.add("near-dup", name, merged, "share", note=note)
    lsh_against_exact(ctx, index, fit.max_distance, layout)
    shutil.rmtree(dest, ignore_errors=True)


def lsh_against_exact(ctx: Context, index: Any, max_distance: int, layout: str) -> None:
    """The groups of the LSH pair search against the exact scan's on these real codes."""
    from search.duplicates import find_duplicates

    exact = find_duplicates(index, max_distance, features=False, method="exact").groups
    lsh = find_duplicates(index, max_distance, features=False, method="lsh")
    same = sum(g in exact for g in lsh.groups) / max(1, len(exact), len(lsh.groups))
    name = f"LSH groups equal to the exact scan's, {layout}, fitted ({max_distance} bits)"
    ctx.add("near-dup", name, same, "share", note=f"{len(exact)} groups; {lsh.pairs}")


def quality(ctx: Context) -> None:
    """The groups ``quality`` and ``near-dup`` (see the module docstring)."""
    from encoder.folder_run import encode_folder
    from encoder.tf_runtime import TensorFlowEncoder as Encoder
    from search.index import Index

    labelled = labels(ctx.files)
    names = [name for name in ctx.files if name in labelled]
    y = np.unique([labelled[name] for name in names], return_inverse=True)[1]
    encoders = {layout: Encoder(ctx.settings(**LITE, layout=layout)) for layout in LAYOUTS}
    numpy_cases = label_precision(ctx, encoders["spatial"], names, y) if len(names) > 2 else {}
    catalogue, made = make_catalogue(ctx, "quality-catalogue")
    methods_for_copies(ctx, encoders["spatial"], catalogue, made)
    for layout in ("pooled", "spatial"):
        dest, encoder = ctx.work / f"quality-photos-{layout}", encoders[layout]
        encode_folder(ctx.images, str(dest), encoder.settings, progress=False, encoder=encoder)
        index = Index.open(str(dest), save=False)
        if layout in numpy_cases:
            through_product(ctx, index, names, y, numpy_cases[layout])
        near_duplicates(ctx, encoder, index, catalogue, made)
        shutil.rmtree(dest, ignore_errors=True)


# --- 3. speed: Lite0 against VGG16 ------------------------------------------------------------
def compiled_note(encoder: Any) -> str:
    """The OpenVINO compiled model's streams, threads and inference precision."""
    compiled = getattr(encoder, "compiled", None)
    if compiled is None:
        return ""
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return (
        f"OV compiled: {compiled.get_property('NUM_STREAMS')} stream(s), "
        f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads, inference precision "
        f"{getattr(precision, 'to_string', lambda: precision)()}"
    )


def backbones(ctx: Context) -> None:
    """The group ``backbones`` (see the module docstring)."""
    from encoder.calibrate import calibration_sample, save_calibration
    from encoder.folder_run import encode_folder
    from encoder.runtime import load_encoder

    photos = ctx.copy_photos(SPEED_PHOTOS, "backbones-photos")
    count = len(ctx.files[:SPEED_PHOTOS])
    calibration, cache = ctx.work / "backbones-calib.npz", ctx.work / "backbones-model-cache"
    sample = 8 if ctx.quick else 64
    save_calibration(calibration, *calibration_sample(ctx.images, ctx.settings(), sample, False))
    batch = decoded_batch(ctx, min(32, len(ctx.files)))

    def files_to_codes(chosen: Any, encoder: Any) -> float:
        """The best of two runs (one under ``--quick``): the first after a build ran slower."""
        rates = []
        for _ in range(1 if ctx.quick else 2):
            dest = ctx.work / "backbones-dest"
            summary = encode_folder(photos, str(dest), chosen, progress=False, encoder=encoder)
            shutil.rmtree(dest, ignore_errors=True)
            rates.append(summary.processed / summary.seconds)
        return max(rates)

    configs = (("tensorflow", "fp32"), ("openvino", "fp32"), ("openvino", "int8"))
    for runtime, precision in configs[:: 2 if ctx.quick else 1]:  # --quick: no OV fp32
        rates, what = {}, f"{'TF' if runtime == 'tensorflow' else 'OV'} {precision}"
        models = (("VGG16", {"backbone": "vgg16"}), ("Lite0", LITE))
        for model, more in models[1:] if ctx.quick and precision == "int8" else models:
            chosen = ctx.settings(
                **more,
                runtime=runtime,
                precision=precision,
                calibration=str(calibration) if precision == "int8" else None,
                model_cache=str(cache),
            )
            start = time.perf_counter()
            encoder = load_encoder(chosen)
            built = time.perf_counter() - start
            encoder.encode(batch)  # warm-up
            rates[model] = files_to_codes(chosen, encoder)
            notes = [f"built in {built:.1f} s, not timed", compiled_note(encoder)]
            if precision == "int8":
                notes.append(f"quantized on {sample} of these photos")
            ratio = rates[model] / rates["VGG16"] if model == "Lite0" and "VGG16" in rates else None
            name = f"{what} files -> codes, {model} ({count} img)"
            note = "; ".join(n for n in notes if n)
            ctx.add("backbones", name, rates[model], "img/s", ratio, f"VGG16, {what}", note)
        bare = len(batch) / seconds_per_call(
            lambda e=encoder: e.encode(batch), 2 if ctx.quick else 5
        )
        name = f"{what} bare encode, Lite0, decoded batch of {len(batch)}"
        note = f"files -> codes reach {rates['Lite0'] / bare:.2f} of it"
        ctx.add("backbones", name, bare, "img/s", note=note)
        for threads in (1, 4):
            rate = files_to_codes(chosen.replace(decode_threads=threads), encoder)
            name = f"{what} files -> codes, Lite0, {threads} decode thread(s)"
            ctx.add("backbones", name, rate, "img/s", rate / rates["Lite0"], "2 (the default)")
        del encoder
    rate = decode_rate(ctx, count)
    ctx.add("backbones", "decode + resize to 224, one core, these photos", rate, "img/s")
