"""`bulkembed worker`: decide the engines, then run them as Celery's prefork pool, one engine per pool process.

The self-test and the ubatch probe run first, in engines (llama processes, worker.engines) that are gone before
Celery forks: this process never starts llama.cpp or CUDA. Each pool process then starts its own engine
(worker.app) and takes one shard at a time, acknowledged late; Celery's pool is the supervisor: an engine killed
mid-shard (its pool process or its llama process) hands its shard back (reject on worker lost) and is replaced,
and SIGTERM drains every engine. Their metrics meet in one directory and one endpoint (Prometheus multiprocess).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bulkembed.contract.job import ModelRef
from bulkembed.contract.llama_process import LlamaProcessDied
from bulkembed.contract.queue import run_worker
from bulkembed.contract.settings import WorkerSettings
from bulkembed.worker.engines import EnginePool, EngineSetup
from bulkembed.worker.selftest import SelfTestError

log = logging.getLogger(__name__)


def _report_engines(settings: WorkerSettings, queue: str, worker: str, engines: int, sha256: str) -> Callable[[], None]:
    """Tell planners, while this worker lives, how many engines serve its queue: they let the queue grow to a few
    shards an engine (back-pressure), not to the whole corpus; and workers of another model (same file name) which
    model serves it. A thread of this (parent) process; Redis hiccups are ridden out (the report lapses after
    ENGINES_TTL_S, then planners assume fewer engines). Returns what withdraws the report, for a worker that stops."""
    from bulkembed.contract.registry import ENGINES_TTL_S, JobRegistry

    registry = JobRegistry.from_url(settings.redis_url.get_secret_value(), check=False)

    def run() -> None:
        while True:
            try:
                registry.report_engines(queue, worker, engines, sha256)
            except Exception as exc:  # noqa: BLE001 - a report missed is a smaller queue allowed, nothing more
                log.warning("could not report engines to Redis: %s", exc)
            time.sleep(ENGINES_TTL_S / 3)

    threading.Thread(target=run, name="report-engines", daemon=True).start()

    def withdraw() -> None:
        try:
            registry.withdraw_engines(queue, worker)
        except Exception as exc:  # noqa: BLE001 - it lapses after ENGINES_TTL_S anyway
            log.warning("could not withdraw this worker's engines from Redis: %s", exc)

    return withdraw


def serve(ref: ModelRef, path: Path, setup: EngineSetup, settings: WorkerSettings) -> int:
    with EnginePool(path, ref.sha256, setup) as pool:
        try:
            plan = pool.start(self_test=True)
        except (SelfTestError, LlamaProcessDied) as exc:  # a build that cannot embed here: say why, once
            log.critical("%s; refusing to start", exc)
            return 3
    engines = plan.engines
    log.info("self-test passed: packed == alone (worst cosine %.7f)", plan.self_test_cosine)
    log.info("worker for %s (sha256 %s…) on queue %s: %d engine(s), ubatch %d, %d thread(s) each", ref.file_name,
             ref.sha256[:12], ref.queue, engines, plan.options.ubatch, plan.options.threads)

    # Every engine writes its samples here; the parent serves their sum. Set before prometheus_client loads.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bulkembed-metrics-")
    from bulkembed.worker import app as worker_app
    from bulkembed.worker import metrics

    metrics.serve_engines(settings.metrics_port)
    metrics.worker_started(ref.file_name, engines, plan.options.ubatch, plan.lm_head_skipped)
    worker_app.MODEL = worker_app.ResidentModel(path=path, sha256=ref.sha256, options=plan.options)
    hostname = f"bulkembed-{os.getpid()}@{socket.gethostname()}"
    withdraw = _report_engines(settings, ref.queue, hostname, engines, ref.sha256)
    try:
        return run_worker(worker_app.app, [
            "worker", "--queues", ref.queue, "--concurrency", str(engines), "--pool", "prefork",
            "--hostname", hostname,
            "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
        ])
    finally:
        withdraw()
