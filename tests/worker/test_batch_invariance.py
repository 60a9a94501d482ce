"""A text's vector does not depend on its neighbours: batch invariance, on a model with the outlier activations of
trained weights (tests/conftest.py: outlier_models), where llama.cpp's kernel regimes show.

llama.cpp's CPU kernels choose their path by a decode's token count (docs/notes.md 30): without padding the same text
gets one vector alone and another in a decode of 64 tokens or more. The engine pads every decode to
MIN_DECODE_TOKENS, and then a text's vector is the same, to the fifth digit of its cosine, whatever shard, plan,
ubatch cap or neighbours it gets, flash attention on or off. With flash attention on (the default), the project's
llama.cpp build and the engine's host pooling make it the same bits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bulkembed.synthetic import quantize
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.packing import MIN_DECODE_TOKENS, single_document_shape
from tests.conftest import letter_texts

# What remains with every decode in one regime but flash attention off (or a stock llama.cpp build): where a text's
# KV cells sit in the cache it shares with its neighbours (sums over cells group them by position in the cache).
# README's contract on CPU there: cos >= 0.99999 for Q8_0 and K-quants (worst measured 1 - cos = 4.7e-6: Q8_0, no
# flash attention, ubatch 256), >= 0.99998 for IQ types (IQ3_S: 1.0e-5), against 1.8e-4 without padding on this model
# (benchmarks/batch_invariance.py) and 1.3e-2 on a real one (docs/notes.md 30).
SAME = 0.99999
BOUND = {"Q8_0": SAME, "Q4_K_M": SAME, "IQ3_S": 0.99998}
QUANTS = list(BOUND)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def engine(path, ubatch: int = 512, min_decode: int = MIN_DECODE_TOKENS, flash_attn: bool | None = None) -> Engine:
    return Engine(path, EngineOptions(ubatch=ubatch, threads=2, min_decode=min_decode, flash_attn=flash_attn))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return letter_texts(60, seed=5, longest=700)


@pytest.mark.parametrize("quant", ["Q4_K_M"])
def test_without_padding_a_short_text_changes_with_the_size_of_its_decode(outlier_models, quant):
    """What the padding is for, and proof that the tests below can fail: today's engine (no padding) gives a 7-token
    text one vector alone and another beside 60 more tokens, where flash attention takes its tiled path."""
    unpadded = engine(outlier_models[quant], min_decode=0)
    try:
        text = unpadded.vocab.tokenize("the sea and")[:7]
        neighbour = unpadded.vocab.tokenize(" ".join(["river"] * 80))[:60]
        alone = unpadded.embed([text], single_document_shape(len(text)))[0]
        packed = unpadded.embed([text, neighbour])[0]
    finally:
        unpadded.close()
    assert cos(alone, packed)[0] < SAME, "no kernel regime shows: the model lacks outliers"


@pytest.mark.parametrize("quant", QUANTS)
def test_a_text_gets_one_vector_whatever_its_decode(outlier_models, quant, texts):
    """Alone, beside 1 to 400 other tokens, in shards cut 1, 7 or 60 texts at a time, under ubatch caps 64 to 512:
    every way of embedding a text gives the vector it gets alone."""
    padded = engine(outlier_models[quant])
    try:
        tokens = [padded.vocab.tokenize(t) for t in texts]
        alone = np.stack([padded.embed([t], single_document_shape(len(t)))[0] for t in tokens])
        filler = padded.vocab.tokenize(" ".join(["grain"] * 500))
        for extra in (1, 8, 57, 64, 400):
            for i in (1, 2, 3):  # short texts: where the regimes differed
                got = padded.embed([tokens[i], filler[:extra]])[0]
                assert cos(got, alone[i])[0] >= BOUND[quant], f"text {i} beside {extra} tokens"
        for cap in (64, 256, 512):
            for shard_size in (1, 7, 60):
                got = np.concatenate([padded.embed(tokens[s:s + shard_size], padded.shape_for(
                    [len(t) for t in tokens[s:s + shard_size]], ubatch_cap=cap)) for s in range(0, len(tokens),
                                                                                                  shard_size)])
                worst = cos(got, alone)
                assert worst.min() >= BOUND[quant], f"cap {cap}, shards of {shard_size}: text {worst.argmin()}"
        assert max(map(len, tokens)) > 512, "some texts are decoded in pieces"
    finally:
        padded.close()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash-attn", "no-flash-attn"])
def test_invariance_holds_with_flash_attention_on_and_off(outlier_models, texts, quant, flash_attn):
    padded = engine(outlier_models[quant], flash_attn=flash_attn)
    try:
        tokens = [padded.vocab.tokenize(t) for t in texts]
        alone = np.stack([padded.embed([t], single_document_shape(len(t)))[0] for t in tokens])
        for cap in (256, 512):
            packed = padded.embed(tokens, padded.shape_for([len(t) for t in tokens], ubatch_cap=cap))
            assert cos(packed, alone).min() >= BOUND[quant], f"ubatch cap {cap}"
    finally:
        padded.close()


# With flash attention on (the default), the project's build and engine leave a text's vector nothing to depend on
# but its tokens, on the CPU: the flash attention cuts its KV tiles from the cells each sequence sees, in cache order
# (infra/llama-cpp/patches/0002); a sequence's cells stay in position order however its document is cut into decodes
# (patch 0003, and contexts with room for it: packing.choose_shape's room_for_order); every decode's size is a
# multiple of 16, so the repacked K-quant matmuls take every row by one path (packing.DECODE_MULTIPLE); and the engine
# pools on the host, token after token in document order, not in a sum over the ubatch. A text then gets the same
# bits alone, beside other neighbours, and cut into pieces by any ubatch cap.
def cuts(padded: Engine, tokens: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The same texts embedded alone and in the ways a job may cut them: ubatch caps 512 and 256, other neighbours."""
    lengths = [len(t) for t in tokens]
    return {
        "alone": np.stack([padded.embed([t], single_document_shape(len(t)))[0] for t in tokens]),
        "ubatch 512": padded.embed(tokens, padded.shape_for(lengths, ubatch_cap=512)),
        "ubatch 256": padded.embed(tokens, padded.shape_for(lengths, ubatch_cap=256)),
        "other neighbours": padded.embed(tokens[::-1], padded.shape_for(lengths[::-1], ubatch_cap=512))[::-1],
    }


