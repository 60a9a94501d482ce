"""Helpers of the fault tests: bounded waits, a redis-server we can stop and restart, a faulty S3
endpoint (a reverse proxy in front of moto that answers 500/503, resets connections or answers
late, deterministically), and the exactly-once checks."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import redis

from bulkembed.contract import keys
from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.store import LocalStore, open_store
from tests.conftest import cosines

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
# Celery's log line for a shard a worker took (each delivery, redeliveries too); the group is the task id.
RECEIVED = re.compile(r"Task bulkembed\.embed_shard\[([0-9a-f-]+)\] received")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05,
               error: type[Exception] = TimeoutError) -> T:
    """Poll `predicate` until it returns something truthy; `error` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


class ShardStuck(Exception):
    """A shard that should have moved on by now did not (what the xfail-marked tests expect)."""


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 20) -> int | None:
    """Signal a process started with start_new_session=True and everything in its group."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return process.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(10)


class Background:
    """A CLI command running in the background in its own process group, its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path, name: str):
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bulkembed.cli", *map(str, args)], env=env, cwd=REPO, start_new_session=True,
                stdout=stdout, stderr=stderr,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(self.process)
            raise TimeoutError(f"{self.process.args[3]} still running after {timeout_s:.0f}s; stderr:\n"
                               f"{self.stderr[-3000:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            kill_tree(self.process)


class RedisProcess:
    """A redis-server of our own, on a fixed port and folder, so it can be stopped and started again."""

    def __init__(self, port: int, folder: Path, *options: str):
        self.port, self.folder, self.options = port, folder, options
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self, timeout_s: float = 20) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "redis.log", "a") as log:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), *self.options],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def loaded() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}")
            try:  # LOADING (reading the AOF back) answers an error to PING
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(loaded, timeout_s, f"redis-server on port {self.port}")
        client.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# --- a shard held at a known point ----------------------------------------------------------------------


class Holds:
    """The test side of BULKEMBED_TEST_HOLD_DIR: a worker started with `env` holds every shard just
    before its commit until the test releases it (worker/hold.py), so a test acts mid-shard whatever
    the machine's speed. `auto_release(keep)` lets every shard but those in `keep` go on."""

    MARKER = re.compile(r"-(\d{5})-(\d+)\.held$")

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env = {"BULKEMBED_TEST_HOLD_DIR": str(folder)}
        self._stop = threading.Event()
        self._releaser: threading.Thread | None = None

    def held(self) -> list[tuple[int, int]]:
        """(shard, pool process id) of every shard held now."""
        found = (self.MARKER.search(p.name) for p in self.folder.glob("*.held"))
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def wait(self, timeout_s: float = 60, shard: int | None = None, not_pid: int | None = None) -> tuple[int, int]:
        """A shard held now (`shard`, if given, by a process other than `not_pid`)."""
        def found() -> tuple[int, int] | None:
            return next((h for h in self.held() if shard in (None, h[0]) and h[1] != not_pid), None)
        return wait_until(found, timeout_s, f"a worker to hold {'a shard' if shard is None else f'shard {shard}'}")

    def release(self, shard: int, pid: int | None = None) -> None:
        """Let `shard` go on (only where process `pid` holds it, if given)."""
        for marker in self.folder.glob(f"*-{shard:05d}-{pid or '*'}.held"):
            marker.unlink(missing_ok=True)

    def auto_release(self, keep: frozenset[int] = frozenset()) -> None:
        def run() -> None:
            while not self._stop.wait(0.02):
                for shard, _ in self.held():
                    if shard not in keep:
                        self.release(shard)
        self.stop()
        self._stop.clear()
        self._releaser = threading.Thread(target=run, daemon=True)
        self._releaser.start()

    def stop(self) -> None:
        self._stop.set()
        if self._releaser is not None:
            self._releaser.join(5)


# --- a faulty S3 endpoint ---------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade"}
S3_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
             503: ("SlowDown", "Please reduce your request rate.")}


