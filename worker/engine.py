"""The only module that runs llama.cpp: one resident model, exact MEAN-pooled embeddings.

The model is loaded once; a llama_context is made per context shape and kept while shards keep
asking for the same one. Batches are filled from numpy arrays (no per-token Python).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import EngineError, ModelError
from contract.vocab import Vocab, init_llama
from worker.packing import ContextShape, choose_shape, plan_decodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    ubatch: int = 512
    gpu_layers: int = -1  # -1: every layer, when the build can offload
    threads: int = 0  # 0: every core
    flash_attn: bool | None = None  # None: llama.cpp decides (on where supported)


class _Context:
    """A llama_context and the numpy-backed batch that feeds it."""

    def __init__(self, llama: object, model: object, shape: ContextShape, options: EngineOptions):
        self._llama = llama
        self.shape = shape
        params = llama.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_ubatch  # one decode is one ubatch: the pooled mean covers all of it
        params.n_ubatch = shape.n_ubatch
        params.n_seq_max = shape.n_seq_max
        params.embeddings = True
        params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
        params.kv_unified = True  # one cache shared by all sequences, sized by n_ctx
        threads = options.threads or os.cpu_count() or 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if options.flash_attn is not None:
            params.flash_attn_type = (
                llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx:
            raise EngineError(f"llama.cpp could not create a context {shape}")
        self.memory = llama.llama_get_memory(self.ctx)

        ub = shape.n_ubatch
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

    def free(self) -> None:
        if self.ctx:
            self._llama.llama_free(self.ctx)
            self.ctx = None


class Engine:
    """One GGUF embedding model, resident; `embed` turns token arrays into exact mean vectors."""

    def __init__(self, model_path: str | Path, options: EngineOptions = EngineOptions()):
        import llama_cpp

        init_llama()
        self._llama = llama_cpp
        self.options = options
        self.model_path = Path(model_path)
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
        self._context: _Context | None = None
        log.info("model %s loaded in %.1fs (n_embd %d, gpu offload %s)", self.model_path.name,
                 self.load_seconds, self.n_embd, offload)

    def close(self) -> None:
        if self._context:
            self._context.free()
            self._context = None
        if self.model:
            self._llama.llama_model_free(self.model)
            self.model = None

    def _context_for(self, shape: ContextShape) -> _Context:
        current = self._context
        if current and current.shape.n_ubatch == shape.n_ubatch and current.shape.n_seq_max == shape.n_seq_max \
                and shape.n_ctx <= current.shape.n_ctx <= 2 * shape.n_ctx:
            self._llama.llama_memory_clear(current.memory, True)
            return current
        if current:
            current.free()
        self._context = None
        self._context = _Context(self._llama, self.model, shape, self.options)
        log.debug("new context %s", shape)
        return self._context

    def embed(self, documents: Sequence[np.ndarray], shape: ContextShape | None = None) -> np.ndarray:
        """Mean of the last hidden states of each document, float32 (n_docs, n_embd), not normalized."""
        lengths = [len(d) for d in documents]
        shape = shape or choose_shape(lengths, self.options.ubatch)
        context = self._context_for(shape)
        llama = self._llama
        sums = np.zeros((len(documents), self.n_embd), np.float64)
        for pieces in plan_decodes(lengths, shape):
            offset = 0
            for p in pieces:
                end = offset + p.stop - p.start
                context.tokens[offset:end] = documents[p.doc][p.start:p.stop]
                context.positions[offset:end] = np.arange(p.start, p.stop, dtype=np.int32)
                context.seq_pointers[offset:end] = context.seq_pointer_of[p.seq]
                offset = end
            context.batch.n_tokens = offset
            status = llama.llama_decode(context.ctx, context.batch)
            if status != 0:
                llama.llama_memory_clear(context.memory, True)
                raise EngineError(f"llama_decode returned {status} for a {offset}-token batch ({shape})")
            for p in pieces:
                pointer = llama.llama_get_embeddings_seq(context.ctx, p.seq)
                if not pointer:
                    raise EngineError(f"llama.cpp returned no pooled embedding for sequence {p.seq}")
                piece_mean = np.ctypeslib.as_array(pointer, shape=(self.n_embd,))
                sums[p.doc] += piece_mean * (p.stop - p.start)  # token-weighted: exact whole mean
                if p.last:
                    llama.llama_memory_seq_rm(context.memory, p.seq, -1, -1)
        return (sums / np.asarray(lengths, np.float64)[:, None]).astype(np.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
