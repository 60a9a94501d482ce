"""The streamed manifest: a summary and a Parquet file of shards, on a local folder and on S3 (moto), read back as
the inline manifest of bulkembed's first format held them; old inline manifests still read."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bulkembed.contract import keys, manifest
from bulkembed.contract.errors import StoreRefused, TransientError
from bulkembed.contract.manifest import manifest_shards, read_manifest, shards_schema, write_manifest
from bulkembed.contract.registry import JobTotals, ReusedFile, ShardResult, deleting_inputs
from bulkembed.contract.store import REQUESTS_AT_ONCE, LocalStore, Store, open_store
from tests.contract.test_open_jobs import job

N = 3_000


def numbers(n: int, per_unit: int = 40) -> list[int]:
    """Shard numbers as planning units give them (unit * 1,000,000 + place): sparse."""
    return [i // per_unit * 1_000_000 + i % per_unit for i in range(n)]


def results(n: int = N, seed: int = 0, per_unit: int = 40) -> list[ShardResult]:
    """Shards in no order, as HSCAN gives them; some with rejected rows, one in ten decoded another way."""
    found = [ShardResult(shard=s, key=f"{s}.arrow", rows=10 + s % 7, tokens=100 + i, sha256=f"{s:064x}",
                         rejected=i % 5 == 0, seconds=1.5, decoding="b" * 12 if i % 10 == 0 else "a" * 12)
             for i, s in enumerate(numbers(n, per_unit))]
    random.Random(seed).shuffle(found)
    return found


def inline_shards(found: list[ShardResult]) -> list[dict]:
    """What the first manifest format (registry.build_manifest) held under "shards"."""
    return [r.model_dump(exclude={"seconds"}) for r in sorted(found, key=lambda r: r.shard)]


TOTALS = JobTotals(shards=N, docs=40_000, tokens=1, truncated=4, rejected=3, reused_rows=50, reused_tokens=700,
                   reused_truncated=2)
REUSED = [ReusedFile(key=keys.reused_output(0), source="000007.arrow", rows=50, tokens=700, truncated=2,
                     sha256="a" * 64, decoding="c" * 12)]


def decodings(found: list[ShardResult]) -> list[dict]:
    """The summary's count of each decoding: the reused file's, then the shards', most rows first."""
    counted = {"c" * 12: {"digest": "c" * 12, "files": 1, "rows": 50, "example": REUSED[0].key}}
    for r in found:
        d = counted.setdefault(r.decoding, {"digest": r.decoding, "files": 0, "rows": 0, "example": r.key})
        d["files"], d["rows"] = d["files"] + 1, d["rows"] + r.rows
    return sorted(counted.values(), key=lambda d: -d["rows"])


def check_written(store: Store, spec, found: list[ShardResult]) -> dict:
    """Stream the results from a generator, then read both files back."""
    for name in ("shard-000005", "plan-b", "plan-a"):
        store.put(keys.rejected(name), b"x")
    consumed = []

    def scan() -> Iterator[ShardResult]:
        for r in found:
            consumed.append(r.shard)
            yield r

    summary = write_manifest(store, spec, TOTALS, scan(), REUSED)
    assert len(consumed) == len(found), "the results were iterated once"
    assert read_manifest(store) == summary
    embedded_rows = sum(r.rows for r in found)
    assert summary == {
        "manifest_version": 2, "job_id": spec.job_id, "job": spec.model_dump(mode="json"),
        "shards_file": "_manifest/shards.parquet", "shard_count": len(found),
        "reused_files": [REUSED[0].model_dump()],
        "rows": embedded_rows + 50, "embedded_rows": embedded_rows, "reused_rows": 50,
        "tokens": sum(r.tokens for r in found) + 700, "truncated_rows": 4 + 2,
        "rejected_rows": 3 + sum(r.rejected for r in found),
        "rejected_files": ["_rejected/plan-a.arrow", "_rejected/plan-b.arrow", "_rejected/shard-000005.arrow"],
        "decodings": decodings(found),
    }
    assert [d["digest"] for d in summary["decodings"]] == ["a" * 12, "b" * 12, "c" * 12]
    table = manifest_shards(store)
    assert table.schema == shards_schema()
    assert table.to_pylist() == inline_shards(found)
    assert manifest_shards(store.uri).equals(table), "read from the output's folder or s3:// URI as README shows"
    return summary


