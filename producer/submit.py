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

import numpy as np
import pyarrow as pa

from bulkembed.contract import keys
from bulkembed.contract.job import (
    Dtype,
    JobSpec,
    Overlength,
    Pooling,
    Role,
    ShardMessage,
    Span,
    Task,
    choose_prefix,
    document_spans,
    task_from_model_name,
)
from bulkembed.contract.model import check_dims, choose_max_tokens, choose_pooling, model_info, model_ref
from bulkembed.contract.registry import JobTotals, ShardResult, stored_result
from bulkembed.contract.schema import content_hash, rejected_schema, shard_input_schema, to_ipc_bytes
from bulkembed.contract.store import Store, open_store
from bulkembed.contract.vocab import TokenCounter
from bulkembed.producer.corpus import Corpus, decode_texts, open_corpus, read_batches
from bulkembed.producer.dedup import SeenIds, id_hashes
from bulkembed.producer.planner import Document, ShardPlanner
from bulkembed.producer.reuse import ROW_KEY, IncompatibleReuse, PreviousOutput, copy_reused, open_previous, row_keys

log = logging.getLogger(__name__)

REJECTED_FLUSH_ROWS = 10_000


@dataclass
class PlannedJob:
    job: JobSpec
    corpus: Corpus
    counter: TokenCounter  # the model's vocabulary, in a llama process; produce() closes it when counting is over
    store: Store
    previous: PreviousOutput | None = None  # --reuse: the earlier output whose vectors unchanged rows copy


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
    reuse: str | None = None  # PREV_OUT: copy its vectors for rows whose id and content are unchanged
    ignore_incompatible_reuse: bool = False  # embed every row when PREV_OUT was embedded differently


def plan_job(input_uri: str, model: str, out: str, options: JobOptions = JobOptions()) -> PlannedJob:
    """Check the input and the model and fix the job spec (and so the job id); queue nothing yet."""
    corpus = open_corpus(input_uri, options.id_column, options.text_column)
    ref, path = model_ref(model)
    info = model_info(path)
    pooling = choose_pooling(info, options.pooling, ref.file_name)  # refuses rankers before any shard exists
    task = options.task or task_from_model_name(ref.file_name)
    prefix = choose_prefix(task, options.role, options.prefix, ref.file_name)
    store = open_store(out)
    counter = TokenCounter(path)
    try:
        job = JobSpec(
            input=input_uri, input_fingerprint=corpus.fingerprint, out=store.uri, model=ref,
            task=task, role=options.role,
            prefix=prefix,
            id_column=options.id_column, text_column=options.text_column, shard_tokens=options.shard_tokens,
            max_tokens=choose_max_tokens(options.max_tokens, info, options.max_ubatch, ref.file_name),
            overlength=options.overlength, pooling=pooling, dims=check_dims(options.dims, info, ref.file_name),
            dtype=options.dtype,
            # Token vectors are raw hidden states for the user to pool; normalizing each would break that.
            normalize=options.normalize and pooling is not Pooling.NONE,
            close_cut_rows=counter.tail > 0,
        )
        previous = None
        if options.reuse is not None:
            try:
                previous = open_previous(options.reuse, job, corpus.id_type)
                job = job.model_copy(update={"reuse": previous.source})
            except IncompatibleReuse as exc:
                if not options.ignore_incompatible_reuse:
                    raise
                log.warning("%s; ignored as asked: every row is embedded", exc)
    except BaseException:  # no job to count tokens for
        counter.close()
        raise
    return PlannedJob(job=job, corpus=corpus, counter=counter, store=store, previous=previous)


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


@dataclass
class _Accepted:
    """A row that will be in the output: copied from PREV_OUT (spans None, key set) or embedded."""

    row: int
    id: Any
    text: str
    content_hash: bytes
    key: bytes
    spans: list[Span] | None


