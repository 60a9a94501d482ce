"""The only module that runs llama.cpp: one resident model, exact pooled embeddings of any model kind.

The model is loaded once; what it is (causal or not, its pooling) comes from its GGUF header
(contract.model.ModelInfo). A llama_context is made per context shape and kept while shards keep
asking for the same one. Batches are filled from numpy arrays (no per-token Python).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bulkembed.contract.errors import EngineError, ModelError
from bulkembed.contract.job import Pooling
from bulkembed.contract.model import ModelInfo, choose_pooling, model_info
from bulkembed.contract.settings import WorkerSettings
from bulkembed.contract.vocab import Vocab, init_llama
from bulkembed.worker.packing import (
    MIN_DECODE_TOKENS,
    PAD_TOKEN,
    ContextShape,
    Piece,
    choose_shape,
    plan_decodes,
    with_min_decode,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    ubatch: int = 512
    gpu_layers: int = -1  # -1: every layer, when the build can offload
    threads: int = 0  # 0: every core
    flash_attn: bool | None = None  # None: llama.cpp decides (on wherever the backend supports it)
    # Tokens per decode above the ubatch: how upstream tools run, wrong for long documents. Only
    # for benchmarks and to prove the self-test refuses it; 0 keeps every decode one ubatch.
    logical_batch: int = 0
    # Leave the LM head (and its logits copy) out of every decode where the llama.cpp build can
    # (infra/llama-cpp: patches/0001); off only to measure what it costs.
    skip_lm_head: bool = True
    # Every decode carries at least this many tokens (padding tops it up), so a text's vector does not depend on
    # how full its decode was (packing.MIN_DECODE_TOKENS); 0 turns it off, only to measure what it fixes.
    min_decode: int = MIN_DECODE_TOKENS
    # One document a decode, from the first cell of an emptied cache: its vector is then the same bits wherever it is
    # embedded, on any backend (packing: isolated), at the price of smaller decodes.
    isolate: bool = False
    # Pool on the host, from every token's hidden state summed in document order, rather than in llama.cpp's graph
    # (a sum over the whole ubatch, whose last bits depend on the text's place in it and on where it was cut). None:
    # on the host where the engine runs on the CPU, the cost there being nil; on a GPU the copy and the sum would
    # stall the device between decodes, and its kernels move packed vectors more than that anyway.
    pool_on_host: bool | None = None
    # `ubatch` stands for `--ubatch auto`: an engine started alone (`embed`, Embedder) takes the cap a worker's pool
    # would where that is fixed rather than measured (probe.auto_ubatch: isolated on a GPU), so that a query's long
    # text is cut where the index's was.
    ubatch_auto: bool = False

    @classmethod
    def from_settings(cls, settings: WorkerSettings, *, ubatch: int | str, gpu_layers: int, threads: int,
                      flash_attn: str, isolate: bool | None = None) -> EngineOptions:
        """What the worker, `run` and `embed` embed with: the command's own options, the rest from BULKEMBED_*, so a
        query runs as its index did."""
        return cls(ubatch=ubatch if isinstance(ubatch, int) else 512, gpu_layers=gpu_layers, threads=threads,
                   flash_attn=flash_attn_choice(flash_attn), logical_batch=settings.logical_batch,
                   skip_lm_head=settings.skip_lm_head, min_decode=settings.min_decode,
                   isolate=settings.isolate if isolate is None else isolate, ubatch_auto=ubatch == "auto")

    def like(self, decoded_by: dict[str, str | int]) -> EngineOptions:
        """These options with the decoding that `decoded_by` (Engine.decoded_by, read from an index) records: the
        ubatch cap too, which decides where long documents are cut."""
        return replace(self, isolate=decoded_by["layout"] == "isolated", min_decode=int(decoded_by["min_decode"]),
                       ubatch=int(decoded_by["ubatch"]), ubatch_auto=False,
                       flash_attn=flash_attn_choice(str(decoded_by["flash_attn"])),
                       pool_on_host=decoded_by.get("pooled_on", "device") == "host")  # older outputs: in the graph


FLASH_ATTN_WORDS = {None: "auto", True: "on", False: "off"}  # EngineOptions.flash_attn -> --flash-attn


def flash_attn_choice(value: str) -> bool | None:
    """--flash-attn auto|on|off as EngineOptions takes it (None: llama.cpp decides)."""
    return {word: choice for choice, word in FLASH_ATTN_WORDS.items()}[value]


# The switch of infra/llama-cpp/patches/0001, read by llama.cpp when a context is created.
NO_LOGITS_ENV = "LLAMA_EMBEDDINGS_NO_LOGITS"


def patched_function(llama: object, name: str, argtypes: list, restype: object) -> Callable | None:
    """A function that the project's llama.cpp patches add (infra/llama-cpp/patches), typed; None on a stock build."""
    function = getattr(llama.llama_cpp._lib, name, None)
    if function is not None:
        function.argtypes, function.restype = argtypes, restype
    return function


