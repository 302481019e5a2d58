"""Where outputs go: a local directory or an ``s3://bucket/prefix``, behind one interface.

Writes are atomic in both: locally a temporary file in the same directory, fsynced, then
``os.replace``; on S3 a single ``put_object``, which is never visible half-written.  S3
credentials and endpoint come from boto3's standard chain (``AWS_ACCESS_KEY_ID``,
``~/.aws``, instance roles...) with ``AWS_ENDPOINT_URL`` for MinIO, SeaweedFS and the like.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class StorageError(Exception):
    """A write or read failed in a way that retrying later may fix (or that needs a human)."""


class Storage(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: str | Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def list_versions(self, prefix: str) -> dict[str, str]: ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        # Absolute: a destination named relative to one process's working directory must
        # mean the same folder to every process it is handed to (the Celery workers).
        self.root = Path(os.path.abspath(root))
        self.url = str(self.root)

    def put(self, key: str, data: bytes) -> None:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write under {target.parent}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            _remove_quietly(tmp)
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"disk full: could not write {target}") from exc
            raise StorageError(f"could not write {target}: {exc.strerror or exc}") from exc

    def put_file(self, key: str, path: str | Path) -> None:
        """Store the file at ``path`` (a temporary file: it may be moved, not copied)
        under ``key``, atomically."""
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.replace(path, target)  # the same file system: a rename
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"disk full: could not write {target}") from exc
            raise StorageError(f"could not write {target}: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def get_file(self, key: str, path: str | Path) -> None:
        """Copy the object ``key`` to the local file ``path``."""
        try:
            shutil.copyfile(self.root / key, path)
        except FileNotFoundError:
            raise KeyError(key) from None

    def delete(self, key: str) -> None:
        _remove_quietly(str(self.root / key))

    def list(self, prefix: str) -> Iterator[str]:
        yield from self.list_versions(prefix)

    def list_versions(self, prefix: str) -> dict[str, str]:
        """``key -> version`` (size and mtime) of every object under ``prefix``, sorted."""
        base = self.root / prefix
        if not base.is_dir():
            return {}
        versions = {}
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                st = entry.stat()
                versions[f"{prefix.rstrip('/')}/{entry.name}"] = f"{st.st_size}-{st.st_mtime_ns}"
        return versions

    def local_path(self, key: str) -> Path:
        return self.root / key


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", client: object | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3", config=Config(retries={"mode": "standard", "max_attempts": 5})
            )
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 put {self.url}/{key} failed: {exc}") from exc

    def put_file(self, key: str, path: str | Path) -> None:
        """Upload the file at ``path`` under ``key`` (multipart when large: boto3's managed
        transfer, which makes the object visible only once complete)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 put {self.url}/{key} failed: {exc}") from exc

    def get_file(self, key: str, path: str | Path) -> None:
        """Download the object ``key`` to the local file ``path``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise StorageError(f"S3 get {self.url}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 get {self.url}/{key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise StorageError(f"S3 get {self.url}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 get {self.url}/{key} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 delete {self.url}/{key} failed: {exc}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        yield from self.list_versions(prefix)

    def list_versions(self, prefix: str) -> dict[str, str]:
        """``key -> version`` (the ETag) of every object under ``prefix``."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix.rstrip("/") + "/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        versions = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    versions[obj["Key"][strip:]] = obj.get("ETag", "").strip('"')
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 list {self.url}/{prefix} failed: {exc}") from exc
        return versions


def open_storage(dest: str | Path) -> LocalStorage | S3Storage:
    """``s3://bucket/prefix`` gives S3 storage; anything else is a local directory."""
    text = str(dest)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {text!r}")
        return S3Storage(bucket, prefix)
    return LocalStorage(text)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
