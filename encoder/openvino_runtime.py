"""``OpenVinoEncoder``: the same model on OpenVINO, for CPU workers, in fp32, bf16 or int8.

The Keras model of ``encoder.model.build_model`` is built as usual; the part up to the
hashing layer (preprocessing, backbone, pooling) is converted in-process with
``openvino.convert_model``.  For ``int8`` it is then quantized with NNCF's post-training
quantization, from the calibration sample of ``imgenc calibrate`` (a file whose SHA-256 is
part of the code spec, so every worker of a job uses the same quantized model).  The
converted model is cached on disk (``~/.cache/imgenc/openvino`` or ``IMGENC_MODEL_CACHE``),
keyed by everything that decides it, so a worker does not convert again at every start.

The hashing itself (features minus the centre, times the hyperplanes, > 0) stays in
float32 NumPy: quantizing it would flip bits for nothing, and it costs 0.1% of the model.

Compilation uses ``PERFORMANCE_HINT=LATENCY`` with one synchronous request per batch: on a
few cores it measured faster than ``THROUGHPUT`` with one request, which left cores idle
(see docs/performance.md); decoding overlaps inference through the runner's thread pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from encoder.backbones import get_backbone
from encoder.calibrate import load_calibration
from encoder.centering import load_center
from encoder.codes import pack_bits
from encoder.fitted_planes import read_planes
from encoder.model import build_model, feature_model
from encoder.planes import hash_features, hyperplanes
from encoder.runtime import pooled, warm_up
from encoder.settings import Settings
from encoder.spec import CodeSpec, file_sha256, spec_for

log = logging.getLogger("imgenc")

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest stays f32
DEFAULT_CACHE = Path.home() / ".cache" / "imgenc" / "openvino"


class RuntimeUnavailable(Exception):
    """The OpenVINO runtime (or NNCF, for int8) is not installed."""


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise RuntimeUnavailable(
            "--runtime openvino needs the openvino extra: pip install 'imgenc[openvino]'"
        ) from None
    return openvino


class OpenVinoEncoder:
    """Pixels in, packed codes out, on OpenVINO (an ``encoder.runtime.Encoder``)."""

    def __init__(self, settings: Settings, performance_hint: str = "LATENCY") -> None:
        ov = import_openvino()
        self.settings = settings
        self.spec: CodeSpec = spec_for(settings)
        self.backbone = get_backbone(settings.backbone)
        self.empty_codes = np.zeros((0, self.spec.bytes_per_code), np.uint8)
        if settings.planes:  # fitted: their own planes and offset
            fitted = read_planes(settings.planes)
            self.planes, self.center = fitted.planes, fitted.offset
        else:
            self.planes = hyperplanes(self.backbone.channels, settings.bits, settings.seed)
            self.center = load_center(settings.center) if settings.center else None
        self.performance_hint = performance_hint
        start = time.monotonic()
        self.cache_path, self.cache_hit = self._cached_model_path(ov), False
        core = ov.Core()
        if self.cache_path.with_suffix(".xml").exists():
            model = core.read_model(str(self.cache_path.with_suffix(".xml")))
            self.cache_hit = True
        else:
            model = self._convert(ov)
            self._save(ov, model)
        config = {
            "PERFORMANCE_HINT": performance_hint,
            "INFERENCE_PRECISION_HINT": OV_PRECISION[settings.precision],
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.output = self.compiled.output(0)
        self.seconds_to_ready = time.monotonic() - start
        log.debug(
            "OpenVINO %s model ready in %.1f s (%s)",
            settings.precision,
            self.seconds_to_ready,
            "from the cache" if self.cache_hit else "converted",
        )

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    # --- conversion and its cache ---------------------------------------------------------
    def _cache_key(self, ov: Any) -> str:
        """Everything that decides the converted model (the hashing is outside it)."""
        from importlib import metadata

        versions = {d: _version(metadata, d) for d in ("openvino", "keras", "nncf")}
        spec = self.spec
        key = {
            "backbone": spec.backbone,
            "layout": spec.layout,
            "weights": spec.weights,
            "seed": spec.seed if spec.weights.startswith("random") else None,
            "input_size": spec.input_size,
            "int8": self.settings.precision == "int8",
            "calibration": spec.calibration_sha256,
            "versions": versions,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def _cached_model_path(self, ov: Any) -> Path:
        folder = Path(self.settings.model_cache) if self.settings.model_cache else DEFAULT_CACHE
        kind = "int8" if self.settings.precision == "int8" else "fp32"
        return folder / f"{self.spec.backbone}-{self.spec.layout}-{kind}-{self._cache_key(ov)}"

    def _convert(self, ov: Any) -> Any:
        full = build_model(
            self.settings.replace(precision="fp32", center=None, planes=None, runtime="tensorflow")
        )
        extractor = feature_model(full)
        size = self.input_size
        with warnings.catch_warnings():  # Keras notes the tuple convert_model passes it
            warnings.simplefilter("ignore", UserWarning)
            model = ov.convert_model(extractor, input=[(-1, size, size, 3)])
        if self.settings.precision == "int8":
            model = self._quantize(model)
        return model

    def _quantize(self, model: Any) -> Any:
        try:
            import nncf
        except ImportError:
            raise RuntimeUnavailable(
                "--precision int8 needs NNCF, in the openvino extra: pip install 'imgenc[openvino]'"
            ) from None
        pixels = load_calibration(self.settings.calibration, self.input_size)
        dataset = nncf.Dataset(list(pixels), lambda p: p[None].astype(np.float32))
        return nncf.quantize(model, dataset, subset_size=len(pixels))

    def _save(self, ov: Any, model: Any) -> None:
        """Save atomically: a temporary pair of files, renamed .bin first, then .xml."""
        folder = self.cache_path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder))
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            os.replace(tmp / "model.bin", self.cache_path.with_suffix(".bin"))
            os.replace(tmp / "model.xml", self.cache_path.with_suffix(".xml"))
            tmp.rmdir()
        except OSError as exc:  # a read-only home: convert at every start, but run
            log.warning("could not cache the converted model in %s: %s", folder, exc)

    # --- inference ------------------------------------------------------------------------
    def features(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, positions, channels)`` for spatial, ``(n, channels)`` for pooled (float32)."""
        out = self.compiled(pixels.astype(np.float32, copy=False))[self.output]
        out = np.asarray(out, np.float32)
        return out.reshape(out.shape[0], -1, out.shape[-1]) if out.ndim == 4 else out

    def bits(self, pixels: np.ndarray) -> np.ndarray:
        return hash_features(self.features(pixels), self.planes, self.center)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[0] == 0:
            return self.empty_codes
        return pack_bits(self.bits(pixels))

    def encode_with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if pixels.shape[0] == 0:
            return self.empty_codes, np.zeros((0, self.backbone.channels), np.float32)
        features = self.features(pixels)
        codes = pack_bits(hash_features(features, self.planes, self.center))
        return codes, pooled(features)

    def warm_up(self) -> None:
        warm_up(self)


def _version(metadata: Any, dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def calibration_sha256(path: str | None) -> str | None:
    return file_sha256(path) if path else None
