"""Prometheus metrics of a worker: each engine process writes its own, the worker's parent serves them summed
(prometheus_client's multiprocess mode), so one endpoint covers every engine.

The same events feed Redis's job registry, which `bulkembed status` and `submit --wait` read.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

TOKENS = Counter("bulkembed_tokens_total", "Tokens embedded (rows written, not rejected).", ["model"])
ROWS = Counter("bulkembed_rows_total", "Rows written.", ["model"])
SHARDS = Counter("bulkembed_shards_total", "Shards finished, by outcome.", ["model", "outcome"])
DECODE_SECONDS = Counter("bulkembed_embed_seconds_total", "Seconds spent embedding shards (tokenize, decode, "
                         "pool, write).", ["model"])
TOKENS_PER_SECOND = Gauge("bulkembed_tokens_per_second", "Throughput of each engine's last shard, summed over "
                          "the engines.", ["model"], multiprocess_mode="livesum")
MODEL_LOAD_SECONDS = Gauge("bulkembed_model_load_seconds", "Seconds the resident model took to load (slowest "
                           "engine).", ["model"], multiprocess_mode="max")
ENGINES = Gauge("bulkembed_engines", "Engine processes of this worker.", ["model"], multiprocess_mode="max")
UBATCH = Gauge("bulkembed_ubatch", "The ubatch cap the engines use (pinned, cached or measured at start).",
               ["model"], multiprocess_mode="max")
LM_HEAD_SKIPPED = Gauge("bulkembed_lm_head_skipped", "1 where the engines leave the LM head out of every decode "
                        "(patched llama.cpp), 0 where they compute it.", ["model"], multiprocess_mode="max")
QUEUE_WAIT = Histogram("bulkembed_queue_wait_seconds", "From a shard's enqueue to its start.", ["model"],
                       buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))


def shard_finished(model: str, tokens: int, rows: int, seconds: float) -> None:
    """A shard this process embedded (seconds > 0) or found already written (seconds == 0)."""
    SHARDS.labels(model, "done" if seconds else "skipped").inc()
    if seconds:
        TOKENS.labels(model).inc(tokens)
        ROWS.labels(model).inc(rows)
        DECODE_SECONDS.labels(model).inc(seconds)
        TOKENS_PER_SECOND.labels(model).set(tokens / seconds)


def shard_failed(model: str) -> None:
    SHARDS.labels(model, "failed").inc()


def shard_handed_back(model: str) -> None:
    """A shard given back to the queue unembedded: Redis failing, the engine not starting, another model's job."""
    SHARDS.labels(model, "handed_back").inc()


def worker_started(model: str, engines: int, ubatch: int, lm_head_skipped: bool) -> None:
    ENGINES.labels(model).set(engines)
    UBATCH.labels(model).set(ubatch)
    LM_HEAD_SKIPPED.labels(model).set(int(lm_head_skipped))


def engine_stopped(pid: int) -> None:
    """An engine process that ends: its live gauges leave the sums."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


def serve_engines(port: int) -> None:
    """The endpoint, in the worker's parent: the sum of what every engine process wrote."""
    if not port:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, registry=registry)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:  # another worker on this host has it: embedding matters more than metrics
        log.warning("metrics port %d unavailable (%s); set BULKEMBED_METRICS_PORT per worker", port, exc)
