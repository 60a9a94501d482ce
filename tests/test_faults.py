"""Faults with real processes: workers killed or stopped mid-shard, Redis restarted, S3 failing,
the producer killed mid-submit, a poison shard. Whatever happens, every input id ends up exactly
once in the output and the manifest agrees with the input."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from bulkembed.contract import keys
from bulkembed.contract.schema import from_ipc_bytes
from tests.conftest import Workers, free_port, mixed_texts, write_corpus
from tests.faults_support import (
    Background,
    FaultPlan,
    FaultyS3Proxy,
    OverwritingStore,
    RedisProcess,
    ShardStuck,
    attempts,
    check_exactly_once,
    cli,
    kill_tree,
    output_ids,
    redis_hash,
    wait_until,
)

QUEUE = "bulkembed.tiny-embeddings-text-retrieval-f32"
RECEIVED = re.compile(r"Task bulkembed\.embed_shard\[([0-9a-f-]+)\] received")
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
    """Short documents (fast shards) and long ones (slow shards, to be caught mid-shard)."""
    texts = mixed_texts(n_short, seed=seed, long_every=10**9) + long_texts(n_long, long_chars, seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    ids = [f"doc-{i:05d}" for i in range(len(texts))]
    path = write_corpus(folder / "corpus.parquet", ids, [texts[i] for i in order])
    return path, ids


@pytest.fixture
def fresh_redis(tmp_path: Path):
    """A Redis of this test's own: nothing left over by another test's killed workers."""
    server = RedisProcess(free_port(), tmp_path / "redis", "--save", "", "--appendonly", "no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(cli_env: dict[str, str], fresh_redis: RedisProcess) -> dict[str, str]:
    """Short redelivery and time limits, for the workers and submit alike."""
    return cli_env | {"BULKEMBED_REDIS_URL": fresh_redis.url, "BULKEMBED_VISIBILITY_TIMEOUT": "10",
                      "BULKEMBED_TASK_TIME_LIMIT": "8"}


@pytest.fixture
def pool(fault_env: dict[str, str], tmp_path: Path):
    workers = Workers(fault_env, tmp_path)
    yield workers
    workers.stop_all()


@pytest.fixture
def background(tmp_path: Path):
    """Start CLI commands in the background; whatever is still running at teardown is killed."""
    started: list[Background] = []

    def start(args: list, env: dict[str, str], name: str) -> Background:
        started.append(Background(args, env, tmp_path, f"{name}-{len(started)}"))
        return started[-1]

    yield start
    for command in started:
        command.stop()


def unacked_messages(url: str) -> dict[str, dict]:
    """Task id → shard message of every message a worker holds (kombu's `unacked` hash)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        found = {}
        for raw in client.hvals("unacked"):
            message = json.loads(raw)[0]
            args = json.loads(base64.b64decode(message["body"]))[0]
            found[message["headers"]["id"]] = args[0]
        return found
    finally:
        client.close()


def current_shard(worker, url: str) -> dict | None:
    """The shard message a worker has received and not yet finished, if any."""
    text = worker.log.read_text()
    received = RECEIVED.findall(text)
    if not received or f"[{received[-1]}] succeeded" in text or f"[{received[-1]}] raised" in text:
        return None
    return unacked_messages(url).get(received[-1])


def catch_mid_shard(worker, url: str, job_id: str, min_tokens: int = 10000, timeout_s: float = 60) -> dict:
    """Wait until `worker` is embedding a slow shard (one of at least `min_tokens` tokens) and return
    its message; short shards it takes meanwhile are let through."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no slow shard for the worker in {timeout_s:.0f}s")
        shard = wait_until(lambda: current_shard(worker, url), left, "the worker to take a shard")
        if shard["n_tokens"] >= min_tokens:
            break
        wait_until(lambda s=shard: current_shard(worker, url) != s, left, "a short shard to finish")
    wait_until(lambda: attempts(url, job_id).get(shard["shard"]), 10, f"shard {shard['shard']} to start")
    time.sleep(0.3)  # well inside: a slow shard takes over a second
    return shard


def submit_args(path, model, out, *extra) -> list:
    return ["submit", path, "--model", model, "--out", out, *extra, "--wait"]


def job_id_of(submit: Background) -> str:
    return wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]


def test_kill9_workers_mid_shard(tmp_path, pool, background, fault_env, tiny_model):
    """Three workers in a row are killed with SIGKILL (the whole process tree) while embedding a
    slow shard, a new worker started after each; another worker keeps running throughout."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=1500, n_long=80)
    out = tmp_path / "out"
    steady = pool.start(tiny_model)
    submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "20000"), fault_env, "submit")
    job_id = job_id_of(submit)
    victim, killed = pool.start(tiny_model), []
    for kill in range(3):
        shard = catch_mid_shard(victim, url, job_id)
        kill_tree(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert not (out / keys.shard_output(shard["shard"])).exists(), "the shard was not written yet"
        killed.append(shard["shard"])
        if kill < 2:
            victim = pool.start(tiny_model)
    # A killed worker's shard stays unacknowledged in Redis until the visibility timeout; a worker
    # restores such shards when it starts (and, with kombu 5.7's defaults, only every ~100 s after:
    # see test_orphaned_shard_is_redelivered_after_the_visibility_timeout). So the third
    # replacement starts once the orphans are past the visibility timeout.
    visibility = int(fault_env["BULKEMBED_VISIBILITY_TIMEOUT"])
    wait_until(lambda: time.monotonic() > killed_at + visibility + 1, visibility + 5, "the visibility timeout")
    pool.start(tiny_model)
    assert submit.wait(90) == 0, submit.stderr[-3000:]
    assert steady.poll() is None, "the steady worker kept running"
    check_exactly_once(str(out), ids)
    counts = attempts(url, job_id)
    assert all(counts[s] >= 2 for s in killed), f"each killed shard was delivered again: {killed} {counts}"


def test_sigterm_mid_shard_finishes_or_hands_back(tmp_path, pool, background, fault_env, tiny_model):
    """SIGTERM to a worker's main process mid-shard: a warm shutdown. The shard is finished (or
    handed back), never lost, the worker exits, and another worker completes the job."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=500, n_long=40, seed=1)
    out = tmp_path / "out"
    victim = pool.start(tiny_model)
    submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "20000"), fault_env, "submit")
    job_id = job_id_of(submit)
    shard = catch_mid_shard(victim, url, job_id)
    task_id = RECEIVED.findall(victim.log.read_text())[-1]
    os.kill(victim.pid, signal.SIGTERM)
    assert victim.wait(30) == 0, victim.log.read_text()[-3000:]
    log = victim.log.read_text()
    assert RECEIVED.findall(log)[-1] == task_id, "nothing taken after SIGTERM"
    finished = f"[{task_id}] succeeded" in log
    if finished:  # written once, by the stopped worker
        assert str(shard["shard"]) in redis_hash(url, keys.REDIS_JOB_DONE.format(job_id=job_id))
        assert (out / keys.shard_output(shard["shard"])).exists()
    else:  # handed back: queued again
        assert task_id in queued_task_ids(url), "the stopped worker's shard is back in the queue"
    pool.start(tiny_model)
    assert submit.wait(60) == 0, submit.stderr[-3000:]
    check_exactly_once(str(out), ids)
    if finished:
        assert attempts(url, job_id)[shard["shard"]] == 1, "a finished shard is not embedded again"


def queued_task_ids(url: str) -> set[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)}
    finally:
        client.close()


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
        totals = json.loads(redis_hash(aof_redis.url, keys.REDIS_JOB.format(job_id=job_id))["totals"])
        assert len(redis_hash(aof_redis.url, done_key)) < totals["shards"], "stopped mid-job"
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


def test_producer_killed_mid_submit_then_resubmitted(tmp_path, pool, background, fault_env, tiny_model):
    """SIGKILL of `submit` while it is still queueing shards; a worker takes part of what was queued;
    the same command again resumes the job: the shards already written are not queued again, the
    ones queued twice are embedded once, each shard is once in the manifest and each id once in
    the output."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=6000, n_long=0, seed=4)
    out = tmp_path / "out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "1500")
    first = background(args, fault_env, "submit")
    wait_until(lambda: queue_length(url) >= 20, 60, "twenty shards queued")
    kill_tree(first.process, signal.SIGKILL)
    client = redis.Redis.from_url(url, decode_responses=True)
    jobs = [k for k in client.keys("bulkembed:job:*") if k.count(":") == 2]
    assert len(jobs) == 1 and "totals" not in client.hgetall(jobs[0]), "killed before every shard was queued"
    job_id = jobs[0].split(":")[-1]
    done_key = keys.REDIS_JOB_DONE.format(job_id=job_id)

    worker = pool.start(tiny_model)  # takes a few of the queued shards, then stops (warm)
    wait_until(lambda: client.hlen(done_key) >= 3, 60, "some queued shards written")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(30) == 0
    left, written = queue_length(url), client.hlen(done_key)
    assert left > 0 and client.hlen("unacked") == 0

    second = background(args, fault_env, "resubmit")
    assert job_id_of(second) == job_id
    totals = json.loads(client.hget(jobs[0], "totals"))
    assert queue_length(url) == left + totals["shards"] - written, "written shards are not queued again"
    pool.start(tiny_model), pool.start(tiny_model)
    assert second.wait(90) == 0, second.stderr[-3000:]
    manifest = check_exactly_once(str(out), ids)
    assert len(manifest["shards"]) == totals["shards"] and manifest["job_id"] == job_id
    logs = "".join(p.log.read_text() for p in pool.processes)
    assert logs.count("already written, skipped") + logs.count("another delivery wrote it first") == left
    client.close()




def poison_corpus(folder: Path) -> tuple[Path, list[str]]:
    """400 short documents and, last, one of ~15000 tokens: ~3 s alone on one thread."""
    texts = mixed_texts(400, seed=5, long_every=10**9) + long_texts(1, (17000, 17001), seed=5)
    ids = [f"doc-{i:05d}" for i in range(len(texts))]
    return write_corpus(folder / "corpus.parquet", ids, texts), ids


def shard_of(out: Path, doc_id: str) -> int:
    """The shard whose input holds `doc_id` (the producer writes every shard's input under _shards/)."""
    for path in sorted((out / "_shards").glob("*.arrow")):
        if doc_id in from_ipc_bytes(path.read_bytes()).column("id").to_pylist():
            return int(path.stem)
    raise LookupError(doc_id)


def check_poison_reported(submit: Background, env: dict[str, str], job_id: str, out: Path, ids: list) -> int:
    """submit --wait exited 1 naming the shard; status --json lists it; every other id written once."""
    status = json.loads(cli(env, "status", job_id, "--json").stdout)
    assert status["state"] == "failed" and len(status["failures"]) == 1, status
    ((poison, error),) = status["failures"].items()
    assert "gave up after 3 attempts" in error, error
    assert f"shard {poison} failed: gave up after 3 attempts" in submit.stderr
    assert f"failed: 1 of {status['totals']['shards']} shards" in submit.stderr
    assert status["shards_done"] == status["totals"]["shards"] - 1
    assert not (out / keys.MANIFEST_KEY).exists()
    written = output_ids(str(out))
    assert sorted(written) == ids[:-1], "every other document written, once"
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
    """One shard (a single ~15000-token document) runs past a 2 s hard time limit every time; the
    others take a fraction of it. After BULKEMBED_SHARD_MAX_ATTEMPTS (3) it is reported failed, the
    rest is written and `submit --wait` exits 1 with the shard's error. Resubmitted to workers with
    a longer limit, the job completes."""
    env = fault_env | {"BULKEMBED_TASK_TIME_LIMIT": "2"}
    url = env["BULKEMBED_REDIS_URL"]
    path, ids = poison_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "4000", "--max-tokens", "20000")
    workers = Workers(env, tmp_path)
    try:
        workers.start(tiny_model), workers.start(tiny_model)
        submit = background(args, env, "submit")
        job_id = job_id_of(submit)
        poison = shard_of(out, ids[-1])
        wait_until(lambda: any("Hard time limit" in p.log.read_text() for p in workers.processes), 30,
                   "the long shard to hit the time limit")
        # It must come back (and count an attempt), not vanish with its acknowledged message.
        wait_until(lambda: attempts(url, job_id).get(poison, 0) >= 2, 20, "the timed-out shard to be delivered again",
                   error=ShardStuck)
        assert submit.wait(60) == 1, submit.stderr[-3000:]
        assert check_poison_reported(submit, env, job_id, out, ids) == poison
    finally:
        workers.stop_all()
    resume_after_poison(tmp_path, background, fault_env, tiny_model, args, out, ids)


