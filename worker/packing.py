"""Plan decodes that fill every ubatch yet keep every pooled vector exact. Pure: token lengths in, steps out.

llama.cpp pools per ubatch, so each decode carries at most n_ubatch tokens (n_batch = n_ubatch
and one decode is one ubatch). For a causal model a document longer than the room left is split into
pieces that continue its positions in later decodes, its KV cache kept between them; earlier tokens
never see later ones, so the worker can rebuild the whole document's vector from its pieces (the
token-weighted mean of their means, the first piece's first token, the last piece's last token).
A non-causal model's tokens see the whole document: it is never split, and the ubatch is made large
enough to hold the shard's longest document.

llama.cpp's kernels choose their path by the decode's token count (docs/notes.md 30), so a text's vector would depend on
how full its decode was. Every decode therefore carries at least `min_decode` tokens: one that the documents do not
fill is topped up with padding, a sequence of its own that no one reads, so every decode runs in the same regime.

That leaves where a text's KV cells sit and which rows it takes in a shared decode. The project's CPU build makes both
irrelevant: its flash attention gathers a sequence's own cells in cache order (infra/llama-cpp/patches/0002), and
llama.cpp places a sequence's new cells after the ones it holds (patch 0003), so a split document's cells stay in
position order. Plans here always leave room for that: at most one document is carried from one decode into the
next, it comes first there, and the documents in a decode fit the cells left (the `reserved` check), so every cell
below a carried document's is held or taken and it grows upward within n_ctx. Padded decodes are a multiple of
DECODE_MULTIPLE tokens, and the engine pools on the host on a CPU.

llama.cpp's CUDA kernels move packed vectors anyway (docs/benchmarks.md). An `isolated` shape therefore decodes one
document at a time, from the first cell of an emptied cache: each decode's shape and contents are then a function of
that document alone, and its vector the same bits wherever it is embedded, on any backend whose kernels give the same
result for the same input (README, Batch invariance).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from bulkembed.contract.job import Pooling

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
CTX_ALIGN = 256  # llama.cpp pads n_ctx to this
# The fewest tokens a decode may carry. llama.cpp's CPU kernels switch paths by a decode's row count: the tiled
# K-quant matmul from 8 rows (its narrow path up to 16), llamafile's sgemm from 2-4, the tiled flash attention
# from 64 (GGML_FA_TILE_Q), and none above that. From 64 tokens up a row's result depends only on where its KV cells
# sit in the cache and in which block of rows it falls (below; README, Batch invariance).
MIN_DECODE_TOKENS = 64
# A padded decode's token count is also a multiple of this (within its ubatch): the CPU's repacked K-quant and Q4_0
# matmuls (AVX-512) take rows sixteen at a time and the rest through another path, four at a time then one by one,
# that rounds differently, so without it the rows at a decode's end would depend on how many tokens came before them.
DECODE_MULTIPLE = 16
PAD_TOKEN = 0  # what padding holds: any valid id does, its outputs are never read


@dataclass(frozen=True)
class Piece:
    doc: int  # index into the shard
    seq: int  # llama seq_id slot while the document is in flight
    start: int  # first token (also its position)
    stop: int
    last: bool  # the document's final piece: its mean is complete after this decode


@dataclass(frozen=True)
class ContextShape:
    """One llama_context configuration; shards that need the same one reuse it."""

    n_ctx: int
    n_ubatch: int
    n_seq_max: int
    n_batch: int = 0  # tokens per decode; 0 = n_ubatch, the only exact choice for pooled output
    pooling: Pooling = Pooling.MEAN  # NONE: every token's vector
    causal: bool = True  # False: documents are never split across decodes
    min_decode: int = 0  # decodes are padded to at least this many tokens; the last sequence slot is the padding's
    isolated: bool = False  # one document a decode, its cells from the first of an emptied cache

    @property
    def pooled(self) -> bool:
        return self.pooling is not Pooling.NONE

    @property
    def decode_tokens(self) -> int:
        return self.n_batch or self.n_ubatch

    @property
    def padding_seq(self) -> int:
        return self.n_seq_max - 1

    def padding(self, n_tokens: int) -> int:
        """How many padding tokens a decode of `n_tokens` document tokens gets: up to `min_decode`, and beyond it up
        to a multiple of DECODE_MULTIPLE (none where the shape does not pad)."""
        if not self.min_decode:
            return 0
        return max(self.min_decode, min(_round_up(n_tokens, DECODE_MULTIPLE), self.decode_tokens)) - n_tokens


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def choose_shape(lengths: Sequence[int], ubatch_cap: int, pooling: Pooling = Pooling.MEAN, n_batch: int = 0,
                 causal: bool = True, min_decode: int = 0, isolated: bool = False) -> ContextShape:
    """Just enough context for the longest document, the biggest ubatch the shard can fill.

    n_seq_max must divide n_ubatch under mean pooling, or llama.cpp aborts the process
    (docs/notes.md 4), so it is the largest divisor of n_ubatch up to llama.cpp's 256. An n_batch above
    n_ubatch lets llama.cpp split decodes itself, as upstream tools do: pooled means then come back
    wrong for documents split across ubatches, which is why only benchmarks and the self-test use it.
    A non-causal model gets an ubatch that holds the longest document whole, above the cap if need be
    (the producer's max tokens bounds it), and never a bigger n_batch. An isolated shape holds one document at a
    time: an ubatch for the longest and a context for it alone (a document is cut by the cap, whatever the shard).
    Where decodes are padded, a cap that is not a multiple of DECODE_MULTIPLE is rounded down to one, so that full
    decodes are one too.
    """
    if not lengths:
        raise ValueError("a shard has at least one document")
    if min_decode:
        ubatch_cap = max(32, ubatch_cap - ubatch_cap % DECODE_MULTIPLE)
    total, longest = sum(lengths), max(lengths)
    n_ubatch = min(ubatch_cap, max(32, next_pow2(longest if isolated else total)))
    if not causal:
        n_ubatch, n_batch = max(n_ubatch, next_pow2(longest)), 0
    n_seq_max = 1 if isolated else largest_divisor_at_most(n_ubatch, MAX_SEQUENCES)
    n_batch = n_batch if n_batch > n_ubatch else 0
    # Room for the longest document plus one decode of others in flight beside it (non-causal: one decode; isolated:
    # the document alone).
    n_ctx = _round_up(longest + 1 if isolated else (longest if causal else 1) + (n_batch or n_ubatch), CTX_ALIGN)
    shape = ContextShape(n_ctx=n_ctx, n_ubatch=n_ubatch, n_seq_max=n_seq_max, n_batch=n_batch, pooling=pooling,
                         causal=causal, isolated=isolated)
    return with_min_decode(shape, min_decode)


def single_document_shape(n_tokens: int, min_decode: int = 0) -> ContextShape:
    """One document in one ubatch: the definition of its embedding, which packing must reproduce."""
    shape = ContextShape(n_ctx=_round_up(n_tokens + 1, CTX_ALIGN), n_ubatch=max(32, next_pow2(n_tokens)), n_seq_max=1)
    return with_min_decode(shape, min_decode)


def with_min_decode(shape: ContextShape, min_decode: int) -> ContextShape:
    """`shape` with every decode padded to `min_decode` tokens, rounded up to a multiple of DECODE_MULTIPLE: an ubatch
    that holds them, a sequence slot and KV cells for the padding (a decode is padded by at most that many).
    Unchanged where `min_decode` is 0 or the shape pads already."""
    if min_decode <= 0:
        return shape
    min_decode = _round_up(min_decode, DECODE_MULTIPLE)
    if shape.min_decode == min_decode:
        return shape
    if shape.min_decode:
        raise ValueError(f"a shape padded to {shape.min_decode} tokens cannot be padded to {min_decode}")
    n_ubatch = max(shape.n_ubatch, next_pow2(min_decode))
    n_seq_max = largest_divisor_at_most(n_ubatch, max(2, shape.n_seq_max))  # a document's slot beside the padding's
    return replace(shape, n_ctx=_round_up(shape.n_ctx + min_decode, CTX_ALIGN), n_ubatch=n_ubatch,
                   n_seq_max=n_seq_max, min_decode=min_decode)


def plan_decodes(lengths: Sequence[int], shape: ContextShape) -> Iterator[list[Piece]]:
    """Yield the pieces of each decode, in order. Documents start in the given order; the oldest
    in flight continues first, so a long document streams through while short ones fill the rest.
    Every document with length > 0 appears, its pieces covering [0, length) exactly once.
    """
    if any(n <= 0 for n in lengths):
        raise ValueError("every document needs at least one token")
    n_ctx = shape.n_ctx - shape.min_decode  # the padding's cells while it is in a decode
    if max(lengths, default=0) + 1 > n_ctx:
        raise ValueError(f"a {max(lengths)}-token document does not fit n_ctx {shape.n_ctx}")
    if not shape.causal and max(lengths, default=0) > shape.decode_tokens:
        raise ValueError(f"a {max(lengths)}-token document does not fit one {shape.decode_tokens}-token decode, "
                         f"and a non-causal model's documents may not be split")
    free_seqs = list(range(shape.n_seq_max - (2 if shape.min_decode else 1), -1, -1))  # the last is the padding's
    in_flight: list[tuple[int, int, int]] = []  # (doc, seq, next token)
    reserved = 0  # KV cells the documents in flight will hold when complete
    next_doc = 0
    while next_doc < len(lengths) or in_flight:
        room = shape.decode_tokens
        pieces: list[Piece] = []
        still: list[tuple[int, int, int]] = []
        for doc, seq, start in in_flight:
            take = min(lengths[doc] - start, room)
            if take == 0:
                still.append((doc, seq, start))
                continue
            stop = start + take
            pieces.append(Piece(doc, seq, start, stop, stop == lengths[doc]))
            room -= take
            if stop < lengths[doc]:
                still.append((doc, seq, stop))
        while room > 0 and next_doc < len(lengths) and free_seqs and reserved + lengths[next_doc] <= n_ctx:
            if shape.isolated and pieces:
                break  # one document a decode
            if not shape.causal and lengths[next_doc] > room:
                break  # whole documents only: it starts the next decode
            doc, seq = next_doc, free_seqs.pop()
            take = min(lengths[doc], room)
            pieces.append(Piece(doc, seq, 0, take, take == lengths[doc]))
            reserved += lengths[doc]
            room -= take
            if take < lengths[doc]:
                still.append((doc, seq, take))
            next_doc += 1
        for piece in pieces:
            if piece.last:
                free_seqs.append(piece.seq)
                reserved -= lengths[piece.doc]
        in_flight = still
        yield pieces
