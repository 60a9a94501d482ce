"""The Celery side of the worker: the app, the engine each pool process keeps, and the shard task.

`bulkembed worker` (worker.serve) sets MODEL before Celery forks its pool; each pool process starts one engine
(a llama process with the model resident, worker.engines.EngineProcess) when it starts, and keeps it for every
shard it takes: the pool process reads and writes the shards, its engine embeds them. An engine that dies
takes its pool process with it, so Celery hands the shard back and replaces both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown

from bulkembed.contract import keys
from bulkembed.contract.errors import JobGone, TransientError
from bulkembed.contract.job import JobSpec, ShardMessage
from bulkembed.contract.llama_process import LlamaProcessDied
from bulkembed.contract.queue import PLAN_QUEUE, TASK_EMBED_SHARD, TASK_FINALIZE_JOB, celery_app
from bulkembed.contract.registry import REDIS_FAILED, JobRegistry
from bulkembed.contract.settings import WorkerSettings
from bulkembed.contract.store import LockedWrites, Store, backoff_s, has_conditional_writes, open_store
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
# A shard whose bookkeeping cannot be written (REDIS_FAILED) is handed back, never acknowledged as if it had run.
GIVE_BACK_MAX_S = 60.0
_given_back = 0  # shards this pool process handed back in a row (its backoff)


@worker_process_init.connect
def _start_engine(**_: object) -> None:
    """Each pool process starts its engine when it starts. Celery only logs what a start hook raises: an engine that
    cannot start (the GPU out of memory, a driver error) is started again by the process's first shard, which goes
    back to the queue if it still cannot."""
    try:
        _load_model()
    except Exception as exc:  # noqa: BLE001 - said here, and met again by the first shard
        log.error("pool process %d: the engine did not start: %s: %s", os.getpid(), type(exc).__name__, exc)


def _load_model() -> None:
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
                raise JobGone.of(job_id, "its shard is dropped; resubmitting the job embeds what it lacks")
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

    def committing(self, store: Store, registry: JobRegistry) -> Store:
        """`store`, where it refuses a second if-absent write; where it overwrites, the store with a Redis lock (every
        worker's) around each such write, which looks for the key first."""
        if store.uri not in self._conditional_writes:
            self._conditional_writes[store.uri] = has_conditional_writes(store)
            if not self._conditional_writes[store.uri]:
                log.warning("%s ignores conditional writes: shard commits take a Redis lock", store.uri)
        if self._conditional_writes[store.uri]:
            return store
        return LockedWrites(store, lambda key: registry.redis.lock(
            keys.REDIS_WRITE_LOCK.format(key=f"{store.uri}/{key}"), timeout=300, blocking_timeout=600))


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
        try:
            raise self.retry(exc=exc, countdown=delay, kwargs={"unreachable_since": since}) from exc
        except Reject as dropped:  # Celery drops a message whose retry it could not publish: hand it back instead
            if dropped.requeue:
                raise
            _give_back(f"job {shard.job_id} shard {shard.shard}", f"its retry could not be queued ({dropped.reason})")


def _give_back(what: str, why: str) -> NoReturn:
    """Neither done nor failed: the shard goes back to the end of its queue (Celery's Reject with requeue, one Redis
    transaction; should Redis refuse it, the message stays unacknowledged and returns after the visibility timeout).
    This process waits first, longer each time in a row, so a sick engine or Redis is not asked again at once."""
    global _given_back
    _given_back += 1
    delay = backoff_s(_given_back, GIVE_BACK_MAX_S)
    log.error("%s: %s; handed back to the queue in %.1fs", what, why, delay)
    metrics.shard_handed_back(MODEL.path.name if MODEL else "")
    time.sleep(delay)
    raise Reject(why, requeue=True)


def still_registered(registry: JobRegistry, shard: ShardMessage) -> None:
    """JobGone where the shard's job is no longer in Redis: the OUT of a job forgotten by submit --force is another
    job's now, under the same file names."""
    if not registry.is_registered(shard.job_id):
        raise JobGone.of(shard.job_id, "its OUT may be another job's now")


def registered(registry: JobRegistry, shard: ShardMessage, guard: Guard) -> Guard:
    """`guard`, then a last look that the shard's job is still in Redis, just before its file is written."""
    @contextmanager
    def checked() -> Iterator[None]:
        with guard():
            still_registered(registry, shard)
            yield

    return checked


def outrun_by_force(registry: JobRegistry, store: Store, shard: ShardMessage) -> bool:
    """A message queued before `submit --force` started the same job over (same id, same shard names): --force deleted
    its input with the old output, and its unit, not yet planned again, writes the input and sends the shard anew. A
    planner writes a shard's input before its message, so a message without input otherwise means a loss: failed."""
    unit = shard.shard // keys.SHARDS_PER_UNIT
    return not registry.unit_is_planned(shard.job_id, unit) and not store.exists(shard.input_key)


def _engine_lost(shard: ShardMessage, why: str) -> NoReturn:
    """As if this pool process had died (it is the engine's other half): Celery hands the shard back (reject on
    worker lost) and starts a new pool process with a new engine."""
    log.critical("job %s shard %d: %s; this pool process exits", shard.job_id, shard.shard, why)
    logging.shutdown()
    os._exit(70)


@app.task(name=TASK_EMBED_SHARD, base=ModelTask, bind=True, max_retries=None)
def embed_shard_task(self: ModelTask, message: list | dict, unreachable_since: float | None = None) -> dict | None:
    """Validate → give up if this shard keeps killing workers → embed (skipped if written) → report.
    `unreachable_since`: when the store first failed this shard, on a retry. A shard is acknowledged only once its
    result or its failure is recorded: where Redis or the engine's start fails, it goes back to the queue."""
    global _given_back
    what = f"shard message {str(message)[:80]}"
    try:
        shard = ShardMessage.from_wire(message, self.job_spec)
        what = f"job {shard.job_id} shard {shard.shard}"
        try:
            model = self.model
        except Exception as exc:  # noqa: BLE001 - not the shard's fault: no attempt counted
            _give_back(what, f"the engine cannot start ({type(exc).__name__}: {exc})")
        result = _embed(self, shard, model, unreachable_since)
    except JobGone as exc:  # its OUT may be another job's now: acknowledged, neither written nor recorded
        log.warning("%s: %s; dropped, not written", what, exc)
        return None
    except REDIS_FAILED as exc:
        log.error("%s: Redis failed (%s: %s); waiting for it to take writes", what, type(exc).__name__, exc)
        JobRegistry.of_process(settings).await_writes(settings.task_time_limit / 2)
        _give_back(what, f"Redis failed ({type(exc).__name__}: {exc})")
    _given_back = 0
    return result


def _embed(self: ModelTask, shard: ShardMessage, model: ResidentModel, unreachable_since: float | None) -> dict | None:
    if not model.engine.alive:
        # It died between shards (the OOM killer): this shard is not to blame, so no attempt is counted for it.
        _engine_lost(shard, f"llama.cpp process {model.engine.pid} died before this shard")
    registry = self.registry
    if not registry.is_registered(shard.job_id):  # its spec is cached here: forgotten since, by submit --force
        raise JobGone.of(shard.job_id, "its shard is dropped; resubmitting the job embeds what it lacks")
    if model.sha256 != shard.job.model.sha256:
        # Another file of the same name (a repository updated under a running fleet): a worker of the job's model
        # takes the shard where one serves the queue; where none does, the shard fails, said, rather than going round.
        why = (f"this worker's {model.path.name} (sha256 {model.sha256[:12]}) is not the job's "
               f"({shard.job.model.sha256[:12]})")
        if registry.model_served(shard.job.model.queue, shard.job.model.sha256):
            _give_back(f"job {shard.job_id} shard {shard.shard}", f"{why}; left to a worker of that model")
        log.error("job %s shard %d: %s, and no worker of that model serves the queue", shard.job_id, shard.shard, why)
        registry.shard_failed(shard.job_id, shard.shard, f"{why}, and no worker of that model serves its queue")
        metrics.shard_failed(model.path.name)
        return None
    attempt = registry.attempt(shard.job_id, shard.shard)
    name = model.path.name
    store = open_store(shard.job.out)
    if shard.queued_at and unreachable_since is None:
        metrics.QUEUE_WAIT.labels(name).observe(max(0.0, time.time() - shard.queued_at))
    try:
        # Within the try: its probe of the store (a worker's first shard of a job) rides out an outage as the shard
        # does. Outside it, a TransientError there ended the task unrecorded, its message acknowledged: the shard
        # was lost and the job waited for it for ever.
        store = self.committing(store, registry)
        # A written shard delivered again is found written below, not failed as poison: a duplicate message, or the
        # delivery that wrote it killed before it told Redis (so the store, not only Redis, is asked).
        if (attempt > settings.shard_max_attempts and not registry.is_written(shard.job_id, shard.shard)
                and not store.exists(shard.output_key)):
            error = (f"gave up after {attempt - 1} attempts that ended without a result (the worker process died or "
                     f"hit the {settings.task_time_limit}s limit); the shard may be poison")
            log.error("job %s shard %d: %s", shard.job_id, shard.shard, error)
            registry.shard_failed(shard.job_id, shard.shard, error)
            metrics.shard_failed(name)
            return None
        guard = registered(registry, shard, holding(settings.test_hold_dir, shard, nullcontext))
        result = embed_shard(shard, model.engine.embed_rows, model.sha256, store, guard,
                             lambda: still_registered(registry, shard))
        if registry.shard_done(shard.job_id, result):  # the last shard: a planner writes the manifest, off the GPU
            # Redelivered after this failed, the shard is found written and this is sent again (complete is
            # complete however often it is asked).
            app.send_task(TASK_FINALIZE_JOB, args=[shard.job_id], queue=PLAN_QUEUE, argsrepr=f"job {shard.job_id}")
    except JobGone:
        raise  # the job's, not the shard's: nothing is recorded
    except LlamaProcessDied as exc:
        _engine_lost(shard, str(exc))  # counted as an attempt: this shard may be what killed it
    except TransientError as exc:
        self.retry_later(shard, exc, unreachable_since)
    except REDIS_FAILED:
        with suppress(*REDIS_FAILED):  # not the shard's fault: its attempt is given back where Redis takes it
            registry.release_attempt(shard.job_id, shard.shard)
        raise
    except Exception as exc:
        if outrun_by_force(registry, store, shard):
            log.warning("job %s shard %d: its input is gone and its unit is being planned again (submit --force "
                        "started the job over): dropped, the planner sends it again", shard.job_id, shard.shard)
            registry.release_attempt(shard.job_id, shard.shard)
            return None
        metrics.shard_failed(name)
        registry.shard_failed(shard.job_id, shard.shard, f"{type(exc).__name__}: {exc}")
        raise
    metrics.shard_finished(name, result.tokens, result.rows, result.seconds)
    return result.model_dump()
