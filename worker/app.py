"""The Celery side of the worker: the app, the engine each pool process keeps, and the shard task.

`bulkembed worker` (worker.serve) sets MODEL before Celery forks its pool; each pool process starts one engine
(a llama process with the model resident, worker.engines.EngineProcess) when it starts, and keeps it for every
shard it takes: the pool process reads and writes the shards, its engine embeds them. An engine that dies
takes its pool process with it, so Celery hands the shard back and replaces both.
"""

from __future__ import annotations

import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown

from bulkembed.contract import keys
from bulkembed.contract.errors import ShardError, TransientError
from bulkembed.contract.job import JobSpec, ShardMessage
from bulkembed.contract.llama_process import LlamaProcessDied
from bulkembed.contract.queue import PLAN_QUEUE, TASK_EMBED_SHARD, TASK_FINALIZE_JOB, celery_app
from bulkembed.contract.registry import JobRegistry
from bulkembed.contract.settings import WorkerSettings
from bulkembed.contract.store import Store, has_conditional_writes, open_store
from bulkembed.worker import metrics
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.engines import EngineProcess
from bulkembed.worker.hold import hold_engine_start, holding
from bulkembed.worker.shard import Guard, embed_shard

log = logging.getLogger(__name__)

settings = WorkerSettings()
app = celery_app(settings, "bulkembed-worker")


@dataclass
class ResidentModel:
    path: Path
    sha256: str
    options: EngineOptions
    engine: EngineProcess | None = None


MODEL: ResidentModel | None = None  # set by `bulkembed worker` before the pool starts


@worker_process_init.connect
def _load_model(**_: object) -> None:
    """Each pool process starts its engine once, when it starts."""
    if MODEL is not None and MODEL.engine is None:
        hold_engine_start(settings.test_hold_dir)
        MODEL.engine = EngineProcess(MODEL.path, MODEL.options)
        metrics.MODEL_LOAD_SECONDS.labels(MODEL.path.name).set(MODEL.engine.facts.load_seconds)
        log.info("pool process %d ready with %s in engine process %d", os.getpid(), MODEL.path.name,
                 MODEL.engine.pid)


@worker_process_shutdown.connect
def _engine_stopped(pid: int | None = None, **_: object) -> None:
    if MODEL is not None and MODEL.engine is not None:
        MODEL.engine.close()
    metrics.engine_stopped(pid or os.getpid())


class ModelTask(Task):
    """Base of tasks that need the resident model."""

    _conditional_writes: dict[str, bool] = {}

    _specs: dict[str, JobSpec] = {}

    def job_spec(self, job_id: str) -> JobSpec:
        """A job's spec, read from its registry entry once per pool process (messages do not carry it)."""
        if job_id not in self._specs:
            spec = self.registry.spec(job_id)
            if spec is None:
                raise ShardError(f"job {job_id} is not in Redis (forgotten by --force, or expired after "
                                 f"BULKEMBED_JOB_RETENTION_S): its shard cannot be embedded; resubmit the job")
            if len(self._specs) >= 64:  # a long-lived worker sees many jobs: keep the recent ones
                self._specs.pop(next(iter(self._specs)))
            self._specs[job_id] = spec
        return self._specs[job_id]

    @property
    def registry(self) -> JobRegistry:
        return JobRegistry.of_process(settings)

    @property
    def model(self) -> ResidentModel:
        if MODEL is None:
            raise RuntimeError("this process has no model: start it with `bulkembed worker --model ...`")
        if MODEL.engine is None:
            _load_model()
        return MODEL

    def write_guard(self, store: Store, registry: JobRegistry, shard: ShardMessage) -> Guard:
        """No guard where the store refuses a second if-absent write; a Redis lock where it does not."""
        if store.uri not in self._conditional_writes:
            self._conditional_writes[store.uri] = has_conditional_writes(store)
            if not self._conditional_writes[store.uri]:
                log.warning("%s ignores conditional writes: shard commits take a Redis lock", store.uri)
        if self._conditional_writes[store.uri]:
            return nullcontext
        name = keys.REDIS_SHARD_LOCK.format(job_id=shard.job_id, shard=shard.shard)
        return lambda: registry.redis.lock(name, timeout=300, blocking_timeout=600)


    def retry_later(self, shard: ShardMessage, exc: TransientError, unreachable_since: float | None) -> NoReturn:
        """The store failed past boto3's own retries: come back after a jittered backoff, without using
        up an attempt, until it has failed for BULKEMBED_STORE_OUTAGE_S and BULKEMBED_TRANSIENT_RETRIES."""
        since = unreachable_since or time.time()
        failing_s, retries = time.time() - since, self.request.retries
        if retries >= settings.transient_retries and failing_s >= settings.store_outage_s:
            error = f"the store kept failing for {failing_s:.0f}s and {retries} retries: {exc}"
            log.error("job %s shard %d: %s", shard.job_id, shard.shard, error)
            self.registry.shard_failed(shard.job_id, shard.shard, error)
            metrics.shard_failed(MODEL.path.name if MODEL else "")
            raise exc
        self.registry.release_attempt(shard.job_id, shard.shard)
        # Under half the visibility timeout: a message held longer than that would be delivered twice.
        delay = backoff_s(retries, min(settings.store_backoff_max_s, settings.visibility_timeout / 2))
        # Cut, not rounded, to a tenth: a retry at 2.96 s of a 3 s limit must not read as 3.0 s.
        log.warning("job %s shard %d: %s; retry %d in %.1fs (store failing for %.1fs)", shard.job_id, shard.shard,
                    exc, retries + 1, delay, int(failing_s * 10) / 10)
        raise self.retry(exc=exc, countdown=delay, kwargs={"unreachable_since": since}) from exc


