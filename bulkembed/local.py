"""Embedded mode: the same producer and worker code on one machine, no Redis: shards go to N engine processes.

This process reads each shard's input and writes its output (worker.shard) while the engines embed: it opens
the next shard as soon as an engine is free for it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bulkembed.contract.job import ShardMessage
from bulkembed.contract.manifest import write_manifest
from bulkembed.contract.registry import ShardResult, deleting_inputs
from bulkembed.contract.store import Store
from bulkembed.producer.submit import PlannedJob, claim_out, produce
from bulkembed.worker.engines import EnginePool, EngineSetup
from bulkembed.worker.shard import OpenShard, open_shard, write_shard

log = logging.getLogger(__name__)


def embed_shards(pool: EnginePool, messages: list[ShardMessage], store: Store) -> Iterator[ShardResult]:
    """Every shard through the engines, read and written here; results as they finish."""
    opened: dict[int, OpenShard] = {}
    written_before: list[ShardResult] = []

    def rows():
        for number, message in enumerate(messages):
            shard = open_shard(message, message.job.model.sha256, store)
            if isinstance(shard, ShardResult):
                written_before.append(shard)
                continue
            opened[number] = shard
            yield number, shard.rows

    for number, embedded in pool.embed(rows()):
        yield write_shard(opened.pop(number), embedded, store)
    yield from written_before


def run_local(planned: PlannedJob, model_path: str, setup: EngineSetup, progress: bool = True,
              force: bool = False) -> dict:
    """Plan every shard first (so the progress bar knows the total), then embed them in the engines.
    Shards written by an earlier, interrupted run of the same job are kept, unless `force`; another job's output in
    OUT is refused, unless `force` deletes it."""
    claim_out(planned, force)
    messages: list[ShardMessage] = []
    results: list[ShardResult] = []
    totals, reused = produce(planned, messages.append, results.append)
    if not messages:  # every row was written before or reused: no engine to start
        return write_manifest(planned.store, planned.job, totals, deleting_inputs(planned.store, results), reused)
    # Longest shards first: with several engines, the last one to finish is then a short one.
    messages.sort(key=lambda m: m.n_tokens, reverse=True)
    with EnginePool(model_path, planned.job.model.sha256, setup) as pool:
        plan = pool.start(self_test=False)
        log.info("job %s: %d shards on %d engine(s), ubatch %d", planned.job.job_id, len(messages), plan.engines,
                 plan.options.ubatch)
        started, embedded = time.perf_counter(), 0
        with tqdm(total=totals.tokens, initial=sum(r.tokens for r in results), unit="tok", unit_scale=True,
                  disable=not progress, desc=f"job {planned.job.job_id}") as bar, logging_redirect_tqdm():
            if totals.reused_rows:
                bar.set_postfix(reused_rows=totals.reused_rows)  # copied from PREV_OUT, not embedded
            for result in embed_shards(pool, messages, planned.store):
                results.append(result)
                embedded += result.tokens if result.seconds else 0
                bar.update(result.tokens)
        seconds = time.perf_counter() - started
        log.info("job %s: %d tokens embedded in %.1fs on %d engine(s): %.0f tok/s", planned.job.job_id, embedded,
                 seconds, plan.engines, embedded / max(seconds, 1e-9))
    return write_manifest(planned.store, planned.job, totals, deleting_inputs(planned.store, results), reused)
