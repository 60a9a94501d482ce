"""Model facts from the GGUF header: the one place planning, the engine and the self-test read them from."""

import pytest

from bulkembed.contract.errors import InputError, ModelError
from bulkembed.contract.job import V4_MAX_TOKENS, Pooling
from bulkembed.contract.model import choose_max_tokens, choose_pooling, model_info
from bulkembed.synthetic import write_qwen2vl_gguf


def test_facts_of_each_kind(kind_models, tiny_model):
    bert = model_info(kind_models["bert-cls"])
    assert (bert.arch, bert.causal, bert.declared_pooling, bert.n_ctx_train) == ("bert", False, Pooling.CLS, 512)
    assert bert.add_bos and bert.add_eos, "[CLS] text [SEP]"
    qwen3 = model_info(kind_models["qwen3-last"])
    assert (qwen3.causal, qwen3.declared_pooling, qwen3.add_bos, qwen3.add_eos) == (True, Pooling.LAST, False, True)
    v4_like = model_info(tiny_model)
    assert (v4_like.causal, v4_like.declared_pooling, v4_like.pooling_type) == (True, None, -1)


def test_pooling_is_the_models_own_unless_asked(kind_models, tiny_model):
    assert choose_pooling(model_info(kind_models["bert-cls"]), None, "m") is Pooling.CLS
    assert choose_pooling(model_info(kind_models["bert-cls"]), Pooling.MEAN, "m") is Pooling.MEAN
    assert choose_pooling(model_info(kind_models["qwen3-last"]), None, "m") is Pooling.LAST
    assert choose_pooling(model_info(tiny_model), None, "m") is Pooling.MEAN, "v4 declares nothing: mean"


def test_rankers_and_unknown_poolings_are_refused(kind_models):
    ranker = model_info(kind_models["bert-rank"])
    for asked in (None, Pooling.MEAN):
        with pytest.raises(ModelError, match="reranker"):
            choose_pooling(ranker, asked, "rank.gguf")
    with pytest.raises(ModelError, match="pooling type 9, which bulkembed does not know"):
        choose_pooling(ranker.model_copy(update={"pooling_type": 9}), None, "odd.gguf")


def test_default_max_tokens(kind_models, models_dir):
    bert = model_info(kind_models["bert-mean"])
    assert choose_max_tokens(None, bert, 8192, "b") == 512, "never above the trained context"
    assert choose_max_tokens(None, bert, 256, "b") == 256, "what one ubatch may hold"
    assert choose_max_tokens(300, bert, 8192, "b") == 300
    with pytest.raises(ModelError, match="non-causal model trained on 512 tokens"):
        choose_max_tokens(513, bert, 8192, "b")
    qwen3 = model_info(kind_models["qwen3-last"])
    assert choose_max_tokens(None, qwen3, 256, "q") == 4096, "a causal model splits documents: its context"
    v4 = model_info(write_qwen2vl_gguf(models_dir / "jina-embeddings-v4-text-retrieval-F32.gguf"))
    assert choose_max_tokens(None, v4, 8192, "v4") == V4_MAX_TOKENS


def test_max_tokens_beyond_a_causal_models_training_is_warned_about(kind_models, models_dir, caplog):
    qwen3 = model_info(kind_models["qwen3-last"])
    assert choose_max_tokens(4096, qwen3, 8192, "q.gguf") == 4096 and not caplog.records
    assert choose_max_tokens(40000, qwen3, 8192, "q.gguf") == 40000, "allowed: a causal model splits documents"
    assert len(caplog.records) == 1 and "beyond the 4096 tokens q.gguf was trained on" in caplog.records[0].getMessage()
    v4 = model_info(write_qwen2vl_gguf(models_dir / "jina-embeddings-v4-text-retrieval-F32.gguf"))
    choose_max_tokens(50000, v4, 8192, "v4.gguf")  # its header says 128000: v4 was trained on 32768
    assert "beyond the 32768 tokens v4.gguf was trained on" in caplog.records[-1].getMessage()
    assert "--max-tokens 32768 with --overlength chunk" in caplog.records[-1].getMessage()


def test_a_pooled_token_the_tokenizer_does_not_add_is_warned_about(kind_models, tiny_model, caplog):
    choose_pooling(model_info(kind_models["qwen3-last"]), None, "qwen3.gguf")
    choose_pooling(model_info(kind_models["bert-cls"]), None, "bert.gguf")
    assert not caplog.records, "both tokenizers add the token their pooling takes"
    choose_pooling(model_info(tiny_model), Pooling.LAST, "v4.gguf")
    assert [r.getMessage().split(":")[1].strip().split()[0] for r in caplog.records] == ["last"]


def test_cls_pooling_of_a_causal_model_is_refused(tiny_model, kind_models):
    """A causal model's first token sees only itself: cls pooling gave every text the vector of its first token, one
    vector for a whole corpus behind a prefix. A non-causal model's first token sees the whole text."""
    with pytest.raises(InputError, match="is causal: its first token sees only itself"):
        choose_pooling(model_info(tiny_model), Pooling.CLS, "v4.gguf")
    assert choose_pooling(model_info(kind_models["bert-mean"]), Pooling.CLS, "bert.gguf") is Pooling.CLS
