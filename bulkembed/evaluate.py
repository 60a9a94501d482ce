"""`bulkembed eval`: NDCG@k and recall@k of a model on a BEIR-format dataset, through the real pipeline.

Queries are embedded with the query role and documents with the passage role by the same producer and
worker code as `bulkembed run` (plan_job + run_local), so the score measures what a job writes. Search
is exact (dot products of L2-normalized vectors). The metrics follow pytrec_eval's `ndcg_cut` and
`recall`, which MTEB uses (and so the NanoBEIR NDCG@5 numbers this is compared with):
linear gain, log2(rank + 1) discount, ideal DCG from all judged relevant documents of the query.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bulkembed.contract.errors import InputError

Qrels = dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
DEFAULT_KS = (5, 10)


# ---- metrics: pure functions -------------------------------------------------------------------

def ndcg_at_k(ranked_ids: Sequence[str], qrels_for_query: Mapping[str, int], k: int) -> float:
    """trec_eval's ndcg_cut.k: gain = graded relevance, DCG = sum_i gain_i / log2(i + 1) over ranks 1..k;
    IDCG sorts every judged relevant doc (also those never retrieved), truncated at k."""
    gains = {d: r for d, r in qrels_for_query.items() if r > 0}  # 0 (and negative) grades gain nothing
    dcg = sum(gains.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked_ids[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids: Sequence[str], qrels_for_query: Mapping[str, int], k: int) -> float:
    """|relevant ∩ top-k| / |relevant|, relevant meaning a grade above 0 (pytrec_eval's recall_k)."""
    relevant = {d for d, r in qrels_for_query.items() if r > 0}
    return len(relevant.intersection(ranked_ids[:k])) / len(relevant) if relevant else 0.0


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], ks: Iterable[int]) -> dict:
    """Mean NDCG@k and recall@k over the run's queries that have judgements, as pytrec_eval (and so MTEB
    and the seed's Table 2) scores them: a query judged only with grade 0 counts, with 0; a query with
    no judgement at all is skipped (pytrec_eval only scores queries present in both run and qrels)."""
    ks = sorted(set(ks))
    judged = [q for q in run if q in qrels]
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(run[q], qrels[q], k) for q in judged])) if judged else 0.0
        metrics[f"recall@{k}"] = float(np.mean([recall_at_k(run[q], qrels[q], k) for q in judged])) if judged else 0.0
    return {"metrics": metrics, "queries": len(run), "evaluated": len(judged),
            "skipped_no_qrels": len(run) - len(judged)}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; equal scores in index (document) order.
    argpartition alone would break ties arbitrarily, so every doc tied with the k-th is kept, then sorted stably."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= kth)
    return candidates[np.argsort(-scores[candidates], kind="stable")][:k]


