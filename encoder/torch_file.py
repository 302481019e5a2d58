"""Reading a legacy ``torch.save`` file into NumPy arrays, without torch and without
running any code the file names.

A legacy (non-zip) ``torch.save`` file is a run of pickles: a magic number, a protocol
version, system facts, the object itself (a state dict of tensors that refer to storages
by key), the list of storage keys, then each storage's raw bytes (an int64 element count,
then the data, little-endian).  ``read_state_dict`` unpickles with an allow-list: nothing
but ``collections.OrderedDict``, ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2``
and the ``torch.*Storage`` types resolve, so a file that names anything else is refused
instead of executed.  Tensors are rebuilt from their storage with their own offset, shape
and strides (some are stored permuted).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a legacy ``torch.save`` state dict this reader accepts."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage is read after the object pickle: resolved at the end."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _StorageRef, offset: int, shape: Any, stride: Any, *_: Any
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(n) for n in shape), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(f"refusing to load {module}.{name}: not a plain tensor state dict")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchFileError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, *_view = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unexpected storage type {storage_type!r:.80}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _load(f: BinaryIO) -> Any:
    return _RestrictedUnpickler(f).load()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``name -> array`` of a legacy ``torch.save`` state dict; raises ``TorchFileError``
    (a ``ValueError``) for anything else, ``OSError`` when the file cannot be read."""
    data = Path(path).read_bytes()
    f = io.BytesIO(data)
    try:
        if _load(f) != MAGIC_NUMBER:
            raise TorchFileError(f"{path} is not a legacy torch.save file (a zip file?)")
        if _load(f) != PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: unknown torch.save protocol version")
        _load(f)  # system facts: endianness, type sizes
        tree = _load(f)
        keys = _load(f)
        refs = _tensor_refs(tree)
        storages: dict[str, _StorageRef] = {r.storage.key: r.storage for r in refs.values()}
        buffers: dict[str, np.ndarray] = {}
        for key in keys:
            ref = storages.get(str(key))
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = ref.dtype if ref else np.dtype(np.uint8)
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise TorchFileError(f"{path} ends early: the file is damaged or truncated")
            buffers[str(key)] = np.frombuffer(raw, dtype.newbyteorder("<"))
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError, TypeError) as exc:
        raise TorchFileError(f"{path} is damaged or not a torch.save file ({exc})") from None
    return {name: _materialise(ref, buffers, path) for name, ref in refs.items()}


def _tensor_refs(tree: Any) -> dict[str, _TensorRef]:
    if isinstance(tree, dict) and "state_dict" in tree and isinstance(tree["state_dict"], dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict) or not all(isinstance(v, _TensorRef) for v in tree.values()):
        raise TorchFileError("the file holds something other than a state dict of tensors")
    return {str(k): v for k, v in tree.items()}


def _materialise(ref: _TensorRef, buffers: dict[str, np.ndarray], path: Any) -> np.ndarray:
    try:
        flat = buffers[ref.storage.key]
    except KeyError:
        raise TorchFileError(f"{path}: storage {ref.storage.key} is missing") from None
    itemsize = flat.dtype.itemsize
    if ref.shape:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
        if min(ref.shape) > 0 and last >= flat.size:
            raise TorchFileError(f"{path}: a tensor reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
