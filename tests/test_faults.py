"""Faults with real processes: workers killed or stopped mid-shard, Redis restarted, S3 failing,
the producer killed mid-submit, a poison shard. Whatever happens, every input id ends up exactly
once in the output and the manifest agrees with the input."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from bulkembed.contract import keys
from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.schema import from_ipc_bytes
from bulkembed.contract.store import open_store
from tests.conftest import Workers, free_port, mixed_texts, write_corpus
from tests.faults_support import (
    RECEIVED,
    Background,
    FaultPlan,
    FaultyS3Proxy,
    HoldRequest,
    Holds,
    OverwritingStore,
    RedisProcess,
    ShardStuck,
    attempts,
    check_exactly_once,
    check_vectors,
    cli,
    kill_tree,
    output_ids,
    redis_hash,
    wait_until,
)

QUEUE = "bulkembed.tiny-embeddings-text-retrieval-f32"
WORDS = ["alpha", "beta", "gamma", "delta", "the", "river", "model", "token", "embed", "over", "and", "sea"]


def long_texts(n: int, chars: tuple[int, int], seed: int) -> list[str]:
    """Texts of about a token a character in the tiny vocab."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        length = int(rng.integers(*chars))
        texts.append(" ".join(rng.choice(WORDS, size=length // 4))[:length])
    return texts


def corpus(folder: Path, n_short: int, n_long: int, long_chars: tuple[int, int] = (2600, 4000),
           seed: int = 0) -> tuple[Path, list[str]]:
    """Short documents and long ones (each spanning many ubatches)."""
    texts = mixed_texts(n_short, seed=seed, long_every=10**9) + long_texts(n_long, long_chars, seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    ids = [f"doc-{i:05d}" for i in range(len(texts))]
    path = write_corpus(folder / "corpus.parquet", ids, [texts[i] for i in order])
    return path, ids


def held_workers(env: dict[str, str], folder: Path) -> tuple[Workers, Holds]:
    """Workers that hold every shard before its commit until the test releases it (BULKEMBED_TEST_HOLD_DIR)."""
    holds = Holds(folder / "holds")
    return Workers(env | holds.env, folder), holds


def submit_args(path, model, out, *extra) -> list:
    return ["submit", path, "--model", model, "--out", out, *extra, "--wait"]


def job_id_of(submit: Background) -> str:
    return wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]


def test_kill9_workers_mid_shard(tmp_path, pool, background, fault_env, tiny_model, reference_embedder):
    """Three workers in a row are killed with SIGKILL (the whole process tree) while holding a shard
    before its commit, a new worker started after each; another worker keeps running throughout
    (holding its first shard until the kills are done, so the queue cannot run dry first)."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=600, n_long=0)
    out = tmp_path / "out"
    # The steady worker's time limit outlasts its hold; neither it nor a victim restores an orphan
    # (that waits for the last worker), so each victim takes a fresh shard from the queue.
    patient = fault_env | {"BULKEMBED_VISIBILITY_TIMEOUT": "120", "BULKEMBED_TASK_TIME_LIMIT": "100"}
    steady_pool, steady_holds = held_workers(patient, tmp_path / "steady")
    victims, victim_holds = held_workers(patient, tmp_path / "victims")
    try:
        steady = steady_pool.start(tiny_model)
        submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "2000"), fault_env, "submit")
        job_id = job_id_of(submit)
        steady_holds.wait()
        victim, killed = victims.start(tiny_model), []
        for kill in range(3):
            shard, _ = victim_holds.wait()
            kill_tree(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            victim_holds.release(shard)
            assert not (out / keys.shard_output(shard)).exists(), "the shard was not written"
            killed.append(shard)
            if kill < 2:
                victim = victims.start(tiny_model)
        steady_holds.auto_release()
        # A killed worker's shard stays unacknowledged in Redis until the visibility timeout; a worker
        # restores such shards when it starts (and, with kombu 5.7's defaults, only every ~100 s after:
        # see test_orphaned_shard_is_redelivered_after_the_visibility_timeout). So a last worker
        # starts once the orphans are past the visibility timeout.
        visibility = int(fault_env["BULKEMBED_VISIBILITY_TIMEOUT"])
        wait_until(lambda: time.monotonic() > killed_at + visibility + 1, visibility + 5, "the visibility timeout")
        pool.start(tiny_model)
        assert submit.wait(90) == 0, submit.stderr[-3000:]
        assert steady.poll() is None, "the steady worker kept running"
    finally:
        steady_holds.stop()
        steady_pool.stop_all()
        victims.stop_all()
    check_exactly_once(str(out), ids)
    check_vectors(str(out), path, reference_embedder)
    counts = attempts(url, job_id)
    assert len(set(killed)) == 3 and all(counts[s] == 2 for s in killed), \
        f"each killed shard was delivered again: {killed} {counts}"


def test_sigterm_mid_shard_finishes_it_then_exits(tmp_path, pool, background, fault_env, tiny_model):
    """SIGTERM to a worker's main process while it holds a shard before its commit: a warm shutdown.
    The worker takes nothing more, finishes the shard once it is let go, writes it once and exits;
    another worker completes the job."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=300, n_long=0, seed=1)
    out = tmp_path / "out"
    victims, holds = held_workers(fault_env, tmp_path / "victim")
    try:
        victim = victims.start(tiny_model)
        submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "2000"), fault_env, "submit")
        job_id = job_id_of(submit)
        shard, _ = holds.wait()
        os.kill(victim.pid, signal.SIGTERM)
        wait_until(lambda: "worker: Warm shutdown" in victim.log.read_text(), 20, "the warm shutdown to begin")
        assert victim.poll() is None and not (out / keys.shard_output(shard)).exists(), "it waits for the shard"
        holds.release(shard)
        assert victim.wait(30) == 0, victim.log.read_text()[-3000:]
    finally:
        victims.stop_all()
    log = victim.log.read_text()
    assert len(RECEIVED.findall(log)) == 1 and "succeeded" in log, "one shard taken, finished, nothing after"
    assert str(shard) in redis_hash(url, keys.REDIS_JOB_DONE.format(job_id=job_id))
    assert (out / keys.shard_output(shard)).exists()
    pool.start(tiny_model)
    assert submit.wait(60) == 0, submit.stderr[-3000:]
    check_exactly_once(str(out), ids)
    assert attempts(url, job_id)[shard] == 1, "a finished shard is not embedded again"


@pytest.fixture
def aof_redis(tmp_path):
    server = RedisProcess(free_port(), tmp_path / "redis-aof", "--appendonly", "yes", "--appendfsync", "always",
                          "--save", "")
    server.start()
    yield server
    server.stop()


def test_redis_restarted_mid_job(tmp_path, background, fault_env, aof_redis, tiny_model):
    """Redis (AOF, fsync always) stopped with SIGTERM mid-job and started again on the same port and
    folder: the workers and the --wait client reconnect and the job completes."""
    env = fault_env | {"BULKEMBED_REDIS_URL": aof_redis.url}
    path, ids = corpus(tmp_path / "in", n_short=1000, n_long=30, seed=2)
    out = tmp_path / "out"
    workers = Workers(env, tmp_path)
    try:
        first, second = workers.start(tiny_model), workers.start(tiny_model)
        submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "20000"), env, "submit")
        job_id = job_id_of(submit)
        done_key = keys.REDIS_JOB_DONE.format(job_id=job_id)
        wait_until(lambda: len(redis_hash(aof_redis.url, done_key)) >= 2, 60, "two shards written")
        shards = wait_until(lambda: redis_hash(aof_redis.url, keys.REDIS_JOB.format(job_id=job_id)).get("shards"), 60,
                            "the job planned")
        assert len(redis_hash(aof_redis.url, done_key)) < int(shards), "stopped mid-job"
        before = redis_hash(aof_redis.url, done_key)
        aof_redis.stop(signal.SIGTERM)
        wait_until(lambda: all("Connection to broker lost" in p.log.read_text() for p in (first, second)), 30,
                   "the workers to notice")
        aof_redis.start()
        assert before.items() <= redis_hash(aof_redis.url, done_key).items(), "the AOF kept what was recorded"
        assert submit.wait(90) == 0, submit.stderr[-3000:]
        assert first.poll() is None and second.poll() is None
        check_exactly_once(str(out), ids)
        assert any("tok/s" in p.log.read_text().split("Connection to broker lost")[-1] for p in (first, second))
    finally:
        workers.stop_all()


