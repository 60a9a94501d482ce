"""One storage interface for a local folder and an s3:// prefix.

Objects are written whole and only if absent (S3 If-None-Match, a hard link locally), so a final
key never holds a partial or a second version of a file.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from bulkembed.contract.errors import InputError, StoreRefused, TransientError

log = logging.getLogger(__name__)

Item, Answer = TypeVar("Item"), TypeVar("Answer")
REQUESTS_AT_ONCE = 8  # store requests of one bulk pass at once: a 10^9-row job has ~7,600 units to list


class Store(Protocol):
    uri: str

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` unless something is there; True when this call wrote it."""

    def put(self, key: str, data: bytes) -> None:
        """Write or replace `key` (only for files that are rewritten whole, like the manifest)."""

    def put_file(self, key: str, path: Path) -> None:
        """Write or replace `key` with a local file's bytes, streamed (a file too large to hold)."""

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None:
        """Delete every key (absent ones too), in as few requests as the store allows."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """(key, size) of every object under prefix, sorted by key."""

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the base path in it, for streaming reads."""

    def check(self) -> None:
        """InputError where nothing can be written here at all (no such bucket): found before a job is registered,
        not at its first write."""


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _temp_file(self, path: Path, data: bytes | Path) -> str:
        """`data` (bytes, or a local file's) durably in a temporary file beside `path`, to be linked or renamed into
        place."""
        for attempt in range(3):  # a delete may prune the folder, or a parent, while it is made: make it again
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, Path):
                    with open(data, "rb") as source:
                        shutil.copyfileobj(source, f, 1 << 20)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            os.unlink(tmp)  # a part written (a full disk) would stay in OUT, hidden, taking space
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(f"no space left in {self.root} (writing {path.name}): free some, and the same "
                                   f"command resumes the job") from exc
            raise
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

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        os.replace(self._temp_file(target, Path(path)), target)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Folders emptied go too, as on S3 where a folder is only a prefix (a done job leaves no empty _shards/).
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty, or gone already
                    break
                folder = folder.parent

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--out {self.uri} is a file, not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that is a file, a read-only or virtual filesystem, no permission
            raise InputError(f"--out {self.uri}: cannot make the folder: {exc.strerror}") from None

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """As S3 lists: every key that starts with `prefix`, a folder or not ("000012-" finds a unit's shards)."""
        base = self._path(prefix)
        if base.is_dir():
            paths = base.rglob("*")
        elif base.parent.is_dir():
            paths = (p for top in base.parent.glob(f"{glob.escape(base.name)}*")
                     for p in ([top] if top.is_file() else top.rglob("*")))
        else:
            return []
        found = [(str(p.relative_to(self.root)), p.stat().st_size) for p in paths
                 if p.is_file() and not p.name.startswith(".tmp-")]
        return sorted(found)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


_S3_CLIENTS: dict[tuple, tuple] = {}  # (process id, AWS_* settings) -> (boto3 session, its client)


def s3_client() -> tuple:
    """This process's boto3 session and S3 client, made once (~60 ms; the connection pool is kept across shards).
    Keyed by the process, so a forked child (Celery's pool) makes its own rather than share its parent's sockets,
    and by the AWS_* variables it was made from (endpoint, credentials), so a change of them is never ignored."""
    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _S3_CLIENTS:
        import boto3
        import botocore.session
        from botocore.config import Config

        # boto3's own AWS_MAX_ATTEMPTS / AWS_RETRY_MODE (or ~/.aws/config) win; else 9 attempts in standard
        # mode. Past those, a failing call is a TransientError and the worker backs off for minutes.
        core = botocore.session.get_session()
        retries = {"total_max_attempts": core.get_config_variable("max_attempts") or 9,
                   "mode": core.get_config_variable("retry_mode") or "standard"}
        # Checksums only when required: some S3-compatible servers reject boto3's default ones.
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries=retries,
        )
        if any(pid != key[0] for pid, _ in _S3_CLIENTS):
            _S3_CLIENTS.clear()  # a parent's, inherited by fork: never used here
        session = boto3.session.Session(botocore_session=core)
        # AWS_REGION, which the docs name (and EKS and Lambda set), before boto3's own AWS_DEFAULT_REGION, as the
        # AWS CLI reads them: boto3 alone ignores it, and pyarrow then reads a bucket outside us-east-1 in us-east-1.
        client = session.client("s3", config=config, region_name=os.environ.get("AWS_REGION") or None)
        _S3_CLIENTS[key] = session, client
    return _S3_CLIENTS[key]


S3_DELETE_BATCH = 1000  # keys per DeleteObjects request, S3's limit


