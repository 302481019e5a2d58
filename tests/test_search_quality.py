"""What a user can trust from search, with the real VGG16 (random weights): near-duplicates
of a photo (recompressed, resized, slightly cropped, slightly rotated, brightened) find
the original first in a catalogue of a few hundred images, and the index ranks exactly
as a brute-force Hamming scan does.

The catalogue: the 16 photos of ``examples/``, each also cut into four quadrants and
mirrored (distinct images that share colours and textures with the originals, the
hardest distractors available offline), plus generated images: 256 images in all.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from encoder.codes import hamming, load_codes
from search import Index
from tests.helpers import REPO, make_settings, photo_like

EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def variants(image: Image.Image) -> dict[str, bytes]:
    """Near-duplicates a catalogue meets: the same photo, processed."""
    w, h = image.size
    return {
        "recompressed q40": _jpeg(image, 40),
        "resized to half": _jpeg(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "cropped 6%": _jpeg(image.crop((w * 3 // 100, h * 3 // 100, w * 97 // 100, h * 97 // 100))),
        "rotated 3 degrees": _jpeg(image.rotate(3, resample=Image.Resampling.BICUBIC, fillcolor="white")),
        "brightened 25%": _jpeg(ImageEnhance.Brightness(image).enhance(1.25)),
    }  # fmt: skip


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality") / "catalogue"
    folder.mkdir()
    for path in EXAMPLES:
        shutil.copy(path, folder / path.name)
        image = Image.open(path)
        w, h = image.size
        for n, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2),
                                 (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):  # fmt: skip
            (folder / f"{path.stem}-quadrant{n}.jpg").write_bytes(_jpeg(image.crop(box)))
        (folder / f"{path.stem}-mirrored.jpg").write_bytes(_jpeg(ImageOps.mirror(image)))
    for i in range(256 - 6 * len(EXAMPLES)):
        photo_like(1000 + i, (320, 400)).save(folder / f"generated-{i:03d}.jpg", quality=90)
    return folder


@pytest.mark.parametrize("layout,required", [("spatial", 0.9), ("pooled", 0.6)])
def test_near_duplicates_find_their_original_first_and_search_is_the_hamming_ranking(
    catalogue, tmp_path, reliability, layout, required
):
    from encoder.folder_run import encode_folder

    dest = tmp_path / "codes"
    settings = make_settings(layout=layout)
    encode_folder(catalogue, str(dest), settings, progress=False)
    index = Index.open(str(dest))
    assert len(index) == 256
    queries, originals = [], []
    for path in EXAMPLES:
        for kind, data in variants(Image.open(path)).items():
            queries.append((f"{path.name} {kind}", data))
            originals.append(path.name)
    answers = index.query(queries, k=10)
    assert all(a.status == "ok" for a in answers)
    top1 = np.mean([a.results[0]["id"] == o for a, o in zip(answers, originals, strict=True)])

    # The index ranks as a brute-force scan of every stored code does (ties by id).
    ids, codes = load_codes(dest)
    _, query_codes = index.embedded_encoder().encode(queries)
    for answer, code in zip(answers, query_codes, strict=True):
        distances = hamming(code, codes)[0]
        expected = sorted(zip(distances.tolist(), ids.tolist(), strict=True))[:10]
        assert [(r["distance"], r["id"]) for r in answer.results] == expected
    reliability.append(
        {"test": f"near-duplicate recall@1, {layout}, random weights", "queries": len(queries),
         "recall_at_1": round(float(top1), 3)}
    )  # fmt: skip
    assert top1 >= required, f"original first for {top1:.0%} of {len(queries)} variants"