@pytest.fixture
def faulty_s3(s3_server):
    plan = FaultPlan(every=5)
    with FaultyS3Proxy(s3_server, plan) as proxy:
        yield proxy


def test_s3_errors_are_retried(tmp_path, bucket, background, fault_env, faulty_s3, tiny_model):
    """Every 5th S3 request answered 500 or 503, or the connection reset before or after the
    request took effect, plus one slow answer: clients retry with backoff and the job completes."""
    import boto3

    path, ids = corpus(tmp_path / "in", n_short=2000, n_long=10, seed=3)
    boto3.client("s3").upload_file(str(path), bucket, "input/corpus.parquet")
    out = f"s3://{bucket}/out"
    env = fault_env | {"AWS_ENDPOINT_URL_S3": faulty_s3.endpoint}
    workers = Workers(env, tmp_path)
    try:
        workers.start(tiny_model), workers.start(tiny_model)
        submit = background(submit_args(f"s3://{bucket}/input", tiny_model, out, "--shard-tokens", "4000"), env,
                            "submit")
        assert submit.wait(90) == 0, submit.stderr[-3000:]
        check_exactly_once(out, ids)  # read straight from the S3 server, not through the proxy
    finally:
        workers.stop_all()
    injected = faulty_s3.plan.injected
    print(f"S3 faults injected: {dict(injected)} in {faulty_s3.plan.requests} requests")
    assert all(injected[kind] >= 3 for kind in ("500", "503", "reset", "reset-after")), injected
    assert injected["slow"] == 1, injected


