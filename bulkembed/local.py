"""Embedded mode: the same producer and worker code in one process, no Redis."""

from __future__ import annotations

import logging

from tqdm import tqdm

from bulkembed.contract.job import ShardMessage
from bulkembed.contract.registry import ShardResult, write_manifest
from bulkembed.producer.submit import PlannedJob, forget_outputs, produce
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.shard import embed_shard

log = logging.getLogger(__name__)


def run_local(planned: PlannedJob, model_path: str, options: EngineOptions, progress: bool = True,
              force: bool = False) -> dict:
    """Plan every shard first (so the progress bar knows the total), then embed them in order.
    Shards written by an earlier, interrupted run of the same job are kept, unless `force`."""
    if force:
        forget_outputs(planned.store)
    messages: list[ShardMessage] = []
    results: list[ShardResult] = []
    totals = produce(planned, messages.append, results.append)
    engine = Engine(model_path, options)
    try:
        with tqdm(total=totals.tokens, initial=sum(r.tokens for r in results), unit="tok", unit_scale=True,
                  disable=not progress, desc=f"job {planned.job.job_id}") as bar:
            for message in messages:
                result = embed_shard(message, engine, planned.job.model.sha256, planned.store)
                results.append(result)
                bar.update(result.tokens)
    finally:
        engine.close()
    return write_manifest(planned.store, planned.job, totals, results)
