"""The object store goes dark, or keeps failing one key, for longer than boto3's own retries: the
workers back off and come back without spending a shard's attempts, and the job completes by itself
with every row once and exact vectors; a store that stays down is reported after the outage limit."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import boto3
import pytest

from bulkembed.contract import keys
from bulkembed.contract.store import open_store
from tests.conftest import Workers, free_port, mixed_texts, write_corpus
from tests.faults_support import (
    Background,
    FaultyS3Proxy,
    RedisProcess,
    attempts,
    check_exactly_once,
    check_vectors,
    cli,
    redis_hash,
    wait_until,
)

BOTO3_ATTEMPTS = 3  # boto3's standard default; its retries then take at most ~3 s
FAILING_FOR = re.compile(r"store failing for ([\d.]+)s")


class Healthy:
    """A FaultPlan that injects nothing (the proxy's darkness is the fault)."""

    requests = 0

    def decide(self, method: str, path: str, user_agent: str = "") -> str:
        self.requests += 1
        return "none"


class FailingKey:
    """Answers 503 to the first `times` GETs of a path ending in `suffix`, then lets them through."""

    def __init__(self, suffix: str, times: int):
        self.suffix, self.times, self.failed = suffix, times, 0

    def decide(self, method: str, path: str, user_agent: str = "") -> str:
        if method == "GET" and path.split("?")[0].endswith(self.suffix) and self.failed < self.times:
            self.failed += 1
            return "503"
        return "none"


class FailingPut:
    """Answers 503 to the first `times` PUTs of a key whose path holds `part`, then lets them through."""

    def __init__(self, part: str, times: int):
        self.part, self.times, self.failed = part, times, 0

    def decide(self, method: str, path: str, user_agent: str = "") -> str:
        if method == "PUT" and self.part in path.split("?")[0] and self.failed < self.times:
            self.failed += 1
            return "503"
        return "none"


@pytest.fixture
def outage_env(cli_env: dict[str, str], tmp_path: Path):
    """A Redis of the test's own; short backoff caps; a visibility timeout far above the test's waits,
    so no shard is redelivered (and counted) for a reason other than the outage."""
    server = RedisProcess(free_port(), tmp_path / "redis", "--save", "", "--appendonly", "no")
    server.start()
    yield cli_env | {"BULKEMBED_REDIS_URL": server.url, "BULKEMBED_VISIBILITY_TIMEOUT": "120",
                     "BULKEMBED_TASK_TIME_LIMIT": "60", "BULKEMBED_STORE_BACKOFF_MAX_S": "4",
                     "AWS_MAX_ATTEMPTS": str(BOTO3_ATTEMPTS)}
    server.stop()


def texts_and_ids(n: int, seed: int) -> tuple[list[str], list[str]]:
    return mixed_texts(n, seed=seed, long_every=10**9), [f"doc-{i:05d}" for i in range(n)]


def upload_corpus(tmp_path: Path, bucket: str, ids: list[str], texts: list[str]) -> str:
    path = write_corpus(tmp_path / "corpus.parquet", ids, texts)
    boto3.client("s3").upload_file(str(path), bucket, "input/corpus.parquet")  # straight to moto
    return f"s3://{bucket}/input"


def test_job_rides_out_a_store_blackout(tmp_path, s3_server, bucket, outage_env, tiny_model, reference_embedder):
    """Mid-job, with two workers, the S3 endpoint goes dark (open connections cut, new ones reset)
    for longer than boto3's retries; nobody intervenes and `submit --wait` exits 0."""
    blackout_s = 15.0
    texts, ids = texts_and_ids(600, seed=21)
    input_uri = upload_corpus(tmp_path, bucket, ids, texts)
    out = f"s3://{bucket}/out"
    with FaultyS3Proxy(s3_server, Healthy()) as proxy:
        env = outage_env | {"AWS_ENDPOINT_URL_S3": proxy.endpoint}
        url = env["BULKEMBED_REDIS_URL"]
        workers = Workers(env, tmp_path)
        try:
            workers.start(tiny_model), workers.start(tiny_model)
            submit = Background(["submit", input_uri, "--model", tiny_model, "--out", out, "--shard-tokens", "800",
                                 "--wait"], env, tmp_path, "submit")
            job_id = wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]
            done_key = keys.REDIS_JOB_DONE.format(job_id=job_id)
            wait_until(lambda: len(redis_hash(url, done_key)) >= 3, 60, "three shards written")
            shards = int(wait_until(lambda: redis_hash(url, keys.REDIS_JOB.format(job_id=job_id)).get("shards"), 60,
                                    "the job planned"))
            proxy.go_dark()
            dark_at = time.monotonic()
            assert len(redis_hash(url, done_key)) < shards - 4, "dark mid-job"
            wait_until(lambda: time.monotonic() > dark_at + blackout_s, blackout_s + 5, "the end of the blackout")
            proxy.light()
            assert submit.wait(120) == 0, submit.stderr[-3000:]
            logs = "".join(p.log.read_text() for p in workers.processes)
            assert all(p.poll() is None for p in workers.processes)
        finally:
            workers.stop_all()
            submit.stop()
    assert proxy.refused > 0, "connections were refused while dark"
    failing_for = [float(s) for s in FAILING_FOR.findall(logs)]
    assert failing_for and max(failing_for) >= blackout_s / 2, "shards kept retrying past boto3's own retries"
    wait_until(lambda: open_store(out).exists(keys.MANIFEST_KEY), 30, "the manifest")
    check_exactly_once(out, ids)  # read straight from moto, not through the proxy
    check_vectors(out, tmp_path / "corpus.parquet", reference_embedder)
    counts = attempts(url, job_id)
    assert len(counts) == shards and set(counts.values()) == {1}, f"the outage used up no attempts: {counts}"


