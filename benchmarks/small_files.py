"""A corpus of many small files: shards and output files, and the whole job's time, against the same documents in
one file.

    python benchmarks/small_files.py --docs 6000 --files 300

Writes the same documents (short ones, a tenth of them long) as one Parquet file and as `--files` files, then runs
each job in this process (bulkembed.local.run_local: planning, then one engine on every core) with a 6-layer,
384-wide F16 synthetic model. Three rows: one file; the small files, units gathered across files (what the
producer plans); the small files planned a unit a file (what jobs planned before units spanned files do, and every
job did before). Prints a markdown table: shards, median rows a shard, seconds, tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.contract.manifest import manifest_shards
from bulkembed.local import run_local
from bulkembed.producer.corpus import plan_units
from bulkembed.producer.submit import JobOptions, plan_job
from bulkembed.synthetic import ModelShape, write_qwen2vl_gguf
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.engines import EngineSetup

SMALL = ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=8192, n_ctx_train=32768)
WORDS = np.array("the river model token embed over and sea alpha beta gamma delta query passage".split())


def texts(n: int, seed: int = 0) -> list[str]:
    """Mostly 2–12 words, every tenth 30–100 (the synthetic vocabulary spells a word in a few tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.where(np.arange(n) % 10 == 0, rng.integers(30, 100, n), rng.integers(2, 12, n))
    return [" ".join(rng.choice(WORDS, int(k))) for k in lengths]


def write(folder: Path, docs: list[str], files: int) -> Path:
    folder.mkdir(parents=True)
    per = -(-len(docs) // files)
    for f in range(files):
        part = slice(f * per, (f + 1) * per)
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(docs))][part], "text": docs[part]}),
                       folder / f"part-{f:05d}.parquet")
    return folder


def run(corpus: Path, model: Path, out: Path, unit_a_file: bool) -> tuple[int, int, float, int, float]:
    planned = plan_job(str(corpus), str(model), str(out), JobOptions())
    if unit_a_file:  # as a job planned before units spanned files is resumed
        planned.job = planned.job.model_copy(update={"units_span_files": False})
        planned.units = plan_units(planned.corpus, planned.job.unit_rows, span_files=False)
    started = time.perf_counter()
    manifest = run_local(planned, str(model), EngineSetup(EngineOptions(), engines=1, ubatch="auto"),
                         progress=False)
    seconds = time.perf_counter() - started
    planned.counter.close()
    rows = manifest_shards(planned.store).column("rows").to_numpy()
    return len(planned.units), len(rows), float(np.median(rows)), manifest["tokens"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bulkembed-small-files-") as work:
        root = Path(work)
        model = write_qwen2vl_gguf(root / "small-embeddings-text-retrieval-F16.gguf", SMALL, dtype="f16")
        docs = texts(args.docs)
        one = write(root / "one", docs, 1)
        many = write(root / "many", docs, args.files)
        print(f"{args.docs} documents; shards of 65,536 tokens; units of 250,000 rows")
        print("| corpus | units | shards | median rows a shard | seconds | tokens/s |")
        print("|---|---|---|---|---|---|")
        cases = (("1 file", one, False), (f"{args.files} files", many, False),
                 (f"{args.files} files, a unit a file (before)", many, True))
        for case, (name, corpus, unit_a_file) in enumerate(cases):
            units, shards, median, tokens, seconds = run(corpus, model, root / f"out-{case}", unit_a_file)
            print(f"| {name} | {units} | {shards} | {median:.0f} | {seconds:.1f} | {tokens / seconds:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
