"""Each model kind through `bulkembed run` and through Celery workers: every row written equals its tokens
embedded alone in one ubatch by llama.cpp with the job's pooling; rerankers are refused before any shard runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from bulkembed.contract.errors import ShardError
from bulkembed.contract.job import Pooling
from bulkembed.contract.schema import read_metadata
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.rows import ShardRows, embed_rows
from bulkembed.worker.selftest import embed_alone
from tests.conftest import cosines, letter_texts, write_corpus

EXACT = 0.9999


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # 50 texts up to ~480 tokens, and two past a BERT's 512 positions: those become chunks.
    return letter_texts(50, seed=11, longest=480) + [" ".join(letter_texts(12, seed=s, longest=480)) for s in (1, 2)]


@pytest.fixture
def corpus(tmp_path, texts):
    return write_corpus(tmp_path / "c.parquet", [f"d{i:03d}" for i in range(len(texts))], texts)


def read_table(out) -> pa.Table:
    return ds.dataset(out, format="arrow").to_table().sort_by([("id", "ascending"), ("chunk", "ascending")])


def check_rows(table: pa.Table, texts: list[str], engine: Engine, pooling: Pooling) -> None:
    """Every row against its own tokens embedded alone: `pooling` as llama.cpp does it for one document in one
    ubatch. A row's tokens are the tokenizer's opening special tokens, its own stretch of the text's tokens (rows
    of one document follow each other and, chunked, cover it all), and the closing special tokens: EOS for qwen3,
    [CLS] ... [SEP] for BERT, whether the row is a whole text, a truncated one or a chunk (no prefix here)."""
    meta = read_metadata(table.schema)
    assert meta["pooling"] == pooling.value
    framing = engine.vocab.tokenize("").tolist()
    opening = framing[:1] if engine.info.arch == "bert" else []
    closing = framing[len(opening):]
    assert closing, "these models close every text with a special token"
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    rows_of: dict[str, list[dict]] = {}
    for row in table.select(["id", "chunk", "n_tokens", "truncated"]).to_pylist():  # sorted by id, chunk
        rows_of.setdefault(row["id"], []).append(row)
    alone = []
    for doc_id, rows in rows_of.items():
        content, offset = engine.vocab.tokenize(texts[int(doc_id[1:])], special=False).tolist(), 0
        for row in rows:
            take = row["n_tokens"] - len(opening) - len(closing)
            alone.append(embed_alone(engine, np.array(opening + content[offset:offset + take] + closing, np.int32),
                                     pooling))
            offset += take
        assert rows[0]["truncated"] or offset == len(content), f"{doc_id}: its rows cover all of its tokens"
    sims = cosines(vectors, np.stack(alone))
    assert sims.min() >= EXACT, f"row {int(sims.argmin())}: {sims.min()}"


@pytest.mark.parametrize("model,flags,pooling", [
    ("bert-mean", [], Pooling.MEAN),
    ("bert-cls", [], Pooling.CLS),
    ("bert-mean", ["--pooling", "cls"], Pooling.CLS),
    ("qwen3-last", ["--max-tokens", "300"], Pooling.LAST),
    ("qwen3-last", ["--max-tokens", "300", "--pooling", "mean"], Pooling.MEAN),
    ("qwen3-last", ["--max-tokens", "300", "--overlength", "truncate"], Pooling.LAST),
    ("bert-mean", ["--max-tokens", "100", "--overlength", "truncate"], Pooling.MEAN),
])
def test_run_writes_exact_vectors(run_cli, corpus, texts, tmp_path, kind_models, model, flags, pooling):
    out = tmp_path / "out"
    done = run_cli("run", corpus, "--model", kind_models[model], "--out", out, "--prefix", "", "--ubatch", "64",
                   "--shard-tokens", "3000", "--overlength", "chunk", "--threads", "2", *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    table = read_table(out)
    if "truncate" in flags:
        assert any(table.column("truncated").to_pylist()), "some documents were longer than max tokens"
    else:
        assert table.column("chunk").to_numpy().max() >= 1, "some documents were longer than max tokens"
    assert set(table.column("id").to_pylist()) == {f"d{i:03d}" for i in range(len(texts))}
    if model.startswith("bert") and "--max-tokens" not in flags:
        # a non-causal model defaults to one ubatch's worth, within its 512 positions
        assert read_metadata(table.schema)["max_tokens"] == "512"
    engine = Engine(kind_models[model], EngineOptions(threads=2))
    try:
        check_rows(table, texts, engine, pooling)
    finally:
        engine.close()


def test_a_reranker_is_refused_before_any_shard(run_cli, corpus, tmp_path, kind_models):
    out = tmp_path / "out"
    done = run_cli("run", corpus, "--model", kind_models["bert-rank"], "--out", out, "--prefix", "")
    assert done.returncode == 2 and "declares rank pooling: it is a reranker" in done.stderr
    assert not out.exists() or not any(out.iterdir()), "nothing was written"
    asked = run_cli("run", corpus, "--model", kind_models["bert-rank"], "--out", out, "--prefix", "",
                    "--pooling", "mean")
    assert asked.returncode == 2 and "reranker" in asked.stderr, "no override makes a reranker an embedder"


def test_max_tokens_past_a_non_causal_models_positions_is_refused(run_cli, corpus, tmp_path, kind_models):
    done = run_cli("run", corpus, "--model", kind_models["bert-mean"], "--out", tmp_path / "o", "--prefix", "",
                   "--max-tokens", "1000")
    assert done.returncode == 2 and "non-causal model trained on 512 tokens" in done.stderr


def test_worker_refuses_a_reranker_at_start(run_cli, kind_models):
    done = run_cli("worker", "--model", kind_models["bert-rank"], "--threads", "1", timeout=120)
    assert done.returncode == 2 and "declares rank pooling" in done.stderr


def test_submit_to_workers_of_a_non_causal_model(corpus, texts, tmp_path, workers, run_cli, kind_models):
    model = kind_models["bert-cls"]
    workers.start(model, "--ubatch", "64")
    out = tmp_path / "out"
    done = run_cli("submit", corpus, "--model", model, "--out", out, "--prefix", "", "--shard-tokens", "3000",
                   "--overlength", "chunk", "--wait")
    assert done.returncode == 0, done.stderr[-3000:]
    engine = Engine(model, EngineOptions(threads=2))
    try:
        check_rows(read_table(out), texts, engine, Pooling.CLS)
    finally:
        engine.close()


def test_a_job_planned_without_closed_cut_rows_is_refused_by_a_worker_whose_tokenizer_closes_texts(kind_models):
    """A shard planned by a bulkembed from before cut rows kept their EOS/[SEP] (its job says close_cut_rows
    False) must not be embedded by the new rules: its planned counts would not match, row by row. The engine
    refuses the whole shard with the reason instead."""
    engine = Engine(kind_models["qwen3-last"], EngineOptions(threads=2))
    try:
        assert engine.vocab.tail == 1
        rows = ShardRows(label="job j shard 0", prefix="", pooling=Pooling.LAST, close_cut_rows=False,
                         texts=["abc"], starts=[0], stops=[4], chunks=[0], n_tokens=[4])
        with pytest.raises(ShardError, match="planned by another bulkembed version; resubmit it"):
            embed_rows(engine, rows)
        closed = embed_rows(engine, dataclasses.replace(rows, close_cut_rows=True))
        assert closed.rejected == {} and closed.vectors.shape == (1, engine.n_embd)
    finally:
        engine.close()
