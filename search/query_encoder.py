"""Encoding query images so that their codes meet a destination's stored codes.

``QueryEncoder`` is what the search needs: images in (name and bytes), one ``LoadResult``
per image and one packed code per ok image out.  ``EmbeddedQueryEncoder`` builds the
model that the destination's spec describes, in this process, and decodes through the
same ``ImageLoader`` as the encoder (a bad query image gets its status, never an
exception); the service decodes uploads apart from the model call (``decode``, then
``encode_pixels``).  A spec this installation cannot reproduce (other weights, another Keras for
ImageNet weights...) is refused with the differing fields named.  The Celery workers can
encode queries too (``producer.RemoteQueryEncoder``), with the same interface.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from encoder.images import DEFAULT_MAX_FILE_BYTES, ImageLoader, LoadResult
from encoder.manifest import CALIBRATION_KEY, CENTER_KEY, PLANES_KEY
from encoder.settings import Settings
from encoder.spec import CodeSpec, SpecMismatch, settings_for_spec
from encoder.storage import Storage

QueryImage = tuple[str, bytes]  # (a name for the results, the file's bytes)


class QueryEncoder(Protocol):
    spec: CodeSpec

    def encode(self, images: list[QueryImage]) -> tuple[list[LoadResult], np.ndarray]:
        """One result per image, and ``(n_ok, bytes_per_code)`` codes of the ok ones."""
        ...

    def decoded_pixels(self, data: bytes) -> int | None:
        """The pixels decoding ``data`` takes, read from its header alone (the service's
        admission: ``search.admission``); None when the header does not say."""
        ...

    def encode_with_features(
        self, images: list[QueryImage]
    ) -> tuple[list[LoadResult], np.ndarray, np.ndarray]:
        """The same, and the ok ones' pooled float features ``(n_ok, channels)``."""
        ...


def read_query_file(
    path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> QueryImage | QueryResult:
    """A query file's ``(path, bytes)``, or, when it cannot be read, its ``QueryResult``
    with the loader's status (``missing``, ``not_a_file``, ``unreadable``, ``empty``,
    ``too_large``): one bad query never stops the others."""
    reader = ImageLoader("/", 1, max_file_bytes)  # any path on this machine may be a query
    result, data = reader.read(os.path.abspath(path).lstrip("/"))
    if data is None:
        return QueryResult(path, str(result.status), result.error)
    return path, data


def destination_file(storage: Storage, key: str, sha256: str | None, folder: Path) -> str | None:
    """A file the spec hashes (the centre, the calibration sample), copied from the
    destination to ``folder`` and checked against the spec; None when the spec has none."""
    if not sha256:
        return None
    data = storage.get(key)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SpecMismatch(f"{key} in {storage.url} does not match the spec's SHA-256")
    path = folder / key
    path.write_bytes(data)
    return str(path)


class EmbeddedQueryEncoder:
    """The destination's model, built in this process."""

    def __init__(
        self,
        storage: Storage,
        spec: CodeSpec,
        base: Settings,
        weights: str | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        from encoder.runtime import load_encoder

        self._tmp = tempfile.TemporaryDirectory(prefix="imgenc-query-")
        folder = Path(self._tmp.name)
        center = destination_file(storage, CENTER_KEY, spec.center_sha256, folder)
        calibration = destination_file(storage, CALIBRATION_KEY, spec.calibration_sha256, folder)
        planes = destination_file(storage, PLANES_KEY, spec.planes_file_sha256, folder)
        self.settings = settings_for_spec(spec, base, weights, center, calibration, planes)
        self.spec = spec
        self.encoder = load_encoder(self.settings)
        self.loader = ImageLoader(self._tmp.name, self.encoder.input_size, max_file_bytes)

    def encode(self, images: list[QueryImage]) -> tuple[list[LoadResult], np.ndarray]:
        results = [self.decode(data, name) for name, data in images]
        codes = self.encode_pixels([r.pixels for r in results if r.ok])
        for r in results:
            r.pixels = None
        return results, codes

    def decoded_pixels(self, data: bytes) -> int | None:
        """The pixel count decoding ``data`` takes, from its header (for admission)."""
        return self.loader.decoded_pixels(data)

    def decode(self, data: bytes, name: str) -> LoadResult:
        """One image decoded and resized to the model's input (``pixels``), or its status;
        thread-safe, so the service decodes uploads outside the model batch."""
        return self.loader.load_bytes(data, name)

    def encode_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Packed codes of decoded images, in one model call."""
        return self.encoder.encode(np.stack(pixels)) if pixels else self.encoder.empty_codes

    def encode_with_features(
        self, images: list[QueryImage]
    ) -> tuple[list[LoadResult], np.ndarray, np.ndarray]:
        results = [self.loader.load_bytes(data, name) for name, data in images]
        pixels = [r.pixels for r in results if r.ok]
        size = self.encoder.input_size
        batch = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
        codes, features = self.encoder.encode_with_features(batch)
        for r in results:
            r.pixels = None
        return results, codes, features

    def warm_up(self) -> None:
        self.encoder.warm_up()


@dataclass
class QueryResult:
    """One query image's answer: its load status and, when ok, its nearest images."""

    query: str
    status: str
    error: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "distance"}]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"query": self.query, "status": self.status}
        if self.error:
            data["error"] = self.error
        data["results"] = self.results
        return data


def encode_uploads(
    encoder: QueryEncoder, images: list[QueryImage], features: list[bool]
) -> list[dict[str, Any]]:
    """``POST /encode``'s answer per image: its name and loader status (and error), and
    when ok its code (base64 of the packed bits) with the code's shape, and, where
    ``features`` asks, its pooled float features.  One model call for all of them."""
    if any(features):
        results, codes, pooled = encoder.encode_with_features(images)
    else:
        (results, codes), pooled = encoder.encode(images), None
    spec, answers, row = encoder.spec, [], 0
    for result, want in zip(results, features, strict=True):
        answer: dict[str, Any] = {"name": result.id, "status": str(result.status)}
        if result.error:
            answer["error"] = result.error
        if result.ok:
            answer["code"] = base64.b64encode(codes[row].tobytes()).decode("ascii")
            answer["code_shape"] = list(spec.code_shape)
            if want and pooled is not None:
                answer["features"] = [float(v) for v in pooled[row]]
            row += 1
        answers.append(answer)
    return answers


def answer_queries(
    index: Any, encoder: QueryEncoder, images: list[QueryImage], k: int
) -> list[QueryResult]:
    """Encode ``images`` with ``encoder`` and search ``index`` for each ok one."""
    check_encoder(index, encoder)
    results, codes = encoder.encode(images)
    return search_codes(index, results, codes, k)


def check_encoder(index: Any, encoder: QueryEncoder) -> None:
    """Refuse an encoder whose codes cannot be compared with the index's."""
    if encoder.spec.fingerprint != index.spec.fingerprint:
        index.spec.check_compatible(encoder.spec, what="the stored codes and this query encoder")


def search_codes(
    index: Any, results: list[LoadResult], codes: np.ndarray, k: int
) -> list[QueryResult]:
    """One ``QueryResult`` per load result: the neighbours of its code when it is ok
    (``codes`` holds one row per ok result, in order), its status otherwise."""
    found = iter(index.search(codes, k) if len(codes) else [])
    return [
        QueryResult(r.id, str(r.status), r.error, next(found).to_json() if r.ok else [])
        for r in results
    ]