def queue_length(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(QUEUE))
    finally:
        client.close()


def test_producer_killed_mid_submit_then_resubmitted(tmp_path, s3_server, bucket, pool, background, fault_env,
                                                    tiny_model):
    """SIGKILL of `submit` while it is still queueing shards (held at a known point: its write of
    shard 20's input, through a proxy); a worker takes part of what was queued; the same command
    again resumes the job: the shards already queued (written or not) are not queued again, each shard is
    embedded once and is once in the manifest, and each id once in the output."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=2000, n_long=0, seed=4)
    out = f"s3://{bucket}/out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "1500")
    plan = HoldRequest("PUT", keys.shard_input(20))
    with FaultyS3Proxy(s3_server, plan) as proxy:
        first = background(args, fault_env | {"AWS_ENDPOINT_URL_S3": proxy.endpoint}, "submit")
        assert plan.reached.wait(60), "submit reached shard 20"
        kill_tree(first.process, signal.SIGKILL)
        plan.release()
    client = redis.Redis.from_url(url, decode_responses=True)
    jobs = [k for k in client.keys("bulkembed:job:*") if k.count(":") == 2]
    assert len(jobs) == 1 and "shards" not in client.hgetall(jobs[0]), "killed before every shard was queued"
    assert queue_length(url) == 20, "shards 0-19 queued"
    job_id = jobs[0].split(":")[-1]
    done_key = keys.REDIS_JOB_DONE.format(job_id=job_id)

    held, holds = held_workers(fault_env, tmp_path / "held")
    try:  # a worker writes four of the queued shards, then stops (warm) while holding the fourth
        worker = held.start(tiny_model)
        for _ in range(3):
            holds.release(holds.wait()[0])
        shard, _ = holds.wait()
        os.kill(worker.pid, signal.SIGTERM)
        holds.release(shard)
        assert worker.wait(30) == 0
    finally:
        held.stop_all()
    left, written = queue_length(url), client.hlen(done_key)
    assert (left, written) == (16, 4) and client.hlen("unacked") == 0

    second = background(args, fault_env, "resubmit")
    assert job_id_of(second) == job_id
    wait_until(lambda: client.hget(jobs[0], "shards"), 60, "the job planned again")
    shards = int(client.hget(jobs[0], "shards"))
    assert queue_length(url) == left + shards - 20, "shards queued before (written or not) are not queued again"
    pool.start(tiny_model), pool.start(tiny_model)
    assert second.wait(90) == 0, second.stderr[-3000:]
    manifest = check_exactly_once(out, ids)
    assert manifest_shards(open_store(str(out))).num_rows == shards and manifest["job_id"] == job_id
    assert set(attempts(url, job_id).values()) == {1}, "every shard embedded once"
    client.close()


def poison_corpus(folder: Path) -> tuple[Path, list[str]]:
    """401 short documents; the shard of the last one is the test's poison (held, never let go)."""
    texts = mixed_texts(401, seed=5, long_every=10**9)
    ids = [f"doc-{i:05d}" for i in range(len(texts))]
    return write_corpus(folder / "corpus.parquet", ids, texts), ids


