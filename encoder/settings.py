"""The one configuration object that ``imgenc``, the producer and the Celery worker all read.

Every field can be set from an ``IMGENC_<FIELD>`` environment variable (for example
``IMGENC_BACKBONE=vgg19`` or ``IMGENC_WEIGHTS=random``); command-line flags override the
environment, and the environment overrides the defaults below.

``Settings`` is the only reader of ``IMGENC_*`` variables in the project.  A process builds
its settings once: ``process_settings()`` reads the environment on first use and returns
the same object afterwards; the command line layers its flags on top with ``override``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from encoder.copies import parse_kinds

ENV_PREFIX = "IMGENC_"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"

DEFAULT_BITS = 500
LAYOUTS = ("spatial", "pooled")
RUNTIMES = ("tensorflow", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")  # int8: OpenVINO only, from a calibration sample


@dataclass(frozen=True)
class Settings:
    """Model, pipeline and service settings, with the notebook's defaults for the model."""

    # --- the model: these decide what a code means (see encoder.spec) ---
    backbone: str = "vgg16"
    layout: str = "spatial"
    bits: int = DEFAULT_BITS
    seed: int = 628  # seeds the hyperplanes, and the backbone itself under --weights random
    weights: str = "imagenet"  # "imagenet", "random" or a path to a Keras weights file
    precision: str = "fp32"
    center: str | None = None  # path to a centre file from `imgenc fit-center`, or None
    planes: str | None = None  # a planes file from `imgenc fit-planes` (its bits win)
    runtime: str = "tensorflow"  # or "openvino" (CPU workers; fp32, bf16 or int8)
    calibration: str | None = None  # int8: the sample from `imgenc calibrate`
    model_cache: str | None = None  # where OpenVINO keeps converted models [~/.cache/imgenc]
    # --- the near-duplicate threshold fitted on each destination (search.duplicate_fit) ---
    dedup_kinds: str = "jpeg,half,crop,rotate,bright,grey,mirror"  # what counts as a copy
    dedup_false_pairs: float = 0.01  # the share of distinct images the threshold may pair
    # --- the pipeline ---
    batch: int = 32
    decode_threads: int = 2
    shard_size: int = 1024  # images per code shard written by `imgenc encode`
    flush_seconds: float = 60.0  # ...or fewer, when a shard has been open this long
    # --- the queue (producer and workers) ---
    broker_url: str = DEFAULT_BROKER_URL
    image_root: str | None = None  # the root image paths travel relative to, on every host
    chunk: int = 256  # images per Celery task message (measured: 64 -> 1,003, 256 -> 1,429 img/s)
    queue: str = "imgenc"
    max_strikes: int = 2  # times an image may be in hand when its worker dies, then `failed`
    visibility_timeout: int = 30  # s without a lease renewal before Redis redelivers a message
    task_time_limit: int = 1800  # s: a chunk running longer is killed (and redelivered)
    image_time_limit: float = 120.0  # s: a worker decoding one image for longer kills itself
    celery_config: str | None = None  # a module whose Celery settings override ours
    # --- a search engine of its own (search.milvus_backend: `imgenc index DEST --kind milvus`) ---
    milvus_uri: str | None = None  # http://host:19530, or a local file.db for milvus-lite
    milvus_token: str | None = None  # USER:PASSWORD where the server checks them
    milvus_index: str | None = None  # BIN_IVF_FLAT on a server, BIN_FLAT (the only one) on lite
    milvus_nlist: int = 1024  # BIN_IVF_FLAT: clusters
    milvus_nprobe: int = 64  # BIN_IVF_FLAT: clusters a search visits (exact searches: all)
    milvus_timeout: int = 60  # s one call may take: a server gone away fails a sync
    # --- tests only ---
    stub_delay: float = 0.0  # s per image the stub backbone sleeps, to stand in for a model

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {self.runtime!r}")
        if self.precision == "int8" and self.runtime != "openvino":
            raise ValueError(
                "precision int8 runs on the openvino runtime only (--runtime openvino)"
            )
        for name in (
            "bits", "batch", "decode_threads", "chunk", "max_strikes", "milvus_nlist",
            "milvus_nprobe",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.planes:
            self._take_bits_from_the_planes_file()
        parse_kinds(self.dedup_kinds)
        if not 0 < self.dedup_false_pairs < 0.5:
            raise ValueError(
                f"dedup_false_pairs must be between 0 and 0.5, not {self.dedup_false_pairs}"
            )
        if self.visibility_timeout < 6:
            raise ValueError(
                f"visibility_timeout must be at least 6 s (leases are renewed every sixth of "
                f"it), not {self.visibility_timeout}"
            )

    def _take_bits_from_the_planes_file(self) -> None:
        from encoder.fitted_planes import read_planes_info

        if self.center:
            raise ValueError(
                "--planes and --center both give an offset: a planes file has its own (fit "
                "one with `imgenc fit-planes --method center` to centre random planes)"
            )
        bits = read_planes_info(self.planes).bits
        if self.bits != bits:
            if self.bits != DEFAULT_BITS:
                raise ValueError(
                    f"--bits {self.bits}, but the planes file {self.planes} has {bits}"
                )
            object.__setattr__(self, "bits", bits)  # the planes decide the bits

    @property
    def lease_interval(self) -> float:
        """Seconds between two renewals of a worker's message leases (see worker.leases)."""
        return self.visibility_timeout / 6

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then ``IMGENC_*`` variables, then ``overrides`` (None values are skipped)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        return cls(**values).override(overrides)

    def override(
        self, overrides: Mapping[str, Any] | None, ignore_unknown: bool = False
    ) -> Settings:
        """These settings with ``overrides`` applied, None values skipped.  An unknown name
        is an error, unless ``ignore_unknown`` (for an ``argparse.Namespace``'s ``vars()``,
        which holds other arguments too)."""
        names = {f.name for f in fields(self)}
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = sorted(set(overrides) - names)
        if unknown and not ignore_unknown:
            raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if k in names}
        return dataclasses.replace(self, **changes) if changes else self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=1)
def process_settings() -> Settings:
    """This process's settings from its environment, read once and then shared."""
    return Settings.from_env()


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a {kind}") from None
    return raw
