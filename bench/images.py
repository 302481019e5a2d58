"""The images a bench run measures on, and the synthetic files some steps need.

``prepare_photos`` copies the chosen photos into one working folder, so that every step
sees exactly the same set: the 1,000 photos of ``../shared/data/clothing-1k/images``
(beside the checkout) when that folder exists, a folder given with ``--images``, or, for
``--quick`` runs without either, the 16 sample photos committed in ``examples/images``
(repeated when more are asked for).  Descriptions never name an absolute path.

``write_small_jpegs`` makes the tiny JPEGs of the queue-capacity step.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import numpy as np
from PIL import Image

from encoder.scan import scan_images

REPO = Path(__file__).resolve().parent.parent
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "clothing-1k" / "images"
SHARED_PHOTOS_NAME = "shared/data/clothing-1k"
SAMPLE_PHOTOS = REPO / "examples" / "images"
SAMPLE_PHOTOS_NAME = "examples/images"


class NoPhotos(Exception):
    """There is nothing to measure on; the message says what to pass."""


@dataclass(frozen=True)
class PhotoSet:
    folder: Path  # the working copy every step reads
    files: list[str]  # names inside ``folder``, sorted
    description: str  # for the table, without any absolute path


def _image_ids(source: Path) -> list[str]:
    return sorted(entry.id for entry in scan_images(source))


def prepare_photos(dest: Path, count: int, images_arg: str | None, quick: bool) -> PhotoSet:
    """Copy ``count`` photos from the chosen source into ``dest`` (see the module docstring)."""
    if images_arg is not None:
        source = Path(images_arg)
        if not source.is_dir():
            raise NoPhotos(f"--images {images_arg}: not a directory")
        origin, repeat = f"the --images folder ({source.name or images_arg})", False
    elif SHARED_PHOTOS.is_dir():
        source, origin, repeat = SHARED_PHOTOS, SHARED_PHOTOS_NAME, False
    elif quick:
        source, origin, repeat = SAMPLE_PHOTOS, SAMPLE_PHOTOS_NAME, True
    else:
        raise NoPhotos(
            f"no photos to measure on: ../{SHARED_PHOTOS_NAME}/images is not beside this "
            "checkout. Pass --images DIR (a folder of photos), or --quick to run on the "
            f"16 sample photos in {SAMPLE_PHOTOS_NAME}."
        )
    ids = _image_ids(source)
    if not ids:
        raise NoPhotos(f"no images found in {origin}")
    chosen = list(islice(cycle(ids), count)) if repeat else ids[:count]
    dest.mkdir(parents=True)
    files = []
    for number, image_id in enumerate(chosen):  # numbered: repeats and sub-folders never clash
        name = f"{number:05d}-{Path(image_id).name}"
        shutil.copyfile(source / image_id, dest / name)
        files.append(name)
    repeated = len(chosen) > len(set(chosen))
    kind = "sample photos" if source == SAMPLE_PHOTOS else "photos"
    description = f"{len(files)} {kind} from {origin}"
    if repeated:
        description += f" (its {len(set(chosen))} photos repeated)"
    return PhotoSet(dest, sorted(files), description)


def write_small_jpegs(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> Path:
    """``count`` distinct small JPEGs (smooth random colour fields), named ``tiny_NNNNN.jpg``."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for number in range(count):
        rng = np.random.default_rng(number)
        grid = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3))
        field = Image.fromarray(grid.astype(np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
        field.save(folder / f"tiny_{number:05d}.jpg", quality=90)
    return folder
