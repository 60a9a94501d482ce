"""The job registry against a real Redis: status costs the same at 10 shards and 100,000, counts each shard once,
pages its failures, and a finished job's keys expire after the retention."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest
import redis

from bulkembed.contract import keys
from bulkembed.contract.registry import FAILURES_PAGE, JobRegistry, JobTotals
from tests.contract.test_open_jobs import job, plan, result

BIG = 100_000


@pytest.fixture
def registry(fresh_redis) -> JobRegistry:
    return JobRegistry.from_url(fresh_redis.url, retention_s=3600)


def planned_job(registry: JobRegistry, tmp_path: Path, shards: int, done: int) -> str:
    """A job with `shards` queued and `done` of them written: results written straight into Redis (a synthetic
    registry, as a real job of that size would leave it), then one more through shard_done for the counters."""
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}", name=uuid.uuid4().hex[:6])
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=shards, docs=shards, tokens=3 * shards))
    done_key, job_key = (k.format(job_id=spec.job_id) for k in (keys.REDIS_JOB_DONE, keys.REDIS_JOB))
    with registry.redis.pipeline(transaction=False) as pipe:
        for shard in range(done - 1):
            pipe.hset(done_key, str(shard), result(shard).model_dump_json())
            if shard % 10_000 == 9_999:
                pipe.execute()
        pipe.hset(job_key, mapping={"rows_done": done - 1, "tokens_done": 3 * (done - 1)})
        pipe.execute()
    registry.shard_done(spec.job_id, result(done - 1))
    return spec.job_id


def cost_of_status(registry: JobRegistry, job_id: str) -> tuple[int, int, object]:
    """Redis commands processed and bytes sent back for one status poll (this Redis serves this test alone)."""
    def stats() -> tuple[int, int]:
        info = registry.redis.info("stats")
        return info["total_commands_processed"], info["total_net_output_bytes"]

    commands, sent = stats()
    status = registry.status(job_id)
    after_commands, after_sent = stats()
    return after_commands - commands - 1, after_sent - sent, status  # less the INFO that read them


def test_status_costs_the_same_at_ten_shards_and_a_hundred_thousand(registry, tmp_path):
    small = planned_job(registry, tmp_path, shards=20, done=10)
    big = planned_job(registry, tmp_path, shards=2 * BIG, done=BIG)
    small_commands, small_bytes, small_status = cost_of_status(registry, small)
    big_commands, big_bytes, big_status = cost_of_status(registry, big)
    assert small_status.shards_done == 10 and big_status.shards_done == BIG
    assert big_status.rows_done == BIG and big_status.tokens_done == 3 * BIG and big_status.state == "running"
    assert big_commands == small_commands <= 5
    assert abs(big_bytes - small_bytes) < 64, (small_bytes, big_bytes)  # a few more digits in the counters


def test_a_shard_reported_twice_counts_once_and_a_written_one_that_fails_is_not_counted_twice(registry, tmp_path):
    job_id = planned_job(registry, tmp_path, shards=3, done=1)
    for _ in range(2):
        registry.shard_done(job_id, result(1))
    registry.shard_failed(job_id, 1, "written, then its job's manifest could not be")
    status = registry.status(job_id)
    assert (status.shards_done, status.rows_done, status.tokens_done, status.failed) == (2, 2, 6, 1)
    assert status.state == "running", "shard 2 is neither written nor failed: not settled"
    registry.shard_failed(job_id, 2, "for good")
    assert registry.status(job_id).state == "failed"


def test_rows_the_workers_quarantine_are_counted_once_beside_plannings(registry, tmp_path):
    """status and submit --wait said "0 rejected" for a job whose rows the workers quarantined (NaN vectors, llama.cpp
    failures): only planning's rejections were counted."""
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=2, docs=10, tokens=30, rejected=1))
    with_rejects = result(0).model_copy(update={"rows": 3, "rejected": 2})
    for _ in range(2):  # delivered twice
        registry.shard_done(spec.job_id, with_rejects)
    status = registry.status(spec.job_id)
    assert (status.rows_done, status.rejected_done, status.totals.rejected) == (3, 2, 1)
    registry.plan_again(spec.job_id, 0, [0])  # its file lost: the unit planned again takes its counts off
    assert registry.status(spec.job_id).rejected_done == 0


def test_failures_come_a_page_at_a_time_and_all_on_request(registry, tmp_path):
    job_id = planned_job(registry, tmp_path, shards=500, done=1)
    for shard in range(1, 300):
        registry.shard_failed(job_id, shard, f"error {shard}")
    status = registry.status(job_id)
    assert status.failed == 299 and len(status.failures) <= FAILURES_PAGE
    assert dict(registry.failures(job_id)) == {shard: f"error {shard}" for shard in range(1, 300)}
    registry.shard_done(job_id, result(7))  # written after all: no longer a failure
    assert registry.status(job_id).failed == 298