def test_local_store(tmp_path):
    spec = job(tmp_path, "q")
    store = open_store(str(tmp_path / "out"))
    check_written(store, spec, results())
    names = sorted(key for key, _ in store.list())
    assert names == ["_manifest.json", "_manifest/shards.parquet", "_rejected/plan-a.arrow",
                     "_rejected/plan-b.arrow", "_rejected/shard-000005.arrow"]
    assert not [p for p in (tmp_path / "out" / "_manifest").iterdir() if p.name.startswith(".tmp-")]


def test_s3_store(s3_server, bucket, tmp_path):
    spec = job(tmp_path, "q")
    store = open_store(f"s3://{bucket}/out")
    check_written(store, spec, results())
    assert [key for key, _ in store.list("_manifest")] == ["_manifest.json", "_manifest/shards.parquet"]


def test_streamed_in_batches(tmp_path, monkeypatch):
    """One row group a batch: never the whole list at once."""
    monkeypatch.setattr(manifest, "BATCH_ROWS", 1_000)
    store = open_store(str(tmp_path / "out"))
    write_manifest(store, job(tmp_path, "q"), JobTotals(), iter(results()))
    assert pq.ParquetFile(tmp_path / "out" / keys.MANIFEST_SHARDS_KEY).metadata.num_row_groups == 3
    assert manifest_shards(store).column("shard").to_pylist() == numbers(N)


def test_what_finalize_holds_stays_small_with_sparse_shard_numbers(tmp_path):
    """A unit's shards are numbered from unit * 1,000,000: what tells a shard seen must not grow with the numbers."""
    found = results(N, per_unit=1)  # the largest number is about N * 1,000,000
    store = open_store(str(tmp_path / "out"))
    tracemalloc.start()
    try:
        write_manifest(store, job(tmp_path, "q"), JobTotals(), iter(found))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_a_shard_reported_twice_counts_once(tmp_path):
    """HSCAN may return a field more than once."""
    found = results(100)
    store = open_store(str(tmp_path / "out"))
    summary = write_manifest(store, job(tmp_path, "q"), JobTotals(), found + found[:30] + found[50:51])
    assert summary["shard_count"] == 100 and summary["embedded_rows"] == sum(r.rows for r in found)
    assert manifest_shards(store).to_pylist() == inline_shards(found)


def test_no_shards(tmp_path):
    store = open_store(str(tmp_path / "out"))
    summary = write_manifest(store, job(tmp_path, "q"), JobTotals(reused_rows=5, reused_tokens=9), [])
    assert (summary["shard_count"], summary["rows"], summary["tokens"], summary["rejected_files"]) == (0, 5, 9, [])
    assert manifest_shards(store).num_rows == 0 and manifest_shards(store).schema == shards_schema()


def test_written_again_replaces_and_a_failed_write_keeps_the_last_complete_one(tmp_path):
    store = open_store(str(tmp_path / "out"))
    spec = job(tmp_path, "q")
    write_manifest(store, spec, JobTotals(), results(10))
    write_manifest(store, spec, JobTotals(), results(20))
    assert manifest_shards(store).num_rows == 20 and read_manifest(store)["shard_count"] == 20

    def broken() -> Iterator[ShardResult]:
        yield from results(5)
        raise ConnectionError("Redis went away")

    with pytest.raises(ConnectionError):
        write_manifest(store, spec, JobTotals(), broken())
    assert manifest_shards(store).num_rows == 20 and read_manifest(store)["shard_count"] == 20
    assert sorted(p.name for p in (tmp_path / "out" / "_manifest").iterdir()) == ["shards.parquet"]


def test_a_failed_write_on_s3_leaves_no_partial_shards_file(s3_server, bucket, tmp_path):
    store = open_store(f"s3://{bucket}/out")

    def broken() -> Iterator[ShardResult]:
        yield from results(5)
        raise ConnectionError("Redis went away")

    with pytest.raises(ConnectionError):
        write_manifest(store, job(tmp_path, "q"), JobTotals(), broken())
    assert store.list() == []


def test_an_inline_manifest_of_an_older_bulkembed_reads_the_same(tmp_path):
    found = results(50)
    store = open_store(str(tmp_path / "old"))
    store.put(keys.MANIFEST_KEY, json.dumps({"job_id": "j", "shards": inline_shards(found), "rows": 1}).encode())
    assert manifest_shards(store).to_pylist() == inline_shards(found)
    assert not store.exists(keys.MANIFEST_SHARDS_KEY)


