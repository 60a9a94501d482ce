"""A shard's rows as the engine sees them, and what it makes of them: no Arrow here (contract.llama_process).

The worker's I/O side (worker.shard) reads a shard's input, sends its rows to the engine process as plain lists,
and writes the vectors that come back; `embed_rows` runs in the engine: tokenize, check against the producer's
counts, embed, and set aside the rows llama.cpp fails on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bulkembed.contract.errors import EngineError, ShardError, TextError
from bulkembed.contract.job import Dtype, Overlength, Pooling, check_room, document_spans
from bulkembed.contract.vocab import NO_TOKENS
from bulkembed.worker.engine import Engine, l2_normalize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRows:
    """What the engine needs of a shard: each row's text and the span of its tokens the producer planned."""

    label: str  # "job J shard S", for logs
    prefix: str
    pooling: Pooling
    close_cut_rows: bool  # the job's: rows cut from a longer text end with the closing special tokens
    texts: list[str]
    starts: list[int]
    stops: list[int]
    chunks: list[int]
    n_tokens: list[int]  # as the producer counted them, prefix included on a first chunk


@dataclass(frozen=True)
class EmbeddedRows:
    """The vectors of the rows that embedded, in row order: (rows, n_embd) float32, not normalized; under pooling
    none, one (tokens, n_embd) matrix per row. `rejected`: row -> why it has no vector."""

    vectors: np.ndarray | list[np.ndarray]
    rejected: dict[int, str]
    n_embd: int
    decoded_by: dict | None = None  # Engine.decoded_by: what the vectors depend on beyond the job


def query_rows(engine: Engine, texts: list[str], prefix: str, pooling: Pooling, max_tokens: int) -> ShardRows:
    """Texts embedded at query time as rows of a shard, planned as the producer plans a bulk job's rows (prefix,
    the tokenizer's framing, truncation at max_tokens), so they embed to what the bulk job gives the same text."""
    vocab = engine.vocab
    prefix_tokens, tail = len(vocab.tokenize(prefix)), vocab.tail
    check_room(max_tokens, prefix_tokens)
    prefixed = [prefix + text for text in texts]
    spans = []
    for i, text in enumerate(prefixed):
        if not texts[i].strip():
            raise TextError(i, "empty")
        n_tokens = len(vocab.tokenize(text))
        # As the producer rejects rows (submit._accept): counted again bare only where the prefix and framing are all.
        if n_tokens <= prefix_tokens and vocab.count(texts[i], special=False) == 0:
            raise TextError(i, NO_TOKENS)
        spans.append(document_spans(n_tokens, max_tokens, Overlength.TRUNCATE, prefix_tokens, tail)[0])
    return ShardRows(label="query", prefix=prefix, pooling=pooling, close_cut_rows=tail > 0, texts=prefixed,
                     starts=[s.start for s in spans], stops=[s.stop for s in spans], chunks=[s.chunk for s in spans],
                     n_tokens=[s.n_tokens(prefix_tokens) for s in spans])


def finish_vectors(vectors: np.ndarray, dims: int, normalize: bool, dtype: Dtype = Dtype.FLOAT32) -> np.ndarray:
    """Pooled vectors as a job writes them (and a query of it is given): the first `dims` (Matryoshka), then
    L2-normalized if asked, in `dtype`."""
    vectors = vectors[:, :dims]
    return as_written(l2_normalize(vectors) if normalize else vectors, dtype)


def as_written(values: np.ndarray, dtype: Dtype) -> np.ndarray:
    """Values in a job's dtype: numpy's float16 rounding, the same bytes as pyarrow's. One beyond float16's range
    becomes inf, found by the caller (a quarantined row, a refused query)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16 if dtype is Dtype.FLOAT16 else np.float32)


def embed_rows(engine: Engine, rows: ShardRows) -> EmbeddedRows:
    tokens, reasons = _tokens(engine, rows)
    vectors, failed = _embed_isolating_failures(engine, rows, tokens, reasons)
    return EmbeddedRows(vectors, reasons | failed, engine.n_embd, engine.decoded_by)


def _tokens(engine: Engine, rows: ShardRows) -> tuple[list[np.ndarray], dict[int, str]]:
    """Tokenize each row once and cut its span. A row whose count differs from the producer's is
    set aside with its reason (a model mismatch is caught earlier, by sha256)."""
    vocab = engine.vocab
    tail = vocab.tail
    if rows.close_cut_rows != (tail > 0):
        raise ShardError(f"{rows.label}: planned {'with' if rows.close_cut_rows else 'without'} closing special "
                         f"tokens after a cut, but this model's tokenizer closes every text with {tail}: the job was "
                         f"planned by another bulkembed version; resubmit it with this one")
    lead = vocab.tokenize(rows.prefix)  # a later chunk's start: the opening tokens and the prefix, without the close
    lead = lead[:len(lead) - tail]
    tokens, reasons = [], {}
    # A document's chunks are rows of one text: tokenized once, not per chunk. Only those are kept (a truncated
    # long text's full tokens would be held for nothing).
    repeated = {text for text, rows_of_it in Counter(rows.texts).items() if rows_of_it > 1}
    tokenized: dict[str, np.ndarray] = {}
    for row, (text, start, stop, chunk, expected) in enumerate(
            zip(rows.texts, rows.starts, rows.stops, rows.chunks, rows.n_tokens, strict=True)):
        full = tokenized.get(text)
        if full is None:
            full = vocab.tokenize(text)
            if text in repeated:
                tokenized[text] = full
        cut = chunk > 0 or stop < len(full)  # as contract.job.document_spans cuts: the close goes after the cut
        piece = np.concatenate([lead if chunk > 0 else full[:0], full[start:stop],
                                full[len(full) - tail:] if cut and tail else full[:0]])
        if len(full) < stop or len(piece) != expected:
            reasons[row] = f"tokenizer mismatch: {len(piece)} tokens in the worker, {expected} when planned"
            piece = np.zeros(0, np.int32)
        tokens.append(piece)
    return tokens, reasons


def _embed_isolating_failures(engine: Engine, rows: ShardRows, tokens: list[np.ndarray], skip: dict[int, str]):
    """Embed the shard; if llama.cpp fails, embed row by row to set aside only the rows it fails on."""
    keep = [i for i in range(len(tokens)) if i not in skip]
    pooling = rows.pooling

    def embed(documents: list[np.ndarray]):
        if pooling is Pooling.NONE:
            return engine.embed_tokens(documents)
        return engine.embed(documents, pooling=pooling)

    def stacked(vectors: list[np.ndarray]):
        if pooling is Pooling.NONE:
            return vectors
        return np.stack(vectors) if vectors else np.zeros((0, engine.n_embd), np.float32)

    if not keep:  # every row set aside already (a tokenizer mismatch): nothing to decode, the shard is still written
        return stacked([]), {}
    try:
        result = embed([tokens[i] for i in keep])
        return (list(result) if pooling is Pooling.NONE else result), {}
    except EngineError as exc:
        log.warning("%s: %s; embedding its rows one by one", rows.label, exc)
    kept, failed = [], {}
    for i in keep:
        try:
            kept.append(embed([tokens[i]])[0])
        except EngineError as exc:
            failed[i] = f"llama.cpp failed: {exc}"
    return stacked(kept), failed