def rows_not_bit_identical(vectors: dict[str, np.ndarray]) -> int:
    """Rows of every cut that are not the same bits as the text alone."""
    alone = vectors["alone"]
    return sum(int((~np.all(v == alone, axis=1)).sum()) for v in vectors.values())


@pytest.mark.parametrize("quant", QUANTS)
def test_on_cpu_a_text_keeps_its_bits_wherever_it_is_cut_or_placed(outlier_models, quant, texts, monkeypatch):
    padded = engine(outlier_models[quant], flash_attn=True)
    try:
        assert padded.pools_on_host, "an engine on the CPU pools on the host"
        tokens = [padded.vocab.tokenize(t) for t in texts]
        assert max(map(len, tokens)) > 512, "some texts are decoded in pieces under every cap"
        unordered = padded.unordered_slots
        assert rows_not_bit_identical(cuts(padded, tokens)) == 0
        assert padded.unordered_slots == unordered, "every decode kept its cells in position order"
        # Each part taken away, the bits move (the test can fail): the KV tiles cut from cell 0 as upstream does,
        # a split document's later cells placed before its earlier ones as upstream may.
        for switch in ("GGML_CPU_FA_GATHER", "LLAMA_KV_ORDERED"):
            monkeypatch.setenv(switch, "0")
            assert rows_not_bit_identical(cuts(padded, tokens)) > 0, f"{switch}=0 changes nothing"
            monkeypatch.delenv(switch)
    finally:
        padded.close()
    graph_pooled = Engine(outlier_models[quant], EngineOptions(threads=2, flash_attn=True, pool_on_host=False))
    try:
        assert rows_not_bit_identical(cuts(graph_pooled, tokens)) > 0, "llama.cpp's pooling is cut-independent"
    finally:
        graph_pooled.close()


