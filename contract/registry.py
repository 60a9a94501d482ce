"""Job progress in Redis and the manifest a finished job leaves next to its embeddings."""

from __future__ import annotations

import json
import time

import redis
from pydantic import BaseModel

from contract import keys
from contract.job import JobSpec
from contract.store import Store, open_store


class ShardResult(BaseModel):
    shard: int
    key: str
    rows: int
    tokens: int
    seconds: float = 0.0


class JobTotals(BaseModel):
    shards: int = 0
    docs: int = 0  # rows to embed (a chunked document counts once per chunk)
    tokens: int = 0
    truncated: int = 0
    rejected: int = 0
    rejected_files: list[str] = []


class JobStatus(BaseModel):
    job_id: str
    state: str  # planning | running | done | failed
    totals: JobTotals | None
    shards_done: int
    tokens_done: int
    rows_done: int
    failures: dict[int, str]

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


def build_manifest(job: JobSpec, totals: JobTotals, results: list[ShardResult]) -> dict:
    results = sorted(results, key=lambda r: r.shard)
    return {
        "job_id": job.job_id,
        "job": job.model_dump(mode="json"),
        "shards": [r.model_dump(exclude={"seconds"}) for r in results],
        "rows": sum(r.rows for r in results),
        "tokens": sum(r.tokens for r in results),
        "truncated_rows": totals.truncated,
        "rejected_rows": totals.rejected,
        "rejected_files": totals.rejected_files,
    }


def write_manifest(store: Store, job: JobSpec, totals: JobTotals, results: list[ShardResult]) -> dict:
    manifest = build_manifest(job, totals, results)
    store.put(keys.MANIFEST_KEY, json.dumps(manifest, indent=2).encode())
    return manifest


class JobRegistry:
    """What a job planned and what its shards did, kept in Redis for status, --wait and the manifest."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> JobRegistry:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    def start(self, job: JobSpec) -> None:
        key = keys.REDIS_JOB.format(job_id=job.job_id)
        self.redis.hset(key, mapping={"spec": job.model_dump_json(), "state": "planning", "started": time.time()})

    def planned(self, job_id: str, totals: JobTotals) -> bool:
        """Record the totals once every shard is queued; True when the job is already complete."""
        self.redis.hset(keys.REDIS_JOB.format(job_id=job_id), mapping={"totals": totals.model_dump_json(),
                                                                      "state": "running"})
        return self._complete(job_id)

    def shard_done(self, job_id: str, result: ShardResult) -> bool:
        """Record a written shard (idempotent); True when this made the job complete."""
        self.redis.hset(keys.REDIS_JOB_DONE.format(job_id=job_id), str(result.shard), result.model_dump_json())
        self.redis.hdel(keys.REDIS_JOB_FAILED.format(job_id=job_id), str(result.shard))
        return self._complete(job_id)

    def shard_failed(self, job_id: str, shard: int, error: str) -> None:
        self.redis.hset(keys.REDIS_JOB_FAILED.format(job_id=job_id), str(shard), error[:2000])

    def _complete(self, job_id: str) -> bool:
        totals = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "totals")
        if totals is None:
            return False
        done = self.redis.hlen(keys.REDIS_JOB_DONE.format(job_id=job_id))
        return done >= JobTotals.model_validate_json(totals).shards

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "spec")
        return JobSpec.model_validate_json(raw) if raw else None

    def results(self, job_id: str) -> list[ShardResult]:
        done = self.redis.hvals(keys.REDIS_JOB_DONE.format(job_id=job_id))
        return [ShardResult.model_validate_json(v) for v in done]

    def finalize(self, job_id: str) -> dict | None:
        """Write the manifest of a complete job; producer and workers may both call it (idempotent)."""
        spec = self.spec(job_id)
        raw = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "totals")
        if spec is None or raw is None:
            return None
        manifest = write_manifest(open_store(spec.out), spec, JobTotals.model_validate_json(raw), self.results(job_id))
        self.redis.hset(keys.REDIS_JOB.format(job_id=job_id), "state", "done")
        return manifest

    def status(self, job_id: str) -> JobStatus | None:
        job = self.redis.hgetall(keys.REDIS_JOB.format(job_id=job_id))
        if not job:
            return None
        totals = JobTotals.model_validate_json(job["totals"]) if "totals" in job else None
        results = self.results(job_id)
        failures = {int(k): v for k, v in self.redis.hgetall(keys.REDIS_JOB_FAILED.format(job_id=job_id)).items()}
        state = job.get("state", "planning")
        if totals is not None and state == "running":
            if len(results) >= totals.shards:
                state = "done"
            elif len(results) + len(failures) >= totals.shards:
                state = "failed"
        return JobStatus(job_id=job_id, state=state, totals=totals, shards_done=len(results),
                         tokens_done=sum(r.tokens for r in results), rows_done=sum(r.rows for r in results),
                         failures=failures)
