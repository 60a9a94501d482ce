"""The Celery side of the worker: the app, the model each pool process keeps, and the shard task.

`bulkembed worker` sets MODEL before Celery forks; each pool process loads the engine once, when
it starts, and keeps it for every shard it takes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from celery import Task
from celery.signals import worker_process_init

from contract.errors import TransientError
from contract.job import ShardMessage
from contract.queue import TASK_EMBED_SHARD, celery_app
from contract.registry import JobRegistry
from contract.settings import WorkerSettings
from contract.store import open_store
from worker.engine import Engine, EngineOptions
from worker.shard import embed_shard

log = logging.getLogger(__name__)

settings = WorkerSettings()
app = celery_app(settings, "bulkembed-worker")


@dataclass
class ResidentModel:
    path: Path
    sha256: str
    options: EngineOptions
    engine: Engine | None = None


MODEL: ResidentModel | None = None  # set by `bulkembed worker` before the pool starts


@worker_process_init.connect
def _load_model(**_: object) -> None:
    if MODEL is not None and MODEL.engine is None:
        MODEL.engine = Engine(MODEL.path, MODEL.options)
        log.info("pool process %d ready with %s", os.getpid(), MODEL.path.name)


class ModelTask(Task):
    """Base of tasks that need the resident model."""

    @property
    def model(self) -> ResidentModel:
        if MODEL is None:
            raise RuntimeError("this process has no model: start it with `bulkembed worker --model ...`")
        if MODEL.engine is None:
            _load_model()
        return MODEL


@app.task(name=TASK_EMBED_SHARD, base=ModelTask, bind=True, autoretry_for=(TransientError,),
          retry_backoff=True, retry_backoff_max=120, max_retries=8)
def embed_shard_task(self: ModelTask, message: dict) -> dict:
    shard = ShardMessage.model_validate(message)
    registry = JobRegistry.from_url(settings.redis_url.get_secret_value())
    store = open_store(shard.job.out)
    model = self.model
    try:
        result = embed_shard(shard, model.engine, model.sha256, store)
    except TransientError:
        raise
    except Exception as exc:
        registry.shard_failed(shard.job_id, shard.shard, f"{type(exc).__name__}: {exc}")
        raise
    if registry.shard_done(shard.job_id, result):
        registry.finalize(shard.job_id)
    return result.model_dump()

