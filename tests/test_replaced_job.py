"""`submit --force` replaces a job whose workers and planners may still be writing: a late write of theirs (an S3 put
slower than the 15 s --force waits) lands under the new job's file names. Each file says which job wrote it, and the
new job writes over what is not its own; the replaced job's writers stop at their look that their job is still
registered instead of deleting the new job's files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bulkembed.contract import keys
from bulkembed.contract.errors import ForeignOutput, JobGone
from bulkembed.contract.registry import stored_result
from bulkembed.contract.schema import from_ipc_bytes, read_metadata, rejected_schema, to_ipc_bytes
from bulkembed.producer.submit import JobOptions, plan_job, produce
from bulkembed.worker.rows import EmbeddedRows
from bulkembed.worker.shard import embed_shard, open_shard, write_shard
from tests.conftest import mixed_texts, write_corpus
from tests.test_bad_input import ALL_EMBEDDED, RunsTheOtherFirst, _shard, _vectors


def _replaced(message):
    """The same shard of the job that submit --force replaced: same names, other options (not normalized)."""
    job = message.job.model_copy(update={"normalize": False})
    return message.model_copy(update={"job": job, "job_id": job.job_id})


def _gone(job_id: str):
    """A worker's look that its job still owns OUT (worker.app.still_registered), its job forgotten."""
    def owned() -> None:
        raise JobGone.of(job_id, "its OUT may be another job's now")

    return owned


def test_a_shard_file_of_the_replaced_job_is_written_over(tmp_path, tiny_model):
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    old = _replaced(message)
    sha = message.job.model.sha256
    embed_shard(old, lambda rows: _vectors([3.0, 0, 0], [0, 3.0, 0]), sha, store)  # landed after --force's wait
    with pytest.raises(ForeignOutput, match=f"written by job {old.job.job_id}"):
        stored_result(message, store)
    result = embed_shard(message, lambda rows: _vectors(*ALL_EMBEDDED), sha, store)
    written = from_ipc_bytes(store.get(message.output_key))
    assert read_metadata(written.schema)["job_id"] == message.job.job_id and result.rows == 2
    assert written.column("embedding").to_pylist()[0] == [1.0, 0.0, 0.0], "this job's vectors, normalized"
    # The replaced job's worker, late again, finds the new job's file and stops at its look (JobGone): it deletes
    # nothing of the new job's.
    with pytest.raises(JobGone):
        embed_shard(old, lambda rows: _vectors(*ALL_EMBEDDED), sha, store, owned=_gone(old.job_id))
    assert store.get(message.output_key) == to_ipc_bytes(written)


def test_a_shard_file_of_the_replaced_job_landing_while_this_one_embeds_is_written_over(tmp_path, tiny_model):
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    old = _replaced(message)
    sha = message.job.model.sha256
    opened, opened_old = open_shard(message, sha, store), open_shard(old, sha, store)
    racing = RunsTheOtherFirst(store, "put_if_absent", lambda: write_shard(opened_old, _vectors(*ALL_EMBEDDED), store))
    result = write_shard(opened, _vectors(*ALL_EMBEDDED), racing)
    assert racing.other_result is not None, "the replaced job's file landed first"
    assert read_metadata(from_ipc_bytes(store.get(message.output_key)).schema)["job_id"] == message.job.job_id
    assert stored_result(message, store).sha256 == result.sha256


def test_a_replaced_jobs_put_slow_past_the_new_jobs_file_deletes_nothing(tmp_path, tiny_model):
    """The replaced job's worker looked that its job was registered, then its put took longer than --force waits:
    the new job's file is there when it fails. It stops (JobGone) instead of deleting that file as a foreign one and
    writing its own (a reviewer's reproduction: the new job's manifest named vectors OUT no longer held)."""
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    old = _replaced(message)
    sha = message.job.model.sha256
    opened, opened_old = open_shard(message, sha, store), open_shard(old, sha, store)
    racing = RunsTheOtherFirst(store, "put_if_absent", lambda: write_shard(opened, _vectors(*ALL_EMBEDDED), store))
    with pytest.raises(JobGone):
        write_shard(opened_old, _vectors([3.0, 0, 0], [np.nan, 0, 0]), racing, owned=_gone(old.job_id))
    assert stored_result(message, store).sha256 == racing.other_result.sha256, "the new job's file, untouched"
    assert not store.exists(keys.shard_rejected(0)), "and no record of the replaced job's"


def test_a_planner_writes_over_the_replaced_jobs_inputs_outputs_and_records(tmp_path, tiny_model):
    """Planning the new job finds, under its names, a shard file, a shard input and a quarantine record of the job
    --force replaced (here: another corpus into the same OUT). The file is deleted and its shard queued, the input
    and the record are this job's."""
    texts = mixed_texts(60, seed=9)
    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(60)], texts[:59] + [""])  # d59 rejected
    options = JobOptions(shard_tokens=600)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    first: list = []
    produce(planned, first.append, lambda result: None)
    store = planned.store
    job = planned.job
    mine = {m.shard: store.get(m.input_key) for m in first}
    record = keys.rejected("unit-000000-0000")
    assert from_ipc_bytes(store.get(record)).column("id").to_pylist() == ["d59"]

    # What the replaced job left, late: its file for shard 0, its inputs, its record.
    old = _replaced(first[0])
    dims = job.dims or 64
    embed_shard(old, lambda rows: EmbeddedRows(np.ones((old.n_docs, dims), np.float32), {}, dims), job.model.sha256,
                store)
    foreign_input = pa.table({"id": ["x"], "text": ["not this corpus"]})
    for message in first:
        store.put(message.input_key, to_ipc_bytes(foreign_input))
    store.put(record, to_ipc_bytes(pa.table({"id": ["x"], "reason": ["empty text"], "source": ["other.parquet"],
                                             "row": [0]}, schema=rejected_schema(pa.string()))))

    again: list = []
    produce(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), again.append,
            lambda result: pytest.fail(f"shard {result.shard} taken as written"))
    assert sorted(m.shard for m in again) == sorted(mine), "every shard queued, the replaced job's file deleted"
    assert not store.exists(first[0].output_key)
    assert {m.shard: store.get(m.input_key) for m in again} == mine, "this job's inputs"
    assert from_ipc_bytes(store.get(record)).column("id").to_pylist() == ["d59"], "this job's record"
