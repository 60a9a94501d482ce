"""What a re-index costs next to a full run: `bulkembed run` in-process, then again with --reuse after 1% and
after 0% of the rows changed.

    python benchmarks/reindex.py --docs 5000 --threads 2

The corpus is synthetic (bulkembed.synthetic's mixed lengths: ~85% short, ~15% long documents) and the
model is the TINY synthetic qwen2vl, so everything runs on the CPU here. Each run is timed from planning
to the manifest, in this process (no Python start-up), model load included. The script also times the
two reuse steps on their own (matching PREV_OUT's keys, copying its vectors) and checks that every
reused vector is byte-identical to PREV_OUT's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bulkembed.contract import keys
from bulkembed.contract.job import ReuseSource
from bulkembed.contract.schema import CONTENT_HASH_TYPE, content_hash, embedding_schema, to_ipc_bytes
from bulkembed.contract.store import LocalStore
from bulkembed.contract.vocab import Vocab
from bulkembed.local import run_local
from bulkembed.producer.reuse import PreviousOutput, copy_reused, open_previous
from bulkembed.producer.submit import JobOptions, plan_job
from bulkembed.synthetic import TINY, synthetic_texts, target_lengths, write_qwen2vl_gguf
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.engines import EngineSetup


def write_version(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), path)
    return path


def timed_run(corpus: Path, model: Path, out: Path, engine: EngineSetup, reuse: Path | None = None) -> tuple:
    started = time.perf_counter()
    planned = plan_job(str(corpus), str(model), str(out), JobOptions(reuse=str(reuse) if reuse else None))
    manifest = run_local(planned, str(model), engine, progress=False)
    return time.perf_counter() - started, manifest


def vectors_by_id(out: Path) -> dict[int, bytes]:
    table = ds.dataset(out, format="arrow").to_table(columns=["id", "embedding"])
    flat = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    return {i: v.tobytes() for i, v in zip(table.column("id").to_pylist(), flat, strict=True)}


def time_reuse_steps(corpus: Path, model: Path, prev: Path, work: Path) -> str:
    """Matching and copying alone, for 0% changed: every PREV_OUT row is matched and copied."""
    planned = plan_job(str(corpus), str(model), str(work / "steps"))
    started = time.perf_counter()
    previous = open_previous(str(prev), planned.job, planned.corpus.id_type)
    index = previous.load_index()
    matched = time.perf_counter() - started
    started = time.perf_counter()
    files = copy_reused(previous, index, LocalStore(work / "steps"), planned.job)
    copied = time.perf_counter() - started
    rows = sum(f.rows for f in files)
    size = sum((work / "steps" / f.key).stat().st_size for f in files)
    return (f"reuse steps alone ({rows} rows): match {matched:.2f}s ({rows / matched:,.0f} rows/s, "
            f"{index.nbytes / rows:.0f} bytes of keys a row); copy {copied:.2f}s ({rows / copied:,.0f} rows/s, "
            f"{size / copied / 2**20:,.0f} MiB/s of Arrow files)")


def time_copy_at_v4_width(corpus: Path, model: Path, work: Path, rows: int = 20_000, per_file: int = 1_000,
                          dims: int = 2048) -> str:
    """Matching and copying a PREV_OUT as wide as v4's (2048 float32 dims, random vectors: nothing is embedded),
    where the bytes copied, not the keys, set the cost: what the producer spends per reused row in a real job."""
    job = plan_job(str(corpus), str(model), str(work / "wide-out")).job.model_copy(update={"dims": dims})
    prev, rng, files = LocalStore(work / "wide-prev"), np.random.default_rng(0), []
    for f in range(rows // per_file):
        ids = np.arange(f * per_file, (f + 1) * per_file)
        vectors = rng.standard_normal((per_file, dims), dtype=np.float32).reshape(-1)
        columns = [pa.array(ids), pa.FixedSizeListArray.from_arrays(pa.array(vectors), dims),
                   pa.array(np.full(per_file, 190, np.int32)), pa.array(np.zeros(per_file, bool)),
                   pa.array(np.zeros(per_file, np.int32)),
                   pa.array([content_hash(f"Passage: {i}") for i in ids], CONTENT_HASH_TYPE)]
        files.append(keys.shard_output(f))
        prev.put(files[-1], to_ipc_bytes(pa.Table.from_arrays(columns, schema=embedding_schema(pa.int64(), dims, job))))
    source = ReuseSource(uri=prev.uri, job_id="synthetic", manifest_sha256="")
    previous = PreviousOutput(store=prev, source=source, files=files)
    started = time.perf_counter()
    index = previous.load_index()
    matched = time.perf_counter() - started
    started = time.perf_counter()
    copy_reused(previous, index, LocalStore(work / "wide-out"), job)
    copied = time.perf_counter() - started
    size = sum(size for _, size in prev.list())
    return (f"at v4 width ({rows:,} rows of {dims} float32 dims in {len(files)} files, {size / 2**20:,.0f} MiB): "
            f"match {matched:.2f}s ({rows / matched:,.0f} rows/s); copy {copied:.2f}s ({rows / copied:,.0f} rows/s, "
            f"{size / copied / 2**20:,.0f} MiB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of rows changed in the second run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ubatch", type=int, default=512)
    args = parser.parse_args()
    engine = EngineSetup(EngineOptions(threads=args.threads, ubatch=args.ubatch), engines=1, ubatch=args.ubatch)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_qwen2vl_gguf(work / "tiny-embeddings-text-retrieval-F32.gguf", TINY)
        lengths = target_lengths(args.docs, "mixed", seed=0, cap=1024)
        texts = synthetic_texts(lengths, Vocab.load(model).count, seed=0)
        rng = np.random.default_rng(1)
        changed = rng.choice(args.docs, max(1, round(args.docs * args.changed)), replace=False)
        edited = list(texts)
        for i in changed:
            edited[i] = texts[i] + " and one more sentence"

        full_s, full = timed_run(write_version(work / "v1.parquet", texts), model, work / "full", engine)
        some_s, some = timed_run(write_version(work / "v2.parquet", edited), model, work / "some", engine,
                                 reuse=work / "full")
        none_s, none = timed_run(write_version(work / "v3.parquet", texts), model, work / "none", engine,
                                 reuse=work / "full")
        steps = time_reuse_steps(work / "v3.parquet", model, work / "full", work)
        wide = time_copy_at_v4_width(work / "v3.parquet", model, work)
        before, after = vectors_by_id(work / "full"), vectors_by_id(work / "none")
        identical = before == after and all(vectors_by_id(work / "some")[i] == before[i]
                                            for i in set(range(args.docs)) - set(changed.tolist()))

    print(f"corpus: {args.docs} docs, {full['tokens']:,} tokens (mixed lengths); TINY synthetic model, "
          f"{args.threads} threads, ubatch {args.ubatch}; times from planning to manifest, model load included")
    print("| run | rows embedded | rows reused | seconds | share of the full run |")
    print("|---|---|---|---|---|")
    for name, seconds, manifest in (("full", full_s, full), (f"{len(changed) / args.docs:.0%} changed", some_s, some),
                                    ("0% changed", none_s, none)):
        print(f"| {name} | {manifest['embedded_rows']} | {manifest['reused_rows']} | {seconds:.2f} | "
              f"{seconds / full_s:.1%} |")
    print(steps)
    print(wide)
    print(f"for comparison, the full run embedded {args.docs / full_s:,.1f} rows/s "
          f"({full['tokens'] / full_s:,.0f} tok/s)")
    print(f"reused vectors byte-identical to PREV_OUT's: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