def pool_pid(worker) -> int:
    return int(re.findall(r"pool process (\d+) ready", worker.log.read_text())[-1])


def test_poison_shard_killing_its_process_fails_after_max_attempts(tmp_path, pool, background, fault_env,
                                                                   tiny_model):
    """A shard whose pool process dies every time it is on it (SIGKILL of that process, as the
    kernel's OOM killer would do): reported failed after 3 attempts, the rest written, `submit
    --wait` exits 1 with the error; resubmitted, the job completes."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = poison_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = submit_args(path, tiny_model, out, "--shard-tokens", "4000", "--max-tokens", "20000")
    worker = pool.start(tiny_model)
    submit = background(args, fault_env, "submit")
    job_id = job_id_of(submit)
    poison = catch_mid_shard(worker, url, job_id)["shard"]
    for attempt in range(1, 4):
        wait_until(lambda a=attempt: attempts(url, job_id)[poison] == a, 30, f"attempt {attempt} of the shard")
        pid = pool_pid(worker)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda p=pid: pool_pid(worker) != p, 30, "a new pool process")
    assert submit.wait(30) == 1, submit.stderr[-3000:]
    assert check_poison_reported(submit, fault_env, job_id, out, ids) == poison
    assert attempts(url, job_id)[poison] == 4, "the fourth delivery gave up without running it"
    assert worker.poll() is None
    pool.stop_all()
    resume_after_poison(tmp_path, background, fault_env, tiny_model, args, out, ids)


def test_orphaned_shard_is_redelivered_after_the_visibility_timeout(tmp_path, pool, background, fault_env,
                                                                     tiny_model):
    """A worker killed mid-shard: a worker that is already running takes the shard again once the
    visibility timeout (10 s here) has passed, give or take a sweep interval."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    path, ids = corpus(tmp_path / "in", n_short=0, n_long=30, seed=6)
    out = tmp_path / "out"
    pool.start(tiny_model)
    victim = pool.start(tiny_model)
    submit = background(submit_args(path, tiny_model, out, "--shard-tokens", "20000"), fault_env, "submit")
    job_id = job_id_of(submit)
    shard = catch_mid_shard(victim, url, job_id)
    kill_tree(victim, signal.SIGKILL)
    visibility = int(fault_env["BULKEMBED_VISIBILITY_TIMEOUT"])
    wait_until(lambda: (out / keys.shard_output(shard["shard"])).exists(), visibility + 15,
               "a running worker to take the orphaned shard again", error=ShardStuck)
    assert submit.wait(30) == 0, submit.stderr[-3000:]
    check_exactly_once(str(out), ids)