class FaultPlan:
    """Which request gets which fault: every `every`-th request, cycling through `kinds`, never two
    faulty answers in a row for one method and path (so a client's retry gets through), at most
    `max_slow` slow answers. Deterministic in the order requests arrive."""

    def __init__(self, every: int = 5, kinds: tuple[str, ...] = ("500", "503", "reset", "reset-after"),
                 slow_s: float = 2.0, max_slow: int = 1, slow_after: int = 40):
        self.every, self.kinds, self.slow_s, self.max_slow, self.slow_after = every, kinds, slow_s, max_slow, slow_after
        self.lock = threading.Lock()
        self.requests = 0
        self.faulted_last: dict[str, bool] = {}
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[int, str, str, str]] = []  # (request number, method, path, fault)

    def decide(self, method: str, path: str, user_agent: str = "") -> str:
        """`slow` only for boto3 (its read timeout is 60 s; the AWS C++ SDK in pyarrow gives up after 3 s)."""
        with self.lock:
            self.requests += 1
            n = self.requests
            target = f"{method} {path.split('?')[0]}"
            fault = "none"
            if self.faulted_last.get(target):
                fault = "none"
            elif (n >= self.slow_after and self.injected["slow"] < self.max_slow and method == "GET"
                  and "Boto3" in user_agent):
                fault = "slow"
            elif n % self.every == 0:
                fault = self.kinds[(n // self.every) % len(self.kinds)]
            self.faulted_last[target] = fault not in ("none", "slow")
            if fault != "none":
                self.injected[fault] += 1
                self.log.append((n, method, path, fault))
            return fault


class HoldRequest:
    """A plan that holds the first `method` request for a path ending in `suffix` until `release()`,
    then resets its connection; every other request goes through. Holds a client at a known point."""

    def __init__(self, method: str, suffix: str):
        self.method, self.suffix = method, suffix
        self.reached, self.released = threading.Event(), threading.Event()

    def decide(self, method: str, path: str, user_agent: str = "") -> str:
        if method == self.method and path.split("?")[0].endswith(self.suffix) and not self.reached.is_set():
            self.reached.set()
            return "hold"
        return "none"

    def release(self) -> None:
        self.released.set()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 and the AWS C++ SDK use it
    timeout = 15  # an idle keep-alive connection frees its thread after this

    server: FaultyS3Proxy

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Close the connection with a TCP reset and no answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            return response.status, [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP], data
        finally:
            upstream.close()

    def _handle(self) -> None:
        body = self._body()
        if self.server.dark.is_set():
            return self._reset()
        fault = self.server.plan.decide(self.command, self.path, self.headers.get("User-Agent", ""))
        if fault == "reset":
            return self._reset()
        if fault == "hold":
            self.server.plan.released.wait(120)
            return self._reset()
        if fault in ("500", "503"):
            code, message = S3_ERRORS[int(fault)]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>injected</RequestId></Error>").encode()
            payload = b"" if self.command == "HEAD" else xml
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return None
        if fault == "slow":
            time.sleep(self.server.plan.slow_s)
        status, headers, data = self._forward(body)
        if fault == "reset-after":  # the request took effect upstream, its answer is lost
            return self._reset()
        self.send_response_only(status)
        for key, value in headers:
            if key.lower() not in ("content-length", "date", "server"):
                self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return None

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class FaultyS3Proxy(ThreadingHTTPServer):
    """A reverse proxy in front of an S3 endpoint that injects the faults of a FaultPlan. At most
    `max_threads` connections are served at once (others are closed at once, which clients retry).
    `go_dark()` starts an outage: open connections are cut and new ones reset, until `light()`."""

    daemon_threads = True

    def __init__(self, upstream: str, plan: FaultPlan, max_threads: int = 64):
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.plan = plan
        self.slots = threading.BoundedSemaphore(max_threads)
        self.dark = threading.Event()
        self.refused = 0  # connections reset while dark
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def go_dark(self) -> None:
        self.dark.set()
        with self._open_lock:
            for connection in self._open:
                _cut(connection)

    def light(self) -> None:
        self.dark.clear()

    def process_request(self, request, client_address) -> None:
        if self.dark.is_set():
            self.refused += 1
            _cut(request)
            self.shutdown_request(request)
            return
        if not self.slots.acquire(timeout=5):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        if not self.dark.is_set():  # a connection cut by go_dark() is expected to fail
            super().handle_error(request, client_address)

    def __enter__(self) -> FaultyS3Proxy:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(10)


def _cut(connection: socket.socket) -> None:
    """End a connection with a TCP reset, whatever its handler is doing."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --- what every fault test checks at the end ----------------------------------------------------------


def output_ids(uri: str) -> list:
    """Every id in the embedding files under `uri` (files starting with _ are skipped)."""
    store = open_store(uri)
    fs, base = store.arrow_fs()
    return ds.dataset(base, filesystem=fs, format="arrow").to_table(columns=["id"]).column("id").to_pylist()


def check_exactly_once(uri: str, expected_ids: list) -> dict:
    """Every input id exactly once in the output, and a manifest whose rows and shards agree."""
    ids = output_ids(uri)
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} ids written more than once, e.g. {duplicates[:5]}"
    missing = set(expected_ids) - set(ids)
    assert not missing, f"{len(missing)} ids missing, e.g. {sorted(missing)[:5]}"
    assert len(ids) == len(expected_ids)
    store = open_store(uri)
    manifest = json.loads(store.get(keys.MANIFEST_KEY))
    assert manifest["rows"] == len(expected_ids), "the manifest's rows equal the input rows"
    table = manifest_shards(store, manifest)
    shards = table.column("shard").to_pylist()
    assert shards == sorted(set(shards)), "the manifest lists each shard once"
    written = [k for k, _ in store.list() if "/" not in k and k.endswith(".arrow")]
    assert len(written) == len(shards) and sum(table.column("rows").to_pylist()) == len(expected_ids)
    return manifest


def cli(env: dict[str, str], *args: object, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bulkembed.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


def redis_hash(url: str, key: str) -> dict[str, str]:
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    try:
        return client.hgetall(key)
    finally:
        client.close()


def attempts(url: str, job_id: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in redis_hash(url, keys.REDIS_JOB_ATTEMPTS.format(job_id=job_id)).items()}


class OverwritingStore(LocalStore):
    """A folder that behaves like an old S3-compatible server: if-absent writes overwrite."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.put(key, data)
        return True


def check_vectors(uri: str, corpus: Path, reference_embedder: Callable[[list[str]], Any]) -> None:
    """Every row's vector equals its document embedded alone by llama-cpp-python (`Passage: ` prefix)."""
    source = pq.read_table(corpus)
    by_id = dict(zip(source.column("id").to_pylist(), source.column("text").to_pylist(), strict=True))
    store = open_store(uri)
    fs, base = store.arrow_fs()
    table = ds.dataset(base, filesystem=fs, format="arrow").to_table()
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    reference = reference_embedder(["Passage: " + by_id[i] for i in table.column("id").to_pylist()])
    assert cosines(vectors, reference).min() >= 0.9999