def shard_of(out: Path, doc_id: str) -> int:
    """The shard whose input holds `doc_id` (planning writes every shard's input under _shards/), once planned."""
    def find() -> tuple[int] | None:  # a tuple: shard 0 is an answer too
        for path in sorted((out / "_shards").glob("*.arrow")):
            if doc_id in from_ipc_bytes(path.read_bytes()).column("id").to_pylist():
                unit, place = path.stem.split("-")
                return (keys.shard_number(int(unit), int(place)),)
        return None

    return wait_until(find, 60, f"the shard of {doc_id} planned")[0]


def check_poison_reported(submit: Background, env: dict[str, str], job_id: str, out: Path, ids: list) -> int:
    """submit --wait exited 1 naming the shard; status --json lists it; every other id written once."""
    status = json.loads(cli(env, "status", job_id, "--json").stdout)
    assert status["state"] == "failed" and len(status["failures"]) == 1, status
    ((poison, error),) = status["failures"].items()
    assert "gave up after 3 attempts" in error, error
    assert f"shard {keys.shard_name(int(poison))} failed: gave up after 3 attempts" in submit.stderr
    assert f"failed: 1 of {status['totals']['shards']} shards" in submit.stderr
    assert status["shards_done"] == status["totals"]["shards"] - 1
    assert not (out / keys.MANIFEST_KEY).exists()
    held = set(from_ipc_bytes((out / keys.shard_input(int(poison))).read_bytes()).column("id").to_pylist())
    assert sorted(output_ids(str(out))) == [i for i in ids if i not in held], "every other document written, once"
    return int(poison)


def resume_after_poison(tmp_path: Path, background, env: dict[str, str], model: Path, args: list, out: Path,
                        ids: list) -> None:
    """Resubmitted to workers with a long enough time limit, the job completes."""
    workers = Workers(env, tmp_path)
    try:
        workers.start(model)
        again = background(args, env, "resubmit")
        assert again.wait(60) == 0, again.stderr[-3000:]
        check_exactly_once(str(out), ids)
    finally:
        workers.stop_all()


def test_poison_shard_past_the_time_limit_fails_after_max_attempts(tmp_path, background, fault_env, tiny_model):
    """One shard is held before its commit, never let go, so it runs past a 3 s hard time limit every
    time; the others are let go at once. After BULKEMBED_SHARD_MAX_ATTEMPTS (3) it is reported
    failed, the rest is written and `submit --wait` exits 1 with the shard's error. Resubmitted to
    workers that hold nothing, the job completes."""
    env = fault_env | {"BULKEMBED_TASK_TIME_LIMIT": "3"}
    url = env["BULKEMBED_REDIS_URL"]
    path, ids = poison_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "1000")
    workers, holds = held_workers(env, tmp_path / "held")
    try:
        workers.start(tiny_model), workers.start(tiny_model)
        submit = background(args, env, "submit")
        job_id = job_id_of(submit)
        poison = shard_of(out, ids[-1])
        holds.auto_release(keep=frozenset({poison}))
        wait_until(lambda: any("Hard time limit" in p.log.read_text() for p in workers.processes), 30,
                   "the held shard to hit the time limit")
        # It must come back (and count an attempt), not vanish with its acknowledged message.
        wait_until(lambda: attempts(url, job_id).get(poison, 0) >= 2, 20, "the timed-out shard to be delivered again",
                   error=ShardStuck)
        assert submit.wait(60) == 1, submit.stderr[-3000:]
        assert check_poison_reported(submit, env, job_id, out, ids) == poison
    finally:
        holds.stop()
        workers.stop_all()
    resume_after_poison(tmp_path, background, fault_env, tiny_model, args, out, ids)


def pool_pid(worker) -> int:
    return int(re.findall(r"pool process (\d+) ready", worker.log.read_text())[-1])