def test_queries_pool_where_their_index_pooled(tiny_model):
    """`decoded_by` records where a job pooled; EngineOptions.like (--index) pools there again. Outputs written before
    the engine pooled on the host record nothing: llama.cpp's graph pooled them."""
    padded = engine(tiny_model)
    try:
        recorded = padded.decoded_by
    finally:
        padded.close()
    assert recorded["pooled_on"] == "host" and EngineOptions().like(recorded).pool_on_host is True
    older = {key: value for key, value in recorded.items() if key != "pooled_on"}
    assert EngineOptions().like(older).pool_on_host is False


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q4_0", "IQ4_NL", "Q5_K_M", "Q6_K"])
def test_other_types_keep_their_bits_too(outlier_models, kind, texts, tmp_path):
    """Every kind of CPU matmul the types above do not take: F16/BF16 (llamafile's sgemm), Q4_0 and IQ4_NL (repacked
    with a lookup table), Q5_K and Q6_K."""
    path = outlier_models["F32"] if kind == "F32" else quantize(
        outlier_models["F32"], tmp_path / f"outlier-text-retrieval-{kind}.gguf", kind, threads=2)
    padded = engine(path, flash_attn=True)
    try:
        assert rows_not_bit_identical(cuts(padded, [padded.vocab.tokenize(t) for t in texts])) == 0
    finally:
        padded.close()


def test_decodes_of_any_size_keep_the_bits_of_repacked_k_quants(outlier_models, texts, monkeypatch):
    """Q4_K_M's repacked matmul takes rows sixteen at a time and the rest another way: decodes of any size, not a
    multiple of 16, move the rows at their end."""
    import bulkembed.worker.packing as packing

    padded = engine(outlier_models["Q4_K_M"], flash_attn=True)
    try:
        tokens = [padded.vocab.tokenize(t) for t in texts]
        monkeypatch.setattr(packing, "DECODE_MULTIPLE", 1)
        assert rows_not_bit_identical(cuts(padded, tokens)) > 0
    finally:
        padded.close()


def test_every_decode_carries_at_least_the_minimum(outlier_models):
    """Padding tops a short decode up; a full one gets none."""
    shape = single_document_shape(7, MIN_DECODE_TOKENS)
    assert shape.padding(7) == MIN_DECODE_TOKENS - 7 and shape.padding(MIN_DECODE_TOKENS) == 0
    assert shape.n_ubatch >= MIN_DECODE_TOKENS and shape.n_ubatch % shape.n_seq_max == 0
    assert shape.n_ctx >= 7 + 1 + MIN_DECODE_TOKENS


def test_workers_pad_to_the_minimum_by_default():
    from bulkembed.contract.settings import WorkerSettings

    assert WorkerSettings().min_decode == MIN_DECODE_TOKENS == EngineOptions().min_decode


