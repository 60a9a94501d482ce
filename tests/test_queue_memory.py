"""What a queued shard costs Redis: its message carries ids and counts, not the job spec (the spec lives once, in
the job's registry entry, and workers read it once per job)."""

from __future__ import annotations

import base64
import json

import redis

from bulkembed.contract.job import WIRE_FIELDS, ShardMessage
from bulkembed.contract.registry import JobRegistry
from tests.conftest import Workers, mixed_texts, write_corpus
from tests.faults_support import check_exactly_once, cli

MAX_BYTES_PER_QUEUED_SHARD = 1200


def test_a_queued_shard_costs_redis_under_1_2_kb_and_still_embeds(fault_env, tmp_path, tiny_model):
    texts = mixed_texts(300, seed=4)
    ids = [f"q{i}" for i in range(len(texts))]
    corpus = write_corpus(tmp_path / "corpus.parquet", ids, texts)
    out = tmp_path / "out"
    submit = cli(fault_env, "submit", corpus, "--model", tiny_model, "--out", out, "--shard-tokens", "300",
                 timeout_s=120)  # no worker yet: every shard stays queued
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = submit.stdout.split()[0]
    client = redis.Redis.from_url(fault_env["BULKEMBED_REDIS_URL"])
    queues = [k for k in client.keys("bulkembed.*") if client.type(k) == b"list"]
    assert len(queues) == 1
    queued = client.llen(queues[0])
    assert queued > 20
    per_shard = client.memory_usage(queues[0], samples=0) / queued
    print(f"{per_shard:.0f} B of Redis per queued shard")  # in the notes: -s shows it
    assert per_shard <= MAX_BYTES_PER_QUEUED_SHARD, f"{per_shard:.0f} B of Redis per queued shard"

    envelope = json.loads(client.lindex(queues[0], 0))
    (argument,), _, _ = json.loads(base64.b64decode(envelope["body"]))
    assert len(argument) == len(WIRE_FIELDS) and argument[0] == job_id, "ids and counts, not the spec"
    assert envelope["headers"]["argsrepr"].startswith("shard "), "nor the arguments again in the headers"
    registry = JobRegistry.from_url(fault_env["BULKEMBED_REDIS_URL"])
    message = ShardMessage.from_wire(argument, registry.spec)  # what a worker does with it
    assert message.job.job_id == job_id and message.shard == argument[1]

    workers = Workers(fault_env, tmp_path)
    try:
        workers.start(tiny_model)
        assert cli(fault_env, "submit", corpus, "--model", tiny_model, "--out", out, "--shard-tokens", "300",
                   "--wait", timeout_s=300).returncode == 0
    finally:
        workers.stop_all()
    check_exactly_once(str(out), ids)
