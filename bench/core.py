"""What every step of ``python -m bench`` shares: a row of the table, the run's context
(photos, scratch folder, weights, figures so far), the machine, and a few timers."""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.images import ImageLoader
from encoder.settings import Settings


@dataclass
class Row:
    """One figure: a value and its unit, optionally a ratio against a named reference
    measured in the same run, and a note."""

    group: str
    name: str
    value: float
    unit: str
    ratio: float | None = None  # value / the figure named in `reference`
    reference: str = ""
    note: str = ""


@dataclass
class Context:
    """The photos, a scratch folder, the weights of the speed steps, and the figures so far."""

    images: Path
    files: list[str]
    quick: bool
    work: Path
    weights: str = "random"
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # for later steps' ratios
    scale: tuple[int, ...] = ()  # catalogue sizes of the scale step
    scale_hnsw: int = 0  # the largest of them the scale step builds HNSW for

    def add(self, *fields: Any, key: str | None = None, **named: Any) -> None:
        """Record and print ``Row(*fields, **named)``; ``key`` keeps its value for later."""
        row = Row(*fields, **named)
        self.rows.append(asdict(row))
        if key:
            self.figures[key] = row.value
        ratio = f"  ({row.ratio:.2f}x {row.reference})" if row.ratio is not None else ""
        value = f"{row.value:,.0f}" if abs(row.value) >= 100 else f"{row.value:,.3g}"
        print(f"  {row.group:<12} {row.name:<62} {value} {row.unit}{ratio}", flush=True)

    def settings(self, **overrides: Any) -> Settings:
        """The defaults with the run's weights and ``overrides``; the environment ignored."""
        return Settings.from_env({"weights": self.weights, **overrides}, environ={})

    def copy_photos(self, count: int, name: str) -> Path:
        """The first ``count`` photos in their own folder under the scratch folder."""
        folder = self.work / name
        folder.mkdir()
        for photo in self.files[:count]:
            shutil.copyfile(self.images / photo, folder / photo)
        return folder


def machine() -> dict[str, Any]:
    """The CPU model, core count and the CPU flags that decide model speed, and the stack."""
    flags: set[str] = set()
    model = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    import tensorflow as tf

    relevant = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": relevant,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def seconds_per_call(fn: Callable[[], object], calls: int = 2) -> float:
    """Seconds per call of ``fn``, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def decoded_batch(ctx: Context, n: int, size: int = 224) -> np.ndarray:
    """``n`` decoded photos (repeated if there are fewer) as one uint8 batch."""
    loader = ImageLoader(ctx.images, size)
    pixels = [r.pixels for r in map(loader.load, ctx.files[: max(n, 1)]) if r.ok]
    return np.stack((pixels * -(-n // len(pixels)))[:n])


def decode_rate(ctx: Context, n: int) -> float:
    """Photos decoded and resized to 224 per second, one at a time (one core)."""
    loader = ImageLoader(ctx.images, 224)
    start = time.perf_counter()
    for name in ctx.files[:n]:
        loader.load(name)
    return len(ctx.files[:n]) / (time.perf_counter() - start)


def features(ctx: Context, encoder: Any, folder: Path, names: list[str]) -> np.ndarray:
    """``encoder.features`` of ``names`` in ``folder``, in order, in batches of 32."""
    loader = ImageLoader(folder, encoder.input_size)
    batches = []
    for start in range(0, len(names), 32):
        results = [loader.load(name) for name in names[start : start + 32]]
        bad = [f"{r.id} ({r.status})" for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"photos that do not decode: {', '.join(bad)}")
        batches.append(encoder.features(np.stack([r.pixels for r in results])))
    return np.concatenate(batches)


def hamming_distances(codes: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances of 0/1 ``codes`` (``(n, ...)``) from one matrix
    product, the diagonal at infinity."""
    x = codes.reshape(len(codes), -1).astype(np.float32)  # exact up to 2**24 bits
    ones = x.sum(axis=1)
    dist = ones[:, None] + ones[None, :] - 2 * (x @ x.T)
    np.fill_diagonal(dist, np.inf)
    return dist


def hamming_topk(codes: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by Hamming distance, ties broken by position (as
    the index breaks them by id, for ids in order)."""
    return np.argsort(hamming_distances(codes), axis=1, kind="stable")[:, :k]


def cosine_topk(x: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))
