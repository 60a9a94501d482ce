"""Embed one shard: read its input, check the model, embed, write the result whole and once."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from contract.errors import ShardError
from contract.job import ShardMessage
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
    expected = table.column("n_tokens").to_numpy()
    tokens = [engine.vocab.tokenize(text) for text in table.column("text").to_pylist()]
    counted = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    if not np.array_equal(counted, expected):
        first = int(np.argmax(counted != expected))
        raise ShardError(f"job {message.job_id} shard {message.shard}: row {first} has {counted[first]} tokens "
                         f"here but {expected[first]} when planned; producer and worker vocabularies differ")
    vectors = engine.embed(tokens)
    if job.normalize:
        vectors = l2_normalize(vectors)
    dims = vectors.shape[1]
    output = pa.Table.from_arrays(
        [table.column("id"),
         pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dims),
         table.column("n_tokens")],
        schema=embedding_schema(table.schema.field("id").type, dims, job),
    )
    written = store.put_if_absent(message.output_key, to_ipc_bytes(output))
    seconds = time.perf_counter() - started
    n_tokens = int(expected.sum())
    log.info("job %s shard %d: %d docs, %d tokens in %.2fs (%.0f tok/s)%s", message.job_id, message.shard,
             len(tokens), n_tokens, seconds, n_tokens / max(seconds, 1e-9), "" if written else ", already there")
    return ShardResult(shard=message.shard, key=message.output_key, rows=output.num_rows, tokens=n_tokens,
                       seconds=seconds)
