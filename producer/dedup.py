"""Duplicate ids, two ways.

`find_duplicates`: every duplicate id of a whole corpus, exactly, in one pre-pass over its id column before
planning. The ids stream into an on-disk DuckDB database, which groups, joins and sorts them within
`memory_limit_mb` and spills the rest to `work_dir`, so memory does not grow with the corpus. The answer is a
Parquet file of (ordinal, first) sorted by ordinal: a planner of one unit reads only the row groups of its range
(`duplicates_between`).

`SeenIds`: 64-bit keys in sorted numpy runs at 8 bytes a key (a Python set costs ~70). Runs merge when a newer one
grows to half the size of the one before it (a log-structured merge), so insertion stays O(n log n) overall and a
lookup is a binary search per run. Any fixed-size numpy key works: --reuse keeps 16-byte (id, content) keys the
same way (producer/reuse.py).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from bulkembed.producer.corpus import Corpus, cast_ids, file_batches, source_name

ROW_BITS = 40  # rows per file < 2**40; files < 2**23, so an ordinal is a non-negative int64
ROW_MASK = (1 << ROW_BITS) - 1
MAX_FILES = 1 << (63 - ROW_BITS)
ID_BATCH_ROWS = 1 << 17
RESULT_ROW_GROUP = 65536
# Only the rows whose key repeats are then grouped by id, exactly. The key is an integer id itself, or a string id's
# 64-bit hash: grouping 10**8 distinct strings ran out of memory at 1 GB (DuckDB 2.0.1); their hashes did not.
STRING_KEY = "hash(id)"
RESULT_SCHEMA = pa.schema([("ordinal", pa.int64()), ("first", pa.int64())])


def ordinal(file_index: int, row: int) -> int:
    """A row's place in corpus order: files in the order of `Corpus.files`, rows within a file."""
    if not (0 <= file_index < MAX_FILES and 0 <= row <= ROW_MASK):
        raise ValueError(f"no ordinal for file {file_index}, row {row}")
    return file_index << ROW_BITS | row


def ordinals(file_index: int, start: int, count: int) -> np.ndarray:
    """The ordinals of rows start .. start + count - 1 of one file."""
    return np.arange(ordinal(file_index, start), ordinal(file_index, start) + count, dtype=np.int64)


def source_of(ordinal: int) -> tuple[int, int]:
    """(file index, row) of an ordinal."""
    return int(ordinal) >> ROW_BITS, int(ordinal) & ROW_MASK


def id_batches(corpus: Corpus, id_column: str) -> Iterator[pa.RecordBatch]:
    """The id column of every file of the corpus, in corpus order, as batches of (id, ordinal)."""
    if len(corpus.files) > MAX_FILES:
        raise ValueError(f"{len(corpus.files)} files: ordinals allow {MAX_FILES}")
    for index, (path, *_) in enumerate(corpus.files):
        row = 0
        for batch in file_batches(corpus.fs, path, ID_BATCH_ROWS, [id_column]):
            yield pa.RecordBatch.from_arrays(
                [cast_ids(batch.column(0), corpus.id_type, source_name(corpus.fs, path)),
                 pa.array(ordinals(index, row, batch.num_rows))],
                names=["id", "ordinal"])
            row += batch.num_rows


def _as_duckdb(batches: Iterable[pa.RecordBatch], id_type: pa.DataType,
               failures: list[Exception]) -> pa.RecordBatchReader:
    """(id, ordinal) batches as DuckDB should see them: string ids as bytes, since Parquet never checked that they
    are UTF-8 and DuckDB refuses a string that is not (bytes compare exactly all the same). An error reading them
    goes to `failures` too: DuckDB hands it on as its own InvalidInputException, its type lost."""
    if pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
        key_type = pa.large_binary() if pa.types.is_large_string(id_type) else pa.binary()
    elif pa.types.is_integer(id_type):
        key_type = id_type
    else:
        raise TypeError(f"ids of type {id_type}: use an integer or string id")
    schema = pa.schema([("id", key_type), ("ordinal", pa.int64())])

    def converted() -> Iterator[pa.RecordBatch]:
        try:
            for batch in batches:
                yield pa.RecordBatch.from_arrays(
                    [batch.column("id").cast(id_type).cast(key_type), batch.column("ordinal").cast(pa.int64())],
                    schema=schema)
        except Exception as exc:
            failures.append(exc)
            raise

    return pa.RecordBatchReader.from_batches(schema, converted())


def find_duplicates(batches: Iterable[pa.RecordBatch], id_type: pa.DataType, out_path: Path, work_dir: Path,
                    memory_limit_mb: int = 1024, threads: int = 2) -> int:
    """Write at out_path, as Parquet sorted by ordinal, every row whose non-null id an earlier row (smaller ordinal)
    also has: (ordinal, first = the ordinal of the earliest row with that id). Returns how many rows that is.
    Null ids are never duplicates here. DuckDB's buffers stay within memory_limit_mb and spill to work_dir; the
    process peaked at that plus 0.25-0.4 GB over 10**8 ids (benchmarks/duplicate_ids.py)."""
    import duckdb  # only the pre-pass needs it

    failures: list[Exception] = []
    reader = _as_duckdb(batches, id_type, failures)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dedup-", dir=work_dir))
    try:
        con = duckdb.connect(str(scratch / "ids.duckdb"), config={
            "memory_limit": f"{memory_limit_mb}MB", "threads": threads, "temp_directory": str(scratch / "spill"),
            "preserve_insertion_order": False})  # the load need not keep the stream's order
        try:
            con.register("reader", reader)
            try:
                con.execute("CREATE TABLE ids AS SELECT id, ordinal FROM reader WHERE id IS NOT NULL")
            except duckdb.Error:
                if failures:  # reading the ids failed (an id that does not fit, a file gone): that error, typed
                    raise failures[0] from None
                raise
            con.unregister("reader")
            key = "id" if pa.types.is_integer(id_type) else STRING_KEY
            con.execute(f"""
                CREATE TEMP TABLE candidates AS SELECT id, ordinal FROM ids WHERE {key} IN (
                    SELECT {key} AS k FROM ids GROUP BY k HAVING count(*) > 1)""")
            con.execute("DROP TABLE ids")
            con.execute("SET preserve_insertion_order = true")  # the Parquet writer keeps ORDER BY's order
            target = str(out_path).replace("'", "''")
            (count,) = con.execute(f"""
                COPY (
                    WITH firsts AS (SELECT id, min(ordinal) AS first FROM candidates GROUP BY id HAVING count(*) > 1)
                    SELECT c.ordinal, f.first FROM candidates c JOIN firsts f ON c.id = f.id
                    WHERE c.ordinal > f.first
                    ORDER BY c.ordinal
                ) TO '{target}' (FORMAT parquet, ROW_GROUP_SIZE {RESULT_ROW_GROUP})""").fetchone()
        finally:
            con.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return int(count)


def duplicates_between(path: str | Path, lo: int, hi: int,
                       filesystem: pafs.FileSystem | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ordinals, firsts) of the duplicates with lo <= ordinal < hi, from find_duplicates' file (local, or a path in
    `filesystem` such as Store.arrow_fs()'s). Row-group statistics skip the rest, so memory follows the range."""
    dataset = ds.dataset(str(path), format="parquet", filesystem=filesystem, schema=RESULT_SCHEMA)
    table = dataset.to_table(filter=(pc.field("ordinal") >= lo) & (pc.field("ordinal") < hi))
    return table.column("ordinal").to_numpy(), table.column("first").to_numpy()


class SeenIds:
    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Mark each hash as a duplicate (seen before, or earlier in this batch) and remember the rest."""
        duplicate = np.zeros(len(hashes), bool)
        if not len(hashes):
            return duplicate
        _, first = np.unique(hashes, return_index=True)
        duplicate[:] = True
        duplicate[first] = False  # the first occurrence in the batch is not a duplicate of the batch
        duplicate |= self.contains(hashes)
        if not duplicate.all():  # an empty run would break the searches above
            self._runs.append(np.sort(hashes[~duplicate]))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            newest = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newest]), kind="mergesort")
        return duplicate

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` were added before (a lookup only: nothing is remembered)."""
        found = np.zeros(len(hashes), bool)
        for run in self._runs:
            where = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[where] == hashes
        return found

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._runs)
