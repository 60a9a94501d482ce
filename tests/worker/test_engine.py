"""Batch invariance, the first feature: every packed embedding equals the document embedded alone."""

from __future__ import annotations

import numpy as np
import pytest

from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.packing import ContextShape, choose_shape
from tests.conftest import cosines, mixed_texts

EXACT = 0.9999


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return ["Passage: " + t for t in mixed_texts(80, seed=3)]


@pytest.fixture(scope="module")
def reference(texts, reference_embedder) -> np.ndarray:
    return reference_embedder(texts)


@pytest.mark.parametrize("ubatch", [32, 64, 128, 512])
def test_packed_equals_single(tiny_model, texts, reference, ubatch):
    engine = Engine(tiny_model, EngineOptions(ubatch=ubatch, threads=2))
    try:
        tokens = [engine.vocab.tokenize(t) for t in texts]
        lengths = [len(t) for t in tokens]
        assert max(lengths) >= 2 * 64 and min(lengths) < 20, "the corpus must mix short and long documents"
        got = engine.embed(tokens)
    finally:
        engine.close()
    sims = cosines(got, reference)
    assert sims.min() >= EXACT, f"worst document {int(sims.argmin())} ({lengths[sims.argmin()]} tokens): {sims.min()}"


@pytest.mark.parametrize("shard_size", [1, 7, 25])
def test_invariant_to_shard_composition(tiny_model, texts, reference, shard_size):
    engine = Engine(tiny_model, EngineOptions(ubatch=64, threads=2))
    try:
        tokens = [engine.vocab.tokenize(t) for t in texts]
        got = np.concatenate([engine.embed(tokens[i:i + shard_size]) for i in range(0, len(tokens), shard_size)])
    finally:
        engine.close()
    assert cosines(got, reference).min() >= EXACT


def test_edge_lengths(tiny_model, reference_embedder):
    """1 token, exactly ub, ub + 1, and a document that fills the context."""
    engine = Engine(tiny_model, EngineOptions(ubatch=64, threads=2))
    try:
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        texts = ["x"] + [(alphabet * 40)[:n] for n in (63, 64, 65, 127, 128, 129, 1000)]
        tokens = [engine.vocab.tokenize(t) for t in texts]
        assert [len(t) for t in tokens] == [1, 63, 64, 65, 127, 128, 129, 1000]
        got = engine.embed(tokens)
    finally:
        engine.close()
    assert cosines(got, reference_embedder(texts)).min() >= EXACT


def test_one_decode_over_ubatch_is_wrong_upstream(tiny_model, reference_embedder):
    """Why the packer exists: one llama_decode holding more than n_ubatch tokens pools per ubatch
    and returns the last piece's mean (docs/notes.md 1). This is what our threshold must catch."""
    import llama_cpp

    text = ("the river and the sea over alpha beta gamma " * 20)[:600]
    engine = Engine(tiny_model, EngineOptions(threads=2))
    try:
        tokens = engine.vocab.tokenize(text)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 1024, 1024, 64, 1
        params.embeddings, params.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_MEAN
        ctx = llama_cpp.llama_init_from_model(engine.model, params)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens.tolist()):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(ctx, batch) == 0
        llama_cpp.llama_batch_free(batch)
        naive = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0), shape=(engine.n_embd,)).copy()
        llama_cpp.llama_free(ctx)
        exact = engine.embed([tokens])
    finally:
        engine.close()
    reference = reference_embedder([text])
    assert cosines(exact, reference)[0] >= EXACT
    assert cosines(naive[None, :], reference)[0] < EXACT


def test_context_is_reused_when_the_shape_repeats(tiny_model):
    engine = Engine(tiny_model, EngineOptions(ubatch=64, threads=2))
    try:
        docs = [engine.vocab.tokenize("alpha beta gamma " * k) for k in (1, 2, 3)]
        engine.embed(docs)
        first = engine._context
        engine.embed(docs)
        assert engine._context is first
        engine.embed(docs, ContextShape(n_ctx=2048, n_ubatch=64, n_seq_max=64))
        assert engine._context is not first
    finally:
        engine.close()


def test_choose_shape_never_aborts_llama(tiny_model):
    """n_seq_max must divide n_ubatch under MEAN pooling, or llama.cpp aborts the process (docs/notes.md 4)."""
    engine = Engine(tiny_model, EngineOptions(threads=2))
    try:
        for cap in (96, 100, 500, 768):
            shape = choose_shape([3, 40, 700], cap)
            assert shape.n_ubatch % shape.n_seq_max == 0
            assert engine.embed([engine.vocab.tokenize("alpha beta")], shape).shape == (1, engine.n_embd)
    finally:
        engine.close()
