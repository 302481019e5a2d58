"""Image keys: the 64-bit integer that stands for an image id wherever a number is needed.

An image's key is the first 8 bytes of the BLAKE2b digest of its id (the path relative to
the image root, UTF-8), read little-endian, with the top bit cleared so that it is a
non-negative ``int64`` (what faiss ids and Milvus primary keys are).  It depends on the
id alone, so it never changes while the image stays in the catalogue: re-encoding the
image, deleting others, resuming, merging or moving the destination keep it.  The merged
manifest carries it (column ``key``), and the search index stores codes under it.

Two ids of one catalogue share a key with probability about n² / 2⁶⁴ (5 in a million for
10 million images); the index notices and leaves the second one out, naming both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

KEY_DTYPE = np.int64
_TOP_BIT_CLEARED = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


def image_key(image_id: str) -> int:
    """The key of one image id."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_keys(ids: Iterable[str]) -> np.ndarray:
    """The keys of ``ids`` (strings, or a pyarrow string array), as ``int64``."""
    if hasattr(ids, "to_pylist"):  # a pyarrow array: hashed a slice at a time
        length = len(ids)  # type: ignore[arg-type]
        parts = [
            image_keys(ids.slice(start, 65536).to_pylist())  # type: ignore[attr-defined]
            for start in range(0, length, 65536)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, KEY_DTYPE)
    digests = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest() for i in ids)
    keys = np.frombuffer(digests, "<u8") & _TOP_BIT_CLEARED
    return keys.astype(KEY_DTYPE)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, on uint64: a bijection that spreads every input bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