def run_with_failing_key(tmp_path: Path, s3_server: str, bucket: str, env: dict[str, str], model: Path,
                         plan: FailingKey) -> tuple[Background, str, str, str]:
    """One worker, a local corpus and output on S3 behind `plan`; returns submit, job id, output and logs."""
    texts, ids = texts_and_ids(200, seed=22)
    path = write_corpus(tmp_path / "corpus.parquet", ids, texts)
    out = f"s3://{bucket}/out"
    with FaultyS3Proxy(s3_server, plan) as proxy:
        env = env | {"AWS_ENDPOINT_URL_S3": proxy.endpoint}
        workers = Workers(env, tmp_path)
        try:
            worker = workers.start(model)
            submit = Background(["submit", path, "--model", model, "--out", out, "--shard-tokens", "1000", "--wait"],
                                env, tmp_path, "submit")
            submit.wait(120)
        finally:
            workers.stop_all()
    return submit, submit.stdout.split()[0], out, worker.log.read_text()


def test_a_key_failing_past_boto3s_retries_is_retried_without_spending_an_attempt(
        tmp_path, s3_server, bucket, outage_env, tiny_model):
    """GETs of shard 1's input answer 503 seven times: twice more than boto3's three attempts. The
    shard goes back with a backoff twice (bulkembed's own retry, releasing the attempt each time) and
    is written by its third delivery; it counts one attempt."""
    plan = FailingKey(keys.shard_input(1), BOTO3_ATTEMPTS * 2 + 1)
    submit, job_id, out, log = run_with_failing_key(tmp_path, s3_server, bucket, outage_env, tiny_model, plan)
    assert submit.process.returncode == 0, submit.stderr[-3000:]
    assert plan.failed == plan.times
    assert log.count(f"shard 1: S3 GET {keys.shard_input(1)}: ClientError") == 2, log[-3000:]
    assert "retry 1 in" in log and "retry 2 in" in log
    assert attempts(outage_env["BULKEMBED_REDIS_URL"], job_id)[1] == 1, "the two retries were released"
    check_exactly_once(out, texts_and_ids(200, seed=22)[1])


def test_a_store_failing_at_a_workers_first_shard_of_a_job_is_ridden_out(tmp_path, s3_server, bucket, outage_env,
                                                                         tiny_model):
    """Before its first shard of a job a worker probes the store's conditional writes (a new worker joining during
    an outage or throttling). That probe failing past boto3's retries ended the task unrecorded and its message was
    acknowledged: the shard was lost, and the job waited for it for ever. It is retried as the shard's own requests
    are."""
    plan = FailingPut("/_probe-", BOTO3_ATTEMPTS * 2 + 1)
    submit, job_id, out, log = run_with_failing_key(tmp_path, s3_server, bucket, outage_env, tiny_model, plan)
    assert submit.process.returncode == 0, submit.stderr[-3000:] + log[-3000:]
    assert plan.failed == plan.times and "retry 1 in" in log, log[-3000:]
    check_exactly_once(out, texts_and_ids(200, seed=22)[1])


