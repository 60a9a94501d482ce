"""Embed one shard: read its input, check the model, embed, write the result whole and once."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from contract.errors import ShardError
from contract.job import Dtype, JobSpec, Pooling, ShardMessage
from contract.registry import ShardResult
from contract.schema import embedding_schema, from_ipc_bytes, to_ipc_bytes
from contract.store import Store
from worker.engine import Engine, l2_normalize

log = logging.getLogger(__name__)


def embed_shard(message: ShardMessage, engine: Engine, model_sha256: str, store: Store) -> ShardResult:
    job = message.job
    if model_sha256 != job.model.sha256:
        raise ShardError(
            f"job {message.job_id} shard {message.shard}: this worker's model {engine.model_path.name} "
            f"(sha256 {model_sha256[:12]}) is not the job's {job.model.file_name} ({job.model.sha256[:12]})"
        )
    if store.exists(message.output_key):
        existing = from_ipc_bytes(store.get(message.output_key))
        if existing.num_rows == message.n_docs:
            log.info("job %s shard %d: already written, skipped", message.job_id, message.shard)
            return ShardResult(shard=message.shard, key=message.output_key, rows=existing.num_rows,
                               tokens=int(pa.compute.sum(existing["n_tokens"]).as_py()))
        raise ShardError(f"job {message.job_id} shard {message.shard}: {message.output_key} exists with "
                         f"{existing.num_rows} rows, expected {message.n_docs}")

    started = time.perf_counter()
    table = from_ipc_bytes(store.get(message.input_key))
    tokens = shard_tokens(table, engine, job.prefix, message)
    dims = job.dims or engine.n_embd
    if job.pooling is Pooling.NONE:
        per_token = [v[:, :dims] for v in engine.embed_tokens(tokens)]
        flat = pa.array(np.concatenate(per_token).reshape(-1), _arrow_float(job))
        offsets = pa.array(np.cumsum([0] + [len(v) for v in per_token]), pa.int32())
        embedding = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(flat, dims))
    else:
        vectors = engine.embed(tokens)[:, :dims]  # Matryoshka: the first dims, then re-normalized
        if job.normalize:
            vectors = l2_normalize(vectors)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), _arrow_float(job)), dims)
    output = pa.Table.from_arrays(
        [table.column("id"), embedding, table.column("n_tokens"), table.column("truncated"), table.column("chunk")],
        schema=embedding_schema(table.schema.field("id").type, dims, job),
    )
    written = store.put_if_absent(message.output_key, to_ipc_bytes(output))
    seconds = time.perf_counter() - started
    n_tokens = int(sum(len(t) for t in tokens))
    log.info("job %s shard %d: %d rows, %d tokens in %.2fs (%.0f tok/s)%s", message.job_id, message.shard,
             len(tokens), n_tokens, seconds, n_tokens / max(seconds, 1e-9), "" if written else ", already there")
    return ShardResult(shard=message.shard, key=message.output_key, rows=output.num_rows, tokens=n_tokens,
                       seconds=seconds)


def _arrow_float(job: JobSpec) -> pa.DataType:
    return pa.float16() if job.dtype is Dtype.FLOAT16 else pa.float32()


def shard_tokens(table: pa.Table, engine: Engine, prefix: str, message: ShardMessage) -> list[np.ndarray]:
    """Tokenize each row once and cut its span; the counts must be the producer's to the token."""
    prefix_ids = engine.vocab.tokenize(prefix) if prefix else np.zeros(0, np.int32)
    columns = {name: table.column(name).to_pylist() for name in ("text", "start", "stop", "chunk", "n_tokens")}
    tokens = []
    for row, (text, start, stop, chunk, expected) in enumerate(zip(*columns.values(), strict=True)):
        full = engine.vocab.tokenize(text)
        piece = full[start:stop]
        if chunk > 0:
            piece = np.concatenate([prefix_ids, piece])
        if len(full) < stop or len(piece) != expected:
            raise ShardError(f"job {message.job_id} shard {message.shard}: row {row} has {len(piece)} tokens here "
                             f"but {expected} when planned; producer and worker vocabularies differ")
        tokens.append(piece)
    return tokens
