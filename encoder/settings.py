"""The one configuration object that `imgenc`, the producer and the Celery worker all read.

Every field can be set from an ``IMGENC_<FIELD>`` environment variable (for example
``IMGENC_BACKBONE=vgg19`` or ``IMGENC_WEIGHTS=random``); command-line flags override the
environment, and the environment overrides the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "IMGENC_"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"

LAYOUTS = ("spatial", "pooled")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Settings:
    """Model, pipeline and service settings, with the notebook's defaults for the model."""

    backbone: str = "vgg16"
    layout: str = "spatial"
    bits: int = 500
    seed: int = 628
    weights: str = "imagenet"  # "imagenet", "random" or a path to a Keras weights file
    precision: str = "fp32"
    center: str | None = None  # path to a centre file from `imgenc fit-center`, or None
    batch: int = 32
    decode_threads: int = 2
    shard_size: int = 1024  # images per code shard written by `imgenc encode`
    flush_seconds: float = 60.0  # ...or fewer, when a shard has been open this long
    broker_url: str = DEFAULT_BROKER_URL
    image_root: str | None = None  # where workers resolve the relative paths they receive
    chunk: int = 256  # images per Celery task message (measured: 64 -> 1,003, 256 -> 1,429 img/s)
    queue: str = "imgenc"
    max_strikes: int = 2  # times an image may be in hand when its worker dies, then `failed`
    visibility_timeout: int = 3600  # s: Redis redelivers a message unacked for this long
    task_time_limit: int = 1800  # s: a chunk running longer is killed (and redelivered)
    image_time_limit: float = 120.0  # s: a worker decoding one image for longer kills itself
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"task_time_limit ({self.task_time_limit} s) must be below visibility_timeout "
                f"({self.visibility_timeout} s), or running chunks would be delivered twice"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        for name in ("bits", "batch", "decode_threads", "chunk", "max_strikes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then ``IMGENC_*`` variables, then ``overrides`` (None values are skipped)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw
