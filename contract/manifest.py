"""The manifest a finished job leaves beside its embeddings: a small summary, `_manifest.json`, and one row per
written shard in `_manifest/shards.parquet`.

The shards are streamed into the Parquet file a batch at a time, so finalizing a million-shard job holds one batch,
not a million results. Its rows are in no particular order (the registry scans them from Redis as they come);
`manifest_shards` sorts them by shard. The Parquet file is written before the summary: a summary present means its
shards file is complete. Writing again (finalize may run twice) replaces both.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from bulkembed.contract import keys
from bulkembed.contract.store import Store, open_store

if TYPE_CHECKING:  # registry imports this module, so its models are for typing only
    from bulkembed.contract.job import JobSpec
    from bulkembed.contract.registry import JobTotals, ReusedFile, ShardResult

MANIFEST_VERSION = 2
# Shard rows a Parquet row group holds, and all that write_manifest keeps at once. Small, because a batch costs far
# more than its values, about 1.6 kB a row as Python objects kept among the freed results' memory: at a million
# shards a batch of 50,000 peaked 91 MiB above the imports, one of 10,000 48 MiB (benchmarks/manifest_rss.py).
BATCH_ROWS = 10_000
REJECTED_PREFIX = keys.REJECTED_KEY.split("{")[0]  # "_rejected/"


def shards_schema() -> pa.Schema:
    """A ShardResult as a row (its `seconds` is left out: how long a shard took is no part of the output)."""
    return pa.schema([("shard", pa.int64()), ("key", pa.string()), ("rows", pa.int64()), ("tokens", pa.int64()),
                      ("sha256", pa.string()), ("rejected", pa.int64()), ("decoding", pa.string())])


def write_manifest(store: Store, job: JobSpec, totals: JobTotals, results: Iterable[ShardResult],
                   reused: Sequence[ReusedFile] = ()) -> dict:
    """Stream `results` (any order; a shard reported twice, as HSCAN may, counts once) into the shards file, then
    write the summary and return it. Rows and tokens count the whole output: embedded plus reused from PREV_OUT.
    `decodings` counts the files and rows of each way they were decoded (their decoded_by, by digest), most rows
    first, each with a file that holds it: queries embed as the first (bulkembed.query.read_index)."""
    schema = shards_schema()
    columns: dict[str, list] = {name: [] for name in schema.names}
    decodings = _Decodings()
    for reused_file in reused:
        decodings.add(reused_file.decoding, reused_file.rows, reused_file.key)
    seen = _ShardSet()
    count = rows = tokens = rejected = 0
    # Written to a local file first, then put whole (Store.put_file): readers and a second finalize racing this one
    # never see half a file, and one whose writing failed leaves the last complete file in place.
    with tempfile.TemporaryDirectory(prefix="bulkembed-manifest-") as work:
        path = Path(work) / "shards.parquet"
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for result in results:
                if not seen.add(result.shard):
                    continue
                count, rows, tokens, rejected = (count + 1, rows + result.rows, tokens + result.tokens,
                                                 rejected + result.rejected)
                decodings.add(result.decoding, result.rows, result.key)
                for name, column in columns.items():
                    column.append(getattr(result, name))
                if len(columns["shard"]) >= BATCH_ROWS:
                    writer.write_batch(pa.record_batch(columns, schema=schema))
                    columns = {name: [] for name in schema.names}
            if columns["shard"]:
                writer.write_batch(pa.record_batch(columns, schema=schema))
        store.put_file(keys.MANIFEST_SHARDS_KEY, path)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "job_id": job.job_id,
        "job": job.model_dump(mode="json"),
        "shards_file": keys.MANIFEST_SHARDS_KEY,
        "shard_count": count,
        "reused_files": [f.model_dump() for f in reused],
        "rows": rows + totals.reused_rows,
        "embedded_rows": rows,
        "reused_rows": totals.reused_rows,
        "tokens": tokens + totals.reused_tokens,
        "truncated_rows": totals.truncated + totals.reused_truncated,
        "rejected_rows": totals.rejected + rejected,
        "rejected_files": sorted(key for key, _ in store.list(REJECTED_PREFIX)),
        "decodings": decodings.summary(),
    }
    store.put(keys.MANIFEST_KEY, json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(store: Store) -> dict | None:
    """The summary; None when the job has not finished (or OUT holds no job)."""
    if not store.exists(keys.MANIFEST_KEY):
        return None
    return json.loads(store.get(keys.MANIFEST_KEY))


def manifest_shards(store: Store | str | Path, manifest: dict | None = None) -> pa.Table:
    """Every written shard of an output (its store, or its folder or s3:// URI), sorted by shard. `manifest`: the
    summary, when the caller has read it already. FileNotFoundError when there is no manifest."""
    if isinstance(store, (str, Path)):
        store = open_store(str(store))
    manifest = manifest if manifest is not None else read_manifest(store)
    if manifest is None:
        raise FileNotFoundError(f"no {keys.MANIFEST_KEY} in {store.uri}")
    if "shards" in manifest:  # written by bulkembed before manifest_version 2: the shards inline
        table = pa.Table.from_pylist(manifest["shards"], schema=shards_schema())
    else:
        fs, base = store.arrow_fs()
        table = pq.read_table(f"{base}/{manifest['shards_file']}", filesystem=fs, schema=shards_schema())
    return table.sort_by("shard")


class _Decodings:
    """Files and rows per decoding digest, and one file of each."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def add(self, digest: str, rows: int, key: str) -> None:
        counted = self.seen.setdefault(digest, {"digest": digest, "files": 0, "rows": 0, "example": key})
        counted["files"] += 1
        counted["rows"] += rows

    def summary(self) -> list[dict]:
        return sorted(self.seen.values(), key=lambda d: (-d["rows"], d["digest"]))


class _ShardSet:
    """Shard numbers seen, as bits in pages of 1,024 numbers: a page in use costs a few hundred bytes, so dense
    numbers (0, 1, 2, ...) and sparse ones (unit * 1,000,000 + place) both stay far below a set of ints."""

    PAGE = 1024

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def add(self, shard: int) -> bool:
        """False when `shard` was there already."""
        page, bit = divmod(shard, self.PAGE)
        bits = self.pages.get(page)
        if bits is None:
            bits = self.pages[page] = bytearray(self.PAGE // 8)
        mask = 1 << (bit & 7)
        if bits[bit >> 3] & mask:
            return False
        bits[bit >> 3] |= mask
        return True