def test_poison_shard_killing_its_process_fails_after_max_attempts(tmp_path, background, fault_env, tiny_model):
    """A shard whose pool process dies every time it is on it (SIGKILL of that process while it holds
    the shard, as the kernel's OOM killer would do): reported failed after 3 attempts, the rest
    written, `submit --wait` exits 1 with the error; resubmitted, the job completes."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = poison_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "1000")
    workers, holds = held_workers(fault_env, tmp_path / "held")
    try:
        worker = workers.start(tiny_model)
        submit = background(args, fault_env, "submit")
        job_id = job_id_of(submit)
        poison = shard_of(out, ids[-1])
        holds.auto_release(keep=frozenset({poison}))
        pid = None
        for attempt in range(1, 4):
            _, pid = holds.wait(shard=poison, not_pid=pid)
            assert attempts(url, job_id)[poison] == attempt
            os.kill(pid, signal.SIGKILL)
            holds.release(poison, pid)  # the dead process's marker
            wait_until(lambda p=pid: pool_pid(worker) != p, 30, "a new pool process")
        assert submit.wait(30) == 1, submit.stderr[-3000:]
        assert check_poison_reported(submit, fault_env, job_id, out, ids) == poison
        assert attempts(url, job_id)[poison] == 4, "the fourth delivery gave up without running it"
        assert worker.poll() is None
    finally:
        holds.stop()
        workers.stop_all()
    resume_after_poison(tmp_path, background, fault_env, tiny_model, args, out, ids)


def test_orphaned_shard_is_redelivered_after_the_visibility_timeout(tmp_path, pool, background, fault_env,
                                                                     tiny_model):
    """A worker killed while it holds a shard: a worker that is already running takes the shard
    again once the visibility timeout (10 s here) has passed, give or take a sweep interval."""
    path, ids = corpus(tmp_path / "in", n_short=300, n_long=0, seed=6)
    out = tmp_path / "out"
    victims, holds = held_workers(fault_env, tmp_path / "victim")
    try:
        victim = victims.start(tiny_model)
        submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "2000"), fault_env, "submit")
        job_id_of(submit)
        shard, _ = holds.wait()
        pool.start(tiny_model)
        kill_tree(victim, signal.SIGKILL)
    finally:
        victims.stop_all()
    visibility = int(fault_env["BULKEMBED_VISIBILITY_TIMEOUT"])
    wait_until(lambda: (out / keys.shard_output(shard)).exists(), visibility + 15,
               "a running worker to take the orphaned shard again", error=ShardStuck)
    assert submit.wait(30) == 0, submit.stderr[-3000:]
    check_exactly_once(str(out), ids)


def test_redis_refusing_writes_as_a_shard_commits_hands_the_shard_back(tmp_path, background, fault_env, fresh_redis,
                                                                       tiny_model):
    """Redis refuses writes (out of memory under noeviction) as a shard commits: its output is written but cannot be
    counted, nor its failure. The shard goes back to the queue, and once Redis takes writes again its redelivery finds
    the output and counts it: the job completes with every row once. Before, the shard was acknowledged as if it had
    run, and the job never finished."""
    path, ids = corpus(tmp_path / "in", n_short=200, n_long=0, seed=7)
    out = tmp_path / "out"
    env = fault_env | {"BULKEMBED_VISIBILITY_TIMEOUT": "120", "BULKEMBED_TASK_TIME_LIMIT": "100"}
    client = redis.Redis.from_url(fresh_redis.url, decode_responses=True)
    workers, holds = held_workers(env, tmp_path / "held")
    try:
        worker = workers.start(tiny_model)
        submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "2000"), env, "submit")
        job_id = job_id_of(submit)
        shard, pid = holds.wait()
        wait_until(lambda: client.hget(keys.REDIS_JOB.format(job_id=job_id), "state") == "running", 60,
                   "planning closed")
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # below what it holds: every write refused
        holds.release(shard, pid)
        wait_until(lambda: "OutOfMemoryError" in worker.log.read_text(), 60, "the commit to meet Redis refusing it")
        # Refusing writes for longer than the worker's first backoff: a hand-back then would be refused too (one
        # Redis transaction), the shard would wait for the 120 s visibility timeout and its prefetch slot stay taken.
        time.sleep(4)
        client.config_set("maxmemory", 0)
        assert (out / keys.shard_output(shard)).exists(), "the output was written before Redis refused its count"
        holds.auto_release()
        assert submit.wait(60) == 0, submit.stderr[-3000:]
    finally:
        client.config_set("maxmemory", 0)
        holds.stop()
        workers.stop_all()
    check_exactly_once(str(out), ids)
    assert "Redis failed (OutOfMemoryError" in worker.log.read_text()


def test_lock_fallback_where_the_store_ignores_conditional_writes(tmp_path, bucket, redis_server):
    """A store whose if-absent writes overwrite (an old S3-compatible server) is detected, and shard
    commits to it take a Redis lock and look for the file first; LocalStore and S3 (moto) need none."""
    from bulkembed.contract.registry import JobRegistry
    from bulkembed.contract.store import LocalStore, LockedWrites, has_conditional_writes, open_store
    from bulkembed.worker.app import ModelTask

    local, s3 = LocalStore(tmp_path / "local"), open_store(f"s3://{bucket}/out")
    old = OverwritingStore(tmp_path / "old")
    assert has_conditional_writes(local) and has_conditional_writes(s3)
    assert not has_conditional_writes(old)
    assert old.list() == [] and local.list() == [] and s3.list() == [], "the probe cleans up"
    assert list((tmp_path / "local").iterdir()) == [], "no empty folder left behind either"

    registry = JobRegistry.from_url(redis_server)
    task = ModelTask()
    assert task.committing(local, registry) is local and task.committing(s3, registry) is s3
    locked = task.committing(old, registry)
    assert isinstance(locked, LockedWrites) and locked.uri == old.uri and copy.copy(locked).uri == old.uri
    name = keys.REDIS_WRITE_LOCK.format(key=f"{old.uri}/000000-000007.arrow")

    holder = registry.redis.lock(name, timeout=30)  # another delivery of the same shard, committing
    assert holder.acquire(blocking=False)
    written: list[bool] = []
    thread = threading.Thread(target=lambda: written.append(locked.put_if_absent("000000-000007.arrow", b"second")),
                              daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), "the commit waits while another delivery holds the lock"
    old.put("000000-000007.arrow", b"first")  # what that delivery wrote
    holder.release()
    thread.join(10)
    assert written == [False] and old.get("000000-000007.arrow") == b"first", "found written, not overwritten"
    assert not registry.redis.exists(name), "released after the commit"


def shard_of_two_rows(store, queue: str = "q"):
    """A shard message of two rows in `store`'s job (its input written there), and a delivery that writes it with
    vectors of a value and a ubatch (as another GPU or setting would)."""
    import pyarrow as pa

    from bulkembed.contract.job import JobSpec, ModelRef, Role, ShardMessage, Task
    from bulkembed.contract.schema import shard_input_schema, to_ipc_bytes
    from bulkembed.worker.rows import EmbeddedRows, ShardRows
    from bulkembed.worker.shard import OpenShard, write_shard

    spec = JobSpec(input="a", input_fingerprint="f", out=store.uri, task=Task.RETRIEVAL, role=Role.PASSAGE,
                   prefix="", shard_tokens=1000, model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64,
                                                                queue=queue))
    message = ShardMessage.of(spec, 7, [3, 3])
    table = pa.table({"id": [1, 2], "text": ["a", "b"], "n_tokens": [3, 3], "chunk": [0, 0], "start": [0, 0],
                      "stop": [3, 3], "truncated": [False, False], "content_hash": [b"0" * 16, b"1" * 16],
                      "row": [0, 1], "source": ["in/a.parquet"] * 2},
                     schema=shard_input_schema(pa.int64()))
    store.put(message.input_key, to_ipc_bytes(table))
    rows = ShardRows(label="shard 7", prefix="", pooling=spec.pooling, close_cut_rows=False, texts=["a", "b"],
                     starts=[0, 0], stops=[3, 3], chunks=[0, 0], n_tokens=[3, 3])

    def delivered(value: float, ubatch: int):
        vectors = np.full((2, 4), value, np.float32)
        return write_shard(OpenShard(message, table, rows, time.perf_counter()),
                           EmbeddedRows(vectors, {}, 4, {"device": "GPU", "ubatch": ubatch}), store)

    return message, delivered


def test_a_second_delivery_keeps_the_first_ones_file_where_the_store_ignores_conditional_writes(tmp_path,
                                                                                                 redis_server):
    """Under the lock, a duplicate delivery of a shard to a store that overwrites on if-absent writes finds the file
    written and reports it, rather than overwriting it with its own vectors (another GPU, ubatch or build gives other
    bytes): the registry keeps the first result, so the manifest's sha256 would no longer match the file."""
    import hashlib

    from bulkembed.contract.registry import JobRegistry
    from bulkembed.worker.app import ModelTask

    store = ModelTask().committing(OverwritingStore(tmp_path / "out"), JobRegistry.from_url(redis_server))
    message, delivered = shard_of_two_rows(store)
    first, second = delivered(1.0, 512), delivered(2.0, 2048)
    on_disk = hashlib.sha256((tmp_path / "out" / message.output_key).read_bytes()).hexdigest()
    assert first.sha256 == on_disk == second.sha256, "the file the registry recorded first is the one kept"
    assert first.seconds and not second.seconds, "the second delivery reports the file found written"


