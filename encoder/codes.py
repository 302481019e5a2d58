"""Reading codes back: ``load_codes(dest)`` gives ``(ids, codes)`` ready for a Hamming search.

Codes are stored bit-packed (``np.packbits`` of the flattened bits, big-endian bit order,
as NumPy does by default): ``bytes_per_code`` uint8 per image, 3,063 bytes for spatial
VGG16 at 500 bits (49 x 500 bits) and 63 bytes for pooled.  ``unpack_codes`` restores the
``(n, *code_shape)`` bit array; ``hamming`` compares packed codes directly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from encoder.manifest import SPEC_KEY, read_manifest
from encoder.spec import CodeSpec
from encoder.storage import LocalStorage, Storage, StorageError, open_storage


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """``(n, ...)`` 0/1 array to ``(n, bytes_per_code)`` packed uint8."""
    bits = np.asarray(bits)
    return np.packbits(bits.reshape(bits.shape[0], -1).astype(np.uint8, copy=False), axis=1)


def unpack_codes(codes: np.ndarray, spec: CodeSpec) -> np.ndarray:
    """``(n, bytes_per_code)`` packed uint8 to ``(n, *spec.code_shape)`` uint8 0/1 bits."""
    n_bits = int(np.prod(spec.code_shape))
    bits = np.unpackbits(codes, axis=1, count=n_bits)
    return bits.reshape((codes.shape[0], *spec.code_shape))


def hamming(query: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances from one packed code (or a batch) to every row of ``codes``."""
    query = np.atleast_2d(query)
    return np.bitwise_count(query[:, None, :] ^ codes[None, :, :]).sum(axis=-1, dtype=np.int64)


def read_spec(dest: str | Path | Storage) -> CodeSpec:
    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    return CodeSpec.from_json(storage.get(SPEC_KEY))


def _load_shard(storage: Storage, key: str) -> np.ndarray:
    try:
        if isinstance(storage, LocalStorage):
            return np.load(storage.local_path(key), mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(storage.get(key)), allow_pickle=False)
    except (FileNotFoundError, KeyError):
        raise StorageError(
            f"{storage.url}: the manifest names the code shard {key}, which is not there "
            "(deleted or not copied?)"
        ) from None


def load_codes(dest: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, codes)`` of every image whose status is ok, ids sorted, rows aligned.

    ``ids`` is a NumPy string array of paths relative to the image root; ``codes`` is
    ``(n, bytes_per_code)`` uint8.  ``dest`` is a directory or an ``s3://bucket/prefix``.
    """
    storage = open_storage(dest)
    spec = read_spec(storage)
    rows = [r for r in read_manifest(storage) if r["status"] == "ok"]
    ids = np.array([r["id"] for r in rows], dtype=str)
    return ids, codes_at(storage, spec, [(r["shard"], int(r["row"])) for r in rows])


def codes_at(storage: Storage, spec: CodeSpec, locations: list[tuple[str, int]]) -> np.ndarray:
    """``(len(locations), bytes_per_code)`` codes stored at ``(shard key, row)``
    locations (the manifest's ``shard`` and ``row``), in their order, each shard read once."""
    codes = np.empty((len(locations), spec.bytes_per_code), np.uint8)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for i, (shard, row) in enumerate(locations):
        by_shard.setdefault(shard, []).append((i, row))
    for key, pairs in by_shard.items():
        shard = _load_shard(storage, key)
        targets, sources = zip(*pairs, strict=True)
        codes[list(targets)] = shard[list(sources)]
    return codes