def _accept(planned: PlannedJob, batch: pa.RecordBatch, source: str, first_row: int, rejects: _Rejects,
            prefix_tokens: int) -> list[_Accepted]:
    """The rows of a batch that can be embedded or reused, in order; the rest quarantined with their reason.
    A row PREV_OUT has (same id, same content) is taken as is: its tokens were counted when it was embedded."""
    job, counter = planned.job, planned.counter
    texts, undecodable = decode_texts(batch.column(1))
    candidates = []
    for i, (doc_id, text) in enumerate(zip(batch.column(0).to_pylist(), texts, strict=True)):
        reason = undecodable.get(i) or _reason_to_reject(doc_id, text)
        if reason is None:
            candidates.append((i, doc_id, job.prefix + text))
        else:
            rejects.add(doc_id, reason, source, first_row + i)
    hashes = [content_hash(text) for _, _, text in candidates]
    index = planned.previous.index if planned.previous is not None else None
    if index is not None:
        row_key = row_keys((doc_id for _, doc_id, _ in candidates), hashes)
        reusable = index.contains(row_key)
    else:  # no --reuse: no keys to compute
        row_key, reusable = np.zeros(len(candidates), ROW_KEY), np.zeros(len(candidates), bool)
    counts = iter(counter.count_many([text for (_, _, text), reuse in zip(candidates, reusable, strict=True)
                                      if not reuse]))
    accepted = []
    for (i, doc_id, text), hashed, key, reuse in zip(candidates, hashes, row_key, reusable, strict=True):
        if reuse:
            accepted.append(_Accepted(i, doc_id, text, hashed, key, None))
            continue
        n_tokens = next(counts)
        spans = document_spans(n_tokens, job.max_tokens, job.overlength, prefix_tokens, counter.tail)
        if n_tokens == 0:
            rejects.add(doc_id, "no tokens: the model's vocabulary drops every character", source, first_row + i)
        elif spans is None:
            rejects.add(doc_id, f"over-length: {n_tokens} tokens > max {job.max_tokens}", source, first_row + i)
        else:
            accepted.append(_Accepted(i, doc_id, text, hashed, key, spans))
    return accepted


def produce(planned: PlannedJob, emit: Callable[[ShardMessage], None],
            written: Callable[[ShardResult], None] | None = None) -> JobTotals:
    """Stream the corpus into shards; write each shard's input, then hand its message to `emit`. With
    --reuse, rows PREV_OUT has unchanged are not planned; once every shard is out, they are copied.

    A resubmitted job plans the same shards (same job id, same input, same order); a shard whose
    output is already there goes to `written` instead of being queued again."""
    with planned.counter:  # counting is over when produce is
        return _produce(planned, emit, written)


def _produce(planned: PlannedJob, emit: Callable[[ShardMessage], None],
             written: Callable[[ShardResult], None] | None) -> JobTotals:
    job, store, counter = planned.job, planned.store, planned.counter
    store.put(keys.JOB_KEY, job.model_dump_json(indent=2).encode())
    prefix_tokens = counter.count(job.prefix)  # with the tokenizer's framing, even for no prefix
    planner = ShardPlanner(job.shard_tokens)
    rejects = _Rejects(store, planned.corpus.id_type)
    input_schema = shard_input_schema(planned.corpus.id_type)
    seen = SeenIds()  # duplicate ids across the corpus, 8 bytes an id
    reused = SeenIds()  # keys of the rows to copy from PREV_OUT, 16 bytes a row
    if planned.previous is not None:
        planned.previous.load_index()
    totals = JobTotals()

    def emit_shard(documents: list[Document]) -> None:
        table = pa.table(
            {"id": [d.id for d in documents], "text": [d.text for d in documents],
             "n_tokens": [d.n_tokens for d in documents], "chunk": [d.span.chunk for d in documents],
             "start": [d.span.start for d in documents], "stop": [d.span.stop for d in documents],
             "truncated": [d.span.truncated for d in documents],
             "content_hash": [d.content_hash for d in documents]},
            schema=input_schema,
        )
        shard = totals.shards
        # zstd: a shard's input is a copy of its text (~440 KiB uncompressed at 65,536 tokens): a fraction of that.
        store.put_if_absent(keys.shard_input(shard), to_ipc_bytes(table, "zstd"))  # same job id, same content
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
        accepted = _accept(planned, batch, source, first_row, rejects, prefix_tokens)
        duplicates = seen.add(id_hashes(row.id for row in accepted))
        reusing = []
        for row, duplicate in zip(accepted, duplicates, strict=True):
            if duplicate:
                rejects.add(row.id, "duplicate id", source, first_row + row.row)
            elif row.spans is None:
                reusing.append(row.key)
            else:
                totals.truncated += row.spans[0].truncated
                for span in row.spans:
                    ready = planner.add(Document(row.id, row.text, span.n_tokens(prefix_tokens), span,
                                                 row.content_hash))
                    if ready:
                        emit_shard(ready)
        reused.add(np.array(reusing, ROW_KEY))
    for ready in planner.finish():
        emit_shard(ready)
    rejects.flush()
    totals.rejected, totals.rejected_files = rejects.count, rejects.files
    if planned.previous is not None:
        planned.previous.index = None  # matching is over: free it before copying
        totals.reused = copy_reused(planned.previous, reused, store, job, planned.corpus.id_type)
    log.info("job %s: %d shards, %d docs, %d tokens, %d rejected, %d reused", job.job_id, totals.shards, totals.docs,
             totals.tokens, totals.rejected, totals.reused_rows)
    return totals


def forget_outputs(store: Store) -> int:
    """--force: delete what a job wrote under OUT (and nothing else that lives there)."""
    doomed = [key for key, _ in store.list() if keys.JOB_OUTPUT_KEY.match(key)]
    store.delete_many(doomed)
    return len(doomed)
