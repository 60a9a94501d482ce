"""One storage interface for a local folder and an s3:// prefix.

Objects are written whole and only if absent (S3 If-None-Match, a hard link locally), so a final
key never holds a partial or a second version of a file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bulkembed.contract.errors import TransientError

log = logging.getLogger(__name__)


class Store(Protocol):
    uri: str

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` unless something is there; True when this call wrote it."""

    def put(self, key: str, data: bytes) -> None:
        """Write or replace `key` (only for files that are rewritten whole, like the manifest)."""

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """(key, size) of every object under prefix, sorted by key."""

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the base path in it, for streaming reads."""


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _temp_file(self, path: Path, data: bytes) -> str:
        """`data` durably in a temporary file beside `path`, to be linked or renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._temp_file(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the key exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.replace(self._temp_file(path, data), path)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        base = self._path(prefix)
        if base.is_file():
            return [(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        found = [
            (str(p.relative_to(self.root)), p.stat().st_size)
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(found)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


class S3Store:
    """s3://bucket/prefix through boto3; endpoint and credentials from the standard AWS variables."""

    def __init__(self, uri: str):
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        # Checksums only when required: some S3-compatible servers reject boto3's default ones.
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 8, "mode": "standard"},
        )
        self._session = boto3.session.Session()
        self.client = self._session.client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise _classify(exc) from exc

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _classify(exc) from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _classify(exc) from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise _classify(exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _classify(exc) from exc

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                found.append((obj["Key"][strip:], obj["Size"]))
        return sorted(found)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        creds = self._session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds else None
        endpoint = self.client.meta.endpoint_url
        parsed = urlparse(endpoint)
        is_aws = parsed.hostname is not None and parsed.hostname.endswith("amazonaws.com")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        fs = pafs.S3FileSystem(
            access_key=frozen.access_key if frozen else None,
            secret_key=frozen.secret_key if frozen else None,
            session_token=frozen.token if frozen else None,
            region=self.client.meta.region_name or "us-east-1",
            endpoint_override=None if is_aws else f"{parsed.hostname}:{port}",
            scheme=parsed.scheme or "https",
            anonymous=frozen is None,
        )
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")


def _classify(exc: Exception) -> Exception:
    """5xx, throttling and connection trouble are transient; the rest is permanent."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return TransientError(f"S3 {code or status}: {exc}")
        return exc
    return TransientError(f"S3 connection problem: {exc}")


def has_conditional_writes(store: Store) -> bool:
    """Probe once: does a second if-absent write of the same key fail, as it must? (Some older
    S3-compatible servers ignore If-None-Match and overwrite.)"""
    key = f"_probe/{uuid.uuid4().hex}"
    try:
        store.put_if_absent(key, b"1")  # its answer may be lost and retried into a 412: ignore it
        return not store.put_if_absent(key, b"2") and store.get(key) == b"1"
    finally:
        store.delete(key)


def open_store(uri: str) -> Store:
    """A store for `s3://bucket/prefix` or a local folder."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    return LocalStore(uri)
