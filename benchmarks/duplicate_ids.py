"""How long the duplicate-id pre-pass takes on a large corpus, and at what peak memory.

    python benchmarks/duplicate_ids.py --ids 100000000 --kind int64 --memory-limit-mb 1024

Writes N ids as Parquet (in --files files, chunk by chunk, so the generator stays small): the values 0..N-1 in a
shuffled order (an affine permutation), with the top 1% folded onto the 1% below them, so exactly N // 100 rows
are duplicates. String ids are f"doc-{value}". Then runs the real pre-pass (id_batches → find_duplicates) in a
child process and prints its seconds, peak RSS (VmHWM) and duplicate count, checked against the expected one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bulkembed.producer.corpus import Corpus
from bulkembed.producer.dedup import find_duplicates, id_batches

CHUNK = 1_000_000
STRIDE = 2_654_435_761  # a prime: i -> i * STRIDE mod N is a permutation unless N is a multiple of it


def write_ids(folder: Path, n: int, files: int, kind: str) -> list[tuple[str, int, str]]:
    folded = n // 100
    per_file = -(-n // files)
    written = []
    for index, start in enumerate(range(0, n, per_file)):
        path = folder / f"part-{index:05d}.parquet"
        id_type = pa.int64() if kind == "int64" else pa.string()
        with pq.ParquetWriter(path, pa.schema([("id", id_type)])) as writer:
            for lo in range(start, min(start + per_file, n), CHUNK):
                rows = np.arange(lo, min(lo + CHUNK, start + per_file, n), dtype=np.int64)
                values = rows * STRIDE % n
                values = np.where(values >= n - folded, values - folded, values)
                ids = pa.array(values)
                if kind == "string":
                    ids = pc.binary_join_element_wise("doc-", ids.cast(pa.string()), "")
                writer.write_table(pa.table({"id": ids}), row_group_size=CHUNK)
        written.append((str(path), path.stat().st_size, ""))
    return written


def run(files: list[tuple[str, int, str]], id_type: pa.DataType, work: str, memory_limit_mb: int,
        threads: int) -> tuple[int, float, float]:
    started = time.perf_counter()
    corpus = Corpus(fs=pafs.LocalFileSystem(), files=files, id_type=id_type)
    count = find_duplicates(id_batches(corpus, "id"), id_type, Path(work) / "duplicates.parquet",
                            Path(work) / "scratch", memory_limit_mb=memory_limit_mb, threads=threads)
    seconds = time.perf_counter() - started
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return count, seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--kind", choices=["int64", "string", "both"], default="both")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--memory-limit-mb", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", help="where the corpus and DuckDB's spill go (default: a temporary folder)")
    args = parser.parse_args()
    print("| ids | kind | files | memory_limit_mb | threads | duplicates | expected | seconds | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ["int64", "string"] if args.kind == "both" else [args.kind]:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            corpus = Path(tmp) / "corpus"
            corpus.mkdir()
            files = write_ids(corpus, args.ids, args.files, kind)
            # a fresh process, so its peak RSS is the pre-pass's alone; if it dies, submit's result says so
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                count, seconds, peak_mib = pool.submit(run, files, pa.int64() if kind == "int64" else pa.string(),
                                                       tmp, args.memory_limit_mb, args.threads).result()
            expected = args.ids // 100
            print(f"| {args.ids:,} | {kind} | {len(files)} | {args.memory_limit_mb} | {args.threads} | {count:,} | "
                  f"{expected:,} | {seconds:.1f} | {peak_mib:,.0f} |", flush=True)
            if count != expected:
                raise SystemExit(f"wrong: {count} duplicates, expected {expected}")


if __name__ == "__main__":
    main()
