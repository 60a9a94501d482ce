"""Do N workers on one Redis give N times one worker's throughput?

    python benchmarks/scaling.py --workers 2 --docs 3000

Starts its own redis-server, writes a synthetic model (6 layers, 384 wide, 8k vocab: big enough
that embedding, not Python, is the work) and a mixed-length corpus, then runs the same job with 1
worker and with N workers (one thread each), timing `submit --wait`. Prints tok/s and the ratio
N-worker / (N x 1-worker); the target is >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.store import open_store
from bulkembed.synthetic import ModelShape, write_qwen2vl_gguf

SMALL = ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=8192, n_ctx_train=32768)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array("the river model token embed over and sea alpha beta gamma delta".split())
    lengths = np.where(rng.random(n) < 0.1, rng.integers(80, 400, n), rng.integers(5, 60, n))
    texts = [" ".join(rng.choice(words, k)) for k in lengths]
    pq.write_table(pa.table({"id": np.arange(n), "text": texts}), path)


def run_job(n_workers: int, model: Path, data: Path, env: dict[str, str], work: Path, shard_tokens: int) -> dict:
    workers = []
    for i in range(n_workers):
        log = open(work / f"worker-{n_workers}-{i}.log", "w")
        workers.append(subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "worker", "--model", str(model),
                                         "--threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=REPO))
    try:
        deadline = time.monotonic() + 120
        while not all(" ready." in (work / f"worker-{n_workers}-{i}.log").read_text() for i in range(n_workers)):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start")
            time.sleep(0.2)
        out = work / f"out-{n_workers}"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "submit", str(data), "--model", str(model),
                               "--out", str(out), "--shard-tokens", str(shard_tokens), "--wait"], env=env,
                              capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        manifest = json.loads((out / "_manifest.json").read_text())
        shards = manifest_shards(open_store(str(out)), manifest).num_rows
        return {"workers": n_workers, "seconds": seconds, "tokens": manifest["tokens"],
                "tok_s": manifest["tokens"] / seconds, "shards": shards}
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        try:
            model = write_qwen2vl_gguf(work / "small-text-retrieval-F16.gguf", SMALL, dtype="f16")
            data = work / "corpus.parquet"
            corpus(data, args.docs)
            env = os.environ | {"BULKEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0", "BULKEMBED_METRICS_PORT": "0",
                                "BULKEMBED_LOG_LEVEL": "INFO"}
            one = run_job(1, model, data, env, work, args.shard_tokens)
            many = run_job(args.workers, model, data, env, work, args.shard_tokens)
        finally:
            redis.terminate()
    for r in (one, many):
        print(f"{r['workers']} worker(s): {r['tokens']} tokens in {r['seconds']:.1f}s = {r['tok_s']:.0f} tok/s "
              f"({r['shards']} shards)")
    print(f"scaling: {many['tok_s'] / one['tok_s']:.2f}x with {args.workers} workers = "
          f"{many['tok_s'] / (args.workers * one['tok_s']):.2f} of linear (target >= 0.90)")


if __name__ == "__main__":
    main()