def test_lock_fallback_where_the_store_ignores_conditional_writes(tmp_path, bucket, redis_server):
    """A store whose if-absent writes overwrite (an old S3-compatible server) is detected, and shard
    commits to it take a Redis lock; LocalStore and S3 (moto) need none."""
    from bulkembed.contract.registry import JobRegistry
    from bulkembed.contract.store import LocalStore, has_conditional_writes, open_store
    from bulkembed.worker.app import ModelTask

    local, s3 = LocalStore(tmp_path / "local"), open_store(f"s3://{bucket}/out")
    old = OverwritingStore(tmp_path / "old")
    assert has_conditional_writes(local) and has_conditional_writes(s3)
    assert not has_conditional_writes(old)
    assert old.list() == [] and local.list() == [] and s3.list() == [], "the probe cleans up"

    registry = JobRegistry.from_url(redis_server)
    shard = SimpleNamespace(job_id="lockjob", shard=7)
    task = ModelTask()
    assert task.write_guard(local, registry, shard) is nullcontext
    assert task.write_guard(s3, registry, shard) is nullcontext
    guard = task.write_guard(old, registry, shard)
    assert guard is not nullcontext
    name = keys.REDIS_SHARD_LOCK.format(job_id="lockjob", shard=7)

    holder = registry.redis.lock(name, timeout=30)  # another delivery of the same shard, committing
    assert holder.acquire(blocking=False)
    entered = threading.Event()

    def commit() -> None:
        with guard():
            entered.set()

    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    assert not entered.wait(1.0), "the guard waits while another delivery holds the lock"
    holder.release()
    assert entered.wait(10), "and goes on once it is released"
    thread.join(10)
    assert not registry.redis.exists(name), "released after the commit"


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
