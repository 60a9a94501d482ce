"""Planning throughput with 1 and 2 `bulkembed planner` processes, and each planner's peak memory.

    python benchmarks/planning.py --docs 10000000 --planners 1 2

Writes a corpus of short documents (files of 1M rows, row groups of 100k), starts its own redis-server, then for
each planner count: starts the planners (`bulkembed planner --concurrency 1` each, a tiny synthetic model's
vocabulary), runs `bulkembed submit --queue-only` (the duplicate-id pre-pass, then one task per unit) and times
until every unit is planned (`status`: units planned = units). No worker runs: shards stay queued
(BULKEMBED_QUEUE_MIN above their count). Prints one markdown row per planner count: seconds, docs/s, speed-up over
the first count, and the largest peak RSS (VmHWM) of a planner's pool process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.contract.registry import JobRegistry
from bulkembed.synthetic import TINY, write_qwen2vl_gguf

WORDS = np.array("the river model token embed over and sea alpha beta gamma delta query passage".split())
FILE_ROWS = 1_000_000


def write_corpus(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for first in range(0, n, FILE_ROWS):
        rows = min(FILE_ROWS, n - first)
        with pq.ParquetWriter(folder / f"part-{first // FILE_ROWS:04d}.parquet",
                              pa.schema([("id", pa.int64()), ("text", pa.string())])) as writer:
            for start in range(first, first + rows, 100_000):
                count = min(100_000, first + rows - start)
                texts = [" ".join(rng.choice(WORDS, k)) for k in rng.integers(4, 16, count)]
                writer.write_table(pa.table({"id": np.arange(start, start + count), "text": texts}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """The largest VmHWM among a process and its children (Celery's pool processes do the planning)."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    peaks = []
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def run(work: Path, corpus: Path, model: Path, planners: int, env: dict[str, str]) -> tuple[float, int, float]:
    out = work / f"out-{planners}"
    started = [subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "planner", "--concurrency", "1"], env=env,
                                stdout=open(work / f"planner-{planners}-{i}.log", "w"), stderr=subprocess.STDOUT)
               for i in range(planners)]
    try:
        time.sleep(5)  # the planners connect
        submit = subprocess.run([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model", str(model),
                                 "--out", str(out), "--queue-only"], env=env, capture_output=True, text=True)
        assert submit.returncode == 0, submit.stderr[-3000:]
        queued_at = time.perf_counter()
        job_id = submit.stdout.split()[0]
        registry = JobRegistry.from_url(env["BULKEMBED_REDIS_URL"])  # polled here: a `status` process a poll would
        while (status := registry.status(job_id)).units_planned < status.units:  # take a core's share
            time.sleep(0.5)
        seconds = time.perf_counter() - queued_at
        peak = max(peak_rss_mib(p.pid) for p in started)
        return seconds, status.planned.docs, peak
    finally:
        for process in started:
            process.terminate()
            process.wait(30)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--planners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--unit-rows", type=int, default=250_000)
    parser.add_argument("--corpus", type=Path, help="a folder to keep the generated corpus in (reused if there)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_qwen2vl_gguf(work / "tiny-text-retrieval.gguf", TINY)
        corpus = args.corpus or work / "corpus"
        if not corpus.exists():
            write_corpus(corpus, args.docs)
        port = free_port()
        redis_server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")} | {
            "BULKEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0", "BULKEMBED_UNIT_ROWS": str(args.unit_rows),
            "BULKEMBED_QUEUE_MIN": str(10**9), "BULKEMBED_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
        try:
            time.sleep(1)
            print(f"{args.docs:,} short documents, units of {args.unit_rows:,} rows, {os.cpu_count()} cores")
            print("| planners | seconds | docs/s | speed-up | peak RSS of a planner process (MiB) |")
            print("|---|---|---|---|---|")
            base = None
            for planners in args.planners:
                subprocess.run(["redis-cli", "-p", str(port), "flushall"], capture_output=True)
                seconds, docs, peak = run(work, corpus, model, planners, env)
                base = base or seconds
                print(f"| {planners} | {seconds:.1f} | {docs / seconds:,.0f} | {base / seconds:.2f} | {peak:.0f} |",
                      flush=True)
        finally:
            redis_server.terminate()


if __name__ == "__main__":
    main()
