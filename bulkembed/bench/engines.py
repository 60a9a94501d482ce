"""bulkembed in N engine processes side by side (worker.engines), on the same shards as the in-process mode."""

from __future__ import annotations

import time

from bulkembed.bench.inprocess import Corpus, embed_texts, plan_shards
from bulkembed.bench.meter import Meter, Result
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.engines import EnginePool, EngineSetup, engine


def _embed_shard(texts: list[str]) -> int:
    """In an engine process: the in-process mode's work on one shard."""
    return embed_texts(engine(), texts)


def run_engines(model: str, corpus: Corpus, options: EngineOptions, engines: int, ubatch: int | str,
                shard_tokens: int) -> tuple[Result, int]:
    """(result, the ubatch the engines used). Wall time runs from the first shard handed out to the last done;
    the meter's CPU and memory columns are this (parent) process's, the engines' own are not in them."""
    shards = [[corpus.texts[d.id] for d in shard] for shard in plan_shards(corpus, shard_tokens)]
    shards.sort(key=lambda s: -sum(len(t) for t in s))  # longest first: the last to finish is a short one
    setup = EngineSetup(options, engines=engines, ubatch=ubatch)
    with EnginePool(model, "bench", setup) as pool:
        plan = pool.start(self_test=False)
        pool.call_all(_embed_shard, corpus.texts[:8])  # first decodes page the weights in
        started = time.perf_counter()
        with Meter() as meter:
            tokens = sum(pool.imap(_embed_shard, shards))
        meter.seconds = time.perf_counter() - started
    note = f"{engines} engine processes, {len(shards)} shards, ubatch {plan.options.ubatch}, " \
           f"{plan.options.threads} thread(s) each"
    return Result.of(f"bulkembed x{engines}", len(corpus.texts), tokens, meter, note), plan.options.ubatch
