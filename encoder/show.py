"""``imgenc show``: a picture of an image beside its code drawn as a bit matrix, as the
notebook's ``plt.imshow(image_encodings[0])`` did, rendered with Pillow alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from encoder.codes import load_codes, read_spec, unpack_codes
from encoder.images import ImageLoader
from encoder.merged import read_manifest
from encoder.storage import open_storage

PANEL_HEIGHT = 392


def find_row(dest: str, image_id: str) -> dict[str, Any]:
    import pyarrow.compute as pc

    rows = read_manifest(open_storage(dest), ["id", "path", "status", "error"])
    exact = rows.filter(pc.equal(rows["id"], image_id))
    if not exact.num_rows:  # accept a bare file name or stem, as the notebook's ids were
        ids = rows["id"].combine_chunks()
        base = pc.extract_regex(ids, r"(?:^|/)(?P<name>[^/]*)$").field("name")
        stem = pc.replace_substring_regex(base, r"^(.+)\.[^.]*$", r"\1")
        exact = rows.filter(pc.or_(pc.equal(base, image_id), pc.equal(stem, image_id)))
    if exact.num_rows != 1:
        raise KeyError(
            f"{image_id!r} matches {exact.num_rows} images in {dest}; give its id as in "
            "the manifest"
        )
    return exact.to_pylist()[0]


def render(dest: str, image_id: str, png: str | Path, image_root: str | None = None) -> Path:
    row = find_row(dest, image_id)
    if row["status"] != "ok":
        raise ValueError(f"{row['id']} has status {row['status']}: {row['error']}")
    spec = read_spec(dest)
    ids, codes = load_codes(dest)
    index = int(np.searchsorted(ids, row["id"]))
    bits = unpack_codes(codes[index : index + 1], spec)[0]
    if bits.ndim == 1:
        bits = bits.reshape(-1, 50) if bits.size % 50 == 0 else bits.reshape(1, -1)
    path = Path(image_root) / row["id"] if image_root else Path(row["path"])
    picture = ImageLoader(path.parent, PANEL_HEIGHT).load(path.name)
    if picture.ok:
        left = Image.fromarray(picture.pixels)
    else:
        left = Image.new("RGB", (PANEL_HEIGHT, PANEL_HEIGHT), (200, 200, 200))
    cell_h = max(1, PANEL_HEIGHT // bits.shape[0])
    cell_w = max(1, 1000 // bits.shape[1])
    matrix = Image.fromarray(((1 - bits) * 255).astype(np.uint8), "L").resize(
        (bits.shape[1] * cell_w, bits.shape[0] * cell_h), Image.Resampling.NEAREST
    )
    caption = 28
    canvas = Image.new(
        "RGB", (left.width + 16 + matrix.width, max(left.height, matrix.height) + caption), "white"
    )
    canvas.paste(left, (0, caption))
    canvas.paste(matrix.convert("RGB"), (left.width + 16, caption))
    ImageDraw.Draw(canvas).text(
        (4, 8),
        f"{row['id']}  |  {spec.backbone} {spec.layout} code {'x'.join(map(str, spec.code_shape))} "
        f"bits (black = 1), weights {spec.weights}",
        fill="black",
    )
    png = Path(png)
    canvas.save(png)
    return png
