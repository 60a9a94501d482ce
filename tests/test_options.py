"""Every v4 option through `bulkembed run`, checked against each row embedded alone in one ubatch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from bulkembed.contract.job import Overlength, document_spans
from bulkembed.synthetic import TINY, write_qwen2vl_gguf
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.selftest import embed_alone
from tests.conftest import cosines, write_corpus

LONG = "the river and the sea over alpha beta gamma delta " * 12  # ~600 tokens in the tiny vocab
TEXTS = {"short": "alpha beta", "mid": "the model embeds every token " * 3, "long": LONG}


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = Engine(tiny_model, EngineOptions(threads=2))
    yield engine
    engine.close()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "c.parquet", list(TEXTS), list(TEXTS.values()))


def run_table(run_cli, corpus, out, model, *flags) -> pa.Table:
    done = run_cli("run", corpus, "--model", model, "--out", out, "--ubatch", "64", *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    return ds.dataset(out, format="arrow").to_table().sort_by([("id", "ascending"), ("chunk", "ascending")])


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(column), -1)


def test_truncate_keeps_the_first_tokens(run_cli, corpus, tmp_path, tiny_model, engine):
    table = run_table(run_cli, corpus, tmp_path / "o", tiny_model, "--max-tokens", "100")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["long"]["truncated"] and rows["long"]["n_tokens"] == 100
    assert not rows["short"]["truncated"]
    tokens = engine.vocab.tokenize("Passage: " + LONG)[:100]
    got = vectors(table)[table.column("id").to_pylist().index("long")]
    assert cosines(got[None], embed_alone(engine, tokens)[None])[0] >= 0.9999


def test_chunk_writes_a_row_per_chunk_each_with_the_prefix(run_cli, corpus, tmp_path, tiny_model, engine):
    table = run_table(run_cli, corpus, tmp_path / "o", tiny_model, "--max-tokens", "150", "--overlength", "chunk")
    full = engine.vocab.tokenize("Passage: " + LONG)
    prefix = engine.vocab.tokenize("Passage: ")
    spans = document_spans(len(full), 150, Overlength.CHUNK, len(prefix))
    long_rows = [i for i, x in enumerate(table.column("id").to_pylist()) if x == "long"]
    assert [table.column("chunk")[i].as_py() for i in long_rows] == list(range(len(spans))) and len(spans) > 3
    got = vectors(table)[long_rows]
    for span, vector in zip(spans, got, strict=True):
        piece = full[span.start:span.stop] if span.chunk == 0 else np.concatenate([prefix, full[span.start:span.stop]])
        assert len(piece) <= 150
        assert cosines(vector[None], embed_alone(engine, piece)[None])[0] >= 0.9999
    covered = np.concatenate([np.arange(s.start, s.stop) for s in spans])
    assert np.array_equal(covered, np.arange(len(full))), "chunks cover the document once, in order"


def test_error_quarantines_over_length_rows(run_cli, corpus, tmp_path, tiny_model):
    out = tmp_path / "o"
    table = run_table(run_cli, corpus, out, tiny_model, "--max-tokens", "100", "--overlength", "error")
    assert sorted(table.column("id").to_pylist()) == ["mid", "short"]
    rejected = ds.dataset(out / "_rejected", format="arrow").to_table().to_pylist()
    assert [(r["id"], r["reason"].split(":")[0]) for r in rejected] == [("long", "over-length")]


def test_max_tokens_must_leave_room_for_text_after_the_prefix(run_cli, corpus, tmp_path, tiny_model, engine):
    """--max-tokens at or below the prefix's tokens (with the tokenizer's framing) is refused by run, chunk or not, and
    by embed: every truncated row would have been the prefix alone, one vector for every text (chunk crashed
    mid-planning). One token more is accepted: each cut row keeps a token of its own."""
    prefix, query = (len(engine.vocab.tokenize(p)) for p in ("Passage: ", "Query: "))
    for argv in (("run", corpus, "--model", tiny_model, "--out", tmp_path / "o", "--max-tokens", prefix),
                 ("run", corpus, "--model", tiny_model, "--out", tmp_path / "o", "--max-tokens", 3,
                  "--overlength", "chunk"),
                 ("embed", "--model", tiny_model, "--max-tokens", query, "alpha", "beta gamma")):
        refused = run_cli(*argv)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "leaves no room for text" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert not (tmp_path / "o").exists(), "refused before anything is written"
    table = run_table(run_cli, corpus, tmp_path / "fits", tiny_model, "--max-tokens", str(prefix + 1))
    assert table.num_rows == len(TEXTS) and max(table.column("n_tokens").to_pylist()) == prefix + 1
    assert len({v.tobytes() for v in vectors(table)}) > 1, "rows cut to the prefix and a token of their own"


def test_matryoshka_dims_dtype_and_normalization(run_cli, corpus, tmp_path, models_dir, engine):
    model = write_qwen2vl_gguf(models_dir / "tiny-mrl-text-retrieval.gguf", TINY, seed=0, matryoshka_dims=(16, 32))
    full = run_table(run_cli, corpus, tmp_path / "full", model)
    cut = run_table(run_cli, corpus, tmp_path / "cut", model, "--dims", "32")
    assert cut.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    expected = vectors(full)[:, :32].copy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors(cut), expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors(cut), axis=1), 1, atol=1e-6)

    half = run_table(run_cli, corpus, tmp_path / "half", model, "--dtype", "float16")
    assert half.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert np.allclose(vectors(half), vectors(full), atol=2e-3)

    raw = run_table(run_cli, corpus, tmp_path / "raw", model, "--no-normalize")
    norms = np.linalg.norm(vectors(raw), axis=1)
    assert not np.allclose(norms, 1, atol=1e-3)
    assert np.allclose(vectors(raw) / norms[:, None], vectors(full), atol=1e-5)

    refused = run_cli("run", corpus, "--model", model, "--out", tmp_path / "x", "--dims", "20")
    assert refused.returncode == 2 and "not a trained Matryoshka size" in refused.stderr and "16, 32" in refused.stderr
    too_big = run_cli("run", corpus, "--model", model, "--out", tmp_path / "x", "--dims", "128")
    assert too_big.returncode == 2 and "has 64 dimensions" in too_big.stderr


def test_pooling_none_writes_every_token(run_cli, corpus, tmp_path, tiny_model):
    tokens = run_table(run_cli, corpus, tmp_path / "tok", tiny_model, "--pooling", "none")
    pooled = run_table(run_cli, corpus, tmp_path / "mean", tiny_model)
    for row, mean in zip(tokens.to_pylist(), vectors(pooled), strict=True):
        per_token = np.asarray(row["embedding"], np.float32)
        assert per_token.shape == (row["n_tokens"], 64)
        assert cosines(per_token.mean(axis=0)[None], mean[None])[0] >= 0.9999


def test_custom_prefix_and_task_inference(run_cli, corpus, tmp_path, tiny_model, engine, models_dir):
    table = run_table(run_cli, corpus, tmp_path / "o", tiny_model, "--prefix", "")
    assert table.schema.metadata[b"bulkembed.prefix"] == b""
    short = vectors(table)[table.column("id").to_pylist().index("short")]
    assert cosines(short[None], embed_alone(engine, engine.vocab.tokenize("alpha beta"))[None])[0] >= 0.9999
    query = run_table(run_cli, corpus, tmp_path / "q", tiny_model, "--role", "query")
    assert query.schema.metadata[b"bulkembed.prefix"] == b"Query: "
    unnamed = write_qwen2vl_gguf(models_dir / "unnamed.gguf", TINY, seed=0)
    done = run_cli("run", corpus, "--model", unnamed, "--out", tmp_path / "u")
    assert done.returncode == 2 and "pass --task" in done.stderr
    matching = run_table(run_cli, corpus, tmp_path / "m", unnamed, "--task", "text-matching", "--role", "passage")
    assert matching.schema.metadata[b"bulkembed.prefix"] == b"Query: "
