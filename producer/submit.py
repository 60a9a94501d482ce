"""Plan a job and produce its shards: read, reject what cannot be embedded, count, bucket, write.

Shards go to a sink: the Celery queue (`submit`) or the in-process worker (`run`); the producer
does not know which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bulkembed.contract import keys
from bulkembed.contract.errors import InputError
from bulkembed.contract.job import (
    Dtype,
    JobSpec,
    Overlength,
    Pooling,
    Role,
    ShardMessage,
    Span,
    Task,
    document_spans,
    prefix_for,
    task_from_model_name,
)
from bulkembed.contract.model import check_dims, choose_max_tokens, choose_pooling, model_info, model_ref
from bulkembed.contract.registry import JobTotals, ShardResult, stored_result
from bulkembed.contract.schema import rejected_schema, shard_input_schema, to_ipc_bytes
from bulkembed.contract.store import Store, open_store
from bulkembed.contract.vocab import Vocab
from bulkembed.producer.corpus import Corpus, decode_texts, open_corpus, read_batches
from bulkembed.producer.dedup import SeenIds, id_hashes
from bulkembed.producer.planner import Document, ShardPlanner

log = logging.getLogger(__name__)

REJECTED_FLUSH_ROWS = 10_000


@dataclass
class PlannedJob:
    job: JobSpec
    corpus: Corpus
    vocab: Vocab
    store: Store


@dataclass(frozen=True)
class JobOptions:
    """What a user can choose about a job (the CLI flags of submit and run)."""

    task: Task | None = None  # None: read from the model file name
    role: Role = Role.PASSAGE
    prefix: str | None = None  # None: from v4's task/role table; "" for no prefix (other model families)
    id_column: str = "id"
    text_column: str = "text"
    shard_tokens: int = 65536
    max_tokens: int | None = None  # None: the model's trained context (32768 for v4), non-causal: max_ubatch
    max_ubatch: int = 8192  # ProducerSettings.max_ubatch
    overlength: Overlength = Overlength.TRUNCATE
    pooling: Pooling | None = None  # None: what the model declares (mean where it declares nothing)
    dims: int | None = None
    dtype: Dtype = Dtype.FLOAT32
    normalize: bool = True


def plan_job(input_uri: str, model: str, out: str, options: JobOptions = JobOptions()) -> PlannedJob:
    """Check the input and the model and fix the job spec (and so the job id); queue nothing yet."""
    corpus = open_corpus(input_uri, options.id_column, options.text_column)
    ref, path = model_ref(model)
    info = model_info(path)
    pooling = choose_pooling(info, options.pooling, ref.file_name)  # refuses rankers before any shard exists
    task = options.task or task_from_model_name(ref.file_name)
    if task is None and options.prefix is None:
        raise InputError(f"cannot tell the task from the model name {ref.file_name}; pass --task, "
                         f"or --prefix for models outside jina-embeddings-v4")
    store = open_store(out)
    job = JobSpec(
        input=input_uri, input_fingerprint=corpus.fingerprint, out=store.uri, model=ref,
        task=task, role=options.role,
        prefix=prefix_for(task, options.role) if options.prefix is None else options.prefix,
        id_column=options.id_column, text_column=options.text_column, shard_tokens=options.shard_tokens,
        max_tokens=choose_max_tokens(options.max_tokens, info, options.max_ubatch, ref.file_name),
        overlength=options.overlength, pooling=pooling, dims=check_dims(options.dims, info, ref.file_name),
        dtype=options.dtype,
        # Token vectors are raw hidden states for the user to pool; normalizing each would break that.
        normalize=options.normalize and pooling is not Pooling.NONE,
    )
    return PlannedJob(job=job, corpus=corpus, vocab=Vocab.load(path), store=store)


@dataclass
class _Rejects:
    """Quarantined rows, flushed to OUT/_rejected/ in bounded files."""

    store: Store
    id_type: pa.DataType
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, doc_id: Any, reason: str, source: str, row: int) -> None:
        self.rows.append({"id": doc_id, "reason": reason, "source": source, "row": row})
        self.count += 1
        if len(self.rows) >= REJECTED_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        key = keys.rejected(f"producer-{len(self.files):05d}")
        table = pa.Table.from_pylist(self.rows, schema=rejected_schema(self.id_type))
        self.store.put(key, to_ipc_bytes(table))
        self.files.append(key)
        self.rows = []


def _reason_to_reject(doc_id: Any, text: str | None) -> str | None:
    if doc_id is None:
        return "null id"
    if text is None:
        return "null text"
    if not text.strip():
        return "empty text"
    return None


def produce(planned: PlannedJob, emit: Callable[[ShardMessage], None],
            written: Callable[[ShardResult], None] | None = None) -> JobTotals:
    """Stream the corpus into shards; write each shard's input, then hand its message to `emit`.

    A resubmitted job plans the same shards (same job id, same input, same order); a shard whose
    output is already there goes to `written` instead of being queued again."""
    job, store, vocab = planned.job, planned.store, planned.vocab
    store.put(keys.JOB_KEY, job.model_dump_json(indent=2).encode())
    prefix_tokens = vocab.count(job.prefix) if job.prefix else 0
    planner = ShardPlanner(job.shard_tokens)
    rejects = _Rejects(store, planned.corpus.id_type)
    input_schema = shard_input_schema(planned.corpus.id_type)
    seen = SeenIds()  # duplicate ids across the corpus, 8 bytes an id
    totals = JobTotals()

    def emit_shard(documents: list[Document]) -> None:
        table = pa.table(
            {"id": [d.id for d in documents], "text": [d.text for d in documents],
             "n_tokens": [d.n_tokens for d in documents], "chunk": [d.span.chunk for d in documents],
             "start": [d.span.start for d in documents], "stop": [d.span.stop for d in documents],
             "truncated": [d.span.truncated for d in documents]},
            schema=input_schema,
        )
        shard = totals.shards
        store.put_if_absent(keys.shard_input(shard), to_ipc_bytes(table))  # same job id, same content
        lengths = [d.n_tokens for d in documents]
        message = ShardMessage(job_id=job.job_id, job=job, shard=shard, n_docs=len(documents),
                               n_tokens=sum(lengths), longest=max(lengths), queued_at=time.time())
        if written is not None and store.exists(message.output_key):
            written(stored_result(message, store))
        else:
            emit(message)
        totals.shards += 1
        totals.docs += len(documents)
        totals.tokens += sum(lengths)

    for source, first_row, batch in read_batches(planned.corpus, job.id_column, job.text_column):
        texts, undecodable = decode_texts(batch.column(1))
        accepted: list[tuple[int, Any, str, list[Span]]] = []
        for i, (doc_id, text) in enumerate(zip(batch.column(0).to_pylist(), texts, strict=True)):
            reason = undecodable.get(i) or _reason_to_reject(doc_id, text)
            if reason is None:
                text = job.prefix + text
                n_tokens = vocab.count(text)
                spans = document_spans(n_tokens, job.max_tokens, job.overlength, prefix_tokens)
                if n_tokens == 0:
                    reason = "no tokens: the model's vocabulary drops every character"
                elif spans is None:
                    reason = f"over-length: {n_tokens} tokens > max {job.max_tokens}"
                else:
                    accepted.append((i, doc_id, text, spans))
            if reason is not None:
                rejects.add(doc_id, reason, source, first_row + i)
        duplicates = seen.add(id_hashes(doc_id for _, doc_id, _, _ in accepted))
        for (i, doc_id, text, spans), duplicate in zip(accepted, duplicates, strict=True):
            if duplicate:
                rejects.add(doc_id, "duplicate id", source, first_row + i)
                continue
            totals.truncated += spans[0].truncated
            for span in spans:
                ready = planner.add(Document(doc_id, text, span.n_tokens(prefix_tokens), span))
                if ready:
                    emit_shard(ready)
    for ready in planner.finish():
        emit_shard(ready)
    rejects.flush()
    totals.rejected, totals.rejected_files = rejects.count, rejects.files
    log.info("job %s: %d shards, %d docs, %d tokens, %d rejected", job.job_id, totals.shards, totals.docs,
             totals.tokens, totals.rejected)
    return totals


def forget_outputs(store: Store) -> int:
    """--force: delete what a job wrote under OUT (and nothing else that lives there)."""
    doomed = [key for key, _ in store.list() if keys.JOB_OUTPUT_KEY.match(key)]
    for key in doomed:
        store.delete(key)
    return len(doomed)