def test_a_finished_jobs_keys_expire_after_the_retention_and_a_resubmission_keeps_them(registry, tmp_path):
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=1, docs=1, tokens=3))
    registry.attempt(spec.job_id, 0)
    assert registry.shard_done(spec.job_id, result(0))
    (tmp_path / "a").mkdir()
    registry.finalize(spec.job_id)
    names = [k.format(job_id=spec.job_id) for k in (keys.REDIS_JOB, keys.REDIS_JOB_DONE, keys.REDIS_JOB_ATTEMPTS)]
    ttls = [registry.redis.ttl(name) for name in names]
    assert all(0 < ttl <= 3600 for ttl in ttls), ttls
    assert registry.status(spec.job_id).state == "done"
    registry.start(spec, 1)  # resubmitted before they expired: kept, and no longer expiring
    assert registry.redis.ttl(names[0]) == -1 and registry.redis.ttl(names[1]) == -1
    assert registry.status(spec.job_id).shards_done == 1


def test_a_resubmission_that_dies_leaves_a_planned_job_running(registry, tmp_path):
    """Submitting a running job again (to queue lost messages) opened its planning again, and only that submit
    closed it: killed in between, it left the job in `planning` for ever, every shard written, no manifest task sent,
    a GPU worker kept up for it. A job whose every unit is planned now stays closed; one that is complete has its
    manifest written again by the submit (manifest_due), as before."""
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=2, docs=2, tokens=6))
    registry.shard_done(spec.job_id, result(0))
    registry.start(spec, 1)  # submitted again, and killed before it closed anything
    assert registry.status(spec.job_id).state == "running" and not registry.manifest_due(spec.job_id)
    assert registry.shard_done(spec.job_id, result(1)), "complete: its worker asks for the manifest"
    registry.start(spec, 1)  # complete: its submit writes the manifest again
    assert registry.manifest_due(spec.job_id) and registry.status(spec.job_id).state == "finishing"
    assert not registry.planning_open(spec.job_id)


def test_keys_made_after_a_job_expires_expire_with_it(registry, tmp_path):
    """A job whose planning failed expires while its other units' shards are still embedded, and a finished job
    may get a late duplicate delivery: the keys those make expire with the job. They used to be kept for ever, and
    the same job submitted after the retention took them up, stale: it never settled (status running, --wait
    waiting, a GPU worker kept up for it)."""
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 2)
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=3, docs=3, tokens=9))
    registry.planning_failed(spec.job_id, 1, "cannot read b.parquet")
    assert registry.status(spec.job_id).state == "failed"
    registry.attempt(spec.job_id, 0)
    registry.shard_done(spec.job_id, result(0))
    registry.shard_failed(spec.job_id, 1, "engine died")
    made_later = [k.format(job_id=spec.job_id) for k in (keys.REDIS_JOB_DONE, keys.REDIS_JOB_FAILED,
                                                          keys.REDIS_JOB_ATTEMPTS)]
    assert all(registry.redis.exists(key) for key in made_later)
    job_ttl = registry.redis.ttl(keys.REDIS_JOB.format(job_id=spec.job_id))
    assert 0 < job_ttl <= 3600
    assert [registry.redis.ttl(key) for key in made_later] == [job_ttl] * 3
    registry.start(spec, 2)  # submitted again: kept again, none expiring (its shards get fresh attempts)
    assert [registry.redis.ttl(key) for key in made_later] == [-1, -1, -2]


def test_once_expired_nothing_of_the_job_is_left(fresh_redis, tmp_path):
    registry = JobRegistry.from_url(fresh_redis.url, retention_s=1)
    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=1, docs=1, tokens=3))
    registry.shard_done(spec.job_id, result(0))
    (tmp_path / "a").mkdir()
    registry.finalize(spec.job_id)
    client = redis.Redis.from_url(fresh_redis.url)
    deadline = time.monotonic() + 10  # Redis expires keys when read or by its active cycle (10 times a second)
    while client.keys(f"*{spec.job_id}*") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.keys(f"*{spec.job_id}*") == []


