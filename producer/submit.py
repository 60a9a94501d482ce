"""Plan a job: check its input and model, find duplicate ids, cut the corpus into units, plan each unit into shards.

`plan_unit` plans one unit wherever it runs: in `bulkembed planner` processes (Celery tasks on the plan queue), in
the submitting process beside them, and in `bulkembed run`. Its shards go to a sink (the Celery queue or the
in-process worker); planning does not know which.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from bulkembed.contract import keys
from bulkembed.contract.errors import ForeignOutput, InputError, JobGone
from bulkembed.contract.job import (
    Dtype,
    JobSpec,
    Overlength,
    Pooling,
    Role,
    ShardMessage,
    Span,
    Task,
    check_room,
    choose_prefix,
    document_spans,
    task_from_model_name,
)
from bulkembed.contract.model import check_dims, choose_max_tokens, choose_pooling, model_info, model_ref
from bulkembed.contract.queue import shards_held
from bulkembed.contract.registry import JobRegistry, JobTotals, ReusedFile, ShardResult, reused_files, stored_result
from bulkembed.contract.schema import (
    content_hash,
    from_ipc_bytes,
    rejected_schema,
    shard_input_schema,
    shard_text_column,
    to_ipc_bytes,
)
from bulkembed.contract.settings import ProducerSettings
from bulkembed.contract.store import Store, at_once, backoff_s, is_transient, open_store
from bulkembed.contract.vocab import NO_TOKENS, TokenCounter
from bulkembed.producer.corpus import (
    Corpus,
    Unit,
    decode_ids,
    decode_texts,
    input_fs,
    open_corpus,
    plan_units,
    read_batches,
)
from bulkembed.producer.dedup import SeenIds, duplicates_between, find_duplicates, id_batches, ordinal
from bulkembed.producer.planner import Document, ShardPlanner
from bulkembed.producer.reuse import (
    ROW_KEY,
    IncompatibleReuse,
    PreviousOutput,
    copy_reused,
    key_column,
    open_previous,
    row_keys,
)

log = logging.getLogger(__name__)

REJECTED_FLUSH_ROWS = 10_000


@dataclass
class PlannedJob:
    """A checked job, before any unit is planned: what `submit` and `run` hold."""

    job: JobSpec
    corpus: Corpus
    units: list[Unit]
    counter: TokenCounter  # the model's vocabulary, in a llama process: close it when planning here is over
    store: Store
    previous: PreviousOutput | None = None  # --reuse: the earlier output whose vectors unchanged rows copy

    def context(self) -> PlanContext:
        return PlanContext(self.job, self.store, self.corpus.fs, self.counter, self.previous)


@dataclass(frozen=True)
class JobOptions:
    """What a user can choose about a job (the CLI flags of submit and run)."""

    task: Task | None = None  # None: read from the model file name
    role: Role = Role.PASSAGE
    prefix: str | None = None  # None: from v4's task/role table; "" for no prefix (other model families)
    id_column: str = "id"
    text_column: str = "text"
    shard_tokens: int = 65536
    unit_rows: int = 250_000  # ProducerSettings.unit_rows
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
    """Check the input and the model, fix the job spec (and so the job id) and cut the corpus into units; queue
    nothing yet."""
    for name, value in (("the input", input_uri), ("--out", out)):
        if not value.strip():  # an unset shell variable: never the current folder, which --force would clear
            raise InputError(f"{name} is empty: name a local file or folder, or an s3:// prefix")
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
            unit_rows=options.unit_rows, units_span_files=True,
            max_tokens=choose_max_tokens(options.max_tokens, info, options.max_ubatch, ref.file_name),
            overlength=options.overlength, pooling=pooling, dims=check_dims(options.dims, info, ref.file_name),
            dtype=options.dtype,
            # Token vectors are raw hidden states for the user to pool; normalizing each would break that.
            normalize=options.normalize and pooling is not Pooling.NONE,
            close_cut_rows=counter.tail > 0,
            id_type=str(corpus.id_type) if corpus.mixed_ids else None,
        )
        check_room(job.max_tokens, counter.count(prefix))
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
    return PlannedJob(job=job, corpus=corpus, units=plan_units(corpus, job.unit_rows, job.units_span_files),
                      counter=counter, store=store,
                      previous=previous)


def prepare(planned: PlannedJob, memory_mb: int, still_ours: Callable[[], bool] = lambda: True) -> None:
    """What any planning of a job does first: write its spec beside the output, and find its duplicate ids.

    Duplicates are every row whose id an earlier row has, found once per job before any unit is planned (DuckDB, out
    of core, `memory_mb` at most; it spills to the temporary folder, TMPDIR) and kept in the store for the planners.
    A resubmitted job finds them there. `still_ours` is asked before each write and at the end: a job forgotten
    meanwhile by another submit --force (minutes at 10^9 rows) no longer owns OUT (JobGone)."""
    store, job = planned.store, planned.job

    def owned() -> None:
        if not still_ours():
            raise JobGone.of(job.job_id, f"{store.uri} may be another job's output now")

    owned()
    claim_spec(store, job)
    if not store.exists(keys.DUPLICATES_KEY):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bulkembed-dedup-") as work:
            path = Path(work) / "duplicates.parquet"
            found = find_duplicates(id_batches(planned.corpus, job.id_column), planned.corpus.id_type, path,
                                    Path(work), memory_limit_mb=memory_mb)
            owned()
            store.put_file(keys.DUPLICATES_KEY, path)  # streamed: with many duplicates the file is large
        log.info("job %s: %d duplicate ids in %.1fs", job.job_id, found, time.perf_counter() - started)
    owned()


@dataclass
class PlanContext:
    """What planning a unit of a job needs: any planner builds it from the job spec alone (PlanContext.open)."""

    job: JobSpec
    store: Store
    fs: pafs.FileSystem  # the input's
    counter: TokenCounter
    previous: PreviousOutput | None = None  # with its index loaded on first use
    prefix_tokens: int = -1

    @classmethod
    def open(cls, job: JobSpec, counter: TokenCounter) -> PlanContext:
        previous = None
        if job.reuse is not None:
            previous = open_previous(job.reuse.uri, job, None)
            if previous.source != job.reuse:
                raise InputError(f"--reuse {job.reuse.uri} changed since job {job.job_id} was submitted (its "
                                 f"manifest differs); submit the job again")
            previous.load_index()  # now, before a unit's hold is taken (plan_claimed): it may take minutes
        return cls(job, open_store(job.out), input_fs(job.input)[0], counter, previous)

    def prefix_length(self) -> int:
        if self.prefix_tokens < 0:  # with the tokenizer's framing, even for no prefix
            self.prefix_tokens = self.counter.count(self.job.prefix)
        return self.prefix_tokens


@dataclass
class ShardSink:
    """Where a unit's shards go. `queued` shards of the unit went out before (a planner that died mid-unit): they
    are not sent again. `tick` runs between batches and shards (a planner keeps its unit's lock alive there)."""

    emit: Callable[[ShardMessage], None]
    written: Callable[[ShardMessage], None]  # a shard found already written (a resumed job)
    queued: int = 0
    on_queued: Callable[[int], None] = lambda place: None
    tick: Callable[[], None] = lambda: None


@dataclass
class _Rejects:
    """Quarantined rows, flushed to OUT/_rejected/ in bounded files."""

    store: Store
    id_type: pa.DataType
    unit: int
    tick: Callable[[], None] = lambda: None  # the planner's look that the unit (and its job) is still its own
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
        key = keys.rejected(f"unit-{self.unit:06d}-{len(self.files):04d}")  # the same names when planned again
        put_over_stale(self.store, key, to_ipc_bytes(pa.Table.from_pylist(self.rows, schema=rejected_schema(
            self.id_type))), self.tick)
        self.files.append(key)
        self.rows = []


def put_over_stale(store: Store, key: str, data: bytes, still_ours: Callable[[], None]) -> None:
    """Write a planner's file. One already there is this job's, planned before (the same bytes), or the late write
    of a job that submit --force replaced, which would pass for this job's: written over once `still_ours` (which
    raises where the unit or its job is no longer this planner's) passes, so the replaced job's planner, late too,
    stops there instead of writing over the new job's."""
    if not store.put_if_absent(key, data):
        still_ours()
        store.put(key, data)


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

    row: int  # in its corpus file
    id: Any
    text: str
    content_hash: bytes
    key: bytes
    spans: list[Span] | None


COUNT_CHARS = 4_000_000  # characters counted in one call, about a second: a planner's lock is kept alive between


def _counted(counter: TokenCounter, texts: list[str], tick: Callable[[], None]) -> list[int]:
    """Each text's token count, COUNT_CHARS at a call with a `tick` after each: a batch of 8,192 long documents
    takes minutes to count, past the unit's lock (BULKEMBED_PLAN_LOCK_S) were it counted in one call."""
    counted: list[int] = []
    start, size = 0, 0
    for end, text in enumerate(texts, 1):
        size += len(text)
        if size >= COUNT_CHARS:
            counted += counter.count_many(texts[start:end])
            tick()
            start, size = end, 0
    return counted + counter.count_many(texts[start:])


def _accept(ctx: PlanContext, batch: pa.RecordBatch, source: str, first_row: int, rejects: _Rejects,
            duplicates: set[int], tick: Callable[[], None]) -> list[_Accepted]:
    """The rows of a batch that can be embedded or reused, in order; the rest quarantined with their reason.
    A row PREV_OUT has (same id, same content) is taken as is: its tokens were counted when it was embedded."""
    job, counter, prefix_tokens = ctx.job, ctx.counter, ctx.prefix_length()
    ids, undecodable_ids = decode_ids(batch.column(0))
    texts, undecodable = decode_texts(batch.column(1))
    candidates = []
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        # The first row of an id wins whatever becomes of it; a later one is a duplicate even if the first is
        # quarantined for its text (found before planning, by DuckDB: prepare).
        reason = undecodable_ids.get(i) or ("duplicate id" if doc_id is not None and i in duplicates else None)
        reason = reason or undecodable.get(i) or _reason_to_reject(doc_id, text)
        if reason is None:
            candidates.append((i, doc_id, job.prefix + text))
        else:
            rejects.add(doc_id, reason, source, first_row + i)
    hashes = [content_hash(text) for _, _, text in candidates]
    index = ctx.previous.load_index() if ctx.previous is not None else None
    if index is not None:
        row_key = row_keys((doc_id for _, doc_id, _ in candidates), hashes)
        reusable = index.contains(row_key)
    else:  # no --reuse: no keys to compute
        row_key, reusable = np.zeros(len(candidates), ROW_KEY), np.zeros(len(candidates), bool)
    to_count = [text for (_, _, text), reuse in zip(candidates, reusable, strict=True) if not reuse]
    counted = _counted(counter, to_count, tick)
    # No more tokens than the prefix and framing alone: the text may have none of its own (rare; counted again bare).
    maybe_empty = [text for text, n in zip(to_count, counted, strict=True) if n <= prefix_tokens]
    empty = {text for text, n in zip(maybe_empty, counter.count_many(
        [text[len(job.prefix):] for text in maybe_empty], special=False), strict=True) if n == 0}
    counts = iter(counted)
    accepted = []
    for (i, doc_id, text), hashed, key, reuse in zip(candidates, hashes, row_key, reusable, strict=True):
        if reuse:
            accepted.append(_Accepted(first_row + i, doc_id, text, hashed, key, None))
            continue
        n_tokens = next(counts)
        spans = document_spans(n_tokens, job.max_tokens, job.overlength, prefix_tokens, counter.tail)
        if text in empty:
            rejects.add(doc_id, NO_TOKENS, source, first_row + i)
        elif spans is None:
            rejects.add(doc_id, f"over-length: {n_tokens} tokens > max {job.max_tokens}", source, first_row + i)
        else:
            accepted.append(_Accepted(first_row + i, doc_id, text, hashed, key, spans))
    return accepted


def plan_unit(ctx: PlanContext, unit: Unit, sink: ShardSink) -> JobTotals:
    """Read a unit, quarantine what cannot be embedded (and duplicate ids), count tokens, cut shards named by the
    unit, write each one's input and hand its message to the sink. Planning a unit again plans the same shards (same
    job, same rows, same order): a shard whose output is already there goes to `sink.written` instead."""
    job, store = ctx.job, ctx.store
    cast = pa.type_for_alias(job.id_type) if job.id_type else None  # files whose ids differ in width
    first, last = unit.pieces[0], unit.pieces[-1]
    id_type = cast or pq.ParquetFile(ctx.fs.open_input_file(first.path)).schema_arrow.field(job.id_column).type
    planner = ShardPlanner(job.shard_tokens)
    rejects = _Rejects(store, id_type, unit.index, sink.tick)
    input_schema = shard_input_schema(id_type)
    written = written_outputs(store, unit.index)
    # Ordinals: the unit's pieces are consecutive in corpus order, so its rows are those between these two.
    duplicates = np.sort(_unit_duplicates(ctx, ordinal(first.file, first.first_row),
                                          ordinal(last.file, last.first_row + last.rows)))
    reusing: list[np.ndarray] = []
    totals = JobTotals()

    def emit_shard(documents: list[Document]) -> None:
        shard = keys.shard_number(unit.index, totals.shards)
        lengths = [d.n_tokens for d in documents]
        totals.shards += 1
        totals.docs += len(documents)
        totals.tokens += sum(lengths)
        if totals.shards <= sink.queued:  # queued by an earlier try at this unit
            return
        sink.tick()  # still this planner's unit (and job) before anything of the shard is written
        message = ShardMessage.of(job, shard, lengths)
        # No input needed for a shard written (a done job's were deleted: not written again).
        if message.output_key not in written or not found_written(message):
            table = pa.table(
                {"id": [d.id for d in documents], "text": shard_text_column([d.text for d in documents]),
                 "n_tokens": lengths, "chunk": [d.span.chunk for d in documents],
                 "start": [d.span.start for d in documents], "stop": [d.span.stop for d in documents],
                 "truncated": [d.span.truncated for d in documents],
                 "content_hash": [d.content_hash for d in documents], "row": [d.row for d in documents],
                 "source": shard_text_column([d.source for d in documents])},
                schema=input_schema,
            )
            # zstd: a shard's input is a copy of its text (~440 KiB uncompressed at 65,536 tokens): a fraction of it.
            put_over_stale(store, keys.shard_input(shard), to_ipc_bytes(table, "zstd"), sink.tick)
            sink.emit(message)
        sink.on_queued(totals.shards - 1)

    def found_written(message: ShardMessage) -> bool:
        """The shard's file reported to the sink; False where it was another job's (ForeignOutput), deleted."""
        try:
            sink.written(message)
            return True
        except ForeignOutput as exc:
            log.warning("job %s shard %d: %s; deleted, the shard is queued anew", job.job_id, message.shard, exc)
            sink.tick()
            store.delete(message.output_key)
            return False

    truncated = 0  # a plain int: JobTotals is a pydantic model, slow to add to a row at a time
    for piece, source, first_row, batch in read_batches(ctx.fs, unit, job.id_column, job.text_column, cast):
        at = ordinal(piece.file, first_row)
        lo, hi = np.searchsorted(duplicates, [at, at + batch.num_rows])
        accepted = _accept(ctx, batch, source, first_row, rejects, set((duplicates[lo:hi] - at).tolist()),
                           sink.tick)
        for row in accepted:
            if row.spans is None:
                reusing.append(row.key)
                continue
            truncated += row.spans[0].truncated
            for span in row.spans:
                ready = planner.add(Document(row.id, row.text, span.n_tokens(ctx.prefix_length()), span,
                                             row.content_hash, row.row, source))
                if ready:
                    emit_shard(ready)
        sink.tick()
    for ready in planner.finish():
        emit_shard(ready)
    rejects.flush()
    totals.rejected, totals.truncated = rejects.count, truncated
    if ctx.previous is not None:  # the rows to copy from PREV_OUT, once every unit is planned (copy_reused_rows)
        table = pa.table({"key": key_column(np.array(reusing, ROW_KEY))})
        store.put(keys.reused_keys(unit.index), to_ipc_bytes(table))
    log.info("job %s unit %d: %d shards, %d docs, %d tokens, %d rejected, %d reused", job.job_id, unit.index,
             totals.shards, totals.docs, totals.tokens, totals.rejected, len(reusing))
    return totals


def _unit_duplicates(ctx: PlanContext, first: int, stop: int) -> np.ndarray:
    fs, base = ctx.store.arrow_fs()
    ordinals, _ = duplicates_between(f"{base}/{keys.DUPLICATES_KEY}", first, stop, fs)
    return ordinals


def copy_reused_rows(ctx: PlanContext, units: int, still_ours: Callable[[], bool] = lambda: True) -> list[ReusedFile]:
    """--reuse, once every unit is planned: copy PREV_OUT's rows that the units matched (16 bytes a row of keys) and
    list the copies in the store (REUSED_FILES_KEY). Idempotent: a copy is written once. The matches are kept, so a
    copy lost later (a file deleted from OUT) is copied again from them when the job is submitted again."""
    if ctx.previous is None:
        return []
    copies, lost = [], None
    if ctx.store.exists(keys.REUSED_FILES_KEY):  # copied before (a resumed job, or units planned again)
        copies = reused_files(ctx.store)
        lost = lost_copies(ctx.store, copies)
        if not lost:
            return copies
        if not reused_matches_kept(ctx.store, units):  # dropped by an older bulkembed: plan_lost_outputs_again
            log.warning("job %s: OUT lost %s, and the matches to copy it again are gone; submit the job again once "
                        "it is done", ctx.job.job_id, ", ".join(copy.key for copy in lost))
            return copies
    reused = SeenIds()
    for matched in at_once(lambda unit: from_ipc_bytes(ctx.store.get(keys.reused_keys(unit))), range(units)):
        reused.add(np.array(matched.column("key").to_pylist(), ROW_KEY))
    ctx.previous.index = None  # matching is over: free it before copying
    sources = {copy.source for copy in lost} if lost else None  # only the lost: each copy reads its PREV_OUT file
    again = {f.key: f for f in copy_reused(ctx.previous, reused, ctx.store, ctx.job, sources, still_ours)}
    files = list(again.values())
    if lost:  # the copies kept, and those written again (a lost one its source no longer gives is no longer listed)
        files = [again.get(copy.key, copy) for copy in copies if copy.key in again or copy not in lost]
    ctx.store.put(keys.REUSED_FILES_KEY, json.dumps([f.model_dump() for f in files], indent=1).encode())
    return files


def reused_matches_kept(store: Store, units: int) -> bool:
    """Whether every unit's --reuse matches are in the store (one listing)."""
    kept = {key for key, _ in store.list(keys.REUSED_KEYS_PREFIX)}
    return all(keys.reused_keys(unit) in kept for unit in range(units))


def lost_copies(store: Store, copies: list[ReusedFile]) -> list[ReusedFile]:
    """Those of a job's --reuse copies that OUT no longer holds (one listing)."""
    present = {key for key, _ in store.list(keys.REUSED_OUTPUT_PREFIX)} if copies else set()
    return [copy for copy in copies if copy.key not in present]


def written_outputs(store: Store, unit: int) -> set[str]:
    """The embedding files of a unit's shards that OUT holds: one listing, instead of a HEAD per shard."""
    return {key for key, _ in store.list(keys.unit_outputs(unit))}


def produce(planned: PlannedJob, emit: Callable[[ShardMessage], None],
            written: Callable[[ShardResult], None]) -> tuple[JobTotals, list[ReusedFile]]:
    """Plan every unit here, one after another (`bulkembed run`); then copy what --reuse matched. The totals
    include the reused rows' counts."""
    prepare(planned, ProducerSettings().dedup_memory_mb)
    ctx = planned.context()
    totals = JobTotals()
    with planned.counter:  # counting is over when planning is
        for unit in planned.units:
            totals = totals.plus(plan_unit(ctx, unit, ShardSink(emit, lambda m: written(stored_result(m, ctx.store)))))
    files = copy_reused_rows(ctx, len(planned.units))
    return totals.plus(JobTotals.of_reused(files)), files


class PlannerStopping(Exception):
    """The planner is asked to stop while held back inside a unit: the unit goes back to the plan queue."""


class Backpressure:
    """Holds a planner back while its model's queue holds more shards than the engines serving it will soon take
    (ProducerSettings.queue_per_engine a reported engine, at least queue_min), so Redis holds what the fleet is about
    to embed, not the corpus. Keeps the planner's unit lock alive meanwhile (`tick`; none where no unit is held, as
    when a resubmit queues lost shards again). A planner asked to stop
    (`stopping`: a scale-down) stops waiting: held back, it may wait for hours, and its pod would be killed with the
    unit, which would then come back only after the visibility timeout."""

    REFRESH_S = 10.0  # how often the engine count is read again

    def __init__(self, registry: JobRegistry, queue: str, per_engine: int, minimum: int, lock: Lock | None,
                 stopping: Callable[[], bool] = lambda: False):
        self.registry, self.queue, self.per_engine, self.minimum, self.lock = registry, queue, per_engine, minimum, lock
        self.stopping = stopping
        self._limit, self._limit_at, self._ticked = minimum, -self.REFRESH_S, time.monotonic()

    def limit(self) -> int:
        if time.monotonic() - self._limit_at >= self.REFRESH_S:
            self._limit = max(self.minimum, self.per_engine * self.registry.engines_serving(self.queue))
            self._limit_at = time.monotonic()
        return self._limit

    def wait(self) -> None:
        while self.registry.queue_length(self.queue) >= self.limit():
            if self.stopping():
                raise PlannerStopping
            self.tick()
            time.sleep(1.0)

    def tick(self) -> None:
        """Raise LockNotOwnedError where the unit's lock is gone (it lapsed: another planner may have the unit now; or
        its job was forgotten by submit --force), else extend it now and then. Asked before each shard is written."""
        if self.lock is None:
            return
        if time.monotonic() - self._ticked > self.lock.timeout / 4:
            self.lock.reacquire()
            self._ticked = time.monotonic()
        elif not self.lock.owned():
            raise LockNotOwnedError(f"the hold on {self.lock.name} is gone")


def plan_claimed(registry: JobRegistry, job: JobSpec, context: Callable[[], PlanContext], unit: Unit,
                 send: Callable[[ShardMessage], None], settings: ProducerSettings,
                 stopping: Callable[[], bool] = lambda: False, keep_planner: bool = True) -> bool:
    """Plan `unit` if no other planner holds it, queue its shards, record it planned once; the planner of a job's
    last unit closes its planning. False when the unit is not planned here and now: another planner holds it, this
    one lost its hold mid-unit (it stalled past BULKEMBED_PLAN_LOCK_S), or it was asked to stop while held back
    (`stopping`): look again later. The shards it queued are not queued again. `keep_planner`: this process is a
    planner pod, to be kept up by KEDA should it write the job's manifest."""
    if error := registry.planning_error(job.job_id):  # another unit's: nothing more is planned until resubmitted
        log.warning("job %s unit %d: not planned, the job's planning failed (%s)", job.job_id, unit.index, error)
        return True
    if not registry.unit_is_planned(job.job_id, unit.index):
        context()  # built before the hold is taken: a planner's first unit may fetch the model
    lock = registry.plan_lock(job.job_id, unit.index, settings.plan_lock_s)
    if not lock.acquire():
        return False
    try:
        if not registry.is_registered(job.job_id):  # forgotten by submit --force: its OUT is another job's now
            raise JobGone.of(job.job_id, f"unit {unit.index} is not planned")
        if not registry.unit_is_planned(job.job_id, unit.index):
            hold = Backpressure(registry, job.model.queue, settings.queue_per_engine, settings.queue_min, lock,
                                stopping)

            def emit(message: ShardMessage) -> None:
                hold.wait()
                send(message)

            def found_written(message: ShardMessage) -> None:
                # Recorded already where a unit is planned again (a lost file): not read again, a GET of every file.
                if not registry.is_written(job.job_id, message.shard):
                    registry.shard_done(job.job_id, stored_result(message, context().store))

            sink = ShardSink(emit, found_written,
                             queued=registry.queued_shards(job.job_id, unit.index),
                             on_queued=lambda place: registry.shard_queued(job.job_id, unit.index, place),
                             tick=hold.tick)
            try:
                totals = plan_unit(context(), unit, sink)
            except LockNotOwnedError:  # stalled past the lock: another planner may have the unit now, or none
                if not registry.is_registered(job.job_id):  # or its job was cancelled, or forgotten by --force
                    raise JobGone.of(job.job_id, f"unit {unit.index} is left part planned") from None
                log.warning("job %s unit %d: its hold lapsed mid-unit; it is looked at again later", job.job_id,
                            unit.index)
                return False
            except PlannerStopping:
                log.warning("job %s unit %d: this planner is stopping; the unit goes back to the plan queue",
                            job.job_id, unit.index)
                return False
            registry.unit_planned(job.job_id, unit.index, totals)
        close_if_planned(registry, job, context, keep_planner)
    finally:
        try:
            lock.release()
        except LockError:  # it lapsed meanwhile: nothing to give back
            pass
    return True


def close_if_planned(registry: JobRegistry, job: JobSpec, context: Callable[[], PlanContext],
                     keep_planner: bool = True) -> None:
    """Once every unit is planned: copy what --reuse matched and let the job run. A job whose every shard is written
    by then (a resubmitted one: no worker will send its manifest task) has its manifest written here, and again on the
    next call while it is not (the store or Redis failed it: this task's retry, or its delivery again, writes it);
    other jobs' manifests are the workers' to ask for. Idempotent: a planner and the submitting process may both get
    here."""
    if not registry.is_registered(job.job_id):  # forgotten: nothing to close, and no keys of it to write back
        return
    if registry.planning_open(job.job_id):
        if not registry.all_units_planned(job.job_id):
            return
        files = copy_reused_rows(context(), registry.unit_count(job.job_id), lambda: registry.is_registered(job.job_id))
        registry.close_planning(job.job_id, JobTotals.of_reused(files))
    if registry.manifest_due(job.job_id):
        registry.finalize(job.job_id, keep_planner)


def submit_job(planned: PlannedJob, registry: JobRegistry, send: Callable[[ShardMessage], None],
               send_unit: Callable[[Unit], None], settings: ProducerSettings, plan_here: bool = True) -> None:
    """Register the job, find its duplicate ids, queue a planning task per unit left, and (unless not `plan_here`)
    plan units here beside any `bulkembed planner`, until every unit is planned. A resubmitted job skips the units
    planned before, plans again the units of the shards that had failed for good, and queues again the shards whose
    messages Redis lost; a finished one also writes again what OUT has lost."""
    job = planned.job
    plan_lost_outputs_again(registry, planned)
    failed_left = registry.plan_failed_again(job.job_id)  # before start(), which opens planning again
    registry.start(job, len(planned.units))
    with planned.counter:
        riding_out_the_store(f"job {job.job_id}: its duplicate ids", settings, lambda: prepare(
            planned, settings.dedup_memory_mb, lambda: registry.is_registered(job.job_id)))
        left = registry.units_left(job.job_id, len(planned.units))
        for index in left:
            send_unit(planned.units[index])
        # Listed for KEDA once every unit is sent: a submit killed while sending them leaves no pod up for a job that
        # cannot finish (its other units wait for it to be submitted again). Workers come for the queued shards.
        registry.open(job)
        if left:
            registry.units_queued(job.job_id)
        # Held back as a planner is; after the units, so that a queue with no room does not keep them from planners.
        hold = Backpressure(registry, job.model.queue, settings.queue_per_engine, settings.queue_min, None)

        def send_held(message: ShardMessage) -> None:
            hold.wait()
            send(message)

        def send_failed(message: ShardMessage) -> None:  # failed shards of units half planned
            hold.wait()
            registry.unfail(job.job_id, [message.shard])  # as it is sent: should it fail again, that is recorded
            send(message)

        queue_again(planned, failed_left, send_failed)
        queue_lost_shards_again(registry, planned, send_held)
        log.info("job %s: %d units, %d to plan", job.job_id, len(planned.units), len(left))
        ctx = planned.context()
        while plan_here and left:
            for index in left:
                riding_out_the_store(f"job {job.job_id} unit {index}", settings, lambda unit=planned.units[index]:
                                     plan_claimed(registry, job, lambda: ctx, unit, send, settings,
                                                  keep_planner=False))
            if error := registry.planning_error(job.job_id):  # a planner's unit: the job waits to be submitted again
                log.error("job %s: planning failed (%s); submit it again once that is fixed", job.job_id, error)
                return
            left = registry.units_left(job.job_id, len(planned.units))
            if left:  # planned by planners right now (or by one that died: its lock lapses, then a unit is ours)
                time.sleep(1.0)
        # This process is no planner pod to keep.
        riding_out_the_store(f"job {job.job_id}: closing its planning", settings,
                             lambda: close_if_planned(registry, job, lambda: ctx, keep_planner=False))


STORE_BACKOFF_MAX_S = 60.0  # the longest wait of submit's own planning before it tries the store again


def riding_out_the_store(what: str, settings: ProducerSettings, call: Callable[[], Any]) -> Any:
    """`call`, again after a backoff while the object store fails past its client's retries (an outage, throttling),
    as planners and workers do, for BULKEMBED_STORE_OUTAGE_S; then its error stands. Submit plans units itself: it
    used to exit at the first such failure, the job left half planned."""
    failing_since, retries = None, 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            failing_since = failing_since or time.monotonic()
            failing_s = time.monotonic() - failing_since
            if failing_s >= settings.store_outage_s:
                raise
            delay = backoff_s(retries, STORE_BACKOFF_MAX_S)
            log.warning("%s: the store failed (%s: %s); retry %d in %.1fs (failing for %.0fs)", what,
                        type(exc).__name__, exc, retries + 1, delay, failing_s)
            time.sleep(delay)
            retries += 1


def plan_lost_outputs_again(registry: JobRegistry, planned: PlannedJob) -> None:
    """A finished job submitted again writes what OUT has lost since (files deleted by hand or by a lifecycle rule)
    instead of reporting done over files that are gone. The units of lost shards are planned again: they queue their
    shards not found written (a done job's shard inputs are deleted). Lost --reuse copies are copied again from the
    matches the job kept (copy_reused_rows); a job whose matches were dropped (by an older bulkembed) has every unit
    planned again. One listing of OUT a unit, several at once; a unit planned again reads its input again, not its
    written files."""
    job, store = planned.job, planned.store
    status = registry.status(job.job_id)
    if status is None or not status.finished:
        return
    copies_lost = lost_copies(store, reused_files(store))
    plan_all = bool(copies_lost) and not reused_matches_kept(store, registry.unit_count(job.job_id))
    lost = again = 0
    units = sorted(registry.planned_units(job.job_id).items())
    listings = at_once(lambda unit: written_outputs(store, unit), [unit for unit, _ in units])
    for (unit, totals), written in zip(units, listings, strict=True):
        count = registry.plan_again(job.job_id, unit, [s for s in keys.unit_shards(unit, totals.shards)
                                                       if keys.shard_output(s) not in written], always=plan_all)
        lost, again = lost + count, again + bool(count or plan_all)
    if lost or copies_lost:
        log.warning("job %s: OUT lost %d shard files and %d reused files written before (%s); planning %d units "
                    "again to write them", job.job_id, lost, len(copies_lost), store.uri, again)


def queue_lost_shards_again(registry: JobRegistry, planned: PlannedJob, send: Callable[[ShardMessage], None]) -> None:
    """A job submitted again while it runs: a shard of a planned unit that is neither written nor held by Redis (on
    the queue, or in a worker's hands) was lost with its message (a Redis crash losing its last second of writes, a
    purged queue), and the job would wait for it for ever. It is queued again from its input. A shard taken by a
    worker between the two reads here may be queued twice: its second delivery finds it written."""
    job = planned.job
    units = registry.planned_units(job.job_id)
    if not units:  # a new job: no queue to read
        return
    # Read before what is written: a shard's message goes only once the shard is recorded.
    held = shards_held(registry.redis, job.model.queue, job.job_id)
    lost = []
    for unit, totals in sorted(units.items()):
        lost += [s for s in registry.unwritten(job.job_id, keys.unit_shards(unit, totals.shards)) if s not in held]
    queue_again(planned, lost, send)
    if lost:
        log.warning("job %s: %d shards were neither written nor queued (their messages lost by Redis), e.g. %s; "
                    "queued again", job.job_id, len(lost), keys.shard_name(lost[0]))


def queue_again(planned: PlannedJob, shards: list[int], send: Callable[[ShardMessage], None]) -> None:
    """Shards planned before queued again (their messages lost by Redis; failed ones of units half planned), each
    message rebuilt from its shard's input (several reads at once)."""
    def message(shard: int) -> ShardMessage:
        lengths = from_ipc_bytes(planned.store.get(keys.shard_input(shard))).column("n_tokens").to_pylist()
        return ShardMessage.of(planned.job, shard, lengths)

    for queued in at_once(message, shards):
        send(queued)


def claim_out(planned: PlannedJob, force: bool, stop: Callable[[str], None] = lambda job_id: None) -> None:
    """OUT holds one job's files. Another job's output there (another input, model or option) is refused: a shard
    file found written is taken as this job's, so old vectors would pass for new ones. `force` deletes it first (once
    `stop` has stopped that job, and this one, where they may still run); the same job's output is resumed. The same
    job with its input spelled otherwise (`./c.parquet`, an absolute path, a trailing slash: the same files, sizes and
    versions) is the same job: `planned.job` becomes the spec OUT holds, and the job resumes under its id."""
    store, job = planned.store, planned.job
    store.check()
    held = store.exists(keys.JOB_KEY)
    try:
        earlier = JobSpec.model_validate_json(store.get(keys.JOB_KEY)) if held else None
    except ValueError:  # written by another version of bulkembed: not this job
        earlier = None
    if not force and earlier is not None and earlier.model_copy(
            update={"input": job.input, "units_span_files": job.units_span_files}).job_id == job.job_id:
        # The input fingerprint names the files by their resolved paths: they agree. A job planned before units
        # spanned files resumes planned as it was (its shards are named by its units).
        planned.job = job = earlier
        planned.units = plan_units(planned.corpus, job.unit_rows, job.units_span_files)
    if force:
        # Every job that may still write here is stopped first: the one OUT holds, and this very job (submitted before
        # and still running: its planners' late records would land in the new run's, the inputs they name deleted).
        other = [earlier.job_id] if earlier is not None and earlier.job_id != job.job_id else []
        for running in [*other, job.job_id]:
            stop(running)
        forget_outputs(store)
        return
    if not held or (earlier is not None and earlier.job_id == job.job_id):
        return
    what = (f"job {earlier.job_id} (input {earlier.input}, model {earlier.model.file_name})" if earlier is not None
            else "a job of another bulkembed version")
    raise InputError(f"{store.uri} holds the output of {what}, not of this job ({job.job_id}): its files would pass "
                     f"for this job's. Pass --force to delete that output first, or choose another --out")


def claim_spec(store: Store, job: JobSpec) -> None:
    """Write the job's spec beside its output; refused where another job's got there since claim_out looked (two
    submits into one fresh OUT at once: each would take the other's shard files for its own)."""
    spec = job.model_dump_json(indent=2).encode()
    if store.put_if_absent(keys.JOB_KEY, spec):
        return
    try:
        held = JobSpec.model_validate_json(store.get(keys.JOB_KEY)).job_id
    except ValueError:
        held = "of another bulkembed version"
    if held != job.job_id:
        raise InputError(f"{store.uri} was claimed by job {held} while job {job.job_id} was being checked; choose "
                         f"another --out, or pass --force to replace that job's output")
    store.put(keys.JOB_KEY, spec)  # the same job's, resubmitted


STOPPING_S = 15.0  # for a forgotten job's planners to notice, between two shards or two parts of a count


def stop_job(registry: JobRegistry, job_id: str) -> None:
    """--force over the output of a job that may still run: forget it in Redis first, so that its workers drop its
    shards (they look before embedding and again just before writing) and its planners and submitting process stop
    (their holds are gone: they look before each shard's input is written). Its files are deleted STOPPING_S after:
    its late writes would otherwise land among the new job's files, under the same names."""
    status = registry.status(job_id)
    registry.forget(job_id)
    # A failed job too: one whose planning failed still has its other units' shards embedded.
    if status is not None and status.state != "done":
        log.warning("job %s, whose output is to be replaced, is %s: forgotten, so its workers and planners stop; its "
                    "files are deleted in %.0fs", job_id, status.state, STOPPING_S)
        time.sleep(STOPPING_S)


def forget_outputs(store: Store) -> int:
    """--force: delete what a job wrote under OUT (and nothing else that lives there)."""
    doomed = [key for key, _ in store.list() if keys.JOB_OUTPUT_KEY.match(key)]
    store.delete_many(doomed)
    return len(doomed)
