"""Every model kind exact: each packed vector equals the document embedded alone in one ubatch by llama.cpp
with the same pooling, for non-causal encoders (documents never split) and causal decoders (pieces)."""

from __future__ import annotations

import numpy as np
import pytest

from bulkembed.contract.errors import ModelError
from bulkembed.contract.job import Pooling
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.selftest import MIN_COSINE, embed_alone, self_test
from tests.conftest import cosines, letter_texts

EXACT = 0.9999
# (model, pooling asked for; None = the model's own): each attention kind with each pooling.
CASES = [("bert-mean", None), ("bert-cls", None), ("bert-mean", Pooling.LAST), ("qwen3-last", None),
         ("qwen3-last", Pooling.CLS), ("qwen3-last", Pooling.MEAN)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return letter_texts(40, seed=7, longest=480)


def _engine(kind_models, model: str, ubatch: int) -> Engine:
    return Engine(kind_models[model], EngineOptions(ubatch=ubatch, threads=2))


@pytest.fixture(scope="module")
def alone(kind_models, texts):
    """Each text's tokens and vector embedded alone in one ubatch, per (model, pooling): the reference."""
    cache: dict[tuple[str, Pooling | None], tuple[list[np.ndarray], np.ndarray]] = {}

    def reference(model: str, pooling: Pooling | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        if (model, pooling) not in cache:
            engine = _engine(kind_models, model, 64)
            try:
                tokens = [engine.vocab.tokenize(t) for t in texts]
                cache[model, pooling] = tokens, np.stack([embed_alone(engine, t, pooling) for t in tokens])
            finally:
                engine.close()
        return cache[model, pooling]

    return reference


@pytest.mark.parametrize("model,pooling", CASES)
@pytest.mark.parametrize("ubatch", [64, 160])  # 160: a cap that is no power of two
def test_packed_equals_alone(kind_models, alone, model, pooling, ubatch):
    tokens, reference = alone(model, pooling)
    assert max(map(len, tokens)) > 2 * ubatch, "documents longer than the ubatch cap"
    engine = _engine(kind_models, model, ubatch)
    try:
        got = engine.embed(tokens, pooling=pooling)
    finally:
        engine.close()
    sims = cosines(got, reference)
    assert sims.min() >= EXACT, f"document {int(sims.argmin())} ({len(tokens[sims.argmin()])} tokens): {sims.min()}"
    assert cosines(reference[:-1], reference[1:]).min() < 0.99, "the texts' vectors differ: the test could fail"


@pytest.mark.parametrize("model", ["bert-mean", "bert-cls", "qwen3-last"])
@pytest.mark.parametrize("shard_size", [1, 7, 25])
def test_invariant_to_shard_composition(kind_models, alone, model, shard_size):
    tokens, reference = alone(model)
    engine = _engine(kind_models, model, 64)
    try:
        got = np.concatenate([engine.embed(tokens[i:i + shard_size]) for i in range(0, len(tokens), shard_size)])
    finally:
        engine.close()
    assert cosines(got, reference).min() >= EXACT


@pytest.mark.parametrize("model", ["bert-mean", "bert-cls", "qwen3-last"])
def test_alone_is_what_llama_embed_gives(kind_models, texts, model):
    """The reference itself, checked against llama-cpp-python's Llama.embed with the model's own pooling."""
    from llama_cpp import Llama

    llm = Llama(str(kind_models[model]), embedding=True, n_ctx=1024, n_batch=1024, n_ubatch=1024, n_threads=2,
                verbose=False)
    engine = _engine(kind_models, model, 64)
    try:
        tokens = [engine.vocab.tokenize(t) for t in texts[:20]]
        ours = engine.embed(tokens)
    finally:
        engine.close()
    theirs = np.array([llm.embed(t, normalize=False) for t in texts[:20]])
    assert cosines(ours, theirs).min() >= EXACT


def test_non_causal_documents_are_never_split(kind_models):
    """The ubatch grows to hold the longest document whole, whatever the cap; splitting would be wrong."""
    engine = _engine(kind_models, "bert-mean", 32)
    try:
        shape = engine.shape_for([5, 40, 300])
        assert not shape.causal and shape.n_ubatch >= 300 and shape.n_ubatch % shape.n_seq_max == 0
        long = engine.vocab.tokenize(letter_texts(1, seed=1, longest=480)[0])
        half = len(long) // 2
        whole = embed_alone(engine, long)
        # What a causal-style split would give: the token-weighted mean of the halves' means, each half
        # seeing only itself. Not the document's vector: why non-causal models are never split.
        first, second = embed_alone(engine, long[:half]), embed_alone(engine, long[half:])
        split = (first * half + second * (len(long) - half)) / len(long)
        assert cosines(split[None], whole[None])[0] < EXACT
        assert cosines(engine.embed([long])[None, 0], whole[None])[0] >= EXACT
    finally:
        engine.close()


def test_a_reranker_is_refused_at_load(kind_models):
    with pytest.raises(ModelError, match="declares rank pooling: it is a reranker"):
        Engine(kind_models["bert-rank"], EngineOptions(threads=2))


@pytest.mark.parametrize("model", ["bert-mean", "bert-cls", "qwen3-last"])
def test_self_test_passes_for_every_kind(kind_models, model):
    engine = _engine(kind_models, model, 64)
    try:
        assert self_test(engine) >= MIN_COSINE
    finally:
        engine.close()
