"""Reading codes back: ``load_codes(dest)`` gives ``(ids, codes)`` ready for a Hamming search.

Codes are stored bit-packed (``np.packbits`` of the flattened bits, big-endian bit order,
as NumPy does by default): ``bytes_per_code`` uint8 per image, 3,063 bytes for spatial
VGG16 at 500 bits (49 x 500 bits) and 63 bytes for pooled.  ``unpack_codes`` restores the
``(n, *code_shape)`` bit array; ``hamming`` compares packed codes directly.

Both readers take the ``ok`` rows of the merged manifest as Arrow columns and read each
shard once: ``load_codes`` returns everything in id order; ``iter_codes`` streams
``(ids, codes)`` a few shards at a time, for catalogues whose ids do not fit in memory as
NumPy strings (10 million ids of 40 characters take 1.6 GB that way).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from encoder.manifest import OK, SPEC_KEY
from encoder.merged import read_manifest
from encoder.spec import CodeSpec
from encoder.storage import LocalStorage, Storage, StorageError, open_storage

STRING_CHUNK = 65536  # ids turned into NumPy strings this many at a time


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


def read_shard(storage: Storage, key: str, what: str = "code shard") -> np.ndarray:
    """A shard (``.npy``): memory-mapped when local, read whole from S3."""
    try:
        if isinstance(storage, LocalStorage):
            return np.load(storage.local_path(key), mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(storage.get(key)), allow_pickle=False)
    except (FileNotFoundError, KeyError):
        raise StorageError(
            f"{storage.url}: the manifest names the {what} {key}, which is not there "
            "(deleted or not copied?)"
        ) from None


def numpy_strings(column: Any) -> np.ndarray:
    """An Arrow string column as a NumPy ``str`` array, converted a chunk at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pa.chunked_array([column]) if isinstance(column, pa.Array) else column
    n = len(column)
    if n == 0:
        return np.zeros(0, dtype=str)
    width = max(1, int(pc.max(pc.utf8_length(column)).as_py() or 1))
    out = np.empty(n, dtype=f"U{width}")
    for start in range(0, n, STRING_CHUNK):
        out[start : start + STRING_CHUNK] = column.slice(start, STRING_CHUNK).to_pylist()
    return out


def shard_groups(shards: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows grouped by shard (``shards``: strings, or dictionary-encoded): the shard
    keys, and the positions sorted by shard with the start of each shard's run
    (``starts[i]:starts[i + 1]``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(shards, (pa.Array, pa.ChunkedArray)):
        shards = pa.array(list(shards), pa.string())
    if isinstance(shards, pa.Array):
        shards = pa.chunked_array([shards])
    if not pa.types.is_dictionary(shards.type):
        shards = pc.dictionary_encode(shards)
    shards = pa.Table.from_arrays([shards], names=["shard"]).unify_dictionaries()["shard"]
    if shards.num_chunks == 0 or len(shards) == 0:
        return [], np.zeros(0, np.int64), np.zeros(1, np.int64)
    combined = shards.combine_chunks()
    names = combined.dictionary.to_pylist()
    indices = combined.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(indices, kind="stable")
    starts = np.searchsorted(indices[order], np.arange(len(names) + 1))
    return names, order, starts


def codes_at(storage: Storage, spec: CodeSpec, shards: Any, rows: Any) -> np.ndarray:
    """``(n, bytes_per_code)`` codes stored at the locations ``(shards[i], rows[i])`` (the
    manifest's ``shard`` and ``row`` columns), in their order, each shard read once."""
    rows = np.asarray(rows, np.int64)
    codes = np.empty((len(rows), spec.bytes_per_code), np.uint8)
    names, order, starts = shard_groups(shards)
    for n, key in enumerate(names):
        targets = order[starts[n] : starts[n + 1]]
        if len(targets):
            codes[targets] = read_shard(storage, key)[rows[targets]]
    return codes


def load_codes(dest: str | Path | Storage) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, codes)`` of every image whose status is ok, ids sorted, rows aligned.

    ``ids`` is a NumPy string array of paths relative to the image root; ``codes`` is
    ``(n, bytes_per_code)`` uint8.  ``dest`` is a directory or an ``s3://bucket/prefix``.
    """
    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    spec = read_spec(storage)
    table = read_manifest(storage, ["id", "shard", "row"], status=OK, shards_encoded=True)
    codes = codes_at(storage, spec, table["shard"], table["row"].to_numpy())
    return numpy_strings(table["id"]), codes


def iter_codes(
    dest: str | Path | Storage, batch_size: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, codes)`` of every ok image, about ``batch_size`` at a time, a few whole
    shards per batch (each shard read once; ids in shard order, not sorted)."""
    import pyarrow as pa

    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    spec = read_spec(storage)
    table = read_manifest(storage, ["id", "shard", "row"], status=OK, shards_encoded=True)
    rows = table["row"].to_numpy()
    ids = table["id"]
    names, order, starts = shard_groups(table["shard"])
    first = 0
    while first < len(names):
        last = first + 1
        while last < len(names) and starts[last + 1] - starts[first] <= batch_size:
            last += 1
        positions = order[starts[first] : starts[last]]
        codes = np.empty((len(positions), spec.bytes_per_code), np.uint8)
        done = 0
        for n in range(first, last):
            targets = order[starts[n] : starts[n + 1]]
            codes[done : done + len(targets)] = read_shard(storage, names[n])[rows[targets]]
            done += len(targets)
        yield numpy_strings(ids.take(pa.array(positions))), codes
        first = last
