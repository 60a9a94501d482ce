"""What the CPU's bit-identical packing costs: the KV gather (infra/llama-cpp/patches/0002), cells kept in position
order (patch 0003) and pooling on the host, against upstream's way of each.

    python benchmarks/invariance_cost.py [--runs 4] [--model synthetic-small-Q8_0.gguf] [--parts] [--only mixed]

One process, two engines on the same model taking turns on the same texts, so both see the same machine load:
"bit-identical" (the defaults) and "upstream" (GGML_CPU_FA_GATHER=0 and LLAMA_KV_ORDERED=0, which both patches read on
every call, and llama.cpp's own mean pooling in the graph). Both pad decodes alike. Tokens per CPU second of this
process (wall time on a shared 2-core machine wanders by ±10% between runs), for a mixed corpus (600 texts) and a long
one (120 texts of 300-3000 tokens), in shards of 100 texts. `--parts`: also each part alone, against upstream.
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

# name: (pool on the host, the KV gather, cells in position order)
VARIANTS = {"bit-identical": (True, True, True), "upstream": (False, False, False)}
PARTS = {"KV gather alone": (False, True, False), "cells in order alone": (False, False, True),
         "host pooling alone": (True, False, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a .gguf (default: the bench's small synthetic model at Q8_0)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bw"))
    parser.add_argument("--parts", action="store_true", help="also each part alone (upstream's way for the others)")
    parser.add_argument("--only", choices=["mixed", "long"], help="one corpus, not both")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or synthetic_model("small", "Q8_0", args.work, 2)
    engines = {host: Engine(model, EngineOptions(threads=2, pool_on_host=host)) for host in (True, False)}
    assert engines[True].pools_on_host, "a CPU engine pools on the host"
    variants = VARIANTS | (PARTS if args.parts else {})
    vocab = engines[False].vocab
    for dist, n in (("mixed", 600), ("long", 120)):
        if args.only not in (None, dist):
            continue
        texts = synthetic.synthetic_texts(synthetic.target_lengths(n, dist, 0), lambda t: len(vocab.tokenize(t)), 0)
        tokens = [vocab.tokenize(t) for t in texts]
        total = sum(map(len, tokens))
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):  # the variants take turns, so each sees the machine's load alike
            for name, (host, gather, ordered) in variants.items():
                os.environ["GGML_CPU_FA_GATHER"], os.environ["LLAMA_KV_ORDERED"] = str(int(gather)), str(int(ordered))
                engine = engines[host]
                engine.embed(tokens[:20])  # its context made before timing
                started = time.process_time()
                for s in range(0, len(tokens), 100):
                    engine.embed(tokens[s:s + 100])
                rates[name].append(total / (time.process_time() - started))
        mean = {name: sum(r) / len(r) for name, r in rates.items()}
        print(f"{dist:5} {total} tokens, tok per CPU s, mean of {args.runs}, against upstream {mean['upstream']:,.0f} "
              f"(runs {[round(r) for r in rates['upstream']]}):")
        for name in [name for name in variants if name != "upstream"]:
            print(f"  {name:22} {mean[name]:,.0f} ({mean[name] / mean['upstream']:.3f}); runs "
                  f"{[round(r) for r in rates[name]]}")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
