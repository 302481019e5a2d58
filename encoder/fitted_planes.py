"""Hyperplanes fitted on a sample of the catalogue: ``imgenc fit-planes`` and ``--planes``.

The hashing stays the notebook's: a bit is 1 where ``(x - offset) . w > 0``, for one plane
``w`` per bit.  Random planes through the origin waste bits on trained features (all
positive after ReLU, and many directions in which every photo looks alike), so a planes
file fits them on the features of a sample of the catalogue, with the model the
destination will use:

- ``center``: the offset is the features' mean; the planes stay the random ones of the
  seed (what ``--center`` did, in the one file type);
- ``itq``: the offset is the mean, and the planes are PCA's top directions turned by ITQ's
  learned rotation (Gong & Lazebnik, 2011), as ``faiss.ITQTransform`` fits them (faiss
  normalises each centred vector before the transform; the sign does not change).

The file (``planes.npz``) holds the offset, the planes and what they were fitted for:
backbone, layout, weights, bits, method and sample size.  Its SHA-256 goes into the code
spec, it is copied into the destination, and query encoders and workers take it from
there.  ITQ needs at least ``MIN_VECTORS_PER_BIT`` feature vectors per bit (images for the
pooled layout, positions for spatial), and cannot give more bits than the features have
dimensions.
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

METHODS = ("center", "itq")
FORMAT = 1
# Measured on 944 labelled photos, pooled Lite0 features: ITQ fitted on as many images as
# bits lost 3% of its label precision at 64 bits against a fit on all of them; on twice as
# many, nothing measurable.  faiss's PCA refuses fewer vectors than bits.
MIN_VECTORS_PER_BIT = 2


class PlanesFileError(ValueError):
    """A planes file that cannot be used: damaged, or fitted for another model."""


@dataclass(frozen=True)
class PlanesInfo:
    """What a planes file was fitted for (its header)."""

    method: str
    backbone: str
    layout: str
    weights: str  # the spec's weights identity
    bits: int
    channels: int
    seed: int
    images: int  # images in the sample
    vectors: int  # feature vectors fitted on (images, or images x positions for spatial)
    format: int = FORMAT


@dataclass(frozen=True)
class FittedPlanes:
    info: PlanesInfo
    offset: np.ndarray  # (channels,) float32, subtracted before the planes
    planes: np.ndarray  # (channels, bits) float32, one column per bit

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(
                f,
                offset=self.offset.astype(np.float32),
                planes=self.planes.astype(np.float32),
                info=np.array(json.dumps(asdict(self.info))),
            )

    @classmethod
    def load(cls, path: str | Path) -> FittedPlanes:
        """The planes in ``path``; ``PlanesFileError`` naming the file when it is none."""
        not_planes = f"{path} is not a planes file from `imgenc fit-planes`"
        try:
            with np.load(path, allow_pickle=False) as data:
                offset, planes = data["offset"], data["planes"]
                info = PlanesInfo(**json.loads(str(data["info"])))
        except FileNotFoundError:
            raise PlanesFileError(f"planes file {path} does not exist") from None
        except (ValueError, OSError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            raise PlanesFileError(f"{not_planes} (damaged or of another kind)") from None
        if info.format != FORMAT or info.method not in METHODS:
            raise PlanesFileError(f"{not_planes} (format {info.format}, method {info.method!r})")
        if offset.shape != (info.channels,) or planes.shape != (info.channels, info.bits):
            raise PlanesFileError(f"{not_planes} (its arrays do not match its header)")
        return cls(info, offset.astype(np.float32), planes.astype(np.float32))

    def check_fits(self, backbone: str, layout: str, weights: str, bits: int) -> None:
        """Refuse planes fitted for another model, naming both."""
        mine = self.info
        wanted = {"backbone": backbone, "layout": layout, "weights": weights, "bits": bits}
        have = {"backbone": mine.backbone, "layout": mine.layout, "weights": mine.weights,
                "bits": mine.bits}  # fmt: skip
        differ = [
            f"{k} {have[k]!r} (planes) vs {v!r} (here)" for k, v in wanted.items() if have[k] != v
        ]
        if differ:
            raise PlanesFileError(
                f"the planes file was fitted for another model: {'; '.join(differ)}; fit "
                "planes with the same --backbone, --layout and --weights"
            )


def read_planes(path: str | Path) -> FittedPlanes:
    """``FittedPlanes.load``, read once per process for each (path, size, mtime)."""
    import os

    st = os.stat(path) if os.path.exists(path) else None
    return _read_planes(str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)


@functools.lru_cache(maxsize=8)
def _read_planes(path: str, size: int, mtime_ns: int) -> FittedPlanes:
    return FittedPlanes.load(path)


def read_planes_info(path: str | Path) -> PlanesInfo:
    return read_planes(path).info