def search(queries: np.ndarray, docs: np.ndarray, doc_ids: Sequence[str], k: int, block: int = 256) -> list[list[str]]:
    """Exact search: dot products of the L2-normalized vectors, in blocks of queries to bound memory."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    ranked: list[list[str]] = []
    for start in range(0, len(queries), block):
        for row in queries[start:start + block] @ docs.T:
            ranked.append([doc_ids[i] for i in top_k(row, k)])
    return ranked


# ---- BEIR input ----------------------------------------------------------------------------------

def _rows(folder: Path, name: str) -> list[dict[str, Any]]:
    """name.jsonl, name.parquet, or a folder name/ of Parquet files (the Hugging Face layout)."""
    if (folder / f"{name}.jsonl").is_file():
        with open(folder / f"{name}.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    for path in (folder / f"{name}.parquet", folder / name):
        if path.exists():
            return pq.read_table(path).to_pylist()
    raise InputError(f"{folder} has no {name}.jsonl, {name}.parquet or {name}/")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _qrels(folder: Path, split: str) -> Qrels:
    """qrels/SPLIT.tsv (header line skipped), qrels/SPLIT.parquet or qrels.parquet; no score column = 1."""
    rows: list[tuple[Any, Any, Any]]
    if (tsv := folder / "qrels" / f"{split}.tsv").is_file():
        with open(tsv, encoding="utf-8", newline="") as f:
            rows = [(r[0], r[1], r[2] if len(r) > 2 else 1) for r in csv.reader(f, delimiter="\t") if len(r) >= 2]
        if rows and not _is_number(rows[0][2]):
            rows = rows[1:]  # the "query-id corpus-id score" header
    else:
        path = next((p for p in (folder / "qrels" / f"{split}.parquet", folder / "qrels.parquet") if p.exists()), None)
        if path is None:
            raise InputError(f"{folder} has no qrels/{split}.tsv, qrels/{split}.parquet or qrels.parquet")
        table = pq.read_table(path)
        score = table.column("score").to_pylist() if "score" in table.column_names else [1] * table.num_rows
        rows = list(zip(table.column("query-id").to_pylist(), table.column("corpus-id").to_pylist(), score,
                        strict=True))
    qrels: Qrels = {}
    for qid, did, score in rows:
        if not _is_number(score):
            raise InputError(f"qrels score {score!r} of ({qid}, {did}) is not a number")
        qrels.setdefault(str(qid), {})[str(did)] = int(float(score))
    return qrels


def document_text(row: Mapping[str, Any]) -> str:
    """MTEB's corpus_to_texts(sep=" ") as its encode_corpus calls it: (title + " " + text).strip(), so an
    empty title leaves the (stripped) text alone."""
    return (f"{row.get('title') or ''} {row.get('text') or ''}").strip()


def load_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], Qrels]:
    """(corpus {id: text} in file order, queries {id: text}, qrels)."""
    folder = Path(folder)
    corpus = {str(r["_id"]): document_text(r) for r in _rows(folder, "corpus")}
    queries = {str(r["_id"]): r.get("text") or "" for r in _rows(folder, "queries")}
    return corpus, queries, _qrels(folder, split)


# ---- embedding through the pipeline --------------------------------------------------------------

def embed_texts(texts: Mapping[str, str], role: str, model: str, work: Path, name: str, task: str | None,
                engine_options: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Embed {id: text} with `bulkembed run`'s code; ({id: vector}, manifest). Rejected rows are absent."""
    from bulkembed.contract.job import Role, Task
    from bulkembed.contract.model import resolve_path
    from bulkembed.local import run_local
    from bulkembed.producer.submit import JobOptions, plan_job
    from bulkembed.worker.engines import EngineSetup

    source, out = work / f"{name}.parquet", work / f"{name}-embeddings"
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.string()), "text": pa.array(list(texts.values()))}),
                   source)
    shutil.rmtree(out, ignore_errors=True)  # a stale job with as many rows would be reused as done
    planned = plan_job(str(source), model, str(out),
                       JobOptions(task=Task(task) if task else None, role=Role(role)))
    setup = EngineSetup(engine_options, engines=1, ubatch=engine_options.ubatch)
    manifest = run_local(planned, str(resolve_path(model)), setup, progress=progress)
    table = ds.dataset(str(out), format="arrow").to_table(columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    if len(ids) != len(set(ids)):
        raise InputError(f"{out} has several rows per id (chunked documents); eval needs one vector a text")
    dims = table.schema.field("embedding").type.list_size
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(-1, dims)
    return dict(zip(ids, vectors, strict=True)), manifest


def run_eval(dataset: str | Path, model: str, ks: Sequence[int] = DEFAULT_KS, task: str | None = None,
             split: str = "test", work: str | Path | None = None, engine_options: Any = None,
             progress: bool = False) -> dict:
    from bulkembed.worker.engine import EngineOptions

    corpus, queries, qrels = load_beir(dataset, split)
    with tempfile.TemporaryDirectory(prefix="bulkembed-eval-") as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        options = engine_options or EngineOptions()
        doc_vectors, doc_manifest = embed_texts(corpus, "passage", model, folder, "corpus", task, options, progress)
        query_vectors, _ = embed_texts(queries, "query", model, folder, "queries", task, options, progress)
    doc_ids = [d for d in corpus if d in doc_vectors]  # corpus order: ties go to the earlier document
    found = [q for q in queries if q in query_vectors]
    ranked = search(np.stack([query_vectors[q] for q in found]), np.stack([doc_vectors[d] for d in doc_ids]),
                    doc_ids, max(ks)) if found and doc_ids else [[] for _ in found]
    run: dict[str, list[str]] = {q: [] for q in queries}  # a rejected (empty) query retrieves nothing
    run.update(zip(found, ranked, strict=True))
    result = evaluate(run, qrels, ks)
    result.update(dataset=str(dataset), model=model, split=split, ks=sorted(set(ks)), documents=len(corpus),
                  rejected_documents=len(corpus) - len(doc_ids), rejected_queries=len(queries) - len(found),
                  truncated_documents=doc_manifest.get("truncated_rows", 0), run=run)
    return result


# ---- command line --------------------------------------------------------------------------------

def parse_ks(value: str) -> list[int]:
    """One --k value: "5" or "5,10" (argparse type; --k repeats and extends)."""
    try:
        ks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes integers, not {value!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--k needs cut-offs of at least 1, not {value!r}")
    return ks


def format_table(result: Mapping[str, Any]) -> str:
    lines = [f"{result['dataset']} ({result['split']}) with {result['model']}",
             f"{'k':>5}  {'NDCG@k':>8}  {'Recall@k':>8}"]
    lines += [f"{k:>5}  {result['metrics'][f'ndcg@{k}']:>8.4f}  {result['metrics'][f'recall@{k}']:>8.4f}"
              for k in result["ks"]]
    lines.append(f"queries {result['queries']}: {result['evaluated']} evaluated, {result['skipped_no_qrels']} skipped "
                 f"(no qrels), {result['rejected_queries']} rejected; documents {result['documents']}: "
                 f"{result['rejected_documents']} rejected, {result['truncated_documents']} truncated")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from bulkembed.worker.engine import EngineOptions

    options = EngineOptions(ubatch=args.ubatch, gpu_layers=args.gpu_layers, threads=args.threads)
    result = run_eval(args.dataset, args.model, args.k or DEFAULT_KS, args.task, args.split, args.work, options,
                      progress=not args.json)
    result.pop("run")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    from bulkembed.contract.job import Task
    from bulkembed.contract.settings import WorkerSettings

    defaults = WorkerSettings()
    parser = subparsers.add_parser("eval", help="NDCG@k and recall@k on a BEIR-format dataset, via the pipeline")
    parser.add_argument("dataset", help="folder with corpus, queries (.jsonl or .parquet) and qrels/SPLIT.tsv")
    parser.add_argument("--model", required=True, help="a local .gguf path or REPO:QUANT")
    parser.add_argument("--task", choices=[t.value for t in Task], default=None,
                        help="v4 task; read from the model file name when it says it")
    parser.add_argument("--k", type=parse_ks, action="extend", default=None,
                        help="cut-offs, repeatable or a comma list (default 5,10)")
    parser.add_argument("--split", default="test", help="qrels split: qrels/SPLIT.tsv")
    parser.add_argument("--work", default=None, help="folder for the converted inputs and embeddings (default: temp)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--ubatch", type=int, default=defaults.ubatch, help="largest physical batch (n_ubatch)")
    parser.add_argument("--gpu-layers", type=int, default=defaults.gpu_layers, help="layers on the GPU; -1 = all")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads; 0 = all cores")
    parser.set_defaults(func=cmd_eval)
    return parser