def test_a_written_shard_delivered_again_past_its_attempts_is_not_failed_as_poison(tmp_path, redis_server):
    """A shard killed its worker twice and was written by its third delivery; a duplicate message of it comes after
    (a planner killed between send and record, a resubmit). Past its attempts, it is found written, not recorded
    failed: before, the job turned `failed` and `submit --wait` exited 1 with every shard written."""
    from bulkembed.contract.registry import JobRegistry, JobTotals
    from bulkembed.contract.store import LocalStore
    from bulkembed.worker import app as worker_app

    store = LocalStore(tmp_path / "out")
    message, delivered = shard_of_two_rows(store, queue=f"q-{time.monotonic_ns()}")
    job_id, registry = message.job_id, JobRegistry.from_url(redis_server)
    registry.start(message.job, 1)
    registry.unit_planned(job_id, 0, JobTotals(shards=2, docs=4, tokens=12))  # one more shard: not complete
    registry.close_planning(job_id)
    for _ in range(worker_app.settings.shard_max_attempts):
        registry.attempt(job_id, message.shard)  # two that died, then the one that wrote it
    assert not registry.shard_done(job_id, delivered(1.0, 512))
    model = SimpleNamespace(engine=SimpleNamespace(alive=True, pid=1, embed_rows=None), sha256="0" * 64,
                            path=Path("m.gguf"))  # no engine to embed with: the shard must be found written
    task = SimpleNamespace(registry=registry, committing=lambda store, registry: store)
    result = worker_app._embed(task, message, model, None)
    status = registry.status(job_id)
    assert result is not None and status.failed == 0 and status.state == "running" and status.shards_done == 1


