"""What counts as a copy of an image: the kinds of copy, how to make one, and the pixel
check that recognises one.

``COPY_KINDS`` are the edits a catalogue's near-duplicates usually went through: a
recompressed JPEG, a downscaled file, a small crop, a small rotation, a brighter export, a
greyscale version and a mirror image.  Which of them count as copies is the catalogue's
choice (a mirror image may be the other shoe of a pair, a greyscale one another
colourway), so the near-duplicate fit takes a list of kinds (the ``dedup_kinds`` setting).

``make_copy`` writes a copy as a file would be written (JPEG bytes), so that it goes
through the same loader as a real copy.  ``PixelCheck`` tells whether two images are
copies of each other from their pixels alone, independently of the codes: both are
reduced to 32 x 32 thumbnails and compared by normalised cross-correlation, over a few
crops and rotations (and mirror images, and colour, as the kinds ask).  Measured on the
1,000 shared clothing photos, every copy of the seven kinds scored at least 0.978, and
the closest distinct photos at most 0.972.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, ImageStat


def _border_colour(picture: Image.Image) -> tuple[int, ...]:
    """The mean colour of the picture's outer pixels: rotation fills its corners with it."""
    width, height = picture.size
    frame = Image.new("L", picture.size, 255)
    frame.paste(0, (2, 2, max(3, width - 2), max(3, height - 2)))
    return tuple(int(round(c)) for c in ImageStat.Stat(picture, frame).mean)


def _crop(picture: Image.Image, keep: float) -> Image.Image:
    """The centred part of ``picture`` with ``keep`` of its width and height."""
    width, height = picture.size
    dx, dy = round(width * (1 - keep) / 2), round(height * (1 - keep) / 2)
    return picture.crop((dx, dy, width - dx, height - dy)) if dx or dy else picture


def _rotate(picture: Image.Image, degrees: float) -> Image.Image:
    return picture.rotate(degrees, Image.Resampling.BICUBIC, fillcolor=_border_colour(picture))


@dataclass(frozen=True)
class CopyKind:
    name: str
    description: str
    edit: Callable[[Image.Image], Image.Image]
    jpeg_quality: int = 95


COPY_KINDS: dict[str, CopyKind] = {
    k.name: k
    for k in (
        CopyKind("jpeg", "recompressed as JPEG at quality 30", lambda p: p, 30),
        CopyKind(
            "half",
            "downscaled to half the width and height",
            lambda p: p.resize((max(1, p.width // 2), max(1, p.height // 2)), Image.BICUBIC),
        ),
        CopyKind("crop", "cropped to the centre 90% of each side", lambda p: _crop(p, 0.9)),
        CopyKind("rotate", "rotated by 5 degrees", lambda p: _rotate(p, 5)),
        CopyKind("bright", "25% brighter", lambda p: ImageEnhance.Brightness(p).enhance(1.25)),
        CopyKind("grey", "greyscale", lambda p: ImageOps.grayscale(p).convert("RGB")),
        CopyKind("mirror", "mirrored left to right", ImageOps.mirror),
    )
}
DEFAULT_KINDS = tuple(COPY_KINDS)


def parse_kinds(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"jpeg,half,crop"`` (or a list) to kind names, refusing unknown ones."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in COPY_KINDS]
    if unknown or not names:
        raise ValueError(
            f"unknown copy kind(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(COPY_KINDS)}"
        )
    return tuple(dict.fromkeys(names))


def open_picture(data: bytes) -> Image.Image:
    """The image in ``data`` as RGB, upright (EXIF orientation applied)."""
    with Image.open(io.BytesIO(data)) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def make_copy(picture: Image.Image, kind: str) -> bytes:
    """A copy of ``picture`` of ``kind``, as the bytes of a JPEG file."""
    copy_kind = COPY_KINDS[kind]
    buffer = io.BytesIO()
    copy_kind.edit(picture).save(buffer, "JPEG", quality=copy_kind.jpeg_quality)
    return buffer.getvalue()


THUMB = 32  # thumbnail side, pixels
SAME_PICTURE = 0.975  # normalised cross-correlation from which two thumbnails are copies
CROPS = (1.0, 0.95, 0.9, 0.85)  # share of each side kept
ROTATIONS = (-6.0, -3.0, 0.0, 3.0, 6.0)  # degrees
_yy, _xx = np.mgrid[:THUMB, :THUMB] - (THUMB - 1) / 2
# The inscribed disc: the corners, which a rotation fills with whatever colour, do not count.
DISC = (np.hypot(_yy, _xx) <= THUMB * 0.46).ravel()


class PixelCheck:
    """Whether two images are copies of each other, from their pixels (see the module
    docstring).  Colour counts unless greyscale copies do; mirror images are tried only
    when they count as copies."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.colour = "grey" not in kinds
        self.mirror = "mirror" in kinds

    def thumbnail(self, picture: Image.Image) -> np.ndarray:
        small = picture.convert("RGB" if self.colour else "L").resize(
            (THUMB, THUMB), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(small, np.float32)
        pixels = pixels.reshape(-1, 3) if self.colour else pixels.reshape(-1, 1)
        pixels = pixels[DISC]
        pixels = pixels - pixels.mean(axis=0)  # each channel's own brightness does not count
        flat = pixels.ravel()
        return flat / (np.linalg.norm(flat) + 1e-6)

    def variants(self, picture: Image.Image) -> np.ndarray:
        """Thumbnails of the picture under the crops, rotations (and mirror) tried."""
        thumbs = []
        for keep in CROPS:
            cropped = _crop(picture, keep)
            for degrees in ROTATIONS:
                turned = _rotate(cropped, degrees) if degrees else cropped
                thumbs.append(self.thumbnail(turned))
                if self.mirror:
                    thumbs.append(self.thumbnail(ImageOps.mirror(turned)))
        return np.stack(thumbs)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """The best correlation between any variant of one image and any of the other: a
        crop and a rotation of one photo meet half way."""
        return float((a @ b.T).max())

    def same_picture(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.similarity(a, b) >= SAME_PICTURE
