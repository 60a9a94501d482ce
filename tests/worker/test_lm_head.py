"""The LM head left out (infra/llama-cpp/patches/0001): the same vectors as with it, for every model kind and
pooling, pieces across decodes included; the engine says which it runs. These tests run on the patched build
that infra/install.sh makes (and CI uses); the head-computed side is what a stock build runs."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from bulkembed.contract.job import Pooling
from bulkembed.worker.engine import Engine, EngineOptions, lm_head_skipper
from tests.conftest import letter_texts

UBATCH = 64
# Each attention kind with each pooling its rows may ask for (none: every token's vector).
CASES = [("qwen2vl", Pooling.MEAN), ("qwen2vl", Pooling.CLS), ("qwen2vl", Pooling.LAST), ("qwen2vl", Pooling.NONE),
         ("qwen3-last", Pooling.LAST), ("qwen3-last", Pooling.MEAN), ("bert-mean", Pooling.MEAN),
         ("bert-cls", Pooling.CLS), ("bert-mean", Pooling.NONE)]


@pytest.fixture(scope="module")
def models(kind_models, tiny_model):
    return kind_models | {"qwen2vl": tiny_model}


def test_the_build_is_the_patched_one():
    assert lm_head_skipper(llama_cpp) is not None, "llama-cpp-python without the patch: run infra/install.sh"


def _embed(path, pooling: Pooling, skip: bool) -> tuple[list[np.ndarray], Engine]:
    engine = Engine(path, EngineOptions(ubatch=UBATCH, threads=2, skip_lm_head=skip))
    try:
        texts = letter_texts(24, seed=11, longest=min(480, 6 * UBATCH))
        tokens = [engine.vocab.tokenize(t) for t in texts]
        if engine.info.causal:
            assert max(map(len, tokens)) > 2 * UBATCH, "some documents are decoded in pieces"
        if pooling is Pooling.NONE:
            return engine.embed_tokens(tokens), engine
        return list(engine.embed(tokens, pooling=pooling)), engine
    finally:
        engine.close()


@pytest.mark.parametrize("model,pooling", CASES, ids=lambda c: getattr(c, "value", c))
def test_vectors_without_the_head_equal_those_with_it(models, model, pooling):
    skipped, engine = _embed(models[model], pooling, skip=True)
    assert engine.lm_head_skipped and engine.lm_head_state == "skipped"
    computed, engine = _embed(models[model], pooling, skip=False)
    assert not engine.lm_head_skipped and engine.lm_head_state.startswith("computed")
    for a, b in zip(skipped, computed, strict=True):
        np.testing.assert_array_equal(a, b)  # the head never feeds the hidden states: bit for bit
    first, second = (np.atleast_2d(v)[-1] for v in skipped[:2])  # (the last token's, under pooling none)
    assert not np.allclose(first, second), "different texts, different vectors: the test could fail"


def test_a_context_without_the_head_has_no_logits(tiny_model):
    """What the patch removes: llama.cpp keeps no logits for an embeddings context (its host buffer and the copy
    into it are gone) and says so; with the head, the logits are there."""
    for skip in (True, False):
        engine = Engine(tiny_model, EngineOptions(ubatch=UBATCH, threads=2, skip_lm_head=skip))
        try:
            engine.embed([engine.vocab.tokenize("the sea and the river")])
            ctx = engine._context.ctx
            assert engine._head_skipped_by(ctx) is skip
            assert bool(llama_cpp.llama_get_logits(ctx)) is not skip
        finally:
            engine.close()


def test_a_stock_build_is_reported_as_computing_the_head(tiny_model, monkeypatch):
    """A stock llama-cpp-python has no llama_get_embeddings_no_logits: the engine computes the head, says so, and
    embeds the same vectors."""
    monkeypatch.setattr("bulkembed.worker.engine.lm_head_skipper", lambda llama: None)
    engine = Engine(tiny_model, EngineOptions(ubatch=UBATCH, threads=2))
    try:
        assert not engine.lm_head_skipped
        assert "stock llama.cpp build" in engine.lm_head_state and "infra/install.sh" in engine.lm_head_state
        tokens = engine.vocab.tokenize("the sea and the river")
        stock = engine.embed([tokens])
        assert bool(llama_cpp.llama_get_logits(engine._context.ctx)), "a stock context keeps its logits"
    finally:
        engine.close()
    patched = Engine(tiny_model, EngineOptions(ubatch=UBATCH, threads=2))
    try:
        np.testing.assert_array_equal(patched.embed([tokens]), stock)
    finally:
        patched.close()