def test_a_shard_written_by_its_last_attempt_killed_before_it_told_redis_is_not_failed_as_poison(tmp_path,
                                                                                                  redis_server):
    """The last allowed delivery wrote the shard's file and was killed before it recorded it in Redis: the next one,
    past the shard's attempts, finds it written in the store. Before, the poison check asked only Redis and failed
    a shard whose file was there."""
    from bulkembed.contract.registry import JobRegistry, JobTotals
    from bulkembed.contract.store import LocalStore
    from bulkembed.worker import app as worker_app

    store = LocalStore(tmp_path / "out")
    message, delivered = shard_of_two_rows(store, queue=f"q-{time.monotonic_ns()}")
    job_id, registry = message.job_id, JobRegistry.from_url(redis_server)
    registry.start(message.job, 1)
    registry.unit_planned(job_id, 0, JobTotals(shards=2, docs=4, tokens=12))
    registry.close_planning(job_id)
    for _ in range(worker_app.settings.shard_max_attempts):
        registry.attempt(job_id, message.shard)
    written = delivered(1.0, 512)  # ... and killed here: Redis never heard of it
    model = SimpleNamespace(engine=SimpleNamespace(alive=True, pid=1, embed_rows=None), sha256="0" * 64,
                            path=Path("m.gguf"))  # no engine to embed with: the shard must be found written
    task = SimpleNamespace(registry=registry, committing=lambda store, registry: store)
    result = worker_app._embed(task, message, model, None)
    status = registry.status(job_id)
    assert result is not None and result["sha256"] == written.sha256
    assert status.failed == 0 and status.shards_done == 1 and registry.is_written(job_id, message.shard)


