"""`bulkembed bench` on the tiny synthetic model: every mode measures the same corpus; no timing thresholds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from bulkembed.bench.report import format_report
from bulkembed.contract.vocab import Vocab
from bulkembed.synthetic import TINY, ModelShape, quantize, synthetic_texts, target_lengths, write_qwen2vl_gguf
from bulkembed.worker.engine import Engine, EngineOptions

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--synthetic-model", "tiny", "--quant", "F32", "--synthetic", "60", "--max-doc-tokens", "600",
        "--threads", "1", "--sweep", "--ubs", "64,512", "--ctxs", "256,1024", "--engines", "2")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bulkembed.bench", *ARGS, "--work", str(work), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_mode_measures_the_same_corpus(report: dict) -> None:
    rows = {r["mode"]: r for r in report["modes"]}
    # No llama-embedding binary on PATH here: its row is left out with a note, the emulation stays.
    assert list(rows) == ["bulkembed", "bulkembed x2", "raw", "llama-embed", "seed emulated"]
    assert any(n.startswith("llama-embedding: no binary") for n in report["notes"])
    assert "2 engine processes" in rows["bulkembed x2"]["note"]
    made = re.search(r"(\d+) contexts made in [\d.]+s", rows["bulkembed"]["note"])
    assert made and int(made.group(1)) >= 1, rows["bulkembed"]["note"]
    corpus = report["corpus"]
    assert corpus["docs"] == 60 and corpus["max"] <= 600
    for row in rows.values():
        assert row["tok_per_s"] > 0 and row["docs_per_s"] > 0 and row["seconds"] > 0
        assert row["tokens"] == corpus["tokens"] and row["docs"] == corpus["docs"]
        assert row["peak_rss_mib"] > 0
        assert row["peak_vram_mib"] is None  # no nvidia-smi here
    assert rows["raw"]["tokens"] == rows["bulkembed"]["tokens"]
    assert rows["raw"]["ratio_to_raw"] == pytest.approx(1.0)
    assert report["ratio_bulkembed_raw"] == pytest.approx(rows["bulkembed"]["tok_per_s"] / rows["raw"]["tok_per_s"])
    assert report["model"]["n_layer"] == TINY.n_layer and report["model"]["quant"] == "F32"


def test_sweep_skips_what_cannot_run_and_measures_the_rest(report: dict) -> None:
    cells = {(c["ub"], c["ctx"]): c for c in report["sweep"]}
    assert cells[512, 256]["status"] == "N/A"  # ub > ctx
    assert cells[64, 256]["status"] == "N/A"  # the longest document does not fit
    for ub in (64, 512):
        cell = cells[ub, 1024]
        assert cell["status"] == "ok" and cell["tok_per_s"] > 0 and cell["tokens"] == report["corpus"]["tokens"]


def test_text_report_prints_the_ratio_and_grids(report: dict) -> None:
    text = format_report(report)
    assert "bulkembed / raw = " in text
    assert "ctx_size=1024" in text and "N/A" in text
    assert text.count("llama-embed") >= 1


def test_quantize_writes_a_smaller_loadable_file(tmp_path: Path) -> None:
    f32 = write_qwen2vl_gguf(tmp_path / "tiny-F32.gguf", TINY)
    q8 = quantize(f32, tmp_path / "tiny-Q8_0.gguf", "Q8_0", threads=1)
    assert q8.stat().st_size < f32.stat().st_size
    engine = Engine(q8, EngineOptions(threads=1))
    try:
        vector = engine.embed([engine.vocab.tokenize("the river carried the boat")])[0]
    finally:
        engine.close()
    assert vector.shape == (TINY.n_embd,) and np.all(np.isfinite(vector))


def test_quantize_refuses_imatrix_quants_without_one(tmp_path: Path) -> None:
    f32 = write_qwen2vl_gguf(tmp_path / "tiny-F32.gguf", TINY)
    with pytest.raises(ValueError, match="importance matrix"):
        quantize(f32, tmp_path / "tiny-IQ1_S.gguf", "IQ1_S", threads=1)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(f32, tmp_path / "tiny-Q9.gguf", "Q9_9", threads=1)


def test_uniform_imatrix_makes_iq_quants_of_random_models(tmp_path: Path) -> None:
    """Rows of 256 so IQ2_XXS really applies; the file must load and embed (speed-only models)."""
    shape = ModelShape(n_layer=1, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512)
    f16 = write_qwen2vl_gguf(tmp_path / "w256-F16.gguf", shape, dtype="f16")
    iq2 = quantize(f16, tmp_path / "w256-IQ2_XXS.gguf", "IQ2_XXS", threads=1, uniform_imatrix=True)
    assert "IQ2_XXS" in {t.tensor_type.name for t in gguf.GGUFReader(str(iq2)).tensors}
    engine = Engine(iq2, EngineOptions(threads=1))
    try:
        assert np.all(np.isfinite(engine.embed([engine.vocab.tokenize("sea and river")])))
    finally:
        engine.close()


def test_synthetic_texts_come_close_to_their_lengths(tmp_path: Path) -> None:
    vocab = Vocab.load(write_qwen2vl_gguf(tmp_path / "tiny.gguf", TINY))
    wanted = target_lengths(200, "mixed", seed=3)
    assert np.array_equal(wanted, target_lengths(200, "mixed", seed=3))  # deterministic
    short = wanted[wanted <= 120]
    assert len(short) > 120 and short.min() >= 10 and wanted.max() <= 3000
    got = np.array([vocab.count(t) for t in synthetic_texts(wanted, vocab.count, seed=3)])
    assert np.all(got <= wanted) and np.all(wanted - got <= 10)
    assert set(target_lengths(5, "fixed:77")) == {77}


def test_llama_embedding_log_parser_reads_a_real_run() -> None:
    """Recorded: the real llama-embedding (upstream, as vendored in llama-cpp-python 0.3.36, CUDA build) on an H100,
    seed recipe, 3000 synthetic texts on the v4-shaped F16 model (docs/benchmarks.md); decode lines kept whole."""
    from bulkembed.bench import peers

    log = (REPO / "tests" / "data" / "llama-embedding-h100.log").read_text()
    peer = peers.parse_llama_embedding_log(log)
    assert peer.decodes == 78 and peer.sequences == 3000 - 64
    assert peer.tokens == 597020 - 7308  # all decodes but the first (warm-up)
    # 0.06.135.806 → 0.53.027.131 over 77 gaps, plus one mean gap for the last decode
    assert peer.decode_s == pytest.approx((53.027131 - 6.135806) * 78 / 77, rel=1e-6)
    with pytest.raises(ValueError, match="announced 0 decodes"):
        peers.parse_llama_embedding_log("main: unable to load model\n")


def test_anchor_batches_are_length_sorted_and_bounded() -> None:
    from bulkembed.bench import anchor

    lengths = np.array([5, 300, 40, 41, 300, 2])
    plan = anchor.batches(lengths, batch_tokens=600)
    assert sorted(i for b in plan for i in b) == list(range(6))
    assert all(len(b) * lengths[b[0]] <= 600 or len(b) == 1 for b in plan)
    assert [lengths[b[0]] for b in plan] == sorted((lengths[b[0]] for b in plan), reverse=True)


def test_non_causal_model_is_measured_against_llama_embed(tmp_path: Path) -> None:
    """A MiniLM-shaped bert: bulkembed and Llama.embed (with the model's pooling) on the same texts; the seed
    recipe, which splits documents, is left out with a note."""
    done = subprocess.run([sys.executable, "-m", "bulkembed.bench", "--synthetic-model", "minilm", "--quant", "F32",
                           "--synthetic", "30", "--max-doc-tokens", "200", "--threads", "1", "--work", str(tmp_path),
                           "--modes", "bulkembed,llama-embed,seed", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    rows = {r["mode"]: r for r in report["modes"]}
    assert set(rows) == {"bulkembed", "llama-embed"} and report["model"]["file"].startswith("synthetic-minilm")
    assert rows["bulkembed"]["tokens"] == rows["llama-embed"]["tokens"] == report["corpus"]["tokens"]
    assert "mean pooling" in rows["llama-embed"]["note"]
    assert any(n.startswith("seed: not run on a non-causal model") for n in report["notes"])


def test_the_variant_modes_measure_one_option_changed_beside_the_default(tmp_path: Path) -> None:
    """`bulkembed-head` is the bulkembed path as a stock llama.cpp runs it, `bulkembed-isolated` with --isolate: the
    report says which the engine runs and what each costs."""
    done = subprocess.run([sys.executable, "-m", "bulkembed.bench", "--synthetic-model", "tiny", "--quant", "F32",
                           "--synthetic", "30", "--threads", "1", "--modes",
                           "bulkembed,bulkembed-head,bulkembed-isolated", "--work", str(tmp_path), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {r["mode"]: r for r in report["modes"]}
    assert list(rows) == ["bulkembed", "bulkembed-head", "bulkembed-isolated"]
    assert report["lm_head"] == "skipped" and report["isolate"] is False
    assert rows["bulkembed"]["note"].endswith("LM head skipped")
    assert rows["bulkembed-head"]["note"].endswith("LM head computed (skip_lm_head is off)")
    assert rows["bulkembed-isolated"]["note"].endswith("LM head skipped, one document a decode")
    assert rows["bulkembed-head"]["tokens"] == rows["bulkembed-isolated"]["tokens"] == rows["bulkembed"]["tokens"]
    text = format_report(report)
    assert re.search(r"==> bulkembed without / with the LM head = [\d.]+ \(the head's share", text)
    assert re.search(r"==> bulkembed isolated / packed = [\d.]+ \(what one document a decode costs", text)