def test_submit_rides_out_the_store_failing_while_it_plans_a_unit(tmp_path, s3_server, bucket, outage_env,
                                                                  tiny_model):
    """submit plans units itself (no planner here): the store refusing its shard inputs past boto3's retries made it
    exit at once, the job left half planned with nobody to plan it. It backs off and goes on, as a planner does."""
    plan = FailingPut("/_shards/", BOTO3_ATTEMPTS * 2 + 1)
    submit, job_id, out, log = run_with_failing_key(tmp_path, s3_server, bucket, outage_env, tiny_model, plan)
    assert submit.process.returncode == 0, submit.stderr[-3000:]
    assert plan.failed == plan.times
    assert "the store failed (TransientError: S3 PUT _shards/" in submit.stderr and "retry 2 in" in submit.stderr
    check_exactly_once(out, texts_and_ids(200, seed=22)[1])


def test_a_store_failing_past_the_outage_limit_fails_the_shard(tmp_path, s3_server, bucket, outage_env, tiny_model):
    """Shard 1's input never comes back: after BULKEMBED_TRANSIENT_RETRIES (1) and
    BULKEMBED_STORE_OUTAGE_S (3 s) the shard is reported failed with the store's error; the rest is written."""
    env = outage_env | {"BULKEMBED_TRANSIENT_RETRIES": "1", "BULKEMBED_STORE_OUTAGE_S": "3",
                        "BULKEMBED_STORE_BACKOFF_MAX_S": "1"}
    plan = FailingKey(keys.shard_input(1), 10**9)
    submit, job_id, out, log = run_with_failing_key(tmp_path, s3_server, bucket, env, tiny_model, plan)
    assert submit.process.returncode == 1, submit.stderr[-3000:]
    assert re.search(r"shard 000000-000001 failed: the store kept failing for [3-9]s and \d+ retries: S3 GET",
                     submit.stderr), submit.stderr[-3000:]
    failing_for = [float(s) for s in FAILING_FOR.findall(log)]
    assert failing_for[-1] < 3, "it kept retrying until the limit"
    status = json.loads(cli(env, "status", job_id, "--json").stdout)
    assert status["state"] == "failed" and list(status["failures"]) == ["1"]
    assert status["shards_done"] == status["totals"]["shards"] - 1


def test_a_planner_rides_out_an_input_read_failing_past_pyarrows_retries(tmp_path, s3_server, bucket, outage_env,
                                                                          tiny_model):
    """The corpus on S3 answers 503 to GETs (throttling) once its units are queued, past the retries of pyarrow's S3
    filesystem, which planners read the input with: the planner backs off and plans the unit, the job is done.
    Before, pyarrow's OSError failed the whole job ("failed while planning")."""
    texts, ids = texts_and_ids(200, seed=23)
    input_uri = upload_corpus(tmp_path, bucket, ids, texts)
    plan = FailingKey("input/corpus.parquet", 0)  # healthy until the units are queued
    with FaultyS3Proxy(s3_server, plan) as proxy:
        env = outage_env | {"AWS_ENDPOINT_URL_S3": proxy.endpoint}
        workers = Workers(env, tmp_path)
        try:
            workers.start(tiny_model)
            submit = Background(["submit", input_uri, "--model", tiny_model, "--out", tmp_path / "out",
                                 "--shard-tokens", "1000", "--queue-only", "--wait"], env, tmp_path, "submit")
            wait_until(lambda: "1 units, 1 to plan" in submit.stderr, 60, "the unit queued")
            plan.times = BOTO3_ATTEMPTS * 2 + 1  # AWS_MAX_ATTEMPTS, which pyarrow's filesystem now follows too
            planner = workers.start_planner()
            assert submit.wait(120) == 0, submit.stderr[-3000:]
        finally:
            workers.stop_all()
            submit.stop()
    assert plan.failed == plan.times
    log = planner.log.read_text()
    assert "the store failed (OSError: " in log and "AWS Error SLOW_DOWN" in log, log[-3000:]
    assert "retry 2 in" in log
    check_exactly_once(str(tmp_path / "out"), ids)
