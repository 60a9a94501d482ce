"""Query vectors match the index, and an index does not depend on how its job was cut.

On the outlier model (tests/conftest.py), where llama.cpp's kernel regimes show: `bulkembed run` with other shard
sizes, ubatch caps and engine counts writes the same vectors, bit for bit; `bulkembed embed` (and
bulkembed.Embedder) of a text alone gives the bits the bulk job wrote for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from bulkembed.contract.schema import read_decoded_by
from tests.conftest import REPO, mixed_texts, write_corpus

TEXTS = mixed_texts(90, seed=9, long_every=9, long_tokens=(300, 700))
IDS = [f"d{i}" for i in range(len(TEXTS))]


def bulkembed(*args: str, stdin: str | None = None, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bulkembed ARGS` with no BULKEMBED_ setting of this shell's, only those of `env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")} | {"HF_HUB_OFFLINE": "1",
                                                                                    **(env or {})}
    result = subprocess.run([sys.executable, "-m", "bulkembed.cli", *args], cwd=REPO, env=env, input=stdin,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def json_vectors(result: subprocess.CompletedProcess) -> np.ndarray:
    """The vectors `bulkembed embed` printed, one JSON line a text."""
    return np.array([json.loads(line)["embedding"] for line in result.stdout.splitlines()], np.float32)


def vectors_by_id(out: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(out, format="arrow").to_table()
    decoded_by = read_decoded_by(table.schema)  # what queries must be embedded alike
    assert decoded_by["layout"] in ("packed", "isolated") and decoded_by["device"] == "CPU", decoded_by
    assert decoded_by["llama_cpp"].startswith("0.3.36+bulkembed."), decoded_by
    return dict(zip(table["id"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                    strict=True))


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("query") / "corpus.parquet", IDS, TEXTS)


@pytest.fixture(scope="module")
def indexed(outlier_models, corpus, tmp_path_factory) -> dict[str, np.ndarray]:
    """The corpus indexed as passages with the defaults (shards of 65536 tokens, ubatch 512, one engine)."""
    out = tmp_path_factory.mktemp("index") / "out"
    bulkembed("run", str(corpus), "--model", str(outlier_models["Q4_K_M"]), "--out", str(out), "--threads", "2",
              "--ubatch", "512")
    return vectors_by_id(out)


# --shard-tokens 40: every shard, so every decode, smaller than 64 tokens, the regime a job's last decodes and
# queries ran in before padding (this case then failed: 68 of 90 rows below cos 0.999999, the worst 0.99984).
def run_job(model: Path, corpus: Path, out: Path, *options: str,
            env: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    threads = "1" if "--engines" in options else "2"
    ubatch = [] if "--ubatch" in options else ["--ubatch", "512"]
    bulkembed("run", str(corpus), "--model", str(model), "--out", str(out), "--threads", threads, *ubatch, *options,
              env=env)
    return vectors_by_id(out)


def rows_not_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    assert got.keys() == want.keys()
    return [i for i in IDS if not np.array_equal(got[i], want[i])]


# On the CPU, with the project's llama.cpp build and flash attention on (the defaults), the same bits
# (tests/worker/test_batch_invariance.py says what makes them so).
@pytest.mark.parametrize("options", [["--shard-tokens", "2000"], ["--shard-tokens", "40"], ["--ubatch", "256"],
                                     ["--engines", "2"]], ids=" ".join)
def test_the_index_does_not_depend_on_how_the_job_is_cut(outlier_models, corpus, indexed, tmp_path, options):
    assert rows_not_bit_identical(run_job(outlier_models["Q4_K_M"], corpus, tmp_path / "out", *options), indexed) == []


def test_embed_of_a_text_alone_is_its_row_in_the_index(outlier_models, indexed, tmp_path):
    """The CLI, one text per stdin line, as passages (the role the index was built with); JSON lines out."""
    picked = [0, 1, 2, 5, 9, 40]  # short ones and long ones
    result = bulkembed("embed", "--model", str(outlier_models["Q4_K_M"]), "--role", "passage", "--threads", "2",
                       stdin="".join(TEXTS[i] + "\n" for i in picked))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == [TEXTS[i] for i in picked]
    got = np.array([line["embedding"] for line in lines], np.float32)
    assert np.array_equal(got, np.stack([indexed[IDS[i]] for i in picked]))
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_embed_with_a_float16_index_gives_its_rows_bits(outlier_models, corpus, tmp_path):
    """An index of --dtype float16 holds float16 rows: a query embedded for it is rounded alike (it came back as
    float32, so never equal to its row)."""
    out = tmp_path / "half"
    index = run_job(outlier_models["Q4_K_M"], corpus, out, "--dtype", "float16")
    picked = [0, 3, 40]
    bulkembed("embed", "--index", str(out), "--role", "passage", "--threads", "2", "--out", str(tmp_path / "q.npy"),
              *[TEXTS[i] for i in picked])
    got = np.load(tmp_path / "q.npy")
    assert got.dtype == np.float16 and np.array_equal(got, np.stack([index[IDS[i]] for i in picked]))


def test_the_python_api_embeds_queries_as_a_query_job_would(outlier_models, corpus, tmp_path):
    from bulkembed import Embedder

    out = tmp_path / "queries"
    bulkembed("run", str(corpus), "--model", str(outlier_models["Q4_K_M"]), "--out", str(out), "--threads", "2",
              "--role", "query", "--dims", "128")
    index = vectors_by_id(out)
    with Embedder(outlier_models["Q4_K_M"], dims=128) as embedder:
        pid = embedder.engine.pid
        one_at_a_time = np.concatenate([embedder.embed([TEXTS[i]]) for i in range(12)])  # role: query by default
        assert embedder.engine.pid == pid and embedder.engine.alive, "one engine for every call"
        passages = embedder.embed(TEXTS[:3], role="passage")
        # Any iterable of texts, read once: a generator (it came back empty, with no error), a numpy array of
        # strings (its truth value was asked), a tuple.
        many = [embedder.embed(t for t in TEXTS[:12]), embedder.embed(np.array(TEXTS[:12])),
                embedder.embed(tuple(TEXTS[:12]))]
    rows = np.stack([index[i] for i in IDS[:12]])
    assert one_at_a_time.shape == (12, 128) and np.array_equal(one_at_a_time, rows)
    assert all(np.array_equal(vectors, rows) for vectors in many)
    with pytest.raises(ValueError, match="Embedder is closed"):
        embedder.embed(TEXTS[:1])
    assert cos(passages, one_at_a_time[:3]).max() < 0.9999, "the role changes the prefix, so the vector"


def test_embed_writes_npy_and_refuses_what_a_job_would(outlier_models, tmp_path):
    from bulkembed import embed
    from bulkembed.contract.errors import InputError

    bulkembed("embed", "the sea", "a river", "--model", str(outlier_models["Q4_K_M"]), "--out",
              str(tmp_path / "v.npy"), "--threads", "2")
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (2, 256) and vectors.dtype == np.float32
    assert np.array_equal(vectors[:1], embed(["the sea"], outlier_models["Q4_K_M"]))
    with pytest.raises(InputError, match="empty"):
        embed(["the sea", "  "], outlier_models["Q4_K_M"])


def test_embed_reads_windows_lines_and_says_what_it_cannot_read(outlier_models, tmp_path):
    """Lines on standard input that end in CRLF (a file from Windows) embed as the same texts as with LF: the CR had
    become part of the text (cos 0.96 to the text without it). Bytes that are not UTF-8, on standard input or as an
    argument, and an --out in no folder get one line that says so and exit 2, before any embedding (they were
    tracebacks, the last after the whole embedding)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")} | {"HF_HUB_OFFLINE": "1"}

    def embed(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bulkembed.cli", "embed", "--model", str(outlier_models["Q8_0"]),
                               "--threads", "2", *args], cwd=REPO, env=env, input=stdin, capture_output=True,
                              timeout=300)

    windows, unix = embed(stdin=b"the sea\r\na river\r\n"), embed(stdin=b"the sea\na river\n")
    assert windows.returncode == unix.returncode == 0, windows.stderr[-2000:]
    assert windows.stdout == unix.stdout and len(json_vectors(unix)) == 2
    (tmp_path / "folder.npy").mkdir()
    for args, stdin, says in (((), b"ok\n\xff\xfe bad\n", "standard input, line 2: not UTF-8"),
                              ((os.fsdecode(b"caf\xe9"),), None, "text 1: not valid Unicode"),
                              # numbered across batches, as given (they were numbered within their batch of 2)
                              (("--batch", "2"), b"a\nb\nc\n \ne\n", "standard input, line 4: empty"),
                              (("--batch", "2", "a", "b", "c", os.fsdecode(b"\xff")), None, "text 4: not valid"),
                              (("the sea", "--out", str(tmp_path / "nowhere" / "v.npy")), None, "no folder"),
                              (("the sea", "--out", str(tmp_path / "folder.npy")), None, "is a folder"),
                              (("the sea", "--threads", "-1"), None, "must be at least 0"),
                              (("the sea", "--gpu-layers", "-5"), None, "must be at least -1")):
        refused = embed(*args, stdin=stdin)
        stderr = refused.stderr.decode()
        assert refused.returncode == 2 and says in stderr and "Traceback" not in stderr, stderr[-2000:]


