"""The one image loader: every kind of bad input gets its own status, never an exception."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder.images import ImageLoader, ImageStatus, to_rgb
from tests.helpers import photo_like

S = ImageStatus


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def load(root: Path, name: str, size: int = 32):
    return ImageLoader(root, size).load(name)


def jpeg_bytes(size=(64, 48), seed=0, **kw) -> bytes:
    buffer = io.BytesIO()
    photo_like(seed, size).save(buffer, "JPEG", **kw)
    return buffer.getvalue()


def test_good_jpeg_is_ok_with_sha256_size_and_original_dimensions(root):
    data = jpeg_bytes((80, 60))
    (root / "a.jpg").write_bytes(data)
    r = load(root, "a.jpg")
    assert r.status is S.OK and r.error == ""
    assert r.pixels.shape == (32, 32, 3) and r.pixels.dtype == np.uint8
    assert (r.width, r.height, r.size) == (80, 60, len(data))
    import hashlib

    assert r.sha256 == hashlib.sha256(data).hexdigest()


def test_missing_file_is_marked_missing(root):
    assert load(root, "nope.jpg").status is S.MISSING


def test_zero_byte_file_is_marked_empty(root):
    (root / "zero.jpg").write_bytes(b"")
    r = load(root, "zero.jpg")
    assert r.status is S.EMPTY and "zero-byte" in r.error


@pytest.mark.parametrize("fmt,cut", [("JPEG", 0.5), ("PNG", 0.6)])
def test_truncated_file_is_marked_truncated_and_not_half_decoded(root, fmt, cut):
    buffer = io.BytesIO()
    photo_like(1, (200, 150)).save(buffer, fmt)
    data = buffer.getvalue()
    (root / "t.img").write_bytes(data[: int(len(data) * cut)])
    r = load(root, "t.img")
    assert r.status is S.TRUNCATED, (r.status, r.error)
    assert r.pixels is None


def test_text_file_named_jpg_is_not_an_image(root):
    (root / "notes.jpg").write_text("this is not a picture\n")
    r = load(root, "notes.jpg")
    assert r.status is S.NOT_AN_IMAGE


@pytest.mark.parametrize(
    "content,what",
    [
        (b"%PDF-1.4\n1 0 obj\n", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (b"8BPS\x00\x01" + b"\x00" * 40, "Photoshop"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    ],
)
def test_pdf_eps_psd_and_svg_are_refused_as_unsupported_without_decoding(root, content, what):
    (root / "x.jpg").write_bytes(content)
    r = load(root, "x.jpg")
    assert r.status is S.UNSUPPORTED and what in r.error


def test_html_renamed_jpg_is_not_an_image(root):
    (root / "page.jpg").write_text("<!doctype html><html><body>hi</body></html>")
    assert load(root, "page.jpg").status is S.NOT_AN_IMAGE


def test_format_outside_the_allow_list_is_not_opened(root):
    buffer = io.BytesIO()
    photo_like(2, (16, 16)).save(buffer, "ICO")  # Pillow reads ICO, we do not
    (root / "icon.png").write_bytes(buffer.getvalue())
    assert load(root, "icon.png").status is S.NOT_AN_IMAGE


def _png_header_claiming(width: int, height: int) -> bytes:
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IDAT"
        + struct.pack(">I", zlib.crc32(b"IDAT"))
    )


def test_decompression_bomb_just_over_pillows_limit_is_refused_before_decoding(root):
    side = int((Image.MAX_IMAGE_PIXELS + 10) ** 0.5) + 1  # just over 1x the limit
    (root / "bomb.png").write_bytes(_png_header_claiming(side, side))
    r = load(root, "bomb.png")
    assert r.status is S.TOO_LARGE and "decompression bomb" in r.error


def test_jpeg_header_claiming_100000_by_100000_is_refused(root):
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)  # JPEG's maximum side
    (root / "huge.jpg").write_bytes(bytes(data))
    r = load(root, "huge.jpg")
    assert r.status is S.TOO_LARGE


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_file_without_read_permission_is_unreadable(root):
    p = root / "secret.jpg"
    p.write_bytes(jpeg_bytes())
    p.chmod(0)
    assert load(root, "secret.jpg").status is S.UNREADABLE


def test_file_without_read_permission_is_unreadable_even_for_root(root, monkeypatch):
    p = root / "secret.jpg"
    p.write_bytes(jpeg_bytes())
    real_open = os.open

    def denying_open(path, *args, **kwargs):  # root reads every file: deny it by hand
        if str(path).endswith("secret.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    r = load(root, "secret.jpg")
    assert r.status is S.UNREADABLE and "permission" in r.error


def test_directory_named_like_an_image_is_not_a_file(root):
    (root / "x.jpg").mkdir()
    assert load(root, "x.jpg").status is S.NOT_A_FILE


def test_symlink_leaving_the_image_root_is_refused(root, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes())
    (root / "link.jpg").symlink_to(outside)
    r = load(root, "link.jpg")
    assert r.status is S.OUTSIDE_ROOT


def test_symlink_inside_the_root_is_followed(root):
    (root / "real.jpg").write_bytes(jpeg_bytes())
    (root / "alias.jpg").symlink_to(root / "real.jpg")
    assert load(root, "alias.jpg").status is S.OK


@pytest.mark.parametrize("rel", ["../escape.jpg", "a/../../escape.jpg", "/etc/passwd"])
def test_paths_that_climb_out_or_are_absolute_are_refused(root, rel):
    assert load(root, rel).status is S.OUTSIDE_ROOT


def test_symlink_loop_is_unreadable_with_a_reason(root):
    (root / "loop1.jpg").symlink_to(root / "loop2.jpg")
    (root / "loop2.jpg").symlink_to(root / "loop1.jpg")
    r = load(root, "loop1.jpg")
    assert r.status is S.UNREADABLE and "loop" in r.error


def test_broken_symlink_is_missing(root):
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    assert load(root, "dangling.jpg").status is S.MISSING


def test_corrupt_jpeg_body_is_marked_corrupt_or_truncated(root):
    data = bytearray(jpeg_bytes((64, 64)))
    sos = data.index(b"\xff\xda")
    for i in range(sos + 20, len(data) - 2, 7):
        data[i] = 0xFF
    (root / "bad.jpg").write_bytes(bytes(data))
    assert load(root, "bad.jpg").status in (S.CORRUPT, S.TRUNCATED)


# --- colour modes -----------------------------------------------------------------


def test_rgba_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 0, 0]


def test_la_is_composited_on_white():
    im = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency_is_composited_on_white(root):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(root / "p.png", transparency=0)
    pixels = ImageLoader(root, 8).load("p.png").pixels
    assert pixels[7, 7].tolist() == [255, 255, 255]  # transparent index 0 -> white
    assert pixels[0, 0].tolist() == [10, 200, 30]


def test_16_bit_png_is_scaled_not_clipped(root):
    values = np.array([[0, 257 * 128, 65535, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(root / "deep.png")
    assert Image.open(root / "deep.png").mode.startswith("I")
    pixels = ImageLoader(root, 4).load("deep.png").pixels
    assert pixels[0, 0, 0] == 0 and 120 <= pixels[0, 1, 0] <= 136 and pixels[0, 3, 0] == 255


def test_cmyk_jpeg_is_converted_to_rgb(root):
    photo_like(3, (40, 40)).convert("CMYK").save(root / "cmyk.jpg")
    r = ImageLoader(root, 16).load("cmyk.jpg")
    assert r.status is S.OK and r.pixels.shape == (16, 16, 3)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel_images_become_three_channel_rgb(root, mode):
    photo_like(4, (20, 20)).convert(mode).save(root / "g.png")
    pixels = ImageLoader(root, 8).load("g.png").pixels
    assert pixels.shape == (8, 8, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])


def test_animated_gif_keeps_its_first_frame(root):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    pixels = ImageLoader(root, 8).load("anim.gif").pixels
    assert pixels[4, 4, 0] > 200 and pixels[4, 4, 2] < 50


def _oriented_jpeg(path: Path, orientation: int) -> None:
    im = Image.new("RGB", (60, 30), (0, 0, 255))  # wide, blue, with a red left third
    im.paste((255, 0, 0), (0, 0, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(root, orientation):
    _oriented_jpeg(root / "o.jpg", orientation)
    r = ImageLoader(root, 60).load("o.jpg")
    assert r.status is S.OK
    upright = Image.open(root / "o.jpg")
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(upright).resize((60, 60)))
    # Orientations 5-8 swap the axes: the red band ends up on top or bottom instead of a side.
    red = r.pixels[..., 0] > 128
    if orientation >= 5:
        assert red.all(axis=1).any() and not red.all(axis=0).any()
    else:
        assert red.all(axis=0).any() and not red.all(axis=1).any()
    assert np.abs(r.pixels.astype(int) - expected.astype(int)).mean() < 8


def test_large_jpeg_is_decoded_at_reduced_scale_with_draft(root, monkeypatch):
    photo_like(5, (1600, 1200)).save(root / "big.jpg")
    from PIL import JpegImagePlugin

    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    r = ImageLoader(root, 224).load("big.jpg")
    assert r.status is S.OK and r.pixels.shape == (224, 224, 3)
    assert [requested for requested, _ in drafts] == [(224, 224)]
    assert drafts[0][1] == (400, 300)  # decoded at 1/4 scale, still >= 224 on each side
    assert (r.width, r.height) == (1600, 1200)


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_webp_tiff_and_bmp_decode(root, fmt, ext):
    photo_like(6, (30, 20)).save(root / f"x.{ext}", fmt)
    assert ImageLoader(root, 16).load(f"x.{ext}").status is S.OK


def test_file_names_with_spaces_unicode_and_newlines_load(root):
    for name in ("with space.jpg", "ünïcødé-画像.jpg", "new\nline.jpg"):
        (root / name).write_bytes(jpeg_bytes())
        assert ImageLoader(root, 16).load(name).status is S.OK
