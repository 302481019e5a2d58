"""One sync at a time: a lock on a destination's index that another process can see.

A search engine of its own (``search.milvus_backend``) is written by whoever syncs it: the
last worker of a job, ``imgenc index``, every ``imgenc serve`` on refresh.  Two syncs that
ran at once could apply older rows after newer ones, so ``sync_lock(storage)`` lets one
in at a time:

- **a local destination**: ``fcntl.flock`` on ``DEST/index/.sync.lock``, which the kernel
  releases when the holder dies, however it dies;
- **S3**: a lease object, ``index/sync.lock``, created only if absent (``If-None-Match``,
  which S3, MinIO and SeaweedFS honour) and renewed by a thread every ``LEASE_SECONDS / 4``;
  a holder that died leaves it to expire, and the next taker replaces it, then reads it
  back to see that it won.

``wait`` is how long to wait for the lock (0: try once); ``SyncBusy`` when it stays taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator

from encoder.storage import LocalStorage, Storage, StorageError

LOCK_KEY = "index/sync.lock"
LOCAL_LOCK = "index/.sync.lock"
LEASE_SECONDS = 60.0
POLL_SECONDS = 0.5


class SyncBusy(RuntimeError):
    """Another process is syncing the index."""


@contextlib.contextmanager
def sync_lock(storage: Storage, wait: float = 0.0) -> Iterator[None]:
    if isinstance(storage, LocalStorage):
        with _file_lock(storage, wait):
            yield
    else:
        with _lease_lock(storage, wait):
            yield


@contextlib.contextmanager
def _file_lock(storage: LocalStorage, wait: float) -> Iterator[None]:
    import fcntl

    path = storage.local_path(LOCAL_LOCK)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the sync lock {path}: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SyncBusy(
                        f"another process is syncing the index of {storage.url}"
                    ) from None
                time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lease(owner: str) -> bytes:
    return json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()


def _holder(storage: Storage) -> dict | None:
    try:
        return json.loads(storage.get(LOCK_KEY))
    except KeyError:
        return None
    except ValueError:
        return {"owner": "", "expires": 0.0}  # torn or foreign: treat as expired


def _take(storage: Storage, owner: str) -> bool:
    """One attempt: create the lease if absent, or replace an expired one."""
    holder = _holder(storage)
    if holder is None:
        if not _create(storage, _lease(owner)):
            return False
    elif holder.get("expires", 0.0) < time.time():
        storage.put(LOCK_KEY, _lease(owner))
    else:
        return False
    time.sleep(0.2)  # another taker that replaced the same expired lease wrote by now
    holder = _holder(storage)
    return bool(holder) and holder.get("owner") == owner


def _create(storage: Storage, data: bytes) -> bool:
    """Write ``LOCK_KEY`` only if absent (S3's conditional put)."""
    from botocore.exceptions import ClientError

    client = storage.client  # type: ignore[attr-defined]
    try:
        client.put_object(
            Bucket=storage.bucket,  # type: ignore[attr-defined]
            Key=storage._key(LOCK_KEY),  # type: ignore[attr-defined]
            Body=data,
            IfNoneMatch="*",
        )
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise StorageError(f"S3 put {storage.url}/{LOCK_KEY} failed: {exc}") from exc


@contextlib.contextmanager
def _lease_lock(storage: Storage, wait: float) -> Iterator[None]:
    owner = secrets.token_hex(8)
    deadline = time.monotonic() + wait
    while not _take(storage, owner):
        if time.monotonic() >= deadline:
            raise SyncBusy(f"another process is syncing the index of {storage.url}")
        time.sleep(POLL_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(StorageError):
                storage.put(LOCK_KEY, _lease(owner))

    renewer = threading.Thread(target=renew, name="sync-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        holder = _holder(storage)
        if holder and holder.get("owner") == owner:
            storage.delete(LOCK_KEY)
