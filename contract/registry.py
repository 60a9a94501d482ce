"""Job progress in Redis and the manifest a finished job leaves next to its embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import redis
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from bulkembed.contract import keys
from bulkembed.contract.errors import BulkEmbedError, ForeignOutput, ShardError, StoreRefused
from bulkembed.contract.job import JobSpec, ShardMessage
from bulkembed.contract.manifest import write_manifest
from bulkembed.contract.schema import (
    decoding_digest,
    from_ipc_bytes,
    other_writer,
    quarantine_table,
    read_decoded_by,
    read_metadata,
    read_rejected,
    to_ipc_bytes,
)
from bulkembed.contract.settings import Settings
from bulkembed.contract.store import S3_DELETE_BATCH, Store, at_once, open_store

log = logging.getLogger(__name__)


class ShardResult(BaseModel):
    shard: int
    key: str
    rows: int
    tokens: int
    sha256: str = ""  # of the Arrow file's bytes, to check a duplicate delivery and the manifest
    rejected: int = 0  # rows llama.cpp could not embed, quarantined under _rejected/
    seconds: float = 0.0
    decoding: str = ""  # schema.decoding_digest of the file's decoded_by


class ReusedFile(BaseModel):
    """Rows copied whole from one embedding file of PREV_OUT (--reuse)."""

    key: str
    source: str = Field(description="The PREV_OUT file they come from.")
    rows: int
    tokens: int
    truncated: int = 0  # documents among them that were truncated
    sha256: str
    decoding: str = ""  # schema.decoding_digest of the decoded_by it keeps from the earlier job


class JobTotals(BaseModel):
    """What planning found: counters only (lists that grow with the job, rejected and reused files, live in the
    store), so Redis keeps them as hash fields that planners add to atomically."""

    shards: int = 0
    docs: int = 0  # rows to embed (a chunked document counts once per chunk)
    tokens: int = 0
    truncated: int = 0
    rejected: int = 0  # rows quarantined by planning (workers count theirs in their ShardResult)
    reused_rows: int = 0  # copied from PREV_OUT (--reuse), not embedded
    reused_tokens: int = 0
    reused_truncated: int = 0

    def plus(self, other: JobTotals) -> JobTotals:
        return JobTotals(**{name: getattr(self, name) + getattr(other, name) for name in JobTotals.model_fields})

    @classmethod
    def of_reused(cls, files: list[ReusedFile]) -> JobTotals:
        return cls(reused_rows=sum(f.rows for f in files), reused_tokens=sum(f.tokens for f in files),
                   reused_truncated=sum(f.truncated for f in files))


def reused_files(store: Store) -> list[ReusedFile]:
    """The files a --reuse job copied from PREV_OUT, as its planning listed them (none before that, or without
    --reuse)."""
    if not store.exists(keys.REUSED_FILES_KEY):
        return []
    return [ReusedFile.model_validate(f) for f in json.loads(store.get(keys.REUSED_FILES_KEY))]


# Redis failing past redis-py's own retries (out of memory under noeviction, a long outage), as the registry's client
# or as Celery's broker through kombu.
REDIS_FAILED = (redis.RedisError, OperationalError)
ENGINES_TTL_S = 90  # a worker reports its engines every third of this
FAILURES_PAGE = 20  # failed shards a status carries; JobRegistry.failures pages through the rest
PAGE = 10_000  # hash fields one command asks for or scans: a job may have millions of shards


class JobStatus(BaseModel):
    job_id: str
    state: str  # planning | running | finishing (every shard written, the manifest not yet) | done | failed
    totals: JobTotals | None  # None while planning (what the planned units found so far is in `planned`)
    planned: JobTotals = JobTotals()
    units: int = 0
    units_planned: int = 0
    error: str | None = None  # why planning failed (state failed), if it did
    shards_done: int
    tokens_done: int
    rows_done: int
    rejected_done: int = 0  # rows the workers quarantined (NaN vectors, llama.cpp failures); planning's are in totals
    failed: int = 0  # shards failed for good
    failures: dict[int, str]  # the first FAILURES_PAGE of them

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def rejected_rows(self) -> int:
        """Rows quarantined so far: by planning (its units planned), then by the workers."""
        return self.planned.rejected + self.rejected_done


class CancelledJob(BaseModel):
    """What `bulkembed cancel` kept of a job: for `status`, which otherwise would not know it."""

    job_id: str
    spec: JobSpec
    cancelled: float  # when (Unix time)
    state: str  # its state then
    shards_done: int
    shards: int | None  # None while it was planning

    @classmethod
    def of(cls, job_id: str, record: dict[str, str]) -> CancelledJob:
        return cls(job_id=job_id, spec=JobSpec.model_validate_json(record["spec"]),
                   cancelled=float(record["cancelled"]), state=record["state"], shards_done=int(record["shards_done"]),
                   shards=int(record["shards"]) if record["shards"] else None)


def stored_result(message: ShardMessage, store: Store) -> ShardResult:
    """A shard found written (a duplicate delivery, a resumed job, the loser of a race to write it): check the file,
    bring OUT/_rejected/ in line with the rows it set aside, report what it holds. ForeignOutput: another job's
    (its writer still embedding it when submit --force replaced that job): the caller deletes it where its own job
    still owns OUT, and writes the shard."""
    data = store.get(message.output_key)
    try:
        table = from_ipc_bytes(data)
    except pa.ArrowInvalid as exc:
        raise ShardError(f"job {message.job_id}: {message.output_key} exists but is not a valid Arrow file") from exc
    if owner := other_writer(table.schema, message.job):
        raise ForeignOutput(f"{message.output_key} was written by job {owner}, not job {message.job.job_id}: a late "
                            f"write of a job that submit --force replaced")
    reasons = read_rejected(table.schema)
    if reasons is None:  # written before outputs named their rejected rows: _rejected/ was written first
        rejected = 0
        if store.exists(keys.shard_rejected(message.shard)):
            rejected = from_ipc_bytes(store.get(keys.shard_rejected(message.shard))).num_rows
    else:
        rejected = len(reasons)
    sha = read_metadata(table.schema).get("model_sha256")
    if sha != message.job.model.sha256 or table.num_rows + rejected != message.n_docs:
        raise ShardError(f"job {message.job_id}: {message.output_key} exists with {table.num_rows} rows "
                         f"(+{rejected} rejected) from model {str(sha)[:12]}, expected {message.n_docs} rows "
                         f"from {message.job.model.sha256[:12]}")
    if reasons is not None:
        record_rejected(store, message, reasons)
    return ShardResult(shard=message.shard, key=message.output_key, rows=table.num_rows,
                       tokens=int(pc.sum(table["n_tokens"]).as_py() or 0),
                       sha256=hashlib.sha256(data).hexdigest(), rejected=rejected,
                       decoding=decoding_digest(read_decoded_by(table.schema)))


def record_rejected(store: Store, message: ShardMessage, reasons: dict[int, str],
                    shard_input: pa.Table | None = None) -> None:
    """Make OUT/_rejected/ hold the rows the shard's written output set aside (`reasons`, from its metadata), and no
    others. It is written after the output and only from it, so deliveries racing to write one shard, each with
    its own failures, all leave the winner's record; one killed in between leaves it to the next look at the shard
    (stored_result). `shard_input`: the shard's input where the caller has it read already."""
    key = keys.shard_rejected(message.shard)
    if not reasons:
        if store.exists(key):  # an older bulkembed wrote it before its output, and was killed in between
            store.delete(key)
        return
    if shard_input is None:
        if store.exists(key) and from_ipc_bytes(store.get(key)).num_rows == len(reasons):
            return
        if not store.exists(message.input_key):
            log.warning("job %s shard %d: its input is gone, so %s cannot be written; the rows it set aside are in "
                        "the metadata of %s", message.job_id, message.shard, key, message.output_key)
            return
        shard_input = from_ipc_bytes(store.get(message.input_key))
    store.put(key, to_ipc_bytes(quarantine_table(shard_input, message.input_key, reasons)))


