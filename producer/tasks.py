"""`bulkembed planner`: Celery workers on the plan queue (CPU only) that plan a job's units and write its manifest.

Planners are a pool of their own rather than a CPU pool inside the GPU workers: planning is tokenizing and S3 writes,
it scales with cores, not GPUs, and a GPU worker's pool processes are one per engine and must stay free for shards.
A planner needs the model file for its vocabulary (as `submit` does), Redis and the store; nothing of the corpus but
the unit named in its task.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Task
from celery.exceptions import Reject, Retry
from celery.signals import worker_shutting_down

from bulkembed.contract.errors import JobGone, TransientError
from bulkembed.contract.job import JobSpec
from bulkembed.contract.model import resolve_path
from bulkembed.contract.queue import PLAN_QUEUE, TASK_FINALIZE_JOB, TASK_PLAN_UNIT, celery_app, run_worker, shard_sender
from bulkembed.contract.registry import REDIS_FAILED, JobRegistry
from bulkembed.contract.settings import ProducerSettings
from bulkembed.contract.store import backoff_s, is_transient
from bulkembed.contract.vocab import TokenCounter
from bulkembed.producer.corpus import Unit
from bulkembed.producer.submit import PlanContext, plan_claimed

log = logging.getLogger(__name__)

settings = ProducerSettings()
app = celery_app(settings, "bulkembed-planner")
# No hard time limit (the workers' BULKEMBED_TASK_TIME_LIMIT is for one shard): a unit waits on back-pressure as long
# as the fleet takes to embed its shards, and a big job's manifest takes minutes. A planner that stalls loses its
# unit's hold after BULKEMBED_PLAN_LOCK_S, and another takes the unit; one that dies has its task come back after
# the visibility timeout (acknowledged late), at once where only its pool process died. A unit planned for longer than
# BULKEMBED_VISIBILITY_TIMEOUT is delivered to a second planner too, which finds it held and looks again every
# LOCKED_RETRY_S until it is planned: churn, never a shard queued twice.
app.conf.task_time_limit = None
LOCKED_RETRY_S = 15  # a unit another planner holds: look again (it is planned by then, or its lock has lapsed)
FINALIZE_RETRIES = 40  # the store failing a manifest, with backoff up to BACKOFF_MAX_S: 35 to 70 minutes
BACKOFF_MAX_S = 120  # the longest wait before a planner task's next try after the store failed


def _stop_marker(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"bulkembed-planner-{pid}.stopping"


@worker_shutting_down.connect
def _stopping(**_: object) -> None:
    """In the planner's main process, on SIGTERM (a scale-down): tell its pool processes, which Celery would otherwise
    leave to finish their units, however long back-pressure holds them."""
    _stop_marker(os.getpid()).touch()


def planner_stopping() -> bool:
    """In a pool process: is its planner shutting down?"""
    return _stop_marker(os.getppid()).exists()


class PlannerTask(Task):
    """Keeps, per pool process, a Redis connection, the token counter of the last model and the last job's context
    (a planner takes many units of the same job in a row)."""

    _counter: tuple[str, TokenCounter] | None = None
    _context: PlanContext | None = None

    @property
    def registry(self) -> JobRegistry:
        return JobRegistry.of_process(settings)

    def context(self, job: JobSpec) -> PlanContext:
        if PlannerTask._context is None or PlannerTask._context.job != job:
            PlannerTask._context = PlanContext.open(job, self.counter(job))
        return PlannerTask._context

    def counter(self, job: JobSpec) -> TokenCounter:
        if PlannerTask._counter is None or PlannerTask._counter[0] != job.model.sha256:
            if PlannerTask._counter is not None:
                PlannerTask._counter[1].close()
            PlannerTask._counter = (job.model.sha256, TokenCounter(resolve_path(job.model.spec)))
        return PlannerTask._counter[1]


@app.task(name=TASK_PLAN_UNIT, base=PlannerTask, bind=True, max_retries=None)
def plan_unit_task(self: PlannerTask, job_id: str, unit: list) -> None:
    """Plan one unit (Unit.wire). Acknowledged late: a planner killed mid-unit hands it back; the
    next planner skips the shards already queued. The store failing past its client's retries (boto3's, or pyarrow's
    for the input) is retried with backoff; Redis failing hands the unit back (_handing_back); any other error fails
    the job with its reason (planning it again would fail again)."""
    with _handing_back(self, f"job {job_id} unit {unit[0]}"):
        try:
            _plan(self, job_id, Unit.of_wire(unit))
        except (Retry, Reject, *REDIS_FAILED):  # Reject: a retry (a unit held elsewhere) that could not be queued
            raise
        except JobGone as exc:  # forgotten mid-unit by submit --force: nothing to plan, nothing to record
            log.warning("%s", exc)
        except Exception as exc:
            if not is_transient(exc):
                log.exception("job %s unit %s could not be planned", job_id, unit[0])
                self.registry.planning_failed(job_id, unit[0], f"{type(exc).__name__}: {exc}")
                return
            delay = backoff_s(self.request.retries, BACKOFF_MAX_S)
            log.warning("job %s unit %s: the store failed (%s: %s); retry %d in %.1fs", job_id, unit[0],
                        type(exc).__name__, exc, self.request.retries + 1, delay)
            raise self.retry(exc=exc, countdown=delay) from exc


@contextmanager
def _handing_back(self: PlannerTask, what: str) -> Iterator[None]:
    """Redis failing (a restart, a failover, writes refused at maxmemory), or a retry that could not be queued (Celery
    then raises Reject without requeue): neither done nor failed, the message goes back to the plan queue (Celery's
    Reject with requeue, one Redis transaction) once Redis takes writes again."""
    try:
        yield
    except REDIS_FAILED as exc:
        why = f"Redis failed ({type(exc).__name__}: {exc})"
    except Reject as dropped:
        if dropped.requeue:
            raise
        why = f"its retry could not be queued ({dropped.reason})"
    else:
        return
    log.error("%s: %s; handed back to the plan queue once Redis takes writes", what, why)
    self.registry.await_writes(settings.redis_wait_s)
    raise Reject(why, requeue=True)


def _plan(self: PlannerTask, job_id: str, unit: Unit) -> None:
    job = self.registry.spec(job_id)
    if job is None:  # forgotten by --force, or expired: a unit task left over from it has nothing to plan
        log.warning("job %s is not in Redis: unit %d not planned", job_id, unit.index)
        return
    if not plan_claimed(self.registry, job, lambda: self.context(job), unit, shard_sender(app), settings,
                        planner_stopping):
        # Back on the plan queue: at once for another planner where this one stops, later where a planner holds it.
        raise self.retry(countdown=0 if planner_stopping() else LOCKED_RETRY_S)


@app.task(name=TASK_FINALIZE_JOB, base=PlannerTask, bind=True, max_retries=FINALIZE_RETRIES)
def finalize_job_task(self: PlannerTask, job_id: str) -> None:
    """Write a complete job's manifest, streamed from Redis (idempotent: sent again, it writes the same). The store
    failing is retried with backoff; past the retries the job stays `finishing`, and submitting it again writes the
    manifest. Redis failing hands the task back (_handing_back)."""
    with _handing_back(self, f"job {job_id}: its manifest"):
        try:
            self.registry.finalize(job_id)
        except TransientError as exc:
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries, BACKOFF_MAX_S)) from exc


def serve(concurrency: int) -> int:
    _stop_marker(os.getpid()).unlink(missing_ok=True)  # a dead planner's of the same pid
    try:
        return _serve(concurrency)
    finally:
        _stop_marker(os.getpid()).unlink(missing_ok=True)


def _serve(concurrency: int) -> int:
    return run_worker(app, ["worker", "--queues", PLAN_QUEUE, "--concurrency", str(concurrency), "--pool", "prefork",
                            "--loglevel", settings.log_level, "--without-gossip", "--without-mingle"])
