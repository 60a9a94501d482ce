"""What one long document costs under `--overlength chunk`, next to the same text as many short rows.

    python benchmarks/long_document.py [--words 50000] [--max-tokens 512] [--threads 2]

Writes a corpus of one document of WORDS random words and a corpus of the same words as rows of 100, then times
`bulkembed run … --overlength chunk --max-tokens N` on each (a process each: planning, engine start, embedding,
writing) and reports its wall time and peak memory. The one document's cost should stay near the many rows':
a chunk's row once carried the whole text and was tokenized whole again, quadratic in the document.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.synthetic import write_qwen2vl_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=50_000)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="long-document-"))
    rng = random.Random(3)
    vocabulary = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    words = [rng.choice(vocabulary) for _ in range(args.words)]
    rows = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)]
    corpora = {"one document": pa.table({"id": [0], "text": [" ".join(words)]}),
               f"{len(rows)} rows of 100 words": pa.table({"id": list(range(len(rows))), "text": rows})}
    model = write_qwen2vl_gguf(work / "tiny-text-retrieval.gguf")
    print(f"{args.words:,} words, --overlength chunk --max-tokens {args.max_tokens}, {args.threads} threads")
    for number, (name, table) in enumerate(corpora.items()):
        pq.write_table(table, work / f"corpus-{number}.parquet")
        log = work / f"run-{number}.log"
        started = time.perf_counter()
        with open(log, "w") as output:
            command = ["run", str(work / f"corpus-{number}.parquet"), "--model", str(model), "--out",
                       str(work / f"out-{number}"), "--prefix", "", "--overlength", "chunk", "--max-tokens",
                       str(args.max_tokens), "--threads", str(args.threads)]
            run = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", *command], stdout=output,
                                   stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(run.pid, 0)  # its largest process's peak, the engine's included
        seconds = time.perf_counter() - started
        if status:
            sys.exit(log.read_text()[-2000:])
        summary = log.read_text().strip().splitlines()[-1]
        print(f"{name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB; {summary}")


if __name__ == "__main__":
    main()