# Prepended to the scripts that may create one of a job's keys (KEYS[1]: the job hash): a key made after the job's
# keys were set to expire (a worker's shard of a job whose planning failed, a late duplicate delivery) expires with
# them; it would otherwise outlive the job and be taken up, stale, by the same job submitted again.
_EXPIRES_WITH_JOB = """
local function expires_with_job(key)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 and redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ttl) end
end
"""
# A written shard, counted once however often it is reported (duplicate deliveries): its result is kept and the
# job's counters grow in one step, so `status` reads a few numbers instead of every shard's result (how many are
# written is the done hash's size). `failed_only` counts the failed shards that are not written, so written +
# failed_only is how many shards are settled.
# KEYS: job hash, done hash, failed hash; ARGV: shard, result json, rows, tokens, rows the worker quarantined.
_SHARD_DONE = _EXPIRES_WITH_JOB + """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return end
local new = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
expires_with_job(KEYS[2])
if new == 1 then
  redis.call('HINCRBY', KEYS[1], 'rows_done', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'tokens_done', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'rejected_done', ARGV[5])
end
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 and new == 1 then
  redis.call('HINCRBY', KEYS[1], 'failed_only', -1)
end
"""
# A unit whose shards are all queued, counted once however often it is planned (a planner killed after queueing its
# last shard, then redelivered): its totals join the job's in one step. KEYS: job hash, units hash; ARGV: unit,
# totals json, then pairs of counter and increment.
_UNIT_PLANNED = _EXPIRES_WITH_JOB + """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return end
local new = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
expires_with_job(KEYS[2])
if new == 1 then
  for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
"""
# Planning closed (KEYS: job hash, done hash, units hash; ARGV: pairs of reused field and value): the job's shard
# count is what its units planned; one that is complete already gets `manifest_due` in the same step, so that no try
# of a planner killed in between can leave it finishing with nobody to write its manifest. Returns 1 when complete,
# 0 when not, -1 when it is not to be closed: closed already, or a unit is to be planned again (a resubmit took it
# back while this closer copied --reuse rows: it would close the job short of that unit's shards).
_CLOSE_PLANNING = """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 or redis.call('HEXISTS', KEYS[1], 'shards') == 1 then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'failed' then return -1 end  -- a unit's planning failed: until resubmitted
if redis.call('HLEN', KEYS[3]) < tonumber(redis.call('HGET', KEYS[1], 'units') or '0') then return -1 end
local shards = redis.call('HGET', KEYS[1], 'planned_shards') or '0'
redis.call('HSET', KEYS[1], 'shards', shards, 'state', 'running', unpack(ARGV))
if redis.call('HLEN', KEYS[2]) >= tonumber(shards) then
  redis.call('HSET', KEYS[1], 'manifest_due', 1)
  return 1
end
return 0
"""
# A job registered (KEYS: JobRegistry._keys, the job hash first; ARGV: spec, time, units). A resubmitted one keeps its
# keys, which expire no more. Its planning is opened again unless it was closed with every unit planned.
_START = """
for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'started', ARGV[2], 'units', ARGV[3])
local shards = redis.call('HGET', KEYS[1], 'shards')
if shards and redis.call('HGET', KEYS[1], 'state') ~= 'failed' and redis.call('HLEN', KEYS[5]) >= tonumber(ARGV[3]) then
  if redis.call('HLEN', KEYS[2]) >= tonumber(shards) then redis.call('HSET', KEYS[1], 'manifest_due', 1) end
else
  redis.call('HSET', KEYS[1], 'state', 'planning')
  redis.call('HDEL', KEYS[1], 'shards', 'error', 'manifest_due')
end
redis.call('DEL', KEYS[4], KEYS[7])  -- attempts start afresh; cancelled no more
"""
# A job cancelled (KEYS: JobRegistry._keys; ARGV: time, retention in s) in one step with the look at its state, so
# that no last shard written meanwhile leaves a complete job forgotten (no manifest) or a manifest being streamed
# from hashes deleted under it: its keys deleted and a record of it kept for `status`, unless it is done, finishing
# (every shard written) or failed with every shard settled. Returns {outcome}: cancelled, done, finishing, failed or
# unknown (no spec: never submitted, expired, or forgotten already).
_CANCEL = """
local spec, state, shards, failed_only = unpack(redis.call('HMGET', KEYS[1], 'spec', 'state', 'shards', 'failed_only'))
if not spec then return {'unknown'} end
if state == 'done' then return {'done'} end
local done = redis.call('HLEN', KEYS[2])
if shards then
  if done >= tonumber(shards) then return {'finishing'} end
  if redis.call('HLEN', KEYS[3]) > 0 and done + tonumber(failed_only or '0') >= tonumber(shards) then
    return {'failed'}
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[7], 'spec', spec, 'cancelled', ARGV[1], 'state', state, 'shards_done', done,
           'shards', shards or '')
redis.call('EXPIRE', KEYS[7], ARGV[2])
return {'cancelled'}
"""
# The job listed for KEDA (KEYS: job hash, list; ARGV: job id) while its planning is open and has not failed: a late
# lister (a submit whose planners closed the job before it listed it) would keep a planner pod up for nothing.
_NEEDS_PLANNER = """
if redis.call('HEXISTS', KEYS[1], 'shards') == 1 or redis.call('HGET', KEYS[1], 'state') ~= 'planning' then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""
# The job listed for KEDA's GPU workers (KEYS: job hash, done hash, list; ARGV: job id) unless it has failed or every
# shard of it is settled: a submit of a done job, or one whose shards were written before it listed it, would keep a
# GPU pod up for nothing.
_OPEN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'failed' or state == 'done' then return 0 end
local shards = redis.call('HGET', KEYS[1], 'shards')
local failed_only = tonumber(redis.call('HGET', KEYS[1], 'failed_only') or '0')
if shards and redis.call('HLEN', KEYS[2]) + failed_only >= tonumber(shards) then return 0 end
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
"""
# A delivery of a shard counted (ARGV: shard, 1 or -1; KEYS: job hash, attempts hash), not for a forgotten job.
_COUNT_ATTEMPT = _EXPIRES_WITH_JOB + """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return 0 end
local count = redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
expires_with_job(KEYS[2])
return count
"""
# Shards failed for good taken off the failed list (ARGV: the shards; KEYS: job hash, done hash, failed hash), the
# count of those not written with them. Nothing for a job Redis no longer knows (its counter would be made anew).
_UNFAIL = """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return end
for i = 1, #ARGV do
  if redis.call('HDEL', KEYS[3], ARGV[i]) == 1 and redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    redis.call('HINCRBY', KEYS[1], 'failed_only', -1)
  end
end
"""
# A unit's shard queued (ARGV: unit, shards queued so far), into the job's planning record (KEYS: job hash, queued
# hash). Like every script here, it writes nothing for a job Redis no longer knows (a planner of a job forgotten by
# submit --force would otherwise bring its keys back, without expiry), nor once planning is closed (`shards` set:
# the record is deleted then, and a planner whose hold lapsed would make it again, without expiry).
_SHARD_QUEUED = """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 or redis.call('HEXISTS', KEYS[1], 'shards') == 1 then return end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
"""
PLANNED = "planned_"  # job hash fields planned_shards, planned_docs, ...: what the planned units found, summed
REUSED_FIELDS = ("reused_rows", "reused_tokens", "reused_truncated")  # set once, when planning is closed
PLAN_FIELDS = tuple(PLANNED + f for f in JobTotals.model_fields if f not in REUSED_FIELDS)
# A shard failed for good (a written one too: its job's manifest could not be written). KEYS: job hash, done hash,
# failed hash; ARGV: shard, error.
_SHARD_FAILED = _EXPIRES_WITH_JOB + """
if redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return end
if redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) == 1 and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  redis.call('HINCRBY', KEYS[1], 'failed_only', 1)
end
expires_with_job(KEYS[3])
"""


