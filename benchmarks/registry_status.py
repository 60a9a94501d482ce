"""What a `status` poll costs at 10 shards and at a million, and what a finished job leaves in Redis.

    python benchmarks/registry_status.py --shards 1000000

Starts its own redis-server and registers two jobs through JobRegistry (start, every unit planned, planning closed):
one of 10 shards and one of `--shards`, all written (results written into the done hash and deliveries counted as
workers leave them, the counters through one last shard_done). Then, for each job: the median and worst time of 200
`status` polls, the Redis commands and bytes one poll costs (INFO stats), and the Redis memory the job holds per shard
(MEMORY USAGE of its keys). Finally the big job is finalized with a 2-second retention and its keys are counted again
after it.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bulkembed.contract import keys
from bulkembed.contract.job import JobSpec, ModelRef, Role, Task
from bulkembed.contract.registry import JobRegistry, JobTotals, ShardResult

SHARDS_PER_UNIT = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_job(registry: JobRegistry, out: Path, name: str, shards: int) -> str:
    spec = JobSpec(input=name, input_fingerprint="f", out=str(out / name), task=Task.RETRIEVAL, role=Role.PASSAGE,
                   prefix="", shard_tokens=65536,
                   model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64, queue="bulkembed.bench"))
    units = -(-shards // SHARDS_PER_UNIT)
    registry.start(spec, units)
    for unit in range(units):
        in_unit = min(SHARDS_PER_UNIT, shards - unit * SHARDS_PER_UNIT)
        registry.unit_planned(spec.job_id, unit, JobTotals(shards=in_unit))
    registry.close_planning(spec.job_id)
    numbers = [keys.shard_number(i // SHARDS_PER_UNIT, i % SHARDS_PER_UNIT) for i in range(shards)]
    done = keys.REDIS_JOB_DONE.format(job_id=spec.job_id)
    with registry.redis.pipeline(transaction=False) as pipe:
        for count, shard in enumerate(numbers[:-1], 1):
            result = ShardResult(shard=shard, key=keys.shard_output(shard), rows=1000, tokens=65000,
                                 sha256=f"{shard:064x}", seconds=1.0)
            pipe.hset(done, str(shard), result.model_dump_json())
            pipe.hincrby(keys.REDIS_JOB_ATTEMPTS.format(job_id=spec.job_id), str(shard), 1)  # its delivery
            if count % 10_000 == 0:
                pipe.execute()
        pipe.execute()
    last = numbers[-1]
    registry.shard_done(spec.job_id, ShardResult(shard=last, key=keys.shard_output(last), rows=1000, tokens=65000,
                                                 sha256=f"{last:064x}", seconds=1.0))
    return spec.job_id


def poll_cost(registry: JobRegistry, job_id: str) -> tuple[float, float, int, int]:
    times = []
    for _ in range(200):
        started = time.perf_counter()
        registry.status(job_id)
        times.append(time.perf_counter() - started)
    before = registry.redis.info("stats")
    registry.status(job_id)
    after = registry.redis.info("stats")
    commands = after["total_commands_processed"] - before["total_commands_processed"] - 1  # less one INFO
    sent = after["total_net_output_bytes"] - before["total_net_output_bytes"]
    return statistics.median(times) * 1000, max(times) * 1000, commands, sent


def job_memory(client: redis.Redis, job_id: str) -> int:
    return sum(client.memory_usage(k) or 0 for k in client.keys(f"bulkembed:job:{job_id}*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=1_000_000)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        registry = JobRegistry.from_url(url, retention_s=2)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            print("| shards | status poll median (ms) | worst of 200 (ms) | Redis commands | bytes sent | "
                  "Redis bytes / shard |")
            print("|---|---|---|---|---|---|")
            big = None
            for shards in (10, args.shards):
                job_id = make_job(registry, out, f"job-{shards}", shards)
                median, worst, commands, sent = poll_cost(registry, job_id)
                per_shard = job_memory(registry.redis, job_id) / shards
                print(f"| {shards:,} | {median:.2f} | {worst:.2f} | {commands} | {sent} | {per_shard:.0f} |",
                      flush=True)
                big = job_id
            (out / f"job-{args.shards}").mkdir()
            started = time.perf_counter()
            registry.finalize(big)
            print(f"finalize (streamed manifest of {args.shards:,} shards, local OUT): "
                  f"{time.perf_counter() - started:.1f}s")
            time.sleep(3)
            print(f"Redis keys of the big job {3}s after its 2s retention: "
                  f"{len(registry.redis.keys(f'bulkembed:job:{big}*'))}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
