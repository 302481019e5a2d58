"""The code spec: everything that decides what a code means, recorded beside every output.

Two sets of codes can be compared only if their *compatibility fields* match (backbone,
layout, bits, seed, planes, weights, input size, resize, precision, centre).  Library
versions, and the destination option ``features``, are recorded but not compared.
``fingerprint`` is a short hash of the compatibility fields that travels in every task
message, so a worker can refuse work it would encode differently.  Computing a spec never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from encoder.backbones import get_backbone
from encoder.calibrate import load_calibration
from encoder.fitted_planes import read_planes
from encoder.planes import planes_sha256 as planes_sha256_of
from encoder.random_weights import RANDOM_WEIGHTS_ID
from encoder.settings import Settings

SPEC_VERSION = 2  # 2: --weights random is seeded (RANDOM_WEIGHTS_ID), no longer per process
RESIZE_METHOD = "squash-bilinear"  # whole image to input_size x input_size, Pillow BILINEAR
COMPAT_FIELDS = (
    "spec_version",
    "backbone",
    "layout",
    "n_bits",
    "seed",
    "planes_sha256",
    "weights",
    "input_size",
    "resize",
    "precision",
    "center_sha256",
    "runtime",
    "calibration_sha256",
    "planes_method",
    "planes_file_sha256",
)
# Fields added after specs were first written: left out of the fingerprint while they hold
# their default, so that codes written before them keep their fingerprint.
LATER_FIELDS = {
    "runtime": "tensorflow",
    "calibration_sha256": None,
    "planes_method": "random",
    "planes_file_sha256": None,
}


class SpecMismatch(Exception):
    """Codes made under two different specs would be compared."""


@dataclass(frozen=True)
class CodeSpec:
    backbone: str
    layout: str
    n_bits: int
    seed: int
    planes_sha256: str
    # "imagenet@keras-3.x" (downloaded by Keras), "imagenet:sha256:<hex>" (installed with a
    # package), RANDOM_WEIGHTS_ID (seeded by `seed`), "file:sha256:<hex>"
    weights: str
    input_size: int
    resize: str
    precision: str
    code_shape: tuple[int, ...]  # unpacked bits per image: (positions, n_bits) or (n_bits,)
    bytes_per_code: int  # packed bytes per image (np.packbits of the flattened bits)
    center_sha256: str | None = None
    runtime: str = "tensorflow"
    calibration_sha256: str | None = None  # int8: the SHA-256 of the calibration sample
    planes_method: str = "random"  # or "center" / "itq": fitted by `imgenc fit-planes`
    planes_file_sha256: str | None = None  # the planes file's SHA-256, when fitted
    # A destination option, not a compatibility field (outside the fingerprint): the
    # destination also keeps the pooled float features, float16 features/<shard>.npy.
    features: bool = False
    spec_version: int = SPEC_VERSION
    libraries: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        compat = {name: getattr(self, name) for name in COMPAT_FIELDS}
        for name, default in LATER_FIELDS.items():
            if compat[name] == default:
                del compat[name]
        return hashlib.sha256(json.dumps(compat, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: CodeSpec) -> dict[str, tuple[Any, Any]]:
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in COMPAT_FIELDS
            if getattr(self, name) != getattr(other, name)
        }

    def check_compatible(self, other: CodeSpec, what: str = "codes") -> None:
        diff = self.differences(other)
        if diff:
            detail = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise SpecMismatch(f"{what} were made under a different code spec ({detail})")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["code_shape"] = list(self.code_shape)
        data["fingerprint"] = self.fingerprint
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodeSpec:
        data = {k: v for k, v in data.items() if k != "fingerprint"}
        data["code_shape"] = tuple(data["code_shape"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> CodeSpec:
        return cls.from_dict(json.loads(text))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "numpy", "pillow", "openvino", "nncf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(weights: str, backbone: str = "vgg16") -> str:
    """What the spec records of ``--weights``: the random rule, the ImageNet weights (the
    installed file's SHA-256, or the Keras version that downloads them), or a file's
    SHA-256."""
    if weights == "random":
        return RANDOM_WEIGHTS_ID
    if weights == "imagenet":
        return get_backbone(backbone).imagenet_identity()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"--weights {weights!r} is neither 'imagenet', 'random' nor a readable weights file"
        )
    return f"file:sha256:{file_sha256(path)}"


def spec_for(settings: Settings) -> CodeSpec:
    """The spec that ``settings`` will produce, computed without building the model.
    Raises ``ValueError`` for settings no encoder can run (int8 without a valid
    calibration sample), before anything is written or sent."""
    backbone = get_backbone(settings.backbone)
    if settings.precision == "int8":
        if not settings.calibration:
            raise ValueError("--precision int8 needs --calibration FILE (from `imgenc calibrate`)")
        load_calibration(settings.calibration, backbone.input_size)
    if settings.layout == "spatial":
        code_shape: tuple[int, ...] = (backbone.positions, settings.bits)
    else:
        code_shape = (settings.bits,)
    n_bits_total = 1
    for n in code_shape:
        n_bits_total *= n
    weights = weights_identity(settings.weights, backbone.name)
    planes_sha256 = planes_sha256_of(backbone.channels, settings.bits, settings.seed)
    planes_method, planes_file = "random", None
    if settings.planes:
        fitted = read_planes(settings.planes)
        fitted.check_fits(backbone.name, settings.layout, weights, settings.bits)
        planes_sha256 = hashlib.sha256(fitted.planes.tobytes()).hexdigest()
        planes_method, planes_file = fitted.info.method, file_sha256(settings.planes)
    return CodeSpec(
        backbone=backbone.name,
        layout=settings.layout,
        n_bits=settings.bits,
        seed=settings.seed,
        planes_sha256=planes_sha256,
        weights=weights,
        input_size=backbone.input_size,
        resize=RESIZE_METHOD,
        precision=settings.precision,
        code_shape=code_shape,
        bytes_per_code=(n_bits_total + 7) // 8,
        center_sha256=file_sha256(settings.center) if settings.center else None,
        runtime=settings.runtime,
        calibration_sha256=(
            file_sha256(settings.calibration)
            if settings.calibration and settings.precision == "int8"
            else None
        ),
        planes_method=planes_method,
        planes_file_sha256=planes_file,
        libraries=library_versions(),
    )


def settings_for_spec(
    spec: CodeSpec,
    base: Settings,
    weights: str | None = None,
    center: str | None = None,
    calibration: str | None = None,
    planes: str | None = None,
) -> Settings:
    """``base`` with the model settings that reproduce ``spec`` (to encode queries that
    meet stored codes).  ``weights`` names the weights file when the codes were made with
    one; ``center`` the centre file when they were centred.  Raises ``SpecMismatch``,
    naming the fields, when this installation cannot make the same codes."""
    if weights is None:
        if spec.weights.startswith(("imagenet@", "imagenet:")):
            weights = "imagenet"
        elif spec.weights == RANDOM_WEIGHTS_ID:
            weights = "random"
        else:
            raise SpecMismatch(
                f"the codes were made with weights {spec.weights!r}; pass that weights file "
                "(--weights PATH) to encode queries that meet them"
            )
    if spec.center_sha256 and not center:
        raise SpecMismatch("the codes are centred; the destination's center.npy is needed")
    if spec.calibration_sha256 and not calibration:
        raise SpecMismatch("the codes are int8; the destination's calibration.npz is needed")
    if spec.planes_file_sha256 and not planes:
        raise SpecMismatch("the codes use fitted planes; the destination's planes.npz is needed")
    settings = base.replace(
        backbone=spec.backbone,
        layout=spec.layout,
        bits=spec.n_bits,
        seed=spec.seed,
        weights=weights,
        precision=spec.precision,
        center=center,
        runtime=spec.runtime,
        calibration=calibration,
        planes=planes,
    )
    spec.check_compatible(spec_for(settings), what="the stored codes and this query encoder")
    return settings