_PROCESS_REGISTRIES: dict[tuple[int, str], JobRegistry] = {}


class JobRegistry:
    """What a job planned and what its shards did, kept in Redis for status, --wait and the manifest.

    Reading a job's state costs the same at 10 shards and 10 million: counters kept as shards complete, failures a
    page at a time. A finished job's keys expire after `retention_s`."""

    def __init__(self, client: redis.Redis, retention_s: float = 7 * 24 * 3600):
        self.redis = client
        self.retention_s = retention_s
        self._shard_done = client.register_script(_SHARD_DONE)
        self._shard_failed = client.register_script(_SHARD_FAILED)
        self._unit_planned = client.register_script(_UNIT_PLANNED)
        self._shard_queued = client.register_script(_SHARD_QUEUED)
        self._unfail = client.register_script(_UNFAIL)
        self._close_planning = client.register_script(_CLOSE_PLANNING)
        self._count_attempt = client.register_script(_COUNT_ATTEMPT)
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)
        self._needs_planner_script = client.register_script(_NEEDS_PLANNER)
        self._open = client.register_script(_OPEN)

    @classmethod
    def from_url(cls, url: str, check: bool = True, retention_s: float = 7 * 24 * 3600) -> JobRegistry:
        if check:
            _check_redis(url)
        # A restarted Redis (AOF keeps the data) must not turn a written shard into a failed task.
        retry = Retry(ExponentialBackoff(cap=10, base=0.2), retries=30)
        client = redis.Redis.from_url(url, decode_responses=True, retry=retry,
                                      retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        return cls(client, retention_s)

    @classmethod
    def of_process(cls, settings: Settings) -> JobRegistry:
        """This process's registry (one Redis connection pool a process, made after Celery's fork), for tasks."""
        key = (os.getpid(), settings.redis_url.get_secret_value())
        if key not in _PROCESS_REGISTRIES:
            _PROCESS_REGISTRIES[key] = cls.from_url(key[1], check=False, retention_s=settings.job_retention_s)
        return _PROCESS_REGISTRIES[key]

    def _keys(self, job_id: str) -> list[str]:
        """The job's keys, in the order _START takes them."""
        return [k.format(job_id=job_id) for k in (keys.REDIS_JOB, keys.REDIS_JOB_DONE, keys.REDIS_JOB_FAILED,
                                                   keys.REDIS_JOB_ATTEMPTS, keys.REDIS_JOB_UNITS,
                                                   keys.REDIS_JOB_QUEUED, keys.REDIS_JOB_CANCELLED)]

    def start(self, job: JobSpec, units: int) -> None:
        """Register a job of `units` planning units; a resubmitted one keeps what its units and shards already did,
        and its shards get a fresh set of attempts (plan_failed_again, before, takes back the units to plan again).
        A job whose planning was closed with every unit planned stays closed (its submit may die before closing it
        again: nobody else would); when complete, its manifest is written again (close_if_planned)."""
        self._start(keys=self._keys(job.job_id), args=[job.model_dump_json(), time.time(), units])

    def plan_failed_again(self, job_id: str) -> list[int]:
        """A resubmitted job's shards that had failed for good are embedded again. Those of a planned unit: the unit
        is planned again (a planner queues what of it is not written, held back as all planning is: a store outage
        may have failed millions), and only then are they taken off the failed list, so that a submit killed in
        between leaves them failed for the next one. Of a unit not planned (half planned: its planner died, or is
        still at it), those past its queued count are its planner's to queue; it skips the others, which are returned:
        the caller queues them again from their inputs, then unfails them."""
        shards = [int(shard) for shard in self.redis.hkeys(keys.REDIS_JOB_FAILED.format(job_id=job_id))]
        by_unit: dict[int, list[int]] = {}
        for shard in shards:
            by_unit.setdefault(shard // keys.SHARDS_PER_UNIT, []).append(shard)
        left = []
        for unit, failed in sorted(by_unit.items()):
            if self._plan_again(job_id, unit, [], always=True)[1]:
                self.unfail(job_id, failed)
                continue
            queued = self.queued_shards(job_id, unit)
            left += [shard for shard in failed if shard % keys.SHARDS_PER_UNIT < queued]
            self.unfail(job_id, [shard for shard in failed if shard % keys.SHARDS_PER_UNIT >= queued])
        return left

    def unfail(self, job_id: str, shards: list[int]) -> None:
        """Shards failed for good, queued again (or their unit to be planned again): off the failed list."""
        job, done, failed = (k.format(job_id=job_id) for k in (keys.REDIS_JOB, keys.REDIS_JOB_DONE,
                                                                keys.REDIS_JOB_FAILED))
        for first in range(0, len(shards), PAGE):
            self._unfail(keys=[job, done, failed], args=shards[first:first + PAGE])

    def units_queued(self, job_id: str) -> None:
        """The job's units wait on the plan queue for planners: it is listed for KEDA until its planning is closed
        (or fails, or the job is forgotten)."""
        self._needs_planner(job_id)

    def _needs_planner(self, job_id: str) -> None:
        """List the job for KEDA, which keeps a planner up while the list is not empty (once, however often it is
        submitted), unless its planning is closed or has failed."""
        self._needs_planner_script(keys=[keys.REDIS_JOB.format(job_id=job_id), keys.REDIS_PLANNING_JOBS],
                                   args=[job_id])

    def _needs_no_planner(self, job_id: str) -> None:
        """Every entry of the job off the list: planned, failed, forgotten or done."""
        self.redis.lrem(keys.REDIS_PLANNING_JOBS, 0, job_id)

    def forget(self, job_id: str) -> None:
        """Drop everything Redis knows of a job (--force; a record of its cancelling too), its planners' holds too: a
        planner of it stops when it next renews its hold, and its workers drop its shards (is_registered)."""
        self._close(job_id)
        self._let_go(job_id)
        self.redis.delete(*self._keys(job_id))

    def _let_go(self, job_id: str) -> None:
        """A forgotten job off the planners' KEDA list, its planners' holds deleted."""
        self._needs_no_planner(job_id)
        if holds := list(self.redis.scan_iter(match=keys.REDIS_PLAN_LOCK.format(job_id=job_id, unit="*"),
                                              count=PAGE)):
            self.redis.delete(*holds)

    def cancel(self, job_id: str) -> tuple[str, int]:
        """`bulkembed cancel`: the job forgotten as --force forgets one (its workers drop its queued shards, its
        planners and submitting process stop, KEDA lets its pods go), with a record of it for `status` (cancelled)
        until the retention ends; what it wrote stays, and submitting it again resumes it. Not a job done, finishing
        (every shard written: it would have no manifest until submitted again) or failed with every shard settled.
        Returns the outcome (cancelled, done, finishing, failed, unknown) and, for a job Redis does not know, how
        many KEDA entries of it were taken off the queues' lists (a job abandoned while listed, then expired)."""
        spec = self.spec(job_id)  # its queue: gone with its keys once cancelled
        outcome = self._cancel(keys=self._keys(job_id), args=[time.time(), int(self.retention_s)])[0]
        unlisted = 0
        if outcome == "cancelled" and spec is not None:
            self._close(job_id, spec)
        elif outcome in ("cancelled", "unknown"):  # no spec to name its queue: every queue's list
            for listed in self.redis.scan_iter(match=keys.REDIS_QUEUE_OPEN_JOBS.format(queue="*"), count=PAGE):
                unlisted += self.redis.lrem(listed, 0, job_id)
        if outcome in ("cancelled", "unknown"):
            self._let_go(job_id)
        return outcome, unlisted

    def cancelled(self, job_id: str) -> CancelledJob | None:
        """What `cancel` kept of the job, where it was cancelled (and not submitted again since)."""
        record = self.redis.hgetall(keys.REDIS_JOB_CANCELLED.format(job_id=job_id))
        return CancelledJob.of(job_id, record) if record else None

    def manifest_due(self, job_id: str) -> bool:
        """The job was complete when its planning closed (no worker sends its manifest task) and its manifest is not
        written yet: a planner's try failed, and the next one writes it."""
        return bool(self.redis.hexists(keys.REDIS_JOB.format(job_id=job_id), "manifest_due"))

    def is_registered(self, job_id: str) -> bool:
        """Whether Redis knows the job (not forgotten by --force, not expired)."""
        return bool(self.redis.hexists(keys.REDIS_JOB.format(job_id=job_id), "spec"))

    def attempt(self, job_id: str, shard: int) -> int:
        """Count a delivery of a shard; the count survives the process that took it."""
        return int(self._count_attempt(keys=[keys.REDIS_JOB.format(job_id=job_id),
                                             keys.REDIS_JOB_ATTEMPTS.format(job_id=job_id)], args=[shard, 1]))

    def release_attempt(self, job_id: str, shard: int) -> None:
        """A retry for a transient error is not a crash: it does not use up an attempt."""
        self._count_attempt(keys=[keys.REDIS_JOB.format(job_id=job_id), keys.REDIS_JOB_ATTEMPTS.format(job_id=job_id)],
                            args=[shard, -1])

    def plan_lock(self, job_id: str, unit: int, timeout_s: float = 120) -> redis.lock.Lock:
        """Held by the one planner that plans a unit; it lapses after `timeout_s` unless extended, so a killed
        planner's unit is planned again by another."""
        return self.redis.lock(keys.REDIS_PLAN_LOCK.format(job_id=job_id, unit=unit), timeout=timeout_s,
                               blocking=False)

    def units_left(self, job_id: str, units: int) -> list[int]:
        """The units not planned yet (one HKEYS: a job has thousands of units, not millions)."""
        planned = {int(u) for u in self.redis.hkeys(keys.REDIS_JOB_UNITS.format(job_id=job_id))}
        return [u for u in range(units) if u not in planned]

    def unit_is_planned(self, job_id: str, unit: int) -> bool:
        return bool(self.redis.hexists(keys.REDIS_JOB_UNITS.format(job_id=job_id), str(unit)))

    def planning_open(self, job_id: str) -> bool:
        """Units are still being planned (the job is not closed for planning)."""
        return self._planned_shards(job_id) is None

    def unit_count(self, job_id: str) -> int:
        """How many units the job was cut into (start)."""
        return int(self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "units") or 0)

    def planned_units(self, job_id: str) -> dict[int, JobTotals]:
        """Each planned unit's totals (one HGETALL: a job has thousands of units, not millions)."""
        raw = self.redis.hgetall(keys.REDIS_JOB_UNITS.format(job_id=job_id))
        return {int(unit): JobTotals.model_validate_json(totals) for unit, totals in raw.items()}

    def unwritten(self, job_id: str, shards: list[int]) -> list[int]:
        """Those of `shards` not recorded written (asked a page at a time: there may be millions)."""
        key, left = keys.REDIS_JOB_DONE.format(job_id=job_id), []
        for first in range(0, len(shards), PAGE):
            page = shards[first:first + PAGE]
            left += [shard for shard, result in zip(page, self.redis.hmget(key, page), strict=True) if result is None]
        return left

    def plan_again(self, job_id: str, unit: int, lost: list[int], always: bool = False) -> int:
        """Of a unit's shards `lost` (files OUT does not hold), those recorded written are written no more, and the
        unit is planned no more, so that submitting the job again plans it again: a done job's shard inputs are
        deleted, and planning a unit queues exactly its shards not found written. `always`: the unit is planned again
        even when none of them was written. Returns how many of `lost` were recorded written; nothing changes when
        none was and not `always`. One transaction (WATCH): two submits at once take each count off once."""
        return self._plan_again(job_id, unit, lost, always)[0]

    def _plan_again(self, job_id: str, unit: int, lost: list[int], always: bool) -> tuple[int, bool]:
        """plan_again's count, and whether the unit is to be planned again now (it was planned, and changed)."""
        job, done, failed, units, queued = (k.format(job_id=job_id) for k in (
            keys.REDIS_JOB, keys.REDIS_JOB_DONE, keys.REDIS_JOB_FAILED, keys.REDIS_JOB_UNITS, keys.REDIS_JOB_QUEUED))
        found, unplanned = 0, False

        def apply(pipe: redis.client.Pipeline) -> None:
            nonlocal found, unplanned
            written = [ShardResult.model_validate_json(r) for r in (pipe.hmget(done, lost) if lost else []) if r]
            planned = pipe.hget(units, str(unit))
            found = len(written) if planned is not None else 0  # no unit to plan again: nothing changes
            unplanned = planned is not None and bool(written or always)
            if not unplanned:
                return
            # Written and failed (its manifest failed) counted as written until now: failed only, from now on.
            failed_too = sum(1 for r in pipe.hmget(failed, [r.shard for r in written]) if r) if written else 0
            totals = JobTotals.model_validate_json(planned)
            pipe.multi()  # the counters stay the sums of what is recorded
            if written:
                pipe.hdel(done, *(result.shard for result in written))
                pipe.hincrby(job, "failed_only", failed_too)
            pipe.hincrby(job, "rows_done", -sum(result.rows for result in written))
            pipe.hincrby(job, "tokens_done", -sum(result.tokens for result in written))
            pipe.hincrby(job, "rejected_done", -sum(result.rejected for result in written))
            # A unit of a job whose planning failed may keep its queued count: planned again it must queue anew.
            pipe.hdel(units, str(unit)).hdel(queued, str(unit))
            pipe.hdel(job, "shards")  # planning open again, in the same step: its count is no longer the job's
            for field in PLAN_FIELDS:
                pipe.hincrby(job, field, -getattr(totals, field.removeprefix(PLANNED)))

        self.redis.transaction(apply, done, units, failed)
        return found, unplanned

    def is_written(self, job_id: str, shard: int) -> bool:
        return bool(self.redis.hexists(keys.REDIS_JOB_DONE.format(job_id=job_id), str(shard)))

    def all_units_planned(self, job_id: str) -> bool:
        return self.redis.hlen(keys.REDIS_JOB_UNITS.format(job_id=job_id)) >= self.unit_count(job_id)

    def queued_shards(self, job_id: str, unit: int) -> int:
        """How many of a unit's shards are queued: a unit planned again after its planner died skips those."""
        return int(self.redis.hget(keys.REDIS_JOB_QUEUED.format(job_id=job_id), str(unit)) or 0)

    def shard_queued(self, job_id: str, unit: int, place: int) -> None:
        """The unit's shard `place` is queued. Recorded after the send: a planner killed in between has it queued
        twice, and the second delivery finds it written (embedded once, counted once)."""
        self._shard_queued(keys=[keys.REDIS_JOB.format(job_id=job_id), keys.REDIS_JOB_QUEUED.format(job_id=job_id)],
                           args=[unit, place + 1])

    def unit_planned(self, job_id: str, unit: int, totals: JobTotals) -> None:
        """Record a unit whose shards are all queued (counted once)."""
        counters = [x for f in PLAN_FIELDS for x in (f, getattr(totals, f.removeprefix(PLANNED)))]
        self._unit_planned(keys=[keys.REDIS_JOB.format(job_id=job_id), keys.REDIS_JOB_UNITS.format(job_id=job_id)],
                           args=[unit, totals.model_dump_json(), *counters])

    def close_planning(self, job_id: str, reused: JobTotals | None = None) -> bool:
        """Every unit is planned (and PREV_OUT's rows copied): the job runs; True when it is already complete (in the
        same script, `manifest_due` is set then: no worker will send its manifest task)."""
        reused = reused or JobTotals()
        closed = int(self._close_planning(
            keys=[keys.REDIS_JOB.format(job_id=job_id), keys.REDIS_JOB_DONE.format(job_id=job_id),
                  keys.REDIS_JOB_UNITS.format(job_id=job_id)],
            args=[x for f in REUSED_FIELDS for x in (f, getattr(reused, f))]))
        if closed < 0:
            return False
        complete = closed == 1
        self.redis.delete(keys.REDIS_JOB_QUEUED.format(job_id=job_id))  # only planning needed it
        self._needs_no_planner(job_id)
        if complete:  # written whole already (a resubmitted job): no worker needs to stay up for it
            self._close(job_id)
        elif self._settled(job_id):  # its last shards failed while it was being planned
            self._close(job_id)
            self._expire(job_id)
        return complete

    def planning_error(self, job_id: str) -> str | None:
        """Why the job's planning failed (planning_failed), until it is submitted again; None if it has not."""
        state, error = self.redis.hmget(keys.REDIS_JOB.format(job_id=job_id), ["state", "error"])
        return error if state == "failed" and error else None

    def planning_failed(self, job_id: str, unit: int, error: str) -> None:
        """A unit could not be planned (not a passing hiccup: its file unreadable, the model missing on the
        planner): the job fails with the reason, and no worker needs to stay up for it. Resubmitting plans it."""
        if not self.is_registered(job_id):  # forgotten by submit --force meanwhile: nothing to fail
            return
        self.redis.hset(keys.REDIS_JOB.format(job_id=job_id), mapping={"state": "failed",
                                                                        "error": f"unit {unit}: {error}"[:2000]})
        self._close(job_id)
        self._needs_no_planner(job_id)
        self._expire(job_id)

    def totals(self, job_id: str) -> JobTotals:
        """What planning found (complete once planning is closed)."""
        values = self.redis.hmget(keys.REDIS_JOB.format(job_id=job_id), [*PLAN_FIELDS, *REUSED_FIELDS])
        return _totals(values)

    def shard_done(self, job_id: str, result: ShardResult) -> bool:
        """Record a written shard (idempotent: counted once); True when the job is complete."""
        job, done, failed = (k.format(job_id=job_id) for k in (keys.REDIS_JOB, keys.REDIS_JOB_DONE,
                                                                keys.REDIS_JOB_FAILED))
        self._shard_done(keys=[job, done, failed], args=[result.shard, result.model_dump_json(), result.rows,
                                                         result.tokens, result.rejected])
        complete = self._complete(job_id)
        if complete:  # nothing left to embed: no worker needs to stay up for it, even should its manifest fail
            self._close(job_id)
        return complete

    def shard_failed(self, job_id: str, shard: int, error: str) -> None:
        job, done, failed = (k.format(job_id=job_id) for k in (keys.REDIS_JOB, keys.REDIS_JOB_DONE,
                                                                keys.REDIS_JOB_FAILED))
        self._shard_failed(keys=[job, done, failed], args=[shard, error[:2000]])
        if self._settled(job_id):  # failed for good: no worker needs to stay up for it
            self._close(job_id)
            self._expire(job_id)

    def _complete(self, job_id: str) -> bool:
        shards = self._planned_shards(job_id)
        return shards is not None and self.redis.hlen(keys.REDIS_JOB_DONE.format(job_id=job_id)) >= shards

    def _planned_shards(self, job_id: str) -> int | None:
        """How many shards the job queued; None while it is being planned (set when planning is closed)."""
        shards = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "shards")
        return int(shards) if shards is not None else None

    def jobs(self) -> list[tuple[float, JobSpec]]:
        """Every job Redis knows (a finished one until its keys expire), newest first, with when it was (last)
        submitted: for `status` without a job. One SCAN of the keyspace, then a read per job."""
        prefix = keys.REDIS_JOB.format(job_id="")
        found = []
        for key in self.redis.scan_iter(match=f"{prefix}*", count=PAGE, _type="HASH"):
            if ":" in key.removeprefix(prefix):  # the job's other hashes: done, failed, units, ...
                continue
            spec, started = self.redis.hmget(key, "spec", "started")
            if spec:
                found.append((float(started or 0), JobSpec.model_validate_json(spec)))
        return sorted(found, key=lambda job: job[0], reverse=True)

    def cancelled_jobs(self) -> list[CancelledJob]:
        """Every job `cancel` kept a record of, the last cancelled first."""
        prefix = keys.REDIS_JOB_CANCELLED.format(job_id="")
        found = [self.cancelled(key.removeprefix(prefix)) for key in self.redis.scan_iter(match=f"{prefix}*",
                                                                                          count=PAGE)]
        return sorted((job for job in found if job is not None), key=lambda job: job.cancelled, reverse=True)

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "spec")
        return JobSpec.model_validate_json(raw) if raw else None

    def results(self, job_id: str) -> Iterator[ShardResult]:
        """Every written shard's result, a page of Redis at a time (HSCAN), in no order."""
        for _, value in self.redis.hscan_iter(keys.REDIS_JOB_DONE.format(job_id=job_id), count=PAGE):
            yield ShardResult.model_validate_json(value)

    def finalize(self, job_id: str, keep_planner: bool = True) -> dict | None:
        """Write the manifest of a complete job, streamed from Redis, and delete the shards' inputs (every shard is
        written: none will be read again). Idempotent: planners and the producer may both call it."""
        spec = self.spec(job_id)
        if spec is None or not self._complete(job_id):
            return None
        store = open_store(spec.out)
        # A planner writing it is listed meanwhile (minutes at 10^9 rows: a shard a row, every input deleted): the plan
        # queue is empty by then, and KEDA would otherwise scale it away mid-way. One entry a writer; a writer that
        # fails takes its own off, one that succeeds every one (the job is done: no other writer is needed, and a
        # killed writer's entry would keep a pod up). `submit --wait` is not a pod to keep.
        if keep_planner:
            self.redis.rpush(keys.REDIS_PLANNING_JOBS, job_id)
        try:
            manifest = write_manifest(store, spec, self.totals(job_id), deleting_inputs(store, self.results(job_id)),
                                      reused_files(store))
            with self.redis.pipeline() as pipe:
                pipe.hset(keys.REDIS_JOB.format(job_id=job_id), "state", "done")
                pipe.hdel(keys.REDIS_JOB.format(job_id=job_id), "manifest_due").execute()
            self._close(job_id)
            self._expire(job_id)
        except BaseException:
            if keep_planner:
                self.redis.lrem(keys.REDIS_PLANNING_JOBS, 1, job_id)
            raise
        self._needs_no_planner(job_id)
        return manifest

    def _expire(self, job_id: str) -> None:
        """A finished job's keys go after the retention: status answers until then, and a job resubmitted in the
        meantime keeps them (start() persists them)."""
        with self.redis.pipeline() as pipe:
            for key in self._keys(job_id):
                pipe.expire(key, int(self.retention_s))
            pipe.execute()

    def await_writes(self, cap_s: float) -> None:
        """Until Redis takes a write again (at most `cap_s`): handing a message back is one Redis transaction, which a
        Redis refusing writes (out of memory under noeviction) refuses whole. The message would then come back only
        after the visibility timeout, and the prefetch slot it held would stay taken."""
        deadline, delay = time.monotonic() + cap_s, 0.5
        while True:
            try:
                self.redis.set(f"bulkembed:write-probe:{os.getpid()}", 1, ex=60)
                return
            except REDIS_FAILED:
                if time.monotonic() + delay > deadline:
                    return
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def report_engines(self, queue: str, worker: str, engines: int, sha256: str = "",
                       ttl_s: float = ENGINES_TTL_S) -> None:
        """A worker's engines serve `queue` with the model of `sha256` for the next `ttl_s` (it reports again before
        then while it runs)."""
        self.redis.hset(keys.REDIS_QUEUE_ENGINES.format(queue=queue), worker,
                        f"{engines} {time.time() + ttl_s:.0f} {sha256}".rstrip())

    def withdraw_engines(self, queue: str, worker: str) -> None:
        """A worker that stops: its engines no longer serve `queue` (without it, the report lapses after its ttl)."""
        self.redis.hdel(keys.REDIS_QUEUE_ENGINES.format(queue=queue), worker)

    def _serving(self, queue: str) -> list[tuple[int, str]]:
        """(engines, model sha256) of each worker on `queue` that reported lately; those silent past their time are
        dropped. An older worker reports no sha256 ("")."""
        key = keys.REDIS_QUEUE_ENGINES.format(queue=queue)
        serving, now = [], time.time()
        for worker, value in self.redis.hgetall(key).items():
            count, until, *sha = value.split()
            if float(until) < now:
                self.redis.hdel(key, worker)
            else:
                serving.append((int(count), sha[0] if sha else ""))
        return serving

    def engines_serving(self, queue: str) -> int:
        """Engines of the workers on `queue` that reported lately."""
        return sum(count for count, _ in self._serving(queue))

    def model_served(self, queue: str, sha256: str) -> bool:
        """Whether a worker on `queue` reported lately that it embeds with the model of `sha256`."""
        return any(sha == sha256 for _, sha in self._serving(queue))

    def queue_length(self, queue: str) -> int:
        """Shards waiting on a model's Celery queue (kombu keeps a queue as a Redis list of its name)."""
        return int(self.redis.llen(queue))

    def open_jobs(self, queue: str) -> list[str]:
        """Jobs on this queue with unfinished shards (what KEDA counts to keep a worker up)."""
        return self.redis.lrange(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=queue), 0, -1)

    def open(self, job: JobSpec) -> None:
        """The job's units are sent: listed for KEDA, which keeps a worker up while any job is (one may have to
        restore an orphaned shard), until its last shard is written or failed for good. Not before: a submit that
        dies before (in the duplicate-id pass, minutes at 10^9 rows, or while it sends the units) would keep a GPU
        pod up for a job that cannot finish. Not for a job that has failed or whose shards are all settled."""
        self._open(keys=[keys.REDIS_JOB.format(job_id=job.job_id), keys.REDIS_JOB_DONE.format(job_id=job.job_id),
                         keys.REDIS_QUEUE_OPEN_JOBS.format(queue=job.model.queue)], args=[job.job_id])

    def _close(self, job_id: str, spec: JobSpec | None = None) -> None:
        """The job off its queue's KEDA list (`spec`: read before its keys were deleted)."""
        spec = spec or self.spec(job_id)
        if spec is not None:
            self.redis.lrem(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=spec.model.queue), 0, job_id)

    def _settled(self, job_id: str) -> bool:
        """Every shard of a fully queued job is written or failed for good."""
        shards = self._planned_shards(job_id)
        if shards is None:
            return False
        failed_only = self.redis.hget(keys.REDIS_JOB.format(job_id=job_id), "failed_only")
        return self.redis.hlen(keys.REDIS_JOB_DONE.format(job_id=job_id)) + int(failed_only or 0) >= shards

    def status(self, job_id: str) -> JobStatus | None:
        """Five Redis commands in one round trip whatever the job's size: the job's state and counters, the number of
        written shards, of failed shards and of planned units, the first page of the failures."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.REDIS_JOB.format(job_id=job_id), [*STATUS_FIELDS, *PLAN_FIELDS, *REUSED_FIELDS])
            pipe.hlen(keys.REDIS_JOB_DONE.format(job_id=job_id))
            pipe.hlen(keys.REDIS_JOB_FAILED.format(job_id=job_id))
            pipe.hlen(keys.REDIS_JOB_UNITS.format(job_id=job_id))
            pipe.hscan(keys.REDIS_JOB_FAILED.format(job_id=job_id), 0, count=FAILURES_PAGE)
            values, shards_done, failed, units_planned, (_, page) = pipe.execute()
        state, shards, units, error, *counters = values[:len(STATUS_FIELDS)]
        if state is None:
            return None
        rows_done, tokens_done, failed_only, rejected_done = (int(c or 0) for c in counters)
        planned = _totals(values[len(STATUS_FIELDS):])
        totals = planned if shards is not None else None
        if totals is not None and state == "running":
            if failed and shards_done + failed_only >= totals.shards:
                state = "failed"  # settled, some for good: also a last shard written whose manifest could not be
            elif shards_done >= totals.shards:
                # Done once the manifest is written (finalize); until then a waiter reading it would not find it.
                state = "finishing"
        failures = dict(sorted((int(k), v) for k, v in page.items())[:FAILURES_PAGE])
        return JobStatus(job_id=job_id, state=state, error=error, totals=totals, planned=planned, units=int(units or 0),
                         units_planned=units_planned, shards_done=shards_done, tokens_done=tokens_done,
                         rows_done=rows_done, rejected_done=rejected_done, failed=failed, failures=failures)

    def failures(self, job_id: str) -> Iterator[tuple[int, str]]:
        """Every failed shard and its error, a page at a time (HSCAN): for `status --failures`."""
        for shard, error in self.redis.hscan_iter(keys.REDIS_JOB_FAILED.format(job_id=job_id), count=PAGE):
            yield int(shard), error


def deleting_inputs(store: Store, results: Iterable[ShardResult]) -> Iterator[ShardResult]:
    """`results`, deleting the input of each shard as the manifest streams them, a thousand keys a request and
    REQUESTS_AT_ONCE requests at once (at_once: a few more batches wait, no more): once a job is done no shard's input
    will be read again (a resubmission finds every shard written; a 10^9-row job's inputs take ~7,600 requests,
    minutes one by one). A delete that failed for now raises (the manifest is written again); one the store refuses
    for good (no delete permission) stops the deleting, said, and not the manifest: the inputs are copies, the
    vectors are whole."""
    refused: list[StoreRefused] = []
    passed: deque[ShardResult] = deque()

    def delete(batch: list[str]) -> None:
        if refused:  # refused once, refused again: no more requests
            return
        try:
            store.delete_many(batch)
        except StoreRefused as exc:
            refused.append(exc)

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for result in results:
            passed.append(result)
            batch.append(keys.shard_input(result.shard))
            if len(batch) == S3_DELETE_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    for _ in at_once(delete, batches()):
        while passed:
            yield passed.popleft()
    if refused:
        log.warning("the store refused to delete the shards' inputs (%s): they stay under %s; delete them by hand",
                    refused[0], keys.SHARD_INPUT_KEY.split("/")[0] + "/")


STATUS_FIELDS = ("state", "shards", "units", "error", "rows_done", "tokens_done", "failed_only", "rejected_done")


def _totals(values: list[str | None]) -> JobTotals:
    """JobTotals from the values of PLAN_FIELDS then REUSED_FIELDS."""
    names = [f.removeprefix(PLANNED) for f in PLAN_FIELDS] + list(REUSED_FIELDS)
    return JobTotals(**{name: int(v or 0) for name, v in zip(names, values, strict=True)})


def wait_for_redis(url: str, wait_s: float, every_s: float = 2.0) -> None:
    """Until Redis answers or `wait_s` passes (it may start after this process); wrong credentials fail at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _check_redis(url)
        except BulkEmbedError as exc:
            left = deadline - time.monotonic()
            if isinstance(exc.__cause__, redis.AuthenticationError) or left <= 0:
                raise BulkEmbedError(f"{exc} (waited {wait_s:.0f}s: BULKEMBED_REDIS_WAIT_S)") from exc.__cause__
            log.warning("%s; trying again for %.0fs more", exc, left)
            time.sleep(min(every_s, left))


def _check_redis(url: str) -> None:
    """One try, no retries: a wrong password or address is a clear error, not a long wait. The
    message names the host, never the URL (it may hold the password)."""
    where = f"{urlparse(url).hostname}:{urlparse(url).port or 6379}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=10).ping()
    except redis.AuthenticationError as exc:
        raise BulkEmbedError(f"Redis at {where} refused the credentials in BULKEMBED_REDIS_URL") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BulkEmbedError(f"cannot reach Redis at {where} ({type(exc).__name__}); check BULKEMBED_REDIS_URL") \
            from exc
