import shutil
import subprocess
import sys

import pyarrow as pa
import pytest

from bulkembed.contract.errors import ModelError
from bulkembed.contract.job import (
    JobSpec,
    ModelRef,
    Overlength,
    Role,
    Span,
    Task,
    document_spans,
    prefix_for,
    task_from_model_name,
)
from bulkembed.contract.model import hub_patterns, is_hub_spec, model_ref, queue_name, resolve_path
from bulkembed.contract.schema import content_hash, embedding_schema, from_ipc_bytes, read_metadata, to_ipc_bytes
from bulkembed.contract.store import LocalStore, open_store
from tests.conftest import hub_cache


def test_prefix_table_matches_the_model_card():
    assert prefix_for(Task.RETRIEVAL, Role.QUERY) == "Query: "
    assert prefix_for(Task.RETRIEVAL, Role.PASSAGE) == "Passage: "
    assert prefix_for(Task.CODE, Role.QUERY) == "Query: "
    assert prefix_for(Task.CODE, Role.PASSAGE) == "Passage: "
    assert prefix_for(Task.TEXT_MATCHING, Role.QUERY) == "Query: "
    assert prefix_for(Task.TEXT_MATCHING, Role.PASSAGE) == "Query: "  # symmetric task


def test_task_from_model_name():
    assert task_from_model_name("jina-embeddings-v4-text-retrieval-Q8_0.gguf") == Task.RETRIEVAL
    assert task_from_model_name("jina-embeddings-v4-text-code-IQ3_M.gguf") == Task.CODE
    assert task_from_model_name("jina-embeddings-v4-text-matching-F16.gguf") == Task.TEXT_MATCHING
    assert task_from_model_name("Text-Code.Q8_0.gguf") == Task.CODE
    assert task_from_model_name("some-model.gguf") is None
    for other in ("nomic-embed-code.Q4_K_M.gguf", "jina-embeddings-v2-base-code-Q8_0.gguf",
                  "jina-code-embeddings-0.5b-Q8_0.gguf", "SFR-Embedding-Code-2B_R-Q8_0.gguf",
                  "long-context-retrieval-Q8_0.gguf", "bge-context-code-7b.Q8_0.gguf", "text-codec-Q8_0.gguf"):
        assert task_from_model_name(other) is None, f"{other} is no v4 model: its prefixes are not v4's"


def _job(**change) -> JobSpec:
    fields = dict(input="in", input_fingerprint="f", out="/o",
                  model=ModelRef(spec="m", file_name="m.gguf", sha256="a" * 64, queue="bulkembed.m"),
                  task=Task.RETRIEVAL, role=Role.PASSAGE, prefix="Passage: ", shard_tokens=100)
    return JobSpec(**(fields | change))


def test_job_id_is_derived_from_input_model_and_options():
    assert _job().job_id == _job().job_id
    assert _job().job_id != _job(shard_tokens=200).job_id
    assert _job().job_id != _job(input_fingerprint="g").job_id
    other_model = ModelRef(spec="m", file_name="m.gguf", sha256="b" * 64, queue="bulkembed.m")
    assert _job().job_id != _job(model=other_model).job_id


def test_queue_name_from_model_file():
    name = queue_name("jina-embeddings-v4-text-retrieval-Q8_0.gguf")
    assert name == "bulkembed.jina-embeddings-v4-text-retrieval-q8_0"


def test_model_spec_errors_are_clear(tmp_path):
    assert is_hub_spec("jinaai/jina-embeddings-v4-text-retrieval-GGUF:Q8_0")
    with pytest.raises(ModelError, match="neither a file nor REPO:QUANT"):
        resolve_path(str(tmp_path / "missing.gguf"))


def test_unreachable_hub_says_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="--model /path/to/model.gguf"):
        resolve_path("nobody-xyz/not-a-real-repo-GGUF:Q8_0")


def test_a_model_from_the_hub_cache_keeps_its_file_name(tmp_path, monkeypatch, tiny_model):
    """huggingface_hub stores a download as a blob named by its hash behind a link with the file's name: the name
    is what names the task, the queue and v4's trained sizes, never the blob's."""
    link = hub_cache(tmp_path, "jinaai/jina-embeddings-v4-text-code-GGUF", "jina-embeddings-v4-text-code-F32.gguf",
                     tiny_model)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at its import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ref, path = model_ref("jinaai/jina-embeddings-v4-text-code-GGUF:F32")
    assert path == link and ref.file_name == "jina-embeddings-v4-text-code-F32.gguf"
    assert task_from_model_name(ref.file_name) == Task.CODE
    assert ref.queue == "bulkembed.jina-embeddings-v4-text-code-f32"
    assert ref.spec == "jinaai/jina-embeddings-v4-text-code-GGUF:F32", "a hub model stays named as typed"


