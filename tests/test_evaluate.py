"""`bulkembed eval`: the metric arithmetic by hand, then a BEIR dataset through the real pipeline."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bulkembed.evaluate import (
    add_eval_parser,
    document_text,
    evaluate,
    load_beir,
    ndcg_at_k,
    parse_ks,
    recall_at_k,
    run_eval,
    search,
    top_k,
)
from bulkembed.worker.engine import EngineOptions

LOG2_3 = math.log2(3)  # 1.5849625


# ---- pure metrics ----------------------------------------------------------------------------------

def test_ndcg_graded_relevance():
    ranking, rels = ["d3", "d1", "d2"], {"d1": 2, "d2": 1}
    # DCG@3 = 0/log2(2) + 2/log2(3) + 1/log2(4) = 0 + 1.2618595 + 0.5 = 1.7618595
    # IDCG@3 = 2/log2(2) + 1/log2(3) = 2 + 0.6309298 = 2.6309298 (ideal order d1, d2)
    assert ndcg_at_k(ranking, rels, 3) == pytest.approx((2 / LOG2_3 + 0.5) / (2 + 1 / LOG2_3))
    assert ndcg_at_k(ranking, rels, 3) == pytest.approx(0.6696718, abs=1e-7)
    # @2: DCG = 2/log2(3) = 1.2618595, IDCG = 2.6309298 -> 0.4796249
    assert ndcg_at_k(ranking, rels, 2) == pytest.approx(0.4796249, abs=1e-7)
    assert ndcg_at_k(ranking, rels, 1) == 0.0  # d3 is not relevant
    assert recall_at_k(ranking, rels, 1) == 0.0
    assert recall_at_k(ranking, rels, 2) == 0.5  # d1 of {d1, d2}
    assert recall_at_k(ranking, rels, 3) == 1.0
    # The ideal order scores 1.
    assert ndcg_at_k(["d1", "d2", "d3"], rels, 3) == pytest.approx(1.0)


def test_relevant_doc_outside_top_k():
    ranking, rels = ["a", "b", "c", "d"], {"d": 1}
    assert ndcg_at_k(ranking, rels, 3) == 0.0 and recall_at_k(ranking, rels, 3) == 0.0
    # @4: DCG = 1/log2(5) = 0.4306766, IDCG = 1/log2(2) = 1
    assert ndcg_at_k(ranking, rels, 4) == pytest.approx(0.4306766, abs=1e-7)
    assert recall_at_k(ranking, rels, 4) == 1.0


def test_ideal_dcg_counts_judged_docs_never_retrieved():
    # z is relevant but not in the run: IDCG@5 = 1 + 1/log2(3) = 1.6309298; DCG = 1 -> 0.6131472
    assert ndcg_at_k(["a"], {"a": 1, "z": 1}, 5) == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert recall_at_k(["a"], {"a": 1, "z": 1}, 5) == 0.5
    # The ideal list is cut at k too: rels 3, 2, 1 at k=2 -> IDCG = 3 + 2/log2(3) = 4.2618595;
    # ranking [c(1), a(3)]: DCG = 1 + 3/log2(3) = 2.8927893 -> 0.6787622
    assert ndcg_at_k(["c", "a"], {"a": 3, "b": 2, "c": 1}, 2) == pytest.approx(0.6787622, abs=1e-7)


def test_zero_score_is_not_relevant():
    rels = {"a": 0, "b": 1}
    # DCG@2 = 0 + 1/log2(3) = 0.6309298; IDCG = 1 (only b)
    assert ndcg_at_k(["a", "b"], rels, 2) == pytest.approx(1 / LOG2_3)
    assert recall_at_k(["a", "b"], rels, 1) == 0.0
    assert recall_at_k(["a", "b"], rels, 2) == 1.0


def test_evaluate_averages_judged_queries_only():
    run = {"q1": ["d3", "d1", "d2"], "q2": ["a", "b"], "q3": ["a"], "q4": ["a", "b"]}
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"b": 1}, "q4": {"a": 0}, "q9": {"a": 1}}  # q3 none, q4 only 0
    result = evaluate(run, qrels, [2, 1])
    # q4 is judged (only with grade 0) and scores 0, as in pytrec_eval; q3 has no judgement: skipped.
    assert result["evaluated"] == 3 and result["skipped_no_qrels"] == 1 and result["queries"] == 4
    # ndcg@2: q1 0.4796249, q2 1/log2(3) = 0.6309298, q4 0 -> mean 0.3701849
    assert result["metrics"]["ndcg@2"] == pytest.approx((0.4796249 + 0.6309298 + 0) / 3, abs=1e-7)
    # recall@2: q1 0.5, q2 1, q4 0 -> 0.5; @1: all 0
    assert result["metrics"]["recall@2"] == pytest.approx(0.5)
    assert result["metrics"]["recall@1"] == 0.0 and result["metrics"]["ndcg@1"] == 0.0
    assert list(result["metrics"]) == ["ndcg@1", "recall@1", "ndcg@2", "recall@2"]


def test_top_k_breaks_ties_by_document_order():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], np.float32)
    assert top_k(scores, 3).tolist() == [1, 3, 0]
    assert top_k(scores, 4).tolist() == [1, 3, 0, 2]
    assert top_k(scores, 10).tolist() == [1, 3, 0, 2, 5, 4]
    docs = np.array([[1, 0], [0, 1], [1, 0], [1, 1]], np.float32)  # d0 and d2 identical
    assert search(np.array([[2, 0.1]], np.float32), docs, ["d0", "d1", "d2", "d3"], 3) == [["d0", "d2", "d3"]]


def test_k_arguments(capsys):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    assert parser.parse_args(["eval", "data", "--model", "m"]).k is None  # cmd_eval then uses 5, 10
    assert parser.parse_args(["eval", "data", "--model", "m", "--k", "1,3", "--k", "10"]).k == [1, 3, 10]
    assert parse_ks("5, 10") == [5, 10]
    for bad in ("0", "x", ","):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "data", "--model", "m", "--k", bad])
    assert "--k" in capsys.readouterr().err


def test_document_text_is_mteb_title_join():
    assert document_text({"title": "Title", "text": "body"}) == "Title body"
    assert document_text({"title": "", "text": "body "}) == "body"
    assert document_text({"text": "body"}) == "body"


# ---- a BEIR dataset through the pipeline -------------------------------------------------------------

def _words(rng: np.random.Generator, n: int) -> str:
    letters = list("abcdefghijklmnopqrstuvwxyz")
    return " ".join("".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(n))


def beir_dataset(seed: int = 3) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """30 documents of random made-up words (a third with titles) and 7 queries:
    q1-q3 are exactly a document's text (title joined), so even random weights rank it first;
    q1 also grades a second, unrelated document 1; q4 is the first half of d10's text; q5 is fresh words
    with one relevant doc (usually outside the top k); q6 has only a 0-score judgement; q7 has none."""
    rng = np.random.default_rng(seed)
    corpus = [{"_id": f"d{i}", "title": _words(rng, 2) if i % 3 == 0 else "",
               "text": _words(rng, int(rng.integers(8, 30)))} for i in range(30)]
    full = {d["_id"]: (d["title"] + " " + d["text"]).strip() for d in corpus}
    queries = [{"_id": "q1", "text": full["d0"]}, {"_id": "q2", "text": full["d7"]}, {"_id": "q3", "text": full["d21"]},
               {"_id": "q4", "text": " ".join(full["d10"].split()[: len(full["d10"].split()) // 2])},
               {"_id": "q5", "text": _words(rng, 12)}, {"_id": "q6", "text": _words(rng, 6)},
               {"_id": "q7", "text": _words(rng, 6)}]
    qrels = [("q1", "d0", 2), ("q1", "d13", 1), ("q2", "d7", 1), ("q3", "d21", 1), ("q4", "d10", 1),
             ("q5", "d4", 1), ("q6", "d5", 0)]
    return corpus, queries, qrels


def write_jsonl_dataset(folder: Path) -> Path:
    corpus, queries, qrels = beir_dataset()
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    lines = "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    return folder


def write_parquet_dataset(folder: Path) -> Path:
    corpus, queries, qrels = beir_dataset()
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(corpus), folder / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(queries), folder / "queries.parquet")
    q, d, s = zip(*qrels, strict=True)
    pq.write_table(pa.table({"query-id": q, "corpus-id": d, "score": s}), folder / "qrels.parquet")
    return folder


ENGINE = EngineOptions(ubatch=64, threads=2)
KS = [1, 3, 5, 10]


@pytest.fixture(scope="module")
def jsonl_result(tmp_path_factory, tiny_model):
    folder = write_jsonl_dataset(tmp_path_factory.mktemp("beir-jsonl"))
    return run_eval(folder, str(tiny_model), KS, engine_options=ENGINE, work=folder / "work")


def test_load_beir_reads_titles_header_and_zero_scores(tmp_path):
    corpus, queries, qrels = load_beir(write_jsonl_dataset(tmp_path / "a"))
    assert len(corpus) == 30 and len(queries) == 7 and list(corpus)[:2] == ["d0", "d1"]
    assert corpus["d0"] == queries["q1"] and " " in corpus["d0"]  # d0 has a title
    assert qrels["q1"] == {"d0": 2, "d13": 1} and qrels["q6"] == {"d5": 0} and "q7" not in qrels
    assert load_beir(write_parquet_dataset(tmp_path / "b")) == (corpus, queries, qrels)


def test_eval_through_pipeline_matches_reference_rankings(jsonl_result, reference_embedder):
    result = jsonl_result
    corpus, queries, qrels_rows = beir_dataset()
    assert (result["queries"], result["evaluated"], result["skipped_no_qrels"]) == (7, 6, 1)
    assert result["documents"] == 30 and result["rejected_documents"] == result["rejected_queries"] == 0

    # Identity queries: their document first, so recall@k = NDCG@k = 1 for q2, q3 (single relevant doc).
    run = result["run"]
    assert run["q1"][0] == "d0" and run["q2"][0] == "d7" and run["q3"][0] == "d21"
    assert run["q4"][0] == "d10", "half of d10's words still find it"

    # Independent path: llama-cpp-python's Llama.embed, each text alone, with the prefixes the pipeline adds.
    doc_texts = ["Passage: " + (d["title"] + " " + d["text"]).strip() for d in corpus]
    docs = reference_embedder(doc_texts)
    query_vectors = reference_embedder(["Query: " + q["text"] for q in queries])
    doc_ids = [d["_id"] for d in corpus]
    reference = {q["_id"]: [doc_ids[i] for i in np.argsort(-(docs @ v), kind="stable")[:10]]
                 for q, v in zip(queries, query_vectors, strict=True)}
    assert run == reference, "the pipeline ranks exactly as the reference embeddings do"

    qrels: dict[str, dict[str, int]] = {}
    for q, d, s in qrels_rows:
        qrels.setdefault(q, {})[d] = s
    judged = ["q1", "q2", "q3", "q4", "q5", "q6"]  # q6 is judged only with grade 0: it scores 0
    for k in KS:
        expected_ndcg = np.mean([ndcg_at_k(reference[q], qrels[q], k) for q in judged])
        expected_recall = np.mean([recall_at_k(reference[q], qrels[q], k) for q in judged])
        assert result["metrics"][f"ndcg@{k}"] == pytest.approx(expected_ndcg, abs=1e-12)
        assert result["metrics"][f"recall@{k}"] == pytest.approx(expected_recall, abs=1e-12)
        for q in ("q2", "q3", "q4"):
            assert recall_at_k(run[q], qrels[q], k) == 1.0 and ndcg_at_k(run[q], qrels[q], k) == 1.0
    # q1: d0 (grade 2) first; d13 (grade 1) where the model put it. At k=1 DCG = 2, IDCG = 2 -> 1.
    assert ndcg_at_k(run["q1"], qrels["q1"], 1) == 1.0 and recall_at_k(run["q1"], qrels["q1"], 1) == 0.5


def test_jsonl_and_parquet_inputs_agree_and_cli_prints_json(jsonl_result, tmp_path, tiny_model, capsys):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    folder = write_parquet_dataset(tmp_path / "beir-parquet")
    args = parser.parse_args(["eval", str(folder), "--model", str(tiny_model), "--k", "1,3", "--k", "5",
                              "--k", "10", "--json", "--ubatch", "64", "--threads", "2"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == jsonl_result["metrics"] and printed["ks"] == KS
    assert (printed["evaluated"], printed["skipped_no_qrels"]) == (6, 1)