def test_a_message_from_before_a_force_restart_of_the_same_job_is_dropped_not_failed(tmp_path, redis_server):
    """`submit --force` over a running job of the same id deletes its inputs with its output and plans it again: a
    message queued before, taken before its unit is planned again, finds no input. It is dropped (the planner sends
    the shard again), not failed: before, the job showed failed shards and the first `submit --wait` exited 1 for a
    job that then finished. Once the unit is planned, a missing input is a loss and still fails the shard."""
    from bulkembed.contract.registry import JobRegistry, JobTotals
    from bulkembed.contract.store import LocalStore
    from bulkembed.worker import app as worker_app

    store = LocalStore(tmp_path / "out")
    message, _ = shard_of_two_rows(store, queue=f"q-{time.monotonic_ns()}")
    job_id, registry = message.job_id, JobRegistry.from_url(redis_server)
    registry.start(message.job, 1)  # started over: its unit not planned yet
    store.delete(message.input_key)  # with the old output
    model = SimpleNamespace(engine=SimpleNamespace(alive=True, pid=1, embed_rows=None), sha256="0" * 64,
                            path=Path("m.gguf"))
    task = SimpleNamespace(registry=registry, committing=lambda store, registry: store)
    assert worker_app._embed(task, message, model, None) is None
    assert registry.status(job_id).failed == 0 and registry.attempt(job_id, message.shard) == 1, "attempt given back"
    registry.unit_planned(job_id, 0, JobTotals(shards=2, docs=4, tokens=12))
    with pytest.raises(FileNotFoundError):
        worker_app._embed(task, message, model, None)
    assert registry.status(job_id).failed == 1


def test_a_shard_of_a_job_forgotten_by_force_is_dropped_not_written(tmp_path, redis_server):
    """submit --force hands a running job's OUT to another job: the old job is forgotten in Redis, and its shards
    are dropped by workers that had its spec cached, whether it was forgotten before a shard was taken or while it
    was embedded. Nothing of it is written under the new job's names, and no key of it comes back to Redis (an
    attempt counted would be a key without expiry). Before, they were embedded and written into the new job's OUT."""
    from bulkembed.contract.errors import JobGone
    from bulkembed.contract.registry import JobRegistry, JobTotals
    from bulkembed.contract.store import LocalStore
    from bulkembed.worker import app as worker_app
    from bulkembed.worker.rows import EmbeddedRows

    store = LocalStore(tmp_path / "out")
    message, _ = shard_of_two_rows(store, queue=f"q-{time.monotonic_ns()}")
    job_id, registry = message.job_id, JobRegistry.from_url(redis_server)

    def registered() -> None:
        registry.start(message.job, 1)
        registry.unit_planned(job_id, 0, JobTotals(shards=2, docs=4, tokens=12))
        registry.close_planning(job_id)

    def forgotten_meanwhile(rows):
        registry.forget(job_id)  # submit --force, while this shard is embedded
        return EmbeddedRows(np.ones((2, 4), np.float32), {}, 4, {})

    task = SimpleNamespace(registry=registry, committing=lambda store, registry: store)
    for embed_rows, forget_first in ((forgotten_meanwhile, False), (None, True)):
        registered()
        if forget_first:
            registry.forget(job_id)
        model = SimpleNamespace(engine=SimpleNamespace(alive=True, pid=1, embed_rows=embed_rows), sha256="0" * 64,
                                path=Path("m.gguf"))
        with pytest.raises(JobGone):  # acknowledged by the task, neither written nor recorded
            worker_app._embed(task, message, model, None)
        assert not store.exists(message.output_key), "nothing written into the OUT the job no longer owns"
        assert not [k for k in registry.redis.scan_iter(f"*{job_id}*")], "no key of the forgotten job comes back"


def test_conditional_write_probe_survives_a_lost_answer(s3_server, bucket, monkeypatch):
    """The probe's first write takes effect but its answer is lost (connection reset); boto3 retries."""
    from bulkembed.contract.store import has_conditional_writes, open_store

    plan = FaultPlan(every=1, kinds=("reset-after",))  # every request, but never twice in a row per path
    with FaultyS3Proxy(s3_server, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        store = open_store(f"s3://{bucket}/out")
        probed = has_conditional_writes(store)
    if plan.log[0][1:4:2] != ("PUT", "reset-after"):
        raise RuntimeError(f"the first write's answer was not the one lost: {plan.log}")
    assert probed, "S3 (moto) honours If-None-Match: the probe must say so"