def lm_head_skipper(llama: object) -> Callable[[object], bool] | None:
    """`llama_get_embeddings_no_logits` (patch 0001): whether a context leaves the LM head out."""
    return patched_function(llama, "llama_get_embeddings_no_logits", [ctypes.c_void_p], ctypes.c_bool)


class _Context:
    """A llama_context and the numpy-backed batch that feeds it."""

    def __init__(self, llama: object, model: object, shape: ContextShape, options: EngineOptions,
                 skip_lm_head: bool):
        self._llama = llama
        self.shape = shape
        params = llama.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.decode_tokens  # one decode = one ubatch: the pooled mean covers all of it
        params.n_ubatch = shape.n_ubatch
        params.n_seq_max = shape.n_seq_max
        params.embeddings = True
        params.pooling_type = getattr(llama, f"LLAMA_POOLING_TYPE_{shape.pooling.name}")
        params.kv_unified = True  # one cache shared by all sequences, sized by n_ctx
        threads = options.threads or os.cpu_count() or 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if options.flash_attn is not None:
            params.flash_attn_type = (
                llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        # Set only while this context is made: a Llama.embed peer in the same process (the bench) stays stock.
        previous = os.environ.pop(NO_LOGITS_ENV, None)
        try:
            if skip_lm_head:
                os.environ[NO_LOGITS_ENV] = "1"
            self.ctx = llama.llama_init_from_model(model, params)
        finally:
            os.environ.pop(NO_LOGITS_ENV, None)
            if previous is not None:
                os.environ[NO_LOGITS_ENV] = previous
        if not self.ctx:
            raise EngineError(f"llama.cpp could not create a context {shape}")
        self.memory = llama.llama_get_memory(self.ctx)  # NULL for encoders (BERT): they keep no KV cache

        ub = shape.decode_tokens
        self.tokens = np.zeros(ub, np.int32)
        self.positions = np.zeros(ub, np.int32)
        self.n_seq_id = np.ones(ub, np.int32)
        self.outputs = np.ones(ub, np.int8)  # every token feeds the mean
        self.seq_values = np.arange(shape.n_seq_max, dtype=np.int32)
        # llama_batch.seq_id is an array of pointers; point each token at its slot's id.
        self.seq_pointer_of = self.seq_values.ctypes.data + 4 * np.arange(shape.n_seq_max, dtype=np.uintp)
        self.seq_pointers = np.zeros(ub, np.uintp)
        self.batch = llama.llama_batch()
        self.batch.token = self.tokens.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        self.batch.embd = None
        self.batch.pos = self.positions.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        self.batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.seq_id = ctypes.cast(
            self.seq_pointers.ctypes.data, ctypes.POINTER(ctypes.POINTER(llama.llama_seq_id))
        )
        self.batch.logits = self.outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def forget(self, seq: int = -1) -> None:
        """Drop a sequence's KV cells (-1: every sequence's, and the next cells are taken from the first)."""
        if not self.memory:
            return
        if seq < 0:
            self._llama.llama_memory_clear(self.memory, False)
        else:
            self._llama.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def free(self) -> None:
        if self.ctx:
            self._llama.llama_free(self.ctx)
            self.ctx = None


class Engine:
    """One GGUF embedding model, resident; `embed` turns token arrays into exact pooled vectors."""

    def __init__(self, model_path: str | Path, options: EngineOptions = EngineOptions()):
        import llama_cpp

        init_llama()
        self._llama = llama_cpp
        self.options = options
        self.model_path = Path(model_path)
        self.info: ModelInfo = model_info(self.model_path)
        # What the model declares (mean where it declares nothing); rank and unknown poolings are refused here.
        self.pooling = choose_pooling(self.info, None, self.model_path.name)
        params = llama_cpp.llama_model_default_params()
        offload = llama_cpp.llama_supports_gpu_offload()
        params.n_gpu_layers = (999 if options.gpu_layers < 0 else options.gpu_layers) if offload else 0
        started = time.perf_counter()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise ModelError(f"llama.cpp cannot load {model_path}")
        self.load_seconds = time.perf_counter() - started
        self.vocab = Vocab(llama_cpp.llama_model_get_vocab(self.model), owner=self)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.gpu_offload = offload
        self.pools_on_host = not offload if options.pool_on_host is None else options.pool_on_host
        self._head_skipped_by = lm_head_skipper(llama_cpp)
        # Patch 0003: how many decodes of this process could not keep a document's KV cells in position order.
        self._unordered_slots = patched_function(llama_cpp, "llama_kv_unordered_slots", [], ctypes.c_uint64)
        # What the build allows and the options ask: checked again on every context made.
        self.lm_head_skipped = options.skip_lm_head and self._head_skipped_by is not None
        self._context: _Context | None = None
        self.contexts_made, self.context_seconds = 0, 0.0  # what shape changes cost (the bench reports it)
        log.info("model %s loaded in %.1fs (n_embd %d, %s, %s pooling on the %s, gpu offload %s); LM head: %s; "
                 "decodes: %s", self.model_path.name, self.load_seconds, self.n_embd,
                 "causal" if self.info.causal else "non-causal", self.pooling.value,
                 "host" if self.pools_on_host else "device", offload, self.lm_head_state,
                 "one document each (--isolate)" if options.isolate else "packed")

    @property
    def lm_head_state(self) -> str:
        """What the engine does with the LM head, in words for logs and reports."""
        if self.lm_head_skipped:
            return "skipped"
        if self._head_skipped_by is None:
            return "computed (a stock llama.cpp build: infra/install.sh builds one that skips it)"
        return "computed (skip_lm_head is off)"

    @property
    def unordered_slots(self) -> int:
        """Decodes of this process whose KV cells llama.cpp could not keep in position order (0 on a stock build,
        which never tries)."""
        return self._unordered_slots() if self._unordered_slots else 0

    @property
    def decoded_by(self) -> dict[str, str | int]:
        """What a vector depends on beyond the job's options, for the output's metadata: vectors with another of
        these differ in their last digits (README, Batch invariance), so queries are embedded alike
        (EngineOptions.like)."""
        o = self.options
        return {"layout": "isolated" if o.isolate else "packed", "min_decode": o.min_decode, "ubatch": o.ubatch,
                "flash_attn": FLASH_ATTN_WORDS[o.flash_attn], "device": "GPU" if self.gpu_offload else "CPU",
                "pooled_on": "host" if self.pools_on_host else "device", "llama_cpp": self._llama.__version__}

    def close(self) -> None:
        if self._context:
            self._context.free()
            self._context = None
        if self.model:
            self._llama.llama_model_free(self.model)
            self.model = None

    def shape_for(self, lengths: Sequence[int], pooling: Pooling | None = None,
                  ubatch_cap: int | None = None) -> ContextShape:
        return choose_shape(lengths, ubatch_cap or self.options.ubatch, pooling or self.pooling,
                            self.options.logical_batch, self.info.causal, self.options.min_decode, self.options.isolate)

    def _context_for(self, shape: ContextShape) -> _Context:
        current = self._context
        if current and replace(current.shape, n_ctx=shape.n_ctx) == shape \
                and shape.n_ctx <= current.shape.n_ctx <= 2 * shape.n_ctx:
            current.forget()
            return current
        if current:
            current.free()
        self._context = None
        started = time.perf_counter()
        self._context = _Context(self._llama, self.model, shape, self.options, self.lm_head_skipped)
        if self._head_skipped_by is not None and self._head_skipped_by(self._context.ctx) != self.lm_head_skipped:
            raise EngineError(f"llama.cpp made a context that {'computes' if self.lm_head_skipped else 'skips'} the "
                              f"LM head, against the engine's choice ({self.lm_head_state})")
        self.contexts_made += 1
        self.context_seconds += time.perf_counter() - started
        log.debug("new context %s", shape)
        return self._context

    def _decode(self, documents: Sequence[np.ndarray], shape: ContextShape,
                read: Callable[[_Context, list[Piece]], None]) -> None:
        """Run every planned decode; `read` takes each decode's results before the next one.

        The next decode's batch is filled while the device still computes this one: llama_decode has copied
        the batch when it returns, and its results are waited for only when `read` asks for them."""
        shape = with_min_decode(shape, self.options.min_decode)  # a caller's shape too: every decode in one regime
        if self.options.isolate and not shape.isolated:
            shape = replace(shape, isolated=True)
        context = self._context_for(shape)
        llama = self._llama
        plan = plan_decodes([len(d) for d in documents], shape)
        pieces = next(plan, None)
        n_tokens = _fill(context, documents, pieces) if pieces else 0
        while pieces:
            context.batch.n_tokens = n_tokens
            status = llama.llama_decode(context.ctx, context.batch)
            if status != 0:
                context.forget()
                raise EngineError(f"llama_decode returned {status} for a {n_tokens}-token batch ({shape})")
            following = next(plan, None)
            n_next = _fill(context, documents, following) if following else 0
            read(context, pieces)
            if shape.isolated and pieces[0].last:
                context.forget()  # the next document starts from the first cell, as it would alone
            else:
                for p in pieces:
                    if p.last:
                        context.forget(p.seq)
                if shape.min_decode:
                    context.forget(shape.padding_seq)
            pieces, n_tokens = following, n_next

    def _fit(self, shape: ContextShape, pooling: Pooling, lengths: Sequence[int]) -> ContextShape:
        """A caller's shape (the self-test's, a benchmark's) made to pool as asked and to respect what the
        model is: a non-causal model's documents whole in one ubatch, within its position table."""
        if self.info.causal:
            return replace(shape, pooling=pooling)
        if self.info.arch == "bert" and max(lengths, default=0) > self.info.n_ctx_train:
            raise EngineError(f"a {max(lengths)}-token document is longer than {self.model_path.name}'s "
                              f"{self.info.n_ctx_train} positions")
        if max(lengths, default=0) > shape.n_ubatch or shape.n_batch:
            return choose_shape(lengths, shape.n_ubatch, pooling, 0, causal=False)
        return replace(shape, pooling=pooling, causal=False)

    def embed(self, documents: Sequence[np.ndarray], shape: ContextShape | None = None,
              pooling: Pooling | None = None) -> np.ndarray:
        """Each document's vector pooled as `pooling` says (default: the model's own), float32 (n_docs, n_embd),
        not normalized; equal to the document decoded alone in one ubatch."""
        pooling = pooling or self.pooling
        if pooling is Pooling.NONE:
            raise ValueError("pooling none gives a matrix per document: use embed_tokens")
        lengths = [len(d) for d in documents]
        shape = self._fit(shape or self.shape_for(lengths, pooling), pooling, lengths)
        out = np.zeros((len(documents), self.n_embd), np.float64)
        # Decodes above the ubatch (logical_batch, the bench's seed emulation) run as upstream tools do, pooled as
        # they pool: in the graph, per ubatch (which the self-test must see fail).
        if self.pools_on_host and not shape.n_batch:
            unordered = self.unordered_slots
            self._decode(documents, replace(shape, pooling=Pooling.NONE), self._host_pooler(pooling, out))
            if self.unordered_slots > unordered:
                log.warning("llama.cpp placed KV cells out of position order in %d decodes (%s): the documents split "
                            "across them may differ in their last bits from other runs", self.unordered_slots -
                            unordered, shape)
        else:
            self._decode(documents, shape, self._graph_pooler(pooling, out))
        if pooling is Pooling.MEAN:
            out /= np.asarray(lengths, np.float64)[:, None]
        return out.astype(np.float32)

    def _graph_pooler(self, pooling: Pooling, out: np.ndarray) -> Callable[[_Context, list[Piece]], None]:
        """Reads llama.cpp's pooled vector of each piece into `out` (mean: its token-weighted sum)."""
        llama = self._llama

        def pooled(context: _Context, seq: int) -> np.ndarray:
            pointer = llama.llama_get_embeddings_seq(context.ctx, seq)
            if not pointer:
                raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            return np.ctypeslib.as_array(pointer, shape=(self.n_embd,))

        def read(context: _Context, pieces: list[Piece]) -> None:
            for p in pieces:
                if pooling is Pooling.MEAN:
                    # Token-weighted mean of the pieces' means: the exact mean of the whole document.
                    out[p.doc] += pooled(context, p.seq) * (p.stop - p.start)
                elif pooling is Pooling.CLS and p.start == 0 or pooling is Pooling.LAST and p.last:
                    # The first token sees only what precedes it (causal) or is pooled whole (non-causal):
                    # the first piece holds it; the last token has seen everything in the last piece.
                    out[p.doc] = pooled(context, p.seq)

        return read

    def _host_pooler(self, pooling: Pooling, out: np.ndarray) -> Callable[[_Context, list[Piece]], None]:
        """Pools each piece's token states into `out` on the host (mean: their sum, in float64, one token after
        another in document order, so the result does not depend on where the document was cut or placed)."""
        def read(context: _Context, pieces: list[Piece]) -> None:
            for p, states in zip(pieces, self._token_states(context, pieces), strict=True):
                if pooling is Pooling.MEAN:
                    out[p.doc] = np.cumsum(np.vstack((out[p.doc], states)), axis=0)[-1]
                elif pooling is Pooling.CLS and p.start == 0:
                    out[p.doc] = states[0]
                elif pooling is Pooling.LAST and p.last:
                    out[p.doc] = states[-1]

        return read

    def _token_states(self, context: _Context, pieces: list[Piece]) -> list[np.ndarray]:
        """Each piece's tokens' last hidden states (views into llama.cpp's output, valid until the next decode): every
        token of a decode is an output, in batch order, the padding's last."""
        ends = np.cumsum([p.stop - p.start for p in pieces])
        rows = np.ctypeslib.as_array(self._llama.llama_get_embeddings(context.ctx), shape=(ends[-1], self.n_embd))
        return np.split(rows, ends[:-1])

    def embed_tokens(self, documents: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every token's last hidden state: (n_tokens, n_embd) float32 per document."""
        shape = self.shape_for([len(d) for d in documents], Pooling.NONE)
        out = [np.empty((len(d), self.n_embd), np.float32) for d in documents]

        def read(context: _Context, pieces: list[Piece]) -> None:
            for p, states in zip(pieces, self._token_states(context, pieces), strict=True):
                out[p.doc][p.start:p.stop] = states

        self._decode(documents, shape, read)
        return out


def _fill(context: _Context, documents: Sequence[np.ndarray], pieces: list[Piece]) -> int:
    """Put one decode's pieces into the context's batch arrays, then the padding the shape asks for after them (a
    sequence of its own: its outputs come last and are never read); the number of tokens."""
    offset = 0
    for p in pieces:
        end = offset + p.stop - p.start
        context.tokens[offset:end] = documents[p.doc][p.start:p.stop]
        context.positions[offset:end] = np.arange(p.start, p.stop, dtype=np.int32)
        context.seq_pointers[offset:end] = context.seq_pointer_of[p.seq]
        offset = end
    if padding := context.shape.padding(offset):
        end = offset + padding
        context.tokens[offset:end] = PAD_TOKEN
        context.positions[offset:end] = np.arange(padding, dtype=np.int32)
        context.seq_pointers[offset:end] = context.seq_pointer_of[context.shape.padding_seq]
        offset = end
    return offset


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
