"""How fast workers drop the queued shards of a cancelled job (what a GPU pool spends on a job cancelled by mistake).

    python benchmarks/cancel_drain.py --rows 3000 --shard-tokens 128

Starts its own redis-server on a free port, writes a tiny synthetic model and a corpus, submits the job with no
worker up and no back-pressure (every shard queued), cancels it (`bulkembed cancel`), then starts one
`bulkembed worker` and times from its "ready" line until the queue is empty. Prints a markdown table: shards queued,
shards dropped (from the worker's log), seconds, milliseconds a shard, and output files written (0 expected).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from bulkembed.synthetic import TINY, write_qwen2vl_gguf

MODEL = "tiny-embeddings-text-retrieval-F32.gguf"
QUEUE = "bulkembed.tiny-embeddings-text-retrieval-f32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bulkembed(*args: object, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "bulkembed.cli", *map(str, args)]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, env=env, **kwargs)
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shard-tokens", type=int, default=128, help="small shards: many messages to drop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        folder, port = Path(work), free_port()
        server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", work], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            model = write_qwen2vl_gguf(folder / MODEL, TINY, seed=0)
            rng = np.random.default_rng(0)
            words = np.array("the river model token embed over and sea alpha beta gamma delta".split())
            texts = [" ".join(rng.choice(words, int(k))) for k in rng.integers(2, 40, args.rows)]
            (folder / "in").mkdir()
            pq.write_table(pa.table({"id": [f"d{i}" for i in range(args.rows)], "text": texts}),
                           folder / "in" / "c.parquet")
            env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")} | {
                "BULKEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0", "BULKEMBED_QUEUE_MIN": "10000000",
                "BULKEMBED_METRICS_PORT": "0"}
            submitted = bulkembed("submit", folder / "in", "--model", model, "--out", folder / "out",
                                  "--shard-tokens", args.shard_tokens, env=env)
            job_id, queued = submitted.stdout.split()[0], client.llen(QUEUE)
            bulkembed("cancel", job_id, env=env)
            log = folder / "worker.log"
            worker = bulkembed("worker", "--model", model, "--threads", "1", env=env, background=True,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
            try:
                while " ready." not in log.read_text():
                    if worker.poll() is not None:
                        raise SystemExit(f"the worker exited:\n{log.read_text()}")
                    time.sleep(0.05)
                started = time.perf_counter()
                while client.llen(QUEUE):
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
                time.sleep(1)  # the last drop's log line
            finally:
                worker.terminate()
                worker.wait(60)
            dropped = log.read_text().count("dropped, not written")
            written = len(list((folder / "out").glob("*.arrow")))
        finally:
            server.terminate()
            server.wait(30)
    print("| shards queued | dropped | seconds | ms a shard | files written |")
    print("|---|---|---|---|---|")
    print(f"| {queued} | {dropped} | {seconds:.2f} | {1000 * seconds / max(dropped, 1):.1f} | {written} |")


if __name__ == "__main__":
    main()
