"""What a query costs once the model is loaded: bulkembed.Embedder, one call per batch of queries.

    python benchmarks/query_latency.py [--shape small-v4vocab] [--calls 100] [--isolate]

Loads a synthetic model once (an engine process, as `bulkembed embed` does), then times `embed` calls of 1, 8 and
64 short queries (5 to 15 words): the padding to 64 tokens a decode makes a single short query cost a 64-token
decode, which is what the table shows against the batched calls. `--isolate`: one query a decode, as an index built
with --isolate is queried.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bulkembed import Embedder
from bulkembed.bench.inprocess import SHAPES
from bulkembed.synthetic import WORDS, write_qwen2vl_gguf
from bulkembed.worker.engine import EngineOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small-v4vocab", choices=sorted(SHAPES))
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isolate", action="store_true", help="one query a decode")
    args = parser.parse_args()
    model = Path(tempfile.mkdtemp(prefix="query-latency-")) / f"query-{args.shape}-text-retrieval-F16.gguf"
    write_qwen2vl_gguf(model, SHAPES[args.shape], dtype="f16")
    rng = np.random.default_rng(0)
    queries = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 16)))) for _ in range(64 * 4)]
    started = time.perf_counter()
    with Embedder(model, options=EngineOptions(threads=args.threads, isolate=args.isolate)) as embedder:
        print(f"{model.name}: engine up in {time.perf_counter() - started:.2f}s")
        embedder.embed(queries[:8])  # warm-up
        for batch in (1, 8, 64):
            calls = max(3, args.calls // batch)
            started = time.perf_counter()
            for i in range(calls):
                embedder.embed(queries[(i * batch) % 192:(i * batch) % 192 + batch])
            seconds = (time.perf_counter() - started) / calls
            print(f"  {batch:3d} queries a call: {seconds * 1000:7.1f} ms a call, {batch / seconds:7.0f} queries/s")


if __name__ == "__main__":
    main()
