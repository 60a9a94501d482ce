"""How fast the producer shards short documents, and whether its memory stays flat.

    python benchmarks/producer_throughput.py --docs 1000000

Writes a Parquet corpus of short documents, then runs the real producer (read, reject checks, exact
token counts with the model's vocabulary, bucketing, shard files) into a local OUT with no queue,
printing docs/min and the resident memory at ten points along the way.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.producer.submit import JobOptions, plan_job, produce
from bulkembed.synthetic import TINY, write_qwen2vl_gguf

WORDS = np.array("the river model token embed over and sea alpha beta gamma delta query passage".split())


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())])) as writer:
        for start in range(0, n, 100_000):
            rows = min(100_000, n - start)
            lengths = rng.integers(4, 16, rows)
            texts = [" ".join(rng.choice(WORDS, k)) for k in lengths]
            writer.write_table(pa.table({"id": np.arange(start, start + rows), "text": texts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--model", help="a .gguf whose vocabulary counts tokens (default: a tiny synthetic one)")
    parser.add_argument("--shard-tokens", type=int, default=65536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or str(write_qwen2vl_gguf(work / "tiny-text-retrieval.gguf", TINY))
        corpus = work / "corpus.parquet"
        write_corpus(corpus, args.docs)
        planned = plan_job(str(corpus), model, str(work / "out"), JobOptions(shard_tokens=args.shard_tokens))
        samples: list[tuple[int, float, float]] = []
        started = time.perf_counter()

        def emit(message) -> None:
            samples.append((message.shard, time.perf_counter() - started, rss_mib()))

        totals, _ = produce(planned, emit, lambda result: None)
        seconds = time.perf_counter() - started
    print(f"producer: {totals.docs} docs, {totals.tokens} tokens, {totals.shards} shards in {seconds:.1f}s "
          f"= {totals.docs / seconds * 60:,.0f} docs/min ({totals.tokens / seconds:,.0f} tokens/s counted)")
    print("memory while producing (shard, seconds, RSS MiB):")
    for shard, at, rss in samples[:: max(1, len(samples) // 10)] + samples[-1:]:
        print(f"  shard {shard:6d}  {at:6.1f}s  {rss:7.1f} MiB")


if __name__ == "__main__":
    main()
