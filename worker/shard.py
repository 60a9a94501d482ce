"""Embed one shard: read its input, check the model, embed, write the result whole and once.

A document llama.cpp cannot embed, or whose tokens differ from what the producer counted, goes to
OUT/_rejected/ with its reason; the rest of the shard is still written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pyarrow as pa

from bulkembed.contract import keys
from bulkembed.contract.errors import EngineError, ShardError
from bulkembed.contract.job import Dtype, JobSpec, Pooling, ShardMessage
from bulkembed.contract.registry import ShardResult, stored_result
from bulkembed.contract.schema import embedding_schema, from_ipc_bytes, rejected_schema, to_ipc_bytes
from bulkembed.contract.store import Store
from bulkembed.worker.engine import Engine, l2_normalize

log = logging.getLogger(__name__)

Guard = Callable[[], AbstractContextManager]


def embed_shard(message: ShardMessage, engine: Engine, model_sha256: str, store: Store,
                guard: Guard = nullcontext) -> ShardResult:
    """`guard` serializes check-and-write where the store has no conditional writes (a Redis lock)."""
    job = message.job
    if model_sha256 != job.model.sha256:
        raise ShardError(
            f"job {message.job_id} shard {message.shard}: this worker's model {engine.model_path.name} "
            f"(sha256 {model_sha256[:12]}) is not the job's {job.model.file_name} ({job.model.sha256[:12]})"
        )
    if store.exists(message.output_key):
        log.info("job %s shard %d: already written, skipped", message.job_id, message.shard)
        return stored_result(message, store)

    started = time.perf_counter()
    table = from_ipc_bytes(store.get(message.input_key))
    tokens, reasons = shard_tokens(table, engine, job.prefix, message)
    vectors, failed = _embed_isolating_failures(engine, job, tokens, reasons)
    good = np.array([i not in failed and i not in reasons for i in range(table.num_rows)], bool)
    if not good.all():
        _quarantine(store, message, table, {**reasons, **failed})
    output = _output_table(table.filter(pa.array(good)), vectors, job, engine.n_embd)
    data = to_ipc_bytes(output)
    with guard():
        if not store.put_if_absent(message.output_key, data):
            log.info("job %s shard %d: another delivery wrote it first", message.job_id, message.shard)
            return stored_result(message, store)
    seconds = time.perf_counter() - started
    n_tokens = int(sum(len(t) for t, ok in zip(tokens, good, strict=True) if ok))
    log.info("job %s shard %d: %d rows, %d tokens in %.2fs (%.0f tok/s), %d rejected", message.job_id,
             message.shard, output.num_rows, n_tokens, seconds, n_tokens / max(seconds, 1e-9), int((~good).sum()))
    return ShardResult(shard=message.shard, key=message.output_key, rows=output.num_rows, tokens=n_tokens,
                       sha256=hashlib.sha256(data).hexdigest(), rejected=int((~good).sum()), seconds=seconds)


def shard_tokens(table: pa.Table, engine: Engine, prefix: str,
                 message: ShardMessage) -> tuple[list[np.ndarray], dict[int, str]]:
    """Tokenize each row once and cut its span. A row whose count differs from the producer's is
    set aside with its reason (a model mismatch is caught earlier, by sha256)."""
    prefix_ids = engine.vocab.tokenize(prefix) if prefix else np.zeros(0, np.int32)
    columns = [table.column(name).to_pylist() for name in ("text", "start", "stop", "chunk", "n_tokens")]
    tokens, reasons = [], {}
    for row, (text, start, stop, chunk, expected) in enumerate(zip(*columns, strict=True)):
        full = engine.vocab.tokenize(text)
        piece = full[start:stop] if chunk == 0 else np.concatenate([prefix_ids, full[start:stop]])
        if len(full) < stop or len(piece) != expected:
            reasons[row] = f"tokenizer mismatch: {len(piece)} tokens in the worker, {expected} when planned"
            piece = np.zeros(0, np.int32)
        tokens.append(piece)
    return tokens, reasons


def _embed_isolating_failures(engine: Engine, job: JobSpec, tokens: list[np.ndarray], skip: dict[int, str]):
    """Embed the shard; if llama.cpp fails, embed row by row to set aside only the rows it fails on."""
    rows = [i for i in range(len(tokens)) if i not in skip]

    def embed(documents: list[np.ndarray]):
        if job.pooling is Pooling.NONE:
            return engine.embed_tokens(documents)
        return engine.embed(documents, pooling=job.pooling)

    try:
        result = embed([tokens[i] for i in rows])
        return (list(result) if job.pooling is Pooling.NONE else result), {}
    except EngineError as exc:
        log.warning("shard of job %s: %s; embedding its rows one by one", job.model.file_name, exc)
    kept, failed = [], {}
    for i in rows:
        try:
            kept.append(embed([tokens[i]])[0])
        except EngineError as exc:
            failed[i] = f"llama.cpp failed: {exc}"
    if job.pooling is Pooling.NONE:
        return kept, failed
    return (np.stack(kept) if kept else np.zeros((0, engine.n_embd), np.float32)), failed


def _output_table(table: pa.Table, vectors, job: JobSpec, n_embd: int) -> pa.Table:
    dims = job.dims or n_embd
    value_type = pa.float16() if job.dtype is Dtype.FLOAT16 else pa.float32()
    if job.pooling is Pooling.NONE:
        per_token = [v[:, :dims] for v in vectors]
        flat = np.concatenate(per_token).reshape(-1) if per_token else np.zeros(0, np.float32)
        offsets = pa.array(np.cumsum([0] + [len(v) for v in per_token]), pa.int32())
        embedding = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type),
                                                                                        dims))
    else:
        vectors = vectors[:, :dims]  # Matryoshka: the first dims, re-normalized below
        if job.normalize:
            vectors = l2_normalize(vectors)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), value_type), dims)
    return pa.Table.from_arrays(
        [table.column(name) if name != "embedding" else embedding
         for name in ("id", "embedding", "n_tokens", "truncated", "chunk", "content_hash")],
        schema=embedding_schema(table.schema.field("id").type, dims, job),
    )


def _quarantine(store: Store, message: ShardMessage, table: pa.Table, reasons: dict[int, str]) -> None:
    rows = sorted(reasons)
    rejected = pa.table({"id": table.column("id").take(rows), "reason": [reasons[r] for r in rows],
                         "source": [message.input_key] * len(rows), "row": pa.array(rows, pa.int64())},
                        schema=rejected_schema(table.schema.field("id").type))
    store.put(keys.shard_rejected(message.shard), to_ipc_bytes(rejected))
