"""Embed one shard: read its input, check the model, have the engine embed its rows, write the result whole and once.

This is the I/O side, in the worker's own process; the engine (worker.rows.embed_rows) runs in a llama process.
A document llama.cpp cannot embed, or whose tokens differ from what the producer counted, goes to
OUT/_rejected/ with its reason; the rest of the shard is still written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bulkembed.contract.errors import ForeignOutput, ShardError
from bulkembed.contract.job import Dtype, JobSpec, Pooling, ShardMessage
from bulkembed.contract.registry import ShardResult, record_rejected, stored_result
from bulkembed.contract.schema import (
    decoding_digest,
    embedding_schema,
    from_ipc_bytes,
    shard_texts,
    to_ipc_bytes,
)
from bulkembed.contract.store import Store
from bulkembed.worker.rows import EmbeddedRows, ShardRows, as_written, finish_vectors

log = logging.getLogger(__name__)

Guard = Callable[[], AbstractContextManager]
Owned = Callable[[], None]  # raises JobGone where the shard's job no longer owns OUT (forgotten by submit --force)
Embedder = Callable[[ShardRows], EmbeddedRows]  # the engine process's embed_rows (worker.engines), or in-process


@dataclass
class OpenShard:
    """A shard read and about to be embedded."""

    message: ShardMessage
    table: pa.Table
    rows: ShardRows
    started: float


def embed_shard(message: ShardMessage, embed: Embedder, model_sha256: str, store: Store,
                guard: Guard = nullcontext, owned: Owned = lambda: None) -> ShardResult:
    """`guard` is entered around the write (the worker's: the job still owns OUT, a test's hold); `owned` is asked
    again before anything found in OUT is deleted or recorded."""
    opened = open_shard(message, model_sha256, store, owned)
    if isinstance(opened, ShardResult):
        return opened
    return write_shard(opened, embed(opened.rows), store, guard, owned)


def open_shard(message: ShardMessage, model_sha256: str, store: Store, owned: Owned = lambda: None
               ) -> OpenShard | ShardResult:
    """The shard's rows for the engine, or its result if an earlier delivery wrote it."""
    job = message.job
    if model_sha256 != job.model.sha256:
        raise ShardError(
            f"job {message.job_id} shard {message.shard}: this worker's model (sha256 {model_sha256[:12]}) is not "
            f"the job's {job.model.file_name} ({job.model.sha256[:12]})"
        )
    if store.exists(message.output_key) and (found := _found_written(message, store, owned)) is not None:
        log.info("job %s shard %d: already written, skipped", message.job_id, message.shard)
        return found
    started = time.perf_counter()
    table = from_ipc_bytes(store.get(message.input_key))
    column = {name: table.column(name).to_pylist() for name in ("start", "stop", "chunk", "n_tokens")}
    rows = ShardRows(label=f"job {message.job_id} shard {message.shard}", prefix=job.prefix, pooling=job.pooling,
                     close_cut_rows=job.close_cut_rows,
                     texts=shard_texts(table.column("text")), starts=column["start"], stops=column["stop"],
                     chunks=column["chunk"],
                     n_tokens=column["n_tokens"])
    return OpenShard(message, table, rows, started)


