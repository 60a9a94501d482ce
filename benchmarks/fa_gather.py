"""What cutting flash attention's KV tiles from each sequence's cells (infra/llama-cpp/patches/0002) costs on CPU.

    python benchmarks/fa_gather.py [--runs 4] [--model synthetic-small-Q8_0.gguf]

One engine, one process; the same texts embedded with GGML_CPU_FA_GATHER=1 and =0 in turn (the patch reads it on every
call), so both see the same machine load. Tokens per CPU second of this process (wall time on a shared 2-core machine
wandered by ±10% between runs), for a mixed corpus (600 texts) and a long one (120 texts of 300-3000 tokens).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (llama.cpp's libraries before numpy)

from bulkembed import synthetic
from bulkembed.bench.inprocess import synthetic_model
from bulkembed.worker.engine import Engine, EngineOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a .gguf (default: the bench's small synthetic model at Q8_0)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bw"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    engine = Engine(args.model or synthetic_model("small", "Q8_0", args.work, 2), EngineOptions(threads=2))
    for dist, n in (("mixed", 600), ("long", 120)):
        texts = synthetic.synthetic_texts(synthetic.target_lengths(n, dist, 0),
                                          lambda t: len(engine.vocab.tokenize(t)), 0)
        tokens = [engine.vocab.tokenize(t) for t in texts]
        total = sum(map(len, tokens))
        engine.embed(tokens[:20])
        rates: dict[str, list[float]] = {"1": [], "0": []}
        for _ in range(args.runs):
            for gather in rates:
                os.environ["GGML_CPU_FA_GATHER"] = gather
                started = time.process_time()
                for s in range(0, len(tokens), 100):  # shards of 100 texts
                    engine.embed(tokens[s:s + 100])
                rates[gather].append(total / (time.process_time() - started))
        on, off = (sum(rates[g]) / len(rates[g]) for g in ("1", "0"))
        print(f"{dist:5} {total} tokens, tok per CPU s, mean of {args.runs}: gather {on:,.0f}, from cell 0 {off:,.0f} "
              f"({on / off:.3f}); runs {[round(r) for r in rates['1']]} / {[round(r) for r in rates['0']]}")
    engine.close()


if __name__ == "__main__":
    main()
