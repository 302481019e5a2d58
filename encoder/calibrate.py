"""``calibration_sample``: the images an int8 model is calibrated on (``imgenc calibrate``).

Post-training quantization sets each layer's int8 range from the activations of a few
dozen representative images.  The sample is the first ``sample`` decodable images of the
folder in scan order, decoded and resized by the same loader as encoding, and kept as
pixels in a file (``calib.npz``) whose SHA-256 goes into the code spec: every worker that
quantizes from it builds the same int8 model.  It runs on the same ``Runner`` as
``imgenc encode``, with the pixels themselves as output and ``PixelSample`` as the sink.
"""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

import numpy as np

from encoder.backbones import get_backbone
from encoder.images import ImageLoader, LoadResult
from encoder.progress import TqdmProgress
from encoder.runner import Runner
from encoder.scan import scan_images
from encoder.settings import Settings


def load_calibration(path: str | Path, input_size: int | None = None) -> np.ndarray:
    """The calibration sample of ``imgenc calibrate``: ``(n, size, size, 3)`` uint8 pixels.
    Raises ``ValueError`` naming the file when it is not one (or not of ``input_size``)."""
    not_a_sample = f"{path} is not a calibration sample from `imgenc calibrate`"
    try:
        with np.load(path, allow_pickle=False) as data:
            pixels = data["pixels"]
    except FileNotFoundError:
        raise ValueError(f"calibration file {path} does not exist") from None
    except (ValueError, OSError, KeyError, TypeError, AttributeError, zipfile.BadZipFile):
        raise ValueError(not_a_sample) from None
    if pixels.ndim != 4 or pixels.dtype != np.uint8 or pixels.shape[-1] != 3 or not len(pixels):
        raise ValueError(not_a_sample)
    if input_size is not None and pixels.shape[1:3] != (input_size, input_size):
        raise ValueError(
            f"{path} holds {pixels.shape[1]}-pixel images; the backbone takes {input_size}: "
            "calibrate again with the same --backbone"
        )
    return pixels


def save_calibration(path: str | Path, pixels: np.ndarray, ids: list[str]) -> None:
    with open(path, "wb") as f:
        np.savez(f, pixels=np.asarray(pixels, np.uint8), ids=np.array(ids, dtype=str))


class PixelSample:
    """A sink that keeps the decoded pixels of ok images, up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pixels: list[np.ndarray] = []
        self.ids: list[str] = []

    def add(self, results: list[LoadResult], pixels: np.ndarray) -> None:
        ok = [r.id for r in results if r.ok]
        for image_id, image in zip(ok, pixels, strict=True):
            if len(self.ids) < self.limit:
                self.ids.append(image_id)
                self.pixels.append(image)

    def flush(self) -> None:
        pass


def calibration_sample(
    image_dir: str | Path, settings: Settings, sample: int = 64, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """``(pixels, ids)`` of the first ``sample`` decodable images under ``image_dir``."""
    if sample < 1:
        raise ValueError("the calibration sample needs at least one image")
    size = get_backbone(settings.backbone).input_size
    sink = PixelSample(sample)
    bar = TqdmProgress(None, progress, desc="calibrate")
    runner = Runner(
        ImageLoader(image_dir, size),
        lambda pixels: pixels,
        sink,
        np.zeros((0, size, size, 3), np.uint8),
        settings.batch,
        settings.decode_threads,
        bar,
    )
    ids = (e.id for e in scan_images(image_dir))
    try:
        # Read a little past the sample: some images may not decode.
        runner.run(itertools.islice(ids, sample * 2 + 16))
    finally:
        bar.close()
    if not sink.ids:
        raise ValueError(f"no decodable image under {image_dir}")
    return np.stack(sink.pixels), sink.ids