class S3Store:
    """s3://bucket/prefix through boto3; endpoint and credentials from the standard AWS variables."""

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise InputError(f"{uri!r} names no bucket: s3://bucket or s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._session, self.client = s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with _transient_errors("PUT", key):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _error_code(exc) in ("PreconditionFailed", "412"):  # 409 (a write racing this one): retried
                    return False
                raise

    def put(self, key: str, data: bytes) -> None:
        with _transient_errors("PUT", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        with _transient_errors("PUT", key):  # boto3's managed transfer: multipart past 8 MB
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def get(self, key: str) -> bytes:
        with _transient_errors("GET", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def delete(self, key: str) -> None:
        with _transient_errors("DELETE", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects, S3's most (1,000 keys) a request: a million-shard job's --force is a thousand requests."""
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = keys[start:start + S3_DELETE_BATCH]
            with _transient_errors("DELETE", f"{len(batch)} keys from {batch[0]}"):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(key)} for key in batch], "Quiet": True})
            if errors := answer.get("Errors"):  # per key, in a 200 answer: transient or not by their codes
                error = (TransientError if all(e.get("Code") in TRANSIENT_CODES for e in errors) else StoreRefused)
                raise error(f"S3 DELETE of {len(errors)} keys failed, the first {errors[0].get('Key')}: "
                            f"{errors[0].get('Code')} {errors[0].get('Message')}")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with _transient_errors("HEAD", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def check(self) -> None:
        from botocore.exceptions import ClientError

        with _transient_errors("HEAD bucket", self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                    raise InputError(f"{self.uri}: there is no bucket {self.bucket!r} (create it first)") from None
                # Anything else (403 where a policy allows writes but not HeadBucket): the writes will tell.

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        with _transient_errors("LIST", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    found.append((obj["Key"][strip:], obj["Size"]))
        return sorted(found)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        from botocore.credentials import RefreshableCredentials

        creds = self._session.get_credentials()
        # Credentials that expire (IRSA, EKS Pod Identity, an assumed role, SSO) are left to pyarrow's own provider
        # chain, which renews them: frozen here, a planner that keeps this filesystem for a job would fail an hour on.
        renewed = isinstance(creds, RefreshableCredentials)
        frozen = creds.get_frozen_credentials() if creds and not renewed else None
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
            anonymous=creds is None,
            # As many tries as boto3's: pyarrow's default of 3 gives up on a throttled read within about a second.
            retry_strategy=pafs.AwsStandardS3RetryStrategy(self.client.meta.config.retries["total_max_attempts"]),
        )
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")


# What botocore's standard retry mode retries, by error code and HTTP status (botocore/retries/standard.py).
TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError", "ServiceUnavailable",
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestThrottled", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "LimitExceededException",
    "EC2ThrottledException",
    "ConditionalRequestConflict",  # 409 to a conditional write racing another: S3 says try again (not in botocore's)
})
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# The same failures as pyarrow's S3 filesystem (the AWS C++ SDK) names them once its retries are spent: the SDK's
# error names for throttling, 5xx and the network, or an unnamed error with such a status.
ARROW_TRANSIENT = re.compile(r"AWS Error (SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|NETWORK_CONNECTION"
                             r"|REQUEST_TIMEOUT|UNKNOWN \(HTTP status (429|5\d\d)\))")


def _error_code(exc: Exception) -> str:
    return exc.response.get("Error", {}).get("Code", "")  # type: ignore[attr-defined]


def backoff_s(retries: int, cap_s: float) -> float:
    """The wait before a retry after the store (or Redis) failed: doubling from 1 s up to `cap_s`, jittered so the
    shards or units that failed together do not come back together."""
    return min(cap_s, 2.0 ** min(retries, 30)) * random.uniform(0.5, 1.0)


def is_transient(exc: Exception) -> bool:
    """Connection trouble, timeouts, throttling and 5xx answers (and a TransientError, which says one of them): worth
    retrying later. The rest (access denied, no such bucket, no credentials, bad parameters) is permanent."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, TransientError):
        return True
    if type(exc) is OSError:  # pyarrow's S3 filesystem (input files, the duplicates file)
        return ARROW_TRANSIENT.search(str(exc)) is not None
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status in TRANSIENT_STATUS or _error_code(exc) in TRANSIENT_CODES
    # ConnectionError: refused, connect timeout, TLS, proxy; HTTPClientError: closed, read timeout,
    # a body cut short; IncompleteReadError: fewer body bytes than announced.
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError))


@contextmanager
def _transient_errors(method: str, key: str) -> Iterator[None]:
    """A transient boto3 failure (after boto3's own retries) becomes a TransientError naming the call."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        if is_transient(exc):
            raise TransientError(f"S3 {method} {key}: {type(exc).__name__}: {exc}") from exc
        raise


@contextmanager
def unreadable_as(error: Callable[[Exception], Exception]) -> Iterator[None]:
    """pyarrow's failures reading a file (OSError, ArrowException) raised as `error(exc)` where the file is at fault;
    S3's transient ones stay as they are, to be retried, and so does running out of memory."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        if is_transient(exc) or isinstance(exc, pa.ArrowMemoryError):
            raise
        raise error(exc) from None


class LockedWrites:
    """A store that ignores if-absent writes (an old S3-compatible server), made to honour them: each such write
    takes `lock(key)` (a Redis lock, every worker's) and looks for the key first. The rest is the store's own."""

    def __init__(self, store: Store, lock: Callable[[str], AbstractContextManager]):
        self.store, self.lock = store, lock

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with self.lock(key):
            return not self.store.exists(key) and self.store.put_if_absent(key, data)

    def __getattr__(self, name: str) -> Any:
        if name == "store" or name.startswith("__"):  # not set yet (a copy being made), or Python's own
            raise AttributeError(name)
        return getattr(self.store, name)


def has_conditional_writes(store: Store) -> bool:
    """Probe once: does a second if-absent write of the same key fail, as it must? (Some older
    S3-compatible servers ignore If-None-Match and overwrite.)"""
    key = f"_probe-{uuid.uuid4().hex}"  # no folder: in a local OUT, a _probe/ one was left behind, empty
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


def at_once(request: Callable[[Item], Answer], items: Iterable[Item], threads: int = REQUESTS_AT_ONCE
            ) -> Iterator[Answer]:
    """`request` of each of `items`, `threads` at a time, the answers in order. At most twice `threads` answers wait
    to be read: a long pass (a listing a unit) neither runs one request at a time nor holds every answer. A request
    that fails, or a caller that stops reading, cancels those not yet started (during an outage each would take
    boto3's whole retry budget)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="store-requests")
    pending: deque[Future[Answer]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(request, item))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
