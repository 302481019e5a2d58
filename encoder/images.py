"""The one image loader: a path in, a ``(size, size, 3)`` uint8 array or a status out.

Every path that decodes images (``imgenc encode`` and the Celery worker) goes through
``ImageLoader.load``.  Bad input never raises: it comes back as a ``LoadResult`` whose
``status`` names what was wrong and whose ``error`` says it in one line.

Decoding rules, in order:

1. The path must stay inside the image root once symlinks are resolved (``outside_root``),
   be a regular file (``not_a_file``), exist (``missing``), be readable (``unreadable``),
   be non-empty (``empty``) and at most ``max_file_bytes`` long (``too_large``).
2. Only raster formats in ``ALLOWED_FORMATS`` are opened: PDF, EPS, PSD and SVG are
   recognised by their magic bytes and refused as ``unsupported`` without ever invoking
   Pillow's plugins for them (the EPS plugin would start Ghostscript).  Anything else
   Pillow cannot identify is ``not_an_image``.
3. The pixel count is checked from the header, before decoding: above
   ``PIL.Image.MAX_IMAGE_PIXELS`` the image is refused as ``too_large`` (a decompression bomb).
4. JPEGs much larger than the target are decoded at a reduced scale with ``draft()``;
   ``load()`` runs inside the guard, so truncated data is ``truncated`` and other decoder
   errors ``corrupt``.  Animated images keep their first frame.
5. EXIF orientation is applied (``ImageOps.exif_transpose``).
6. Modes become RGB by explicit rules: alpha (RGBA, LA, PA, palette with transparency) is
   composited on white; 16- and 32-bit integer images are *scaled* to 8 bits, not clipped;
   float images are scaled by their range; CMYK, YCbCr, LAB, HSV, L and 1 are converted.
7. The whole image is resized to ``size x size`` (aspect ratio not kept, like the
   notebook's ``target_size``) with Pillow's BILINEAR filter, which antialiases when it
   shrinks.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

T = TypeVar("T")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # MPO opens via JPEG
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
RESAMPLE = Image.Resampling.BILINEAR
ORIENTATION_TAG = 0x0112

_REFUSED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "Photoshop PSD"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)


class ImageStatus(str, enum.Enum):
    OK = "ok"
    MISSING = "missing"
    EMPTY = "empty"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not_a_file"
    OUTSIDE_ROOT = "outside_root"
    FAILED = "failed"  # the worker gave up on it (for example it kept killing the worker)
    SPEC_MISMATCH = "spec_mismatch"  # a worker refused a job made for another code spec

    def __str__(self) -> str:
        return self.value


@dataclass
class LoadResult:
    id: str  # the image's path relative to the image root, with "/" separators
    path: str  # the absolute path that was opened
    status: ImageStatus
    error: str = ""
    pixels: np.ndarray | None = None  # (size, size, 3) uint8 when status is OK
    sha256: str = ""
    size: int | None = None  # bytes on disk
    mtime_ns: int | None = None
    width: int | None = None  # as stored, before EXIF rotation and resizing
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is ImageStatus.OK


class LoadFailure(Exception):
    def __init__(self, status: ImageStatus, error: str) -> None:
        super().__init__(error)
        self.status = status


def resolve_in_root(root_prefix: str, rel: str) -> str:
    """``root_prefix + rel``, refusing any path that is absolute or climbs out with ``..``.

    Symlinks are checked separately by the loader, once the file is opened.
    """
    if not rel or rel.startswith(("/", "\\")) or os.path.isabs(rel) or "\x00" in rel:
        raise LoadFailure(ImageStatus.OUTSIDE_ROOT, f"absolute path {rel!r} refused")
    if ".." in rel.replace("\\", "/").split("/"):
        raise LoadFailure(ImageStatus.OUTSIDE_ROOT, f"path {rel!r} climbs out of the image root")
    return root_prefix + rel


class ImageLoader:
    """Loads images under ``root`` to ``size x size`` RGB arrays (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        size: int,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_pixels: int | None = None,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self._root_str = str(self.root)
        self._root_prefix = self._root_str.rstrip("/") + "/"
        self.size = size
        self.max_file_bytes = max_file_bytes
        self.max_pixels = max_pixels

    def load(self, rel: str) -> LoadResult:
        """Never raises for bad input; returns a ``LoadResult`` whose status says what happened."""
        result = LoadResult(id=rel, path=self._root_prefix + rel, status=ImageStatus.OK)
        with _guard(result):
            data = self._read(resolve_in_root(self._root_prefix, rel), result)
            result.pixels = self._decode(data, result, self.size, self._to_pixels)
        return result

    def read(self, rel: str) -> tuple[LoadResult, bytes | None]:
        """The file's bytes under the same checks as ``load``, not decoded; None, with the
        status, when it cannot be read (missing, not a file, unreadable, empty...)."""
        result = LoadResult(id=rel, path=self._root_prefix + rel, status=ImageStatus.OK)
        data = None
        with _guard(result):
            data = self._read(resolve_in_root(self._root_prefix, rel), result)
        return result, data if result.ok else None

    def load_bytes(self, data: bytes, image_id: str = "upload") -> LoadResult:
        """The same rules for an image held in memory (an upload, a query): never raises."""
        result = LoadResult(id=image_id, path="", status=ImageStatus.OK, size=len(data))
        with _guard(result):
            if not data:
                raise LoadFailure(ImageStatus.EMPTY, "zero-byte file")
            if len(data) > self.max_file_bytes:
                raise LoadFailure(
                    ImageStatus.TOO_LARGE,
                    f"{len(data)} bytes is over the {self.max_file_bytes}-byte limit",
                )
            result.sha256 = hashlib.sha256(data).hexdigest()
            result.pixels = self._decode(data, result, self.size, self._to_pixels)
        return result

    def load_picture(self, rel: str, max_side: int) -> tuple[LoadResult, Image.Image | None]:
        """The decoded RGB picture (orientation applied, aspect ratio kept) shrunk to fit
        ``max_side``, for thumbnails; the same checks as ``load``."""
        result = LoadResult(id=rel, path=self._root_prefix + rel, status=ImageStatus.OK)
        picture = None
        with _guard(result):
            data = self._read(resolve_in_root(self._root_prefix, rel), result)
            picture = self._decode(
                data, result, max_side, lambda rgb: ImageOps.contain(rgb, (max_side, max_side))
            )
        return result, picture if result.ok else None

    def decoded_pixels(self, data: bytes) -> int | None:
        """How many pixels decoding ``data`` would produce, read from its header alone
        (nothing is decoded): width x height, divided by the square of the reduced scale
        that JPEGs are decoded at (``draft_scale``).  None when the header does not say
        (not an image, a refused format, a bomb...): ``load_bytes`` then gives the status
        without decoding anything."""
        try:
            im = _open(data)
        except LoadFailure:
            return None
        with im:
            scale = draft_scale(im.format, im.size, self.size)
            return -(-im.size[0] // scale) * -(-im.size[1] // scale)

    def _to_pixels(self, rgb: Image.Image) -> np.ndarray:
        return np.asarray(rgb.resize((self.size, self.size), RESAMPLE), dtype=np.uint8)

    def _read(self, path: str, result: LoadResult) -> bytes:
        # Open first (following symlinks), then ask the kernel where the descriptor really
        # points: one syscall instead of an lstat per path component.  O_NONBLOCK keeps a
        # FIFO named like an image from blocking the open.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            reason = "broken symlink" if os.path.islink(path) else "no such file"
            raise LoadFailure(ImageStatus.MISSING, reason) from None
        except PermissionError:
            raise LoadFailure(ImageStatus.UNREADABLE, "permission denied") from None
        except IsADirectoryError:
            raise LoadFailure(ImageStatus.NOT_A_FILE, "is a directory") from None
        except OSError as exc:  # ELOOP: a symlink loop
            raise LoadFailure(ImageStatus.UNREADABLE, _os_reason(exc)) from None
        try:
            real = _real_path(fd, path)
            if real != self._root_str and not real.startswith(self._root_prefix):
                raise LoadFailure(ImageStatus.OUTSIDE_ROOT, "resolves outside the image root")
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise LoadFailure(ImageStatus.NOT_A_FILE, "is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise LoadFailure(ImageStatus.NOT_A_FILE, "not a regular file")
            result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
            if st.st_size == 0:
                raise LoadFailure(ImageStatus.EMPTY, "zero-byte file")
            if st.st_size > self.max_file_bytes:
                raise LoadFailure(
                    ImageStatus.TOO_LARGE,
                    f"{st.st_size} bytes is over the {self.max_file_bytes}-byte limit",
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(self.max_file_bytes + 1)
        except OSError as exc:
            raise LoadFailure(ImageStatus.UNREADABLE, _os_reason(exc)) from None
        finally:
            os.close(fd)
        if not data:
            raise LoadFailure(ImageStatus.EMPTY, "zero-byte file")
        result.sha256 = hashlib.sha256(data).hexdigest()
        return data

    def _decode(
        self, data: bytes, result: LoadResult, target: int, finish: Callable[[Image.Image], T]
    ) -> T:
        """``finish`` applied to ``data`` decoded as an RGB picture (while the decoded image
        is open); JPEGs at least twice ``target`` are decoded at a reduced scale."""
        limit = self.max_pixels or Image.MAX_IMAGE_PIXELS
        im = _open(data)
        with im:
            result.width, result.height = im.size
            if limit and im.size[0] * im.size[1] > limit:
                raise LoadFailure(
                    ImageStatus.TOO_LARGE,
                    f"{im.size[0]}x{im.size[1]} pixels is over the {limit}-pixel limit "
                    "(decompression bomb refused before decoding)",
                )
            try:
                if draft_scale(im.format, im.size, target) > 1:
                    im.draft("RGB", (target, target))
                im.load()  # first frame of animated images
                if im.getexif().get(ORIENTATION_TAG, 1) != 1:
                    im = ImageOps.exif_transpose(im)
                return finish(to_rgb(im))
            except (
                EOFError,
                SyntaxError,
                ValueError,
                OSError,
                Image.DecompressionBombError,
            ) as exc:
                raise LoadFailure(_decode_status(exc), _one_line(exc)) from None


def draft_scale(image_format: str | None, size: tuple[int, int], target: int) -> int:
    """The factor by which the loader decodes an image below its stored size: a JPEG at
    least twice ``target`` on its shorter side is decoded with ``draft()`` at 1/2, 1/4 or
    1/8 (the largest that keeps both sides at least ``target``, as Pillow picks it);
    every other format at full size (1)."""
    if image_format != "JPEG" or min(size) < 2 * target:
        return 1
    ratio = min(size[0] // target, size[1] // target)
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


def _open(data: bytes) -> Image.Image:
    """``data`` opened lazily (header only) among ``ALLOWED_FORMATS``; refused formats,
    unknown data and decompression bombs raise ``LoadFailure``."""
    head = data[:64].lstrip()
    for signature, name in _REFUSED_SIGNATURES:
        if head.startswith(signature):
            raise LoadFailure(ImageStatus.UNSUPPORTED, f"{name} is not a supported image format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise LoadFailure(ImageStatus.NOT_AN_IMAGE, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LoadFailure(ImageStatus.TOO_LARGE, f"decompression bomb refused: {exc}") from None
    except (EOFError, SyntaxError, ValueError, OSError) as exc:
        raise LoadFailure(_decode_status(exc), _one_line(exc)) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by the rules in the module docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**32 - 1
        scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scale = 255.0 / (high - low) if high > low else 0.0
        scaled = np.nan_to_num((values - low) * scale).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, L, 1, P


_PROC_FD = Path("/proc/self/fd")
_HAVE_PROC_FD = _PROC_FD.is_dir()


def _real_path(fd: int, path: str) -> str:
    """The file an open descriptor refers to, symlinks resolved."""
    if _HAVE_PROC_FD:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return os.path.realpath(path)


@contextlib.contextmanager
def _guard(result: LoadResult) -> Iterator[None]:
    """Turn whatever decoding raises into the result's status: bad input never raises."""
    try:
        yield
    except LoadFailure as failure:
        result.status, result.error = failure.status, str(failure)
    except MemoryError:
        result.status, result.error = ImageStatus.TOO_LARGE, "out of memory while decoding"
    except Exception as exc:  # a decoder bug must not stop the run
        result.status, result.error = ImageStatus.CORRUPT, _one_line(exc)


def _decode_status(exc: BaseException) -> ImageStatus:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "premature end" in text:
        return ImageStatus.TRUNCATED
    if isinstance(exc, Image.DecompressionBombError):
        return ImageStatus.TOO_LARGE
    return ImageStatus.CORRUPT


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return exc.strerror or _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