V4_REPO_FILES = ["jina-embeddings-v4-text-retrieval-F16.gguf", "jina-embeddings-v4-text-retrieval-BF16.gguf",
                 "jina-embeddings-v4-text-retrieval-IQ3_M.gguf", "jina-embeddings-v4-text-retrieval-Q3_K_M.gguf",
                 "mmproj-jina-embeddings-v4-retrieval-BF16.gguf", "mmproj-jina-embeddings-v4-retrieval-F16.gguf",
                 "other.Q8_0.gguf", "Q6_K.gguf", "README.md"]


@pytest.mark.parametrize("quant, wanted", [("F16", "jina-embeddings-v4-text-retrieval-F16.gguf"),
                                           ("f16", "jina-embeddings-v4-text-retrieval-F16.gguf"),
                                           ("BF16", "jina-embeddings-v4-text-retrieval-BF16.gguf"),
                                           ("iq3_m", "jina-embeddings-v4-text-retrieval-IQ3_M.gguf"),
                                           ("Q3_K_M", "jina-embeddings-v4-text-retrieval-Q3_K_M.gguf"),
                                           ("q8_0", "other.Q8_0.gguf"), ("Q6_K", "Q6_K.gguf")])
def test_a_hub_quant_fetches_and_picks_only_its_model(quant, wanted, tmp_path, monkeypatch, tiny_model):
    """What the hub sends for REPO:QUANT (its own filter on the repository's listing) and what is then loaded from the
    cache: the one model file of that quant in any case, never BF16 for F16, never the vision projector."""
    import huggingface_hub.constants
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = hub_patterns(quant)
    assert list(filter_repo_objects(V4_REPO_FILES, allow_patterns=allow, ignore_patterns=ignore)) == [wanted]
    for name in V4_REPO_FILES:  # offline, the cache holds every quant fetched before
        hub_cache(tmp_path, "jinaai/jina-embeddings-v4-text-retrieval-GGUF", name, tiny_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_path(f"jinaai/jina-embeddings-v4-text-retrieval-GGUF:{quant}").name == wanted
    with pytest.raises(ModelError, match="no file named …-Q5_K_M.gguf .*local cache"):
        resolve_path("jinaai/jina-embeddings-v4-text-retrieval-GGUF:Q5_K_M")


def test_two_files_of_one_quant_are_named_not_guessed_between(tmp_path, monkeypatch, tiny_model):
    import huggingface_hub.constants

    for name in ("model-a-Q8_0.gguf", "model-b-Q8_0.gguf"):
        hub_cache(tmp_path, "org/two-GGUF", name, tiny_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="2 files for Q8_0 .model-a-Q8_0.gguf, model-b-Q8_0.gguf.*--model"):
        resolve_path("org/two-GGUF:Q8_0")


def test_the_hub_caches_file_passed_as_a_path_keeps_its_name(tmp_path, tiny_model):
    """What `huggingface-cli download` prints, and what a two-file error says to pass: a link to a hashed blob."""
    link = hub_cache(tmp_path, "jinaai/jina-embeddings-v4-text-code-GGUF", "jina-embeddings-v4-text-code-F32.gguf",
                     tiny_model)
    ref, path = model_ref(str(link))
    assert path == link and ref.file_name == "jina-embeddings-v4-text-code-F32.gguf" and ref.spec == str(link)


def test_a_local_model_is_recorded_by_its_absolute_path(tmp_path, monkeypatch, tiny_model):
    """The job spec's model is read back by planners and `embed --index`, from other folders than the one the
    user typed a relative path in."""
    shutil.copyfile(tiny_model, tmp_path / "m.gguf")
    monkeypatch.chdir(tmp_path)
    ref, path = model_ref("m.gguf")
    assert ref.spec == str((tmp_path / "m.gguf").resolve()) == str(path)


def test_schema_roundtrip_keeps_metadata():
    schema = embedding_schema(pa.string(), 4, _job())
    table = pa.table({"id": ["a"], "embedding": pa.array([[1, 0, 0, 0]], pa.list_(pa.float32(), 4)),
                      "n_tokens": pa.array([3], pa.int32()), "truncated": [False],
                      "chunk": pa.array([0], pa.int32()), "content_hash": [content_hash("Passage: a")]}, schema=schema)
    back = from_ipc_bytes(to_ipc_bytes(table))
    meta = read_metadata(back.schema)
    assert meta["model_sha256"] == "a" * 64 and meta["prefix"] == "Passage: " and meta["dims"] == "4"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_store_writes_once(kind, tmp_path, bucket):
    store = LocalStore(tmp_path) if kind == "local" else open_store(f"s3://{bucket}/prefix")
    assert store.put_if_absent("a/x.bin", b"one")
    assert not store.put_if_absent("a/x.bin", b"two")
    assert store.get("a/x.bin") == b"one"
    assert store.exists("a/x.bin") and not store.exists("a/y.bin")
    store.put("m.json", b"{}")
    assert [k for k, _ in store.list()] == ["a/x.bin", "m.json"]


@pytest.mark.parametrize("tail", [0, 1, 2])
def test_spans_cut_from_a_long_document_keep_its_closing_tokens(tail):
    """A 1000-token text (its closing special tokens counted) cut at 100 tokens a row with a 7-token prefix:
    every row is at most 100 tokens with the close appended, and the chunks cover the text once, in order."""
    n, prefix = 1000, 7
    (truncated,) = document_spans(n, 100, Overlength.TRUNCATE, prefix, tail)
    assert (truncated.start, truncated.stop, truncated.tail, truncated.truncated) == (0, 100 - tail, tail, True)
    assert truncated.n_tokens(prefix) == 100
    chunks = document_spans(n, 100, Overlength.CHUNK, prefix, tail)
    assert all(c.n_tokens(prefix) <= 100 and c.tail == tail for c in chunks)
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert all(b.start == a.stop for a, b in zip(chunks, chunks[1:], strict=False)), "each chunk goes on from the last"
    assert chunks[0].start == 0 and chunks[-1].stop == n - tail, "every token but the close, which each row gets"
    assert document_spans(n, 1000, Overlength.CHUNK, prefix, tail) == [Span(0, 0, n)], "a text that fits is whole"
    assert document_spans(n, 100, Overlength.ERROR, prefix, tail) is None


def test_closed_cut_rows_are_part_of_the_job_and_of_what_reuse_compares():
    spec = JobSpec(input="in", input_fingerprint="f", out="out", task=Task.RETRIEVAL, role=Role.PASSAGE, prefix="",
                   shard_tokens=100, model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64, queue="q"))
    closed = spec.model_copy(update={"close_cut_rows": True})
    assert closed.job_id != spec.job_id, "a job planned by the old rules is not resumed by the new ones"
    assert closed.vector_options() != spec.vector_options(), "nor are its vectors reused"
    assert spec.vector_options()["cut rows closed"] is False


