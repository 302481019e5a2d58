"""Test images made on the spot, so that the suite needs nothing outside the repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random colour field with a few blocks: compressible like a photo, distinct per seed."""
    rng = np.random.RandomState(seed)
    w, h = size
    small = rng.randint(0, 256, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
    im = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(im).copy()
    for _ in range(3):
        x, y = rng.randint(0, w // 2), rng.randint(0, h // 2)
        pixels[y : y + h // 4, x : x + w // 4] = rng.randint(0, 256, 3)
    return Image.fromarray(pixels, "RGB")


def write_jpegs(
    folder: Path, n: int, start: int = 0, size: tuple[int, int] = (160, 120)
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img_{i:05d}.jpg"
        photo_like(i, size).save(folder / name, quality=90)
        names.append(name)
    return names