# Isolation (--isolate): one document a decode, from the first cell of an emptied cache, so its decodes are a
# function of its own tokens. The CPU build here would hide what it is for (padding and patch 0002 already give
# invariance), so these tests take both away: without padding and with the KV tiles cut from cell 0 (upstream's
# tiling), the CPU's kernels move a packed text's vector with its decode's size and its cells' place, as llama.cpp's
# CUDA kernels do (an emulation of such a backend, not a GPU). Isolated, every text keeps its bits.
def isolation_cuts(engine_: Engine, tokens: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The same texts as a job may cut them under one ubatch cap: alone, in shards of 7 and of all, in reverse."""
    lengths = [len(t) for t in tokens]
    return {
        "alone": np.stack([engine_.embed([t])[0] for t in tokens]),
        "shards of 7": np.concatenate([engine_.embed(tokens[s:s + 7]) for s in range(0, len(tokens), 7)]),
        "one shard": engine_.embed(tokens, engine_.shape_for(lengths)),
        "other neighbours": engine_.embed(tokens[::-1])[::-1],
    }


@pytest.mark.parametrize("quant", ["Q8_0", "IQ3_S"])
def test_isolated_a_text_keeps_its_bits_where_kernels_move_it(outlier_models, quant, texts, monkeypatch):
    monkeypatch.setenv("GGML_CPU_FA_GATHER", "0")
    options = EngineOptions(ubatch=256, threads=2, min_decode=0, flash_attn=True)
    packed = Engine(outlier_models[quant], options)
    isolated = Engine(outlier_models[quant], replace(options, isolate=True))
    try:
        tokens = [packed.vocab.tokenize(t) for t in texts]
        assert max(map(len, tokens)) > 256, "some texts are decoded in pieces"
        packed_cut = isolation_cuts(packed, tokens)
        assert rows_not_bit_identical(packed_cut) > 10, "the kernels do not move vectors here"
        cut = isolation_cuts(isolated, tokens)
        assert rows_not_bit_identical(cut) == 0
        # Another ubatch cap cuts long texts elsewhere; the ones it does not cut keep their bits.
        wider = Engine(outlier_models[quant], replace(options, ubatch=512, isolate=True))
        try:
            uncut = np.array([len(t) <= 256 for t in tokens])
            assert np.all(wider.embed(tokens)[uncut] == cut["alone"][uncut])
        finally:
            wider.close()
        # Isolation changes nothing but the layout: the vectors are the model's, as close to packed ones as ever.
        assert cos(cut["alone"], packed_cut["alone"]).min() >= BOUND[quant]
    finally:
        packed.close()
        isolated.close()


def test_an_isolated_plan_holds_one_document_a_decode():
    from bulkembed.worker.packing import choose_shape, plan_decodes

    lengths = [5, 300, 40, 1, 700]
    packed_shape = choose_shape(lengths, 256, min_decode=MIN_DECODE_TOKENS)
    # The engine's own isolated shape, and a caller's packed one (the self-test's, a probe's) made isolated.
    for shape in (choose_shape(lengths, 256, min_decode=MIN_DECODE_TOKENS, isolated=True),
                  replace(packed_shape, isolated=True)):
        decodes = list(plan_decodes(lengths, shape))
        assert all(len({p.doc for p in pieces}) == 1 for pieces in decodes)
        assert [p.doc for pieces in decodes for p in pieces] == [0, 1, 1, 2, 3, 4, 4, 4]
        assert [p.stop - p.start for pieces in decodes for p in pieces] == [5, 256, 44, 40, 1, 256, 256, 188]
    packed = list(plan_decodes(lengths, packed_shape))
    assert len(packed) < len(decodes) and any(len(pieces) > 1 for pieces in packed)


def test_llama_cpp_counts_the_decodes_whose_cells_it_could_not_keep_in_order(tiny_model):
    """Patch 0003 places a split document's new cells after the ones it holds. The engine's plans always leave room
    for that (worker/packing.py); where there is none, llama.cpp places them as upstream does, and counts it."""
    from bulkembed.worker.engine import _fill
    from bulkembed.worker.packing import ContextShape, Piece

    engine_ = engine(tiny_model, ubatch=128, min_decode=0)
    try:
        context = engine_._context_for(ContextShape(n_ctx=256, n_ubatch=128, n_seq_max=2))
        documents = [np.full(200, 5, np.int32), np.full(200, 7, np.int32)]

        def decode(*pieces: Piece) -> None:
            context.batch.n_tokens = _fill(context, documents, list(pieces))
            assert engine_._llama.llama_decode(context.ctx, context.batch) == 0

        decode(Piece(0, 0, 0, 100, False))  # cells 0-99
        decode(Piece(1, 1, 0, 100, False))  # cells 100-199
        context.forget(0)
        before = engine_.unordered_slots
        decode(Piece(1, 1, 100, 150, False))  # 56 free cells above its own: they take 50
        assert engine_.unordered_slots == before
        decode(Piece(1, 1, 150, 200, True))  # 6 left above, 100 free below
        assert engine_.unordered_slots == before + 1
    finally:
        engine_.close()