def test_a_cast_of_ids_is_part_of_the_job_and_leaves_other_jobs_their_ids():
    spec = JobSpec(input="in", input_fingerprint="f", out="out", task=Task.RETRIEVAL, role=Role.PASSAGE, prefix="",
                   shard_tokens=100, model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64, queue="q"))
    # The ids this spec had before JobSpec knew id_type (and close_cut_rows): jobs planned then are resumed now.
    assert (spec.job_id, spec.model_copy(update={"close_cut_rows": True}).job_id) == \
        ("699247554cb72e85", "ea1dfd86a82077d4")
    assert spec.model_copy(update={"id_type": "int64"}).job_id not in (spec.job_id, "ea1dfd86a82077d4")



UNRECOVERABLE = """
import sys
from celery import Celery
from celery.worker.consumer import Consumer
from bulkembed.contract.queue import run_worker

def broken(self):
    raise AttributeError("'NoneType' object has no attribute 'hostname'")  # what kombu raised

Consumer.start = broken
argv = ["worker", "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "CRITICAL", "--queues", "nothing-here"]
sys.exit(run_worker(Celery("unrecoverable", broker=sys.argv[1]), argv))
"""


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(redis_server):
    """Celery.worker_main drops the worker's exit code: a planner that stopped on kombu failing to restore its held
    retries after a Redis restart ("Unrecoverable error") exited 0, and a supervisor restarting failures left it
    down. bulkembed's planners and workers return it. (A process of its own: Celery takes over logging.)"""
    done = subprocess.run([sys.executable, "-c", UNRECOVERABLE, redis_server], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Unrecoverable error" in done.stderr


def test_shard_texts_share_one_string_per_text_and_read_inputs_planned_before():
    from bulkembed.contract.schema import shard_text_column, shard_texts

    long = "a long document " * 1000
    column = shard_text_column([long, "short", long, long])
    assert len(column.dictionary) == 2
    texts = shard_texts(pa.chunked_array([column]))
    assert texts == [long, "short", long, long] and texts[0] is texts[2] is texts[3], "one str, sent and tokenized once"
    assert shard_texts(pa.chunked_array([pa.array(["x", "y"])])) == ["x", "y"], "a plain string column, as before"