def test_no_manifest(tmp_path: Path):
    store = open_store(str(tmp_path / "empty"))
    assert read_manifest(store) is None
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        manifest_shards(store)


class WatchedStore(LocalStore):
    """A folder that records its delete requests, how many run at once, and fails the `fail_at`-th."""

    def __init__(self, root: Path, fail_at: int = 0, error: Exception | None = None):
        super().__init__(root)
        self.requests: list[int] = []
        self.running = self.most = 0
        self.fail_at, self.error = fail_at, error or TransientError("S3 DELETE failed")
        self.lock = threading.Lock()

    def delete_many(self, names: list[str]) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            failing = len(self.requests) + 1 == self.fail_at
            self.requests.append(len(names))
        try:
            time.sleep(0.02)  # a request's round trip
            if failing:
                raise self.error
            super().delete_many(names)
        finally:
            with self.lock:
                self.running -= 1


def test_a_done_jobs_inputs_are_deleted_several_requests_at_once_and_a_failure_is_raised(tmp_path):
    """At 10^9 rows a job's inputs take ~7,600 delete requests: one by one they took minutes while the manifest
    waited, and KEDA may stop the planner meanwhile. They run REQUESTS_AT_ONCE at once, each whole, and a failed one
    fails the manifest (written again by the next finalize) rather than leaving inputs unsaid."""
    count = 10_500
    store = WatchedStore(tmp_path / "out")
    for shard in range(count):
        store.put(keys.shard_input(shard), b"x")
    results = [ShardResult(shard=shard, key=keys.shard_output(shard), rows=1, tokens=1) for shard in range(count)]
    assert [r.shard for r in deleting_inputs(store, results)] == list(range(count)), "every result, in order"
    assert store.list("_shards/") == []
    assert sorted(store.requests) == [500] + [1000] * 10
    assert 1 < store.most <= REQUESTS_AT_ONCE
    failing = WatchedStore(tmp_path / "failing", fail_at=3)
    with pytest.raises(TransientError, match="S3 DELETE failed"):
        list(deleting_inputs(failing, results))


def test_inputs_the_store_refuses_to_delete_for_good_stop_the_deleting_not_the_manifest(tmp_path, caplog):
    """An output bucket that lets workers write but not delete: the inputs stay (said, once), every result still
    reaches the manifest, and no more delete requests are sent. Before, a refusal was taken for a hiccup: the
    manifest was retried for an hour, then the job stayed `finishing` for good."""
    count = 40_500
    store = WatchedStore(tmp_path / "out", fail_at=2, error=StoreRefused("S3 DELETE of 1000 keys failed: AccessDenied"))
    for shard in range(count):
        store.put(keys.shard_input(shard), b"x")
    results = [ShardResult(shard=shard, key=keys.shard_output(shard), rows=1, tokens=1) for shard in range(count)]
    with caplog.at_level(logging.WARNING):
        assert [r.shard for r in deleting_inputs(store, results)] == list(range(count)), "every result, in order"
    assert "refused to delete the shards' inputs" in caplog.text and "AccessDenied" in caplog.text
    assert len(store.requests) <= 2 * REQUESTS_AT_ONCE + 1 < 41, "none after a refusal but those already under way"


@pytest.mark.parametrize("codes, raised", [(["SlowDown", "InternalError"], TransientError),
                                           (["AccessDenied"], StoreRefused),
                                           (["InternalError", "AccessDenied"], StoreRefused)])
def test_per_key_delete_errors_are_transient_or_not_by_their_codes(bucket, codes, raised, monkeypatch):
    """DeleteObjects answers 200 with an error per key that it did not delete: retried only where every code says
    try again."""
    store = open_store(f"s3://{bucket}/out")
    errors = [{"Key": f"out/_shards/{i}.arrow", "Code": code, "Message": "..."} for i, code in enumerate(codes)]
    # What S3 answers (moto deletes them all). The client is every store's: put back after the test.
    monkeypatch.setattr(store.client, "delete_objects", lambda **request: {"Errors": errors})
    with pytest.raises(raised, match=codes[0]):
        store.delete_many(["_shards/0.arrow", "_shards/1.arrow"])