# --isolate on kernels that move a packed text's vector with its decode's size and its cells' place, as llama.cpp's
# CUDA kernels do: the CPU's without padding and with the KV tiles cut from cell 0 (an emulation of such a backend,
# tests/worker/test_batch_invariance.py). Isolated, a job's rows and a text embedded alone are the same bits.
MOVING_KERNELS = {"BULKEMBED_MIN_DECODE": "0", "GGML_CPU_FA_GATHER": "0"}



@pytest.fixture(scope="module")
def isolated_out(outlier_models, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("isolated") / "out"
    run_job(outlier_models["Q8_0"], corpus, out, "--isolate", "--flash-attn", "on", env=MOVING_KERNELS)
    return out


@pytest.fixture(scope="module")
def isolated_index(isolated_out) -> dict[str, np.ndarray]:
    return vectors_by_id(isolated_out)


def test_on_moving_kernels_a_packed_index_depends_on_how_the_job_is_cut(outlier_models, corpus, tmp_path):
    """What --isolate is for, and proof that the test below can fail."""
    runs = [run_job(outlier_models["Q8_0"], corpus, tmp_path / name, "--flash-attn", "on", *options,
                    env=MOVING_KERNELS) for name, options in (("default", []), ("small", ["--shard-tokens", "40"]))]
    assert len(rows_not_bit_identical(*runs)) > 10


@pytest.mark.parametrize("options", [["--shard-tokens", "40"], ["--engines", "2"]], ids=" ".join)
def test_isolated_the_index_keeps_its_bits_however_the_job_is_cut(outlier_models, corpus, isolated_index, tmp_path,
                                                                 options):
    got = run_job(outlier_models["Q8_0"], corpus, tmp_path / "out", "--isolate", "--flash-attn", "on", *options,
                  env=MOVING_KERNELS)
    assert rows_not_bit_identical(got, isolated_index) == []
    decoded_by = read_decoded_by(ds.dataset(tmp_path / "out", format="arrow").schema)
    assert (decoded_by["layout"], decoded_by["min_decode"], decoded_by["flash_attn"]) == ("isolated", 0, "on")


def test_isolated_embed_of_a_text_is_its_row_bit_for_bit(outlier_models, isolated_index):
    picked = [0, 1, 2, 5, 9, 40]
    result = bulkembed("embed", "--model", str(outlier_models["Q8_0"]), "--role", "passage", "--threads", "2",
                       "--isolate", "--flash-attn", "on", *[TEXTS[i] for i in picked], env=MOVING_KERNELS)
    assert np.array_equal(json_vectors(result), np.stack([isolated_index[IDS[i]] for i in picked]))


def test_embed_with_index_embeds_as_the_job_did(outlier_models, isolated_out, isolated_index):
    """--index takes the model, prefix rule, pooling and the decoding (--isolate, no padding, flash attention on)
    from the output: no option repeated, and the texts get their rows' bits. Left to the defaults instead, the same
    command gives other vectors."""
    picked = [0, 3, 40]
    moving = {"GGML_CPU_FA_GATHER": "0"}  # the kernels, as when the index was written; the rest comes from it
    texts = [TEXTS[i] for i in picked]
    want = np.stack([isolated_index[IDS[i]] for i in picked])

    def embedded(*options: str) -> np.ndarray:
        return json_vectors(bulkembed("embed", "--role", "passage", "--threads", "2", *options, *texts, env=moving))

    assert np.array_equal(embedded("--index", str(isolated_out)), want)
    assert not np.array_equal(embedded("--model", str(outlier_models["Q8_0"])), want), "the test could not fail"


def test_the_python_api_takes_its_options_from_an_index(outlier_models, corpus, tmp_path, monkeypatch):
    """An index with another ubatch cap: the long texts it cut at 256 tokens are cut there again."""
    from bulkembed import Embedder
    from bulkembed.contract.errors import InputError

    out = tmp_path / "out"
    index = run_job(outlier_models["Q8_0"], corpus, out, "--isolate", "--flash-attn", "on", "--ubatch", "256",
                    env=MOVING_KERNELS)
    picked = [0, 5, 9, 18]  # 0, 9 and 18: 300 to 700 tokens
    monkeypatch.setenv("GGML_CPU_FA_GATHER", "0")
    with Embedder.for_index(out) as embedder:
        assert (embedder.engine.options.isolate, embedder.engine.options.min_decode,
                embedder.engine.options.ubatch) == (True, 0, 256)
        got = embedder.embed([TEXTS[i] for i in picked], role="passage")
    assert np.array_equal(got, np.stack([index[IDS[i]] for i in picked]))
    with pytest.raises(InputError, match="is not the model"):
        Embedder.for_index(out, outlier_models["Q4_K_M"])
    with pytest.raises(InputError, match="--prefix does not apply"):
        Embedder.for_index(out, prefix="Query: ")


def test_embed_refuses_options_that_an_index_decides(isolated_out):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    result = subprocess.run([sys.executable, "-m", "bulkembed.cli", "embed", "--index", str(isolated_out), "--dims",
                             "8", "--isolate", "a query"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--index takes --dims, --isolate from the index's job" in result.stderr


def test_an_index_decoded_two_ways_says_so_and_queries_follow_most_rows(outlier_models, corpus, isolated_out,
                                                                        tmp_path):
    """Re-indexed with --reuse under other settings, an output holds rows decoded two ways: the manifest counts
    them, and --index embeds as most rows were, with a warning."""
    from bulkembed.contract.manifest import read_manifest
    from bulkembed.contract.schema import decoding_digest
    from bulkembed.contract.store import open_store

    extra = mixed_texts(120, seed=11, long_every=9, long_tokens=(300, 700))
    grown = write_corpus(tmp_path / "grown.parquet", IDS + [f"e{i}" for i in range(120)], TEXTS + extra)
    out = tmp_path / "out"
    index = run_job(outlier_models["Q8_0"], grown, out, "--reuse", str(isolated_out))
    decodings = read_manifest(open_store(str(out)))["decodings"]
    embedded = read_decoded_by(ds.dataset(out / "000000-000000.arrow", format="arrow").schema)
    reused = read_decoded_by(ds.dataset(isolated_out, format="arrow").schema)
    assert [(d["digest"], d["rows"]) for d in decodings] == [(decoding_digest(embedded), 120),
                                                             (decoding_digest(reused), 90)]
    result = bulkembed("embed", "--index", str(out), "--role", "passage", "--threads", "2", extra[0], extra[1])
    assert "was embedded in 2 ways" in result.stderr, result.stderr[-2000:]
    assert np.array_equal(json_vectors(result), np.stack([index["e0"], index["e1"]]))


def test_embed_takes_what_its_options_leave_unsaid_from_the_workers_environment(monkeypatch):
    """`bulkembed embed` runs as a worker of the same environment would: BULKEMBED_THREADS, BULKEMBED_GPU_LAYERS and
    BULKEMBED_FLASH_ATTN apply where no option says otherwise (flash attention changes a vector's last digits).
    Before, embed ignored them."""
    import argparse

    from bulkembed.query import add_embed_parser, embed_options

    parser = argparse.ArgumentParser()
    add_embed_parser(parser.add_subparsers())
    monkeypatch.setenv("BULKEMBED_THREADS", "1")
    monkeypatch.setenv("BULKEMBED_GPU_LAYERS", "0")
    monkeypatch.setenv("BULKEMBED_FLASH_ATTN", "off")
    options = embed_options(parser.parse_args(["embed", "a text"]))
    assert (options.threads, options.gpu_layers, options.flash_attn) == (1, 0, False)
    options = embed_options(parser.parse_args(["embed", "--threads", "2", "--gpu-layers", "-1", "--flash-attn", "on",
                                               "a text"]))
    assert (options.threads, options.gpu_layers, options.flash_attn) == (2, -1, True), "an option wins"
    monkeypatch.setenv("BULKEMBED_UBATCH", "256")  # where a long text is cut
    monkeypatch.setenv("BULKEMBED_ISOLATE", "true")
    options = embed_options(parser.parse_args(["embed", "a text"]))
    assert (options.ubatch, options.isolate) == (256, True)


def test_the_python_api_takes_the_workers_environment_too(outlier_models, monkeypatch):
    """Embedder(model) without options ran packed with every default whatever BULKEMBED_* said (the CLI did not)."""
    from bulkembed import Embedder

    monkeypatch.setenv("BULKEMBED_ISOLATE", "true")
    monkeypatch.setenv("BULKEMBED_UBATCH", "256")
    monkeypatch.setenv("BULKEMBED_THREADS", "2")
    with Embedder(outlier_models["Q4_K_M"]) as embedder:
        decoded_by = embedder.engine.facts.decoded_by
    assert (decoded_by["layout"], int(decoded_by["ubatch"])) == ("isolated", 256), decoded_by


def test_an_index_made_with_a_relative_model_path_is_queried_from_anywhere(tiny_model, tmp_path):
    """The job spec records the model's absolute path; once the file is gone, one line says to pass --model."""
    shutil.copyfile(tiny_model, tmp_path / "m-text-retrieval.gguf")
    write_corpus(tmp_path / "c.parquet", ["a", "b"], ["first text", "second text"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")} | {"HF_HUB_OFFLINE": "1"}

    def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bulkembed.cli", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)

    done = cli("run", "c.parquet", "--model", "m-text-retrieval.gguf", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    queried = cli("embed", "--index", str(tmp_path / "out"), "--role", "passage", "first text", cwd=REPO)
    assert queried.returncode == 0, queried.stderr[-3000:]
    assert np.array_equal(json_vectors(queried)[0], vectors_by_id(tmp_path / "out")["a"])
    (tmp_path / "m-text-retrieval.gguf").rename(tmp_path / "moved.gguf")
    gone = cli("embed", "--index", str(tmp_path / "out"), "a query", cwd=REPO)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr, gone.stderr[-3000:]
    assert f"{tmp_path / 'm-text-retrieval.gguf'}, which is not here" in gone.stderr and "--model" in gone.stderr
    moved = cli("embed", "--index", str(tmp_path / "out"), "--model", str(tmp_path / "moved.gguf"), "a query",
                cwd=REPO)
    assert moved.returncode == 0, moved.stderr[-3000:]


def test_an_index_of_only_rejected_rows_is_queried_without_a_false_warning(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "c.parquet", ["a", "b"], ["", "   "])
    bulkembed("run", str(corpus), "--model", str(tiny_model), "--out", str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["rejected_rows"] == 2
    queried = bulkembed("embed", "--index", str(tmp_path / "out"), "a query")
    assert json_vectors(queried).shape[0] == 1
    assert "written before" not in queried.stderr, "it holds no vectors, not old ones"
