"""End to end with real processes: Parquet on S3 → shards on Redis → two workers → Arrow on S3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.schema import read_metadata
from bulkembed.contract.store import open_store
from bulkembed.producer.submit import plan_job
from tests.conftest import REPO, cosines, hub_cache, mixed_texts, write_corpus

N_ROWS = 3000


@pytest.fixture
def corpus(tmp_path):
    texts = mixed_texts(N_ROWS, seed=11, long_every=25)
    ids = [f"doc-{i:05d}" for i in range(N_ROWS)]
    # Two files, to read a folder / prefix.
    write_corpus(tmp_path / "corpus" / "part-0.parquet", ids[:1700], texts[:1700])
    write_corpus(tmp_path / "corpus" / "part-1.parquet", ids[1700:], texts[1700:])
    return tmp_path / "corpus", dict(zip(ids, texts, strict=True))


def upload_folder(folder, bucket: str, prefix: str) -> str:
    s3 = boto3.client("s3")
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def read_output(uri: str) -> pa.Table:
    store = open_store(uri)
    fs, base = store.arrow_fs()
    return ds.dataset(base, filesystem=fs, format="arrow").to_table()


def check_output(table: pa.Table, expected: dict[str, str], reference_embedder, n_embd: int = 64) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected), "every input id exactly once"
    assert set(ids) == set(expected)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, n_embd)
    assert vectors.shape == (len(expected), n_embd)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Batch invariance through the whole pipeline, on a sample including the long documents.
    rng = np.random.default_rng(0)
    longest = np.argsort(table.column("n_tokens").to_numpy())[-20:]
    sample = np.unique(np.concatenate([rng.choice(len(ids), 60, replace=False), longest]))
    texts = ["Passage: " + expected[ids[i]] for i in sample]
    assert cosines(vectors[sample], reference_embedder(texts)).min() >= 0.9999


def test_submit_wait_with_two_workers(corpus, bucket, workers, run_cli, tiny_model, reference_embedder):
    folder, expected = corpus
    input_uri = upload_folder(folder, bucket, "input")
    out = f"s3://{bucket}/embeddings"
    first, second = workers.start(tiny_model), workers.start(tiny_model)

    done = run_cli("submit", input_uri, "--model", tiny_model, "--out", out, "--shard-tokens", "4000", "--wait")
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.split()[0]

    table = read_output(out)
    check_output(table, expected, reference_embedder)
    meta = read_metadata(table.schema)
    assert meta["task"] == "retrieval" and meta["prefix"] == "Passage: " and meta["pooling"] == "mean"

    manifest = json.loads(open_store(out).get("_manifest.json"))
    assert manifest["job_id"] == job_id and manifest["rows"] == N_ROWS
    assert manifest["tokens"] == int(pa.compute.sum(table.column("n_tokens")).as_py())
    assert done.stdout.strip().splitlines()[-1] == \
        f"job {job_id} done: {N_ROWS} rows embedded ({manifest['tokens']} tokens), 0 reused, 0 rejected"
    shards = manifest_shards(open_store(out)).num_rows
    assert shards > 4, "the job was cut into several shards"
    # Both workers took shards: the queue spreads work.
    logs = [p.log.read_text() for p in (first, second)]
    assert all("tok/s" in text for text in logs), logs

    status = run_cli("status", job_id, "--json")
    state = json.loads(status.stdout)
    assert state["state"] == "done" and state["shards_done"] == shards
    assert state["tokens_done"] == manifest["tokens"]
    failures = run_cli("status", job_id, "--failures")
    assert failures.returncode == 0 and not failures.stdout and "no failed shards" in failures.stderr


def test_run_embedded_mode_local_and_s3(corpus, bucket, tmp_path, run_cli, tiny_model, reference_embedder):
    folder, expected = corpus
    local_out = tmp_path / "out"
    done = run_cli("run", folder, "--model", tiny_model, "--out", local_out, "--shard-tokens", "8000",
                   "--ubatch", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    check_output(ds.dataset(local_out, format="arrow").to_table(), expected, reference_embedder)
    assert json.loads((local_out / "_manifest.json").read_text())["rows"] == N_ROWS
    assert not (local_out / "_shards").exists(), "a done job's shard inputs are deleted, their folder too"
    # Each shard's log line is written above the progress bar (which tqdm clears first with a carriage return), not
    # run on after the bar's text: in a terminal every line ended `…tok/s]2026-11-28 02:47:32,458 INFO …`.
    assert done.stderr.count("bulkembed.worker.shard: job") > 1
    assert not re.search(r"[^\n\r]\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", done.stderr), done.stderr[-3000:]

    s3_out = f"s3://{bucket}/run-out"
    done = run_cli("run", folder / "part-0.parquet", "--model", tiny_model, "--out", s3_out)
    assert done.returncode == 0, done.stderr[-3000:]
    part0 = {k: v for k, v in expected.items() if int(k.split("-")[1]) < 1700}
    check_output(read_output(s3_out), part0, reference_embedder)


def test_the_default_command_runs_a_model_from_the_hub_cache(tmp_path, cli_env, tiny_model):
    """README's first command names the model REPO:QUANT: run with the file as huggingface_hub keeps a download (a
    link named as the file, to a blob named by its hash). The task comes from the file's name."""
    hub_cache(tmp_path / "hf", "jinaai/jina-embeddings-v4-text-retrieval-GGUF",
              "jina-embeddings-v4-text-retrieval-F32.gguf", tiny_model)
    corpus = write_corpus(tmp_path / "c.parquet", ["a", "b"], ["first text", "second text"])
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "run", str(corpus), "--out", str(tmp_path / "o"),
                           "--model", "jinaai/jina-embeddings-v4-text-retrieval-GGUF:F32"],
                          env=cli_env | {"HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((tmp_path / "o" / "_manifest.json").read_text())["job"]
    assert job["model"]["file_name"] == "jina-embeddings-v4-text-retrieval-F32.gguf"
    assert (job["task"], job["prefix"]) == ("retrieval", "Passage: ")


def test_bad_rows_are_quarantined_never_lost(tmp_path, bucket, run_cli, tiny_model):
    ids = ["a", "b", None, "c", "d", "b", "e", "f"]
    texts = ["fine text", "also fine", "no id", None, "   ", "duplicate of b", "", "last one"]
    path = write_corpus(tmp_path / "in" / "bad.parquet", ids, texts)
    for source, out in ((path, tmp_path / "out"), (upload_folder(path.parent, bucket, "in") + "/bad.parquet",
                                                   tmp_path / "from-s3")):
        done = run_cli("run", source, "--model", tiny_model, "--out", out)
        assert done.returncode == 0, done.stderr[-3000:]
        written = ds.dataset(out, format="arrow").to_table().column("id").to_pylist()
        rejected = ds.dataset(out / "_rejected", format="arrow").to_table()
        reasons = dict(zip(rejected.column("row").to_pylist(), rejected.column("reason").to_pylist(), strict=True))
        assert sorted(written) == ["a", "b", "f"]
        assert reasons == {2: "null id", 3: "null text", 4: "empty text", 5: "duplicate id", 6: "empty text"}
        assert len(written) + len(reasons) == len(ids), "every input row is written or rejected"
        assert json.loads((out / "_manifest.json").read_text())["rejected_rows"] == 5
        assert set(rejected.column("source").to_pylist()) == {str(source)}, "the file as the user named it"


def test_input_errors_are_clear_before_anything_is_queued(tmp_path, run_cli, tiny_model):
    path = write_corpus(tmp_path / "c.parquet", ["a"], ["x"])
    done = run_cli("run", path, "--model", tiny_model, "--out", tmp_path / "o", "--text-column", "body")
    assert done.returncode == 2 and "has no column 'body'" in done.stderr
    assert not (tmp_path / "o" / "_shards").exists()
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    done = run_cli("run", tmp_path / "broken.parquet", "--model", tiny_model, "--out", tmp_path / "o")
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = run_cli("run", path, "--model", "nobody-xyz/missing-GGUF:Q8_0", "--out", tmp_path / "o")
    assert done.returncode == 2 and "--model /path/to/model.gguf" in done.stderr
    done = run_cli("run", path, "--model", tiny_model, "--out", tmp_path / "o", "--id-column", "text")
    assert done.returncode == 2 and "both name 'text'" in done.stderr, done.stderr[-2000:]
    # No such bucket: said before the job is registered (it was a traceback, and the job stayed `planning`).
    for command in ("run", "submit"):
        done = run_cli(command, path, "--model", tiny_model, "--out", "s3://no-such-bucket/o")
        assert done.returncode == 2 and "there is no bucket 'no-such-bucket'" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    planned = plan_job(str(path), str(tiny_model), "s3://no-such-bucket/o")
    planned.counter.close()
    assert "no job" in run_cli("status", planned.job.job_id).stderr, "submit registered nothing"


def test_integer_ids_keep_their_type(tmp_path, run_cli, tiny_model):
    path = write_corpus(tmp_path / "c.parquet", [10, 20, 30], ["x y", "z", "w v u"], id_type=pa.int64())
    done = run_cli("run", path, "--model", tiny_model, "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    table = ds.dataset(tmp_path / "o", format="arrow").to_table()
    assert table.schema.field("id").type == pa.int64()
    assert sorted(table.column("id").to_pylist()) == [10, 20, 30]


@pytest.mark.parametrize(("first", "second", "common"), [(pa.string(), pa.large_string(), pa.string()),
                                                        (pa.int32(), pa.int64(), pa.int64())])
def test_files_whose_ids_differ_in_width_are_one_corpus(tmp_path, run_cli, tiny_model, first, second, common):
    """Files written by different tools (pandas' object strings and pyarrow's large strings, int32 and int64 ids) are
    one corpus: their ids are read as one type, duplicates are found across them, and the job id of a corpus whose
    files agree is unchanged. Before, such a corpus was refused."""
    make = (lambda i: f"d{i}") if pa.types.is_string(common) else (lambda i: i)
    write_corpus(tmp_path / "in" / "a.parquet", [make(i) for i in range(30)], mixed_texts(30, seed=1), id_type=first)
    write_corpus(tmp_path / "in" / "b.parquet", [make(i) for i in range(25, 60)], mixed_texts(35, seed=2),
                 id_type=second)
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr[-2000:]
    table = ds.dataset(tmp_path / "o", format="arrow").to_table()
    assert table.schema.field("id").type == common
    assert sorted(table.column("id").to_pylist()) == sorted(make(i) for i in range(60)), "ids 25-29 once: the first"
    rejected = ds.dataset(tmp_path / "o" / "_rejected", format="arrow").to_table()
    assert rejected.num_rows == 5 and set(rejected.column("reason").to_pylist()) == {"duplicate id"}
    assert rejected.schema.field("id").type == common
    alone = plan_job(str(tmp_path / "in" / "a.parquet"), str(tiny_model), str(tmp_path / "a"))
    alone.counter.close()
    assert alone.job.id_type is None and "id_type" not in json.dumps(alone.job.model_dump(exclude_none=True))


def test_rerun_resumes_and_force_starts_over(tmp_path, run_cli, tiny_model):
    path = write_corpus(tmp_path / "c.parquet", [f"d{i}" for i in range(60)], mixed_texts(60, seed=2))
    out = tmp_path / "out"
    args = ("run", path, "--model", tiny_model, "--out", out, "--shard-tokens", "800")
    assert run_cli(*args).returncode == 0
    outputs = sorted(out.glob("0*.arrow"))
    assert len(outputs) > 3
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    outputs[1].unlink()  # as if the first run died before this shard
    (out / "_manifest.json").unlink()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in outputs if p != outputs[1]), "written shards kept"
    assert outputs[1].exists() and json.loads((out / "_manifest.json").read_text())["rows"] == 60
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert all(p.stat().st_mtime_ns != stamps[p] for p in outputs if p != outputs[1]), "--force rewrote them"
    assert ds.dataset(out, format="arrow").to_table().num_rows == 60


def test_another_jobs_output_in_out_is_refused_unless_forced(tmp_path, run_cli, tiny_model):
    """OUT holds one job's files. A job of an edited corpus, or with other options, into an OUT that holds another
    job's output is refused before anything is written, by run and by submit; --force replaces that output whole.
    Before, shard files found there were taken as the new job's: old vectors passed for new ones, and the spec and
    manifest claimed options the files did not have."""
    ids = [f"d{i}" for i in range(40)]
    texts = mixed_texts(len(ids), seed=6)
    first = write_corpus(tmp_path / "v1" / "a.parquet", ids[:20], texts[:20])
    write_corpus(tmp_path / "v1" / "b.parquet", ids[20:], texts[20:])
    out = tmp_path / "out"
    common = ("--model", tiny_model, "--out", out, "--shard-tokens", "400")
    assert run_cli("run", first.parent, *common).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    edited = write_corpus(tmp_path / "v2" / "a.parquet", ids[:20], ["an edited first text"] + texts[1:20])
    for argv in (("run", edited, *common), ("run", first.parent, *common, "--dims", "32"),
                 ("submit", edited, *common)):
        refused = run_cli(*argv)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "holds the output of job" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing written"
    resumed = run_cli("run", first.parent, *common)
    assert resumed.returncode == 0, "the same job resumes"
    # Spelled otherwise (relative, with a trailing slash; the model's path too), the same input is the same job:
    # resumed under its id, its shards kept.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.arrow")}
    respelled = run_cli("run", os.path.relpath(first.parent, REPO) + "/", "--model", os.path.relpath(tiny_model, REPO),
                        *common[2:])
    assert respelled.returncode == 0, respelled.stderr[-2000:]
    assert respelled.stdout.split(":")[0] == resumed.stdout.split(":")[0], (respelled.stdout, resumed.stdout)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.arrow")} == stamps, "no shard embedded again"

    forced = run_cli("run", edited, *common, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    table = ds.dataset(out, format="arrow").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(ids[:20]), "only the new job's rows"
    assert json.loads((out / "_manifest.json").read_text())["rows"] == 20


def test_a_job_planned_before_units_spanned_files_resumes_as_it_was_planned(tmp_path, run_cli, tiny_model):
    """An OUT half written by a bulkembed whose units were one file's: the same command resumes that job (its id,
    its units, so its shard names), embedding only what it lacks. Planned anew, the files' rows would have come
    under other shard names, beside the written ones: every row twice."""
    from bulkembed.local import run_local
    from bulkembed.producer.corpus import plan_units
    from bulkembed.worker.engine import EngineOptions
    from bulkembed.worker.engines import EngineSetup

    folder = tmp_path / "in"
    texts = mixed_texts(90, seed=4)
    for f in range(3):
        write_corpus(folder / f"part-{f}.parquet", [f"f{f}-{i}" for i in range(30)], texts[f * 30:(f + 1) * 30])
    out = tmp_path / "out"
    old = plan_job(str(folder), str(tiny_model), str(out))
    old.job = old.job.model_copy(update={"units_span_files": False})
    old.units = plan_units(old.corpus, old.job.unit_rows, span_files=False)
    run_local(old, str(tiny_model), EngineSetup(EngineOptions(threads=1), engines=1, ubatch=512), progress=False)
    old.counter.close()
    assert json.loads((out / "_job.json").read_text()).get("units_span_files") is False and len(old.units) == 3
    outputs = sorted(out.glob("0*.arrow"))
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    outputs[-1].unlink()  # as if it died before this shard
    (out / "_manifest.json").unlink()
    resumed = run_cli("run", folder, "--model", tiny_model, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split(":")[0] == f"job {old.job.job_id}", resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs[:-1]} == {p: stamps[p] for p in outputs[:-1]}, "kept"
    ids = ds.dataset(out, format="arrow").to_table().column("id").to_pylist()
    assert sorted(ids) == sorted(f"f{f}-{i}" for f in range(3) for i in range(30)), "each row once"
    fresh = run_cli("run", folder, "--model", tiny_model, "--out", tmp_path / "fresh")
    assert fresh.returncode == 0 and fresh.stdout.split(":")[0] != f"job {old.job.job_id}", "a new job spans files"


def test_documents_longer_than_the_ubatch_through_two_workers(tmp_path, bucket, workers, run_cli, tiny_model,
                                                               reference_embedder):
    """Workers with a 64-token ubatch and documents up to ~8 ubatches long: each long document is
    decoded in pieces across decodes, and its vector still equals the document embedded in one go."""
    texts = mixed_texts(300, seed=12, long_every=4)
    ids = [f"doc-{i:05d}" for i in range(len(texts))]
    path = write_corpus(tmp_path / "long.parquet", ids, texts)
    out = f"s3://{bucket}/long"
    workers.start(tiny_model, "--ubatch", "64"), workers.start(tiny_model, "--ubatch", "64")
    done = run_cli("submit", path, "--model", tiny_model, "--out", out, "--shard-tokens", "3000", "--wait")
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(out)
    assert (table.column("n_tokens").to_numpy() > 4 * 64).sum() >= 20, "many documents span several ubatches"
    check_output(table, dict(zip(ids, texts, strict=True)), reference_embedder)
    assert all("tok/s" in p.log.read_text() for p in workers.processes), "both workers took shards"
