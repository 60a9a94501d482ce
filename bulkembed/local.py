"""Embedded mode: the same producer and worker code on one machine, no Redis: shards go to N engine processes."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from bulkembed.contract.job import ShardMessage
from bulkembed.contract.registry import ShardResult, write_manifest
from bulkembed.contract.store import open_store
from bulkembed.producer.submit import PlannedJob, forget_outputs, produce
from bulkembed.worker.engines import EnginePool, EngineSetup, engine
from bulkembed.worker.shard import embed_shard

log = logging.getLogger(__name__)


def _embed(message: ShardMessage) -> ShardResult:
    """In an engine process: one shard, read from and written to the job's store like a worker does."""
    return embed_shard(message, engine(), message.job.model.sha256, open_store(message.job.out))


def run_local(planned: PlannedJob, model_path: str, setup: EngineSetup, progress: bool = True,
              force: bool = False) -> dict:
    """Plan every shard first (so the progress bar knows the total), then embed them in the engines.
    Shards written by an earlier, interrupted run of the same job are kept, unless `force`."""
    if force:
        forget_outputs(planned.store)
    messages: list[ShardMessage] = []
    results: list[ShardResult] = []
    totals = produce(planned, messages.append, results.append)
    if not messages:  # every row was written before or reused: no engine to start
        return write_manifest(planned.store, planned.job, totals, results)
    # Longest shards first: with several engines, the last one to finish is then a short one.
    messages.sort(key=lambda m: m.n_tokens, reverse=True)
    with EnginePool(model_path, planned.job.model.sha256, setup) as pool:
        plan = pool.start(self_test=False)
        log.info("job %s: %d shards on %d engine(s), ubatch %d", planned.job.job_id, len(messages), plan.engines,
                 plan.options.ubatch)
        started, embedded = time.perf_counter(), 0
        with tqdm(total=totals.tokens, initial=sum(r.tokens for r in results), unit="tok", unit_scale=True,
                  disable=not progress, desc=f"job {planned.job.job_id}") as bar:
            if totals.reused:
                bar.set_postfix(reused_rows=totals.reused_rows)  # copied from PREV_OUT, not embedded
            for result in pool.imap(_embed, messages):
                results.append(result)
                embedded += result.tokens if result.seconds else 0
                bar.update(result.tokens)
        seconds = time.perf_counter() - started
        log.info("job %s: %d tokens embedded in %.1fs on %d engine(s): %.0f tok/s", planned.job.job_id, embedded,
                 seconds, plan.engines, embedded / max(seconds, 1e-9))
    return write_manifest(planned.store, planned.job, totals, results)