def test_planning_a_unit_again_takes_its_counts_off_once_whoever_asks(registry, tmp_path, monkeypatch):
    """Two submits of a done job that lost a file, at once: both read the unit's records before either writes. Each
    count is taken off once (a WATCH transaction), the unit's queued count goes too, and what is left plus the unit
    planned again adds up. Before, both took their counts off: planned shards 3 went to -3, and the job would have
    been complete with a unit short."""
    import threading

    spec = job(tmp_path, f"bulkembed.test-{uuid.uuid4().hex[:8]}")
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=3, docs=30, tokens=90))
    for shard in range(3):
        registry.shard_done(spec.job_id, result(shard))
    registry.redis.hset(keys.REDIS_JOB_QUEUED.format(job_id=spec.job_id), "0", 3)  # as a job whose planning failed
    both_read = threading.Barrier(2, timeout=5)
    reads = []
    parse = JobTotals.model_validate_json

    def read_together(raw, *args, **kwargs):
        reads.append(raw)
        if len(reads) <= 2:
            both_read.wait()
        return parse(raw, *args, **kwargs)

    monkeypatch.setattr(JobTotals, "model_validate_json", read_together)
    found: list[int] = []
    threads = [threading.Thread(target=lambda: found.append(registry.plan_again(spec.job_id, 0, [1]))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    monkeypatch.undo()
    assert sorted(found) == [0, 1], "one of them found shard 1 written"
    fields = registry.redis.hgetall(keys.REDIS_JOB.format(job_id=spec.job_id))
    assert (int(fields["planned_shards"]), int(fields["planned_docs"]), int(fields["rows_done"])) == (0, 0, 2)
    assert registry.unwritten(spec.job_id, [0, 1, 2]) == [1]
    assert registry.planned_units(spec.job_id) == {}
    assert registry.redis.hget(keys.REDIS_JOB_QUEUED.format(job_id=spec.job_id), "0") is None, "queues it anew"


def test_shards_held_reads_its_own_shards_and_skips_any_other_message(registry):
    """What a resubmission asks before queueing a shard again: is its message on the queue, or delivered and not
    acknowledged? Messages of other jobs, other tasks, older producers' dicts and garbage (another client's list, a
    body of another shape) are told apart or skipped, never raised on."""
    from celery import Celery

    from bulkembed.contract.queue import KOMBU_UNACKED, TASK_EMBED_SHARD, shards_held

    queue = f"bulkembed.test-{uuid.uuid4().hex[:8]}"
    app = Celery("held-test", broker=f"redis://127.0.0.1:{registry.redis.connection_pool.connection_kwargs['port']}/0")
    app.conf.task_serializer = "json"
    app.send_task("bulkembed.plan_unit", args=["job-a", [6]], queue=queue)
    for args in ([["job-b", 4, 1, 1, 1, 0.0]], [{"job_id": "job-a", "shard": 5}], [], [["job-a", 3, 1, 1, 1, 0.0]]):
        app.send_task(TASK_EMBED_SHARD, args=args, queue=queue)
    registry.redis.rpush(queue, "not json", json.dumps({"headers": {"task": TASK_EMBED_SHARD}, "body": "%%%",
                                                        "properties": {"body_encoding": "base64"}}))
    delivered = json.loads(registry.redis.lpop(queue))  # shard 3, as kombu keeps a message a worker holds
    assert json.loads(base64.b64decode(delivered["body"]))[0] == [["job-a", 3, 1, 1, 1, 0.0]]
    registry.redis.hset(KOMBU_UNACKED, "tag-1", json.dumps([delivered, "", queue]))
    try:
        assert shards_held(registry.redis, queue, "job-a") == {3, 5}
        assert shards_held(registry.redis, queue, "job-b") == {4}
    finally:
        registry.redis.hdel(KOMBU_UNACKED, "tag-1")



def test_submit_wait_says_on_a_line_of_its_own_that_the_job_left_redis(redis_server, tmp_path, capsys):
    """Forgotten, expired or lost with Redis's data (a restart without persistence): the message was glued to the
    progress bar, the bar drawn again after it, and it named --force or expiry only."""
    from bulkembed.cli import wait_for

    registry = JobRegistry.from_url(redis_server)
    spec = job(tmp_path, f"q-{uuid.uuid4().hex}")
    registry.start(spec, 1)
    registry.forget(spec.job_id)  # as Redis restarted without its data leaves it (this Redis is shared: no FLUSHDB)
    assert wait_for(registry, spec.job_id, poll_s=0.01) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"job {spec.job_id} is gone from Redis (") and "lost with Redis's data" in last, last
    assert "the same submit command resumes the job" in last


def test_submit_wait_says_when_no_worker_of_the_jobs_model_serves_it(redis_server, tmp_path, capsys):
    """It waited for ever with the bar at 0 and not a word (a worker of another model, or none started)."""
    import threading

    from bulkembed.cli import wait_for

    registry = JobRegistry.from_url(redis_server)
    spec = job(tmp_path, f"q-{uuid.uuid4().hex}")
    registry.start(spec, 1)
    registry.report_engines(spec.model.queue, "w1", 2, sha256="1" * 64)  # another file of the same name
    threading.Timer(2.0, registry.forget, [spec.job_id]).start()  # ends the wait
    assert wait_for(registry, spec.job_id, poll_s=0.05, no_worker_s=0.5) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("no worker of m.gguf")]
    assert len(said) == 1 and f"queue {spec.model.queue}" in said[0], said
    served = job(tmp_path, f"q-{uuid.uuid4().hex}", name="b")
    registry.start(served, 1)
    registry.report_engines(served.model.queue, "w2", 1, sha256=served.model.sha256)
    threading.Timer(1.5, registry.forget, [served.job_id]).start()
    assert wait_for(registry, served.job_id, poll_s=0.05, no_worker_s=0.5) == 1
    assert "no worker of" not in capsys.readouterr().err, "a worker of its model serves it: nothing to say"
