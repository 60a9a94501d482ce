"""Embedded mode: the same producer and worker code in one process, no Redis."""

from __future__ import annotations

import logging

from tqdm import tqdm

from contract.job import ShardMessage
from contract.registry import write_manifest
from producer.submit import PlannedJob, produce
from worker.engine import Engine, EngineOptions
from worker.shard import embed_shard

log = logging.getLogger(__name__)


def run_local(planned: PlannedJob, model_path: str, options: EngineOptions, progress: bool = True) -> dict:
    """Plan every shard first (so the progress bar knows the total), then embed them in order."""
    messages: list[ShardMessage] = []
    totals = produce(planned, messages.append)
    engine = Engine(model_path, options)
    results = []
    try:
        with tqdm(total=totals.tokens, unit="tok", unit_scale=True, disable=not progress,
                  desc=f"job {planned.job.job_id}") as bar:
            for message in messages:
                result = embed_shard(message, engine, planned.job.model.sha256, planned.store)
                results.append(result)
                bar.update(result.tokens)
    finally:
        engine.close()
    return write_manifest(planned.store, planned.job, totals, results)