def _engine_lost(shard: ShardMessage, why: str) -> NoReturn:
    """As if this pool process had died (it is the engine's other half): Celery hands the shard back (reject on
    worker lost) and starts a new pool process with a new engine."""
    log.critical("job %s shard %d: %s; this pool process exits", shard.job_id, shard.shard, why)
    logging.shutdown()
    os._exit(70)


def backoff_s(retries: int, cap_s: float) -> float:
    """Doubling from 1 s up to `cap_s`, jittered so shards that failed together do not return together."""
    return min(cap_s, 2.0 ** retries) * random.uniform(0.5, 1.0)


@app.task(name=TASK_EMBED_SHARD, base=ModelTask, bind=True, max_retries=None)
def embed_shard_task(self: ModelTask, message: list | dict, unreachable_since: float | None = None) -> dict | None:
    """Validate → give up if this shard keeps killing workers → embed (skipped if written) → report.
    `unreachable_since`: when the store first failed this shard, on a retry."""
    shard = ShardMessage.from_wire(message, self.job_spec)
    if MODEL is not None and MODEL.engine is not None and not MODEL.engine.alive:
        # It died between shards (the OOM killer): this shard is not to blame, so no attempt is counted for it.
        _engine_lost(shard, f"llama.cpp process {MODEL.engine.pid} died before this shard")
    registry = self.registry
    attempt = registry.attempt(shard.job_id, shard.shard)
    if attempt > settings.shard_max_attempts:
        error = (f"gave up after {attempt - 1} attempts that ended without a result (the worker process died or "
                 f"hit the {settings.task_time_limit}s limit); the shard may be poison")
        log.error("job %s shard %d: %s", shard.job_id, shard.shard, error)
        registry.shard_failed(shard.job_id, shard.shard, error)
        metrics.shard_failed(MODEL.path.name if MODEL else "")
        return None
    store = open_store(shard.job.out)
    model = self.model
    name = model.path.name
    if shard.queued_at and unreachable_since is None:
        metrics.QUEUE_WAIT.labels(name).observe(max(0.0, time.time() - shard.queued_at))
    try:
        guard = holding(settings.test_hold_dir, shard, self.write_guard(store, registry, shard))
        result = embed_shard(shard, model.engine.embed_rows, model.sha256, store, guard)
        if registry.shard_done(shard.job_id, result):  # the last shard: a planner writes the manifest, off the GPU
            app.send_task(TASK_FINALIZE_JOB, args=[shard.job_id], queue=PLAN_QUEUE, argsrepr=f"job {shard.job_id}")
    except LlamaProcessDied as exc:
        _engine_lost(shard, str(exc))  # counted as an attempt: this shard may be what killed it
    except TransientError as exc:
        self.retry_later(shard, exc, unreachable_since)
    except Exception as exc:
        metrics.shard_failed(name)
        registry.shard_failed(shard.job_id, shard.shard, f"{type(exc).__name__}: {exc}")
        raise
    metrics.shard_finished(name, result.tokens, result.rows, result.seconds)
    return result.model_dump()