def write_shard(shard: OpenShard, embedded: EmbeddedRows, store: Store, guard: Guard = nullcontext,
                owned: Owned = lambda: None) -> ShardResult:
    """Write the vectors whole and once, naming the rows the engine set aside in their metadata, then OUT/_rejected/
    from them (registry.record_rejected); both within `guard` (the worker's: the job still owns OUT)."""
    message, table, job = shard.message, shard.table, shard.message.job
    kept = [i for i in range(table.num_rows) if i not in embedded.rejected]
    values = written_values(embedded.vectors, job, embedded.n_embd)
    finite = [bool(np.isfinite(v).all()) for v in values]
    rejected = embedded.rejected | {row: NOT_FINITE + (NOT_FINITE_FLOAT16 if job.dtype is Dtype.FLOAT16 else "")
                                    for row, ok in zip(kept, finite, strict=True) if not ok}
    if len(rejected) > len(embedded.rejected):
        values = [v for v, ok in zip(values, finite, strict=True) if ok]
    good = np.array([i not in rejected for i in range(table.num_rows)], bool)
    output = _output_table(table.filter(pa.array(good)), values, job, job.dims or embedded.n_embd,
                           embedded.decoded_by, rejected)
    data = to_ipc_bytes(output)
    with guard():
        while not store.put_if_absent(message.output_key, data):
            if (found := _found_written(message, store, owned)) is not None:
                log.info("job %s shard %d: another delivery wrote it first", message.job_id, message.shard)
                return found  # its rows set aside, not these, go to _rejected/
        owned()  # a put slow past submit --force's wait: the record is the new job's to write
        record_rejected(store, message, rejected, table)
    seconds = time.perf_counter() - shard.started
    n_tokens = int(np.asarray(shard.rows.n_tokens, np.int64)[good].sum())
    log.info("job %s shard %d: %d rows, %d tokens in %.2fs (%.0f tok/s), %d rejected", message.job_id,
             message.shard, output.num_rows, n_tokens, seconds, n_tokens / max(seconds, 1e-9), int((~good).sum()))
    return ShardResult(shard=message.shard, key=message.output_key, rows=output.num_rows, tokens=n_tokens,
                       sha256=hashlib.sha256(data).hexdigest(), rejected=int((~good).sum()), seconds=seconds,
                       decoding=decoding_digest(embedded.decoded_by or {}))


def _found_written(message: ShardMessage, store: Store, owned: Owned) -> ShardResult | None:
    """The shard's written file's result; None where it was another job's (ForeignOutput), deleted once `owned` says
    this job still owns OUT (a worker of the replaced job, its put slow past --force's wait, stops there instead of
    deleting the new job's file)."""
    try:
        return stored_result(message, store)
    except ForeignOutput as exc:
        owned()
        log.warning("job %s shard %d: %s; deleted, the shard is written anew", message.job_id, message.shard, exc)
        store.delete(message.output_key)
        return None


NOT_FINITE = "NaN or infinity in its vector"
NOT_FINITE_FLOAT16 = " (as float16: beyond its ±65504 with --no-normalize or --pooling none? --dtype float32 keeps it)"


def written_values(vectors: np.ndarray | list[np.ndarray], job: JobSpec, n_embd: int) -> list[np.ndarray]:
    """Each row's values as a job writes them: the first `dims` (Matryoshka), L2-normalized if asked (pooled rows),
    in the job's dtype (worker.rows.as_written)."""
    dims = job.dims or n_embd
    if job.pooling is Pooling.NONE:
        return [as_written(v[:, :dims], job.dtype) for v in vectors]
    return list(finish_vectors(np.asarray(vectors), dims, job.normalize, job.dtype))


def _output_table(table: pa.Table, values: list[np.ndarray], job: JobSpec, dims: int,
                  decoded_by: dict | None, rejected: dict[int, str]) -> pa.Table:
    value_type = pa.float16() if job.dtype is Dtype.FLOAT16 else pa.float32()
    if job.pooling is Pooling.NONE:
        flat = np.concatenate(values).reshape(-1) if values else np.zeros(0, value_type.to_pandas_dtype())
        offsets = pa.array(np.cumsum([0] + [len(v) for v in values]), pa.int32())
        embedding = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type),
                                                                                        dims))
    else:
        flat = np.concatenate(values) if values else np.zeros(0, value_type.to_pandas_dtype())
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), dims)
    return pa.Table.from_arrays(
        [table.column(name) if name != "embedding" else embedding
         for name in ("id", "embedding", "n_tokens", "truncated", "chunk", "content_hash")],
        schema=embedding_schema(table.schema.field("id").type, dims, job, decoded_by, rejected),
    )

