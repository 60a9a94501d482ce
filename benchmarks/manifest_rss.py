"""How much memory finalizing a job's manifest takes at a million shards (the target: < 300 MB peak RSS).

    python benchmarks/manifest_rss.py --shards 1000000

Starts its own redis-server, fills a job's done hash with synthetic ShardResults (as workers leave it: field = shard
number, value = the result's json; shards numbered by planning unit), then in a child process, so the filling does
not count, streams HSCAN → ShardResult → write_manifest into a local temporary OUT. Prints seconds and the child's
peak RSS (VmHWM), and its RSS before the first result (imports and a connection) for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bulkembed.contract import keys
from bulkembed.contract.job import JobSpec, ModelRef, Role, Task
from bulkembed.contract.manifest import BATCH_ROWS, write_manifest
from bulkembed.contract.registry import JobTotals, ShardResult
from bulkembed.contract.store import open_store

JOB_ID = "bench-manifest"
SHARDS_PER_UNIT = 64  # what a planning unit of 250,000 short rows gives at 64k tokens a shard, about


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spec(out: str) -> JobSpec:
    return JobSpec(input="corpus/", input_fingerprint="f", out=out, task=Task.RETRIEVAL, role=Role.PASSAGE,
                   prefix="Passage: ", shard_tokens=65536,
                   model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64, queue="bulkembed.bench"))


def fill(client: redis.Redis, shards: int, chunk: int = 10_000) -> None:
    done = keys.REDIS_JOB_DONE.format(job_id=JOB_ID)
    client.delete(done)
    for start in range(0, shards, chunk):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + chunk, shards)):
                shard = keys.shard_number(i // SHARDS_PER_UNIT, i % SHARDS_PER_UNIT)
                result = ShardResult(shard=shard, key=keys.shard_output(shard), rows=250 + i % 50,
                                     tokens=65_000 + i % 500, sha256=hashlib.sha256(b"%d" % i).hexdigest(),
                                     rejected=i % 97 == 0, seconds=3.2)
                pipe.hset(done, str(shard), result.model_dump_json())
            pipe.execute()


def child(url: str, out: str) -> None:
    """What JobRegistry.finalize does, and nothing more."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.ping()
    before = status_mib("VmRSS")
    results = (ShardResult.model_validate_json(value)
               for _, value in client.hscan_iter(keys.REDIS_JOB_DONE.format(job_id=JOB_ID), count=10_000))
    started = time.perf_counter()
    summary = write_manifest(open_store(out), spec(out), JobTotals(), results)
    seconds = time.perf_counter() - started
    size = (Path(out) / keys.MANIFEST_SHARDS_KEY).stat().st_size
    print(json.dumps({"shards": summary["shard_count"], "seconds": seconds, "peak_mib": status_mib("VmHWM"),
                      "before_mib": before, "file_mib": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, metavar=("REDIS_URL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            started = time.perf_counter()
            fill(client, args.shards)
            filled = time.perf_counter() - started
            done = subprocess.run([sys.executable, __file__, "--child", url, str(Path(tmp) / "out")],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout)
        finally:
            server.terminate()
            server.wait(10)
    assert r["shards"] == args.shards, r
    print(f"| {r['shards']:,} shards | write_manifest {r['seconds']:.1f}s | peak RSS {r['peak_mib']:.0f} MiB "
          f"(before the first result {r['before_mib']:.0f} MiB) | shards file {r['file_mib']:.1f} MiB | "
          f"batch {BATCH_ROWS:,} | target < 300 MB | filling Redis took {filled:.0f}s |")


if __name__ == "__main__":
    main()
