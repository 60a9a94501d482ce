"""Bad input gets a clear error or a quarantine record with its reason; no row is lost or doubled."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from bulkembed.contract import keys
from bulkembed.contract.errors import EngineError, InputError, ShardError
from bulkembed.contract.job import Dtype, JobSpec, ModelRef, Pooling, Role, ShardMessage, Task
from bulkembed.contract.model import file_sha256, queue_name
from bulkembed.contract.registry import stored_result
from bulkembed.contract.schema import (
    METADATA_PREFIX,
    SHARD_SOURCE,
    content_hash,
    from_ipc_bytes,
    read_rejected,
    shard_input_schema,
    to_ipc_bytes,
)
from bulkembed.contract.store import LocalStore
from bulkembed.contract.vocab import NO_TOKENS
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.rows import EmbeddedRows, embed_rows
from bulkembed.worker.shard import NOT_FINITE, embed_shard, open_shard, write_shard
from tests.conftest import write_corpus


def invalid_utf8_column(values: list[bytes | None]) -> pa.Array:
    """A string column holding bytes that are not UTF-8: Parquet stores it without complaint."""
    offsets, data, valid = [0], b"", []
    for v in values:
        data += v or b""
        offsets.append(len(data))
        valid.append(v is not None)
    validity = pa.array(valid).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.array(offsets, pa.int32()).buffers()[1],
                                                            pa.py_buffer(data)])


def test_every_bad_row_is_quarantined_with_its_reason(tmp_path, run_cli, tiny_model):
    rows = [  # (id, text bytes, expected reason or None)
        ("ok-1", b"a fine document", None),
        (None, b"no id", "null id"),
        ("null-text", None, "null text"),
        ("empty", b"", "empty text"),
        ("blank", b"  \n\t ", "empty text"),
        ("bad-utf8", b"caf\xe9 au lait", "invalid UTF-8"),
        ("surrogate", b"lone \xed\xa0\x80 surrogate", "invalid UTF-8"),
        ("ok-1", b"same id again", "duplicate id"),
        ("too-long", b"alpha beta gamma " * 40, "over-length"),
        ("ok-2", b"another fine one", None),
        (b"\xff\xfe", b"an id that is not UTF-8", "id of invalid UTF-8 (at byte 0)"),
        (b"\xff\xfe", b"the same bytes again", "id of invalid UTF-8"),  # no id to be a duplicate of
    ]
    table = pa.table({"id": invalid_utf8_column([r[0].encode() if isinstance(r[0], str) else r[0] for r in rows]),
                      "text": invalid_utf8_column([r[1] for r in rows])})
    pq.write_table(table, tmp_path / "bad.parquet")
    out = tmp_path / "out"
    done = run_cli("run", tmp_path / "bad.parquet", "--model", tiny_model, "--out", out,
                   "--max-tokens", "200", "--overlength", "error")
    assert done.returncode == 0, done.stderr[-2000:]

    written = ds.dataset(out, format="arrow").to_table().column("id").to_pylist()
    rejected = ds.dataset(out / "_rejected", format="arrow").to_table().to_pylist()
    by_row = {r["row"]: r["reason"] for r in rejected}
    expected = {i: reason for i, (_, _, reason) in enumerate(rows) if reason}
    assert set(by_row) == set(expected) and len(rejected) == len(expected), "each bad row quarantined once"
    for row, reason in expected.items():
        assert by_row[row].startswith(reason), (row, by_row[row])
    assert sorted(written) == ["ok-1", "ok-2"]
    accepted_rows = {i for i, r in enumerate(rows) if r[2] is None}
    assert accepted_rows | set(by_row) == set(range(len(rows))) and not accepted_rows & set(by_row)
    manifest = (out / "_manifest.json").read_text()
    assert '"rejected_rows": 10' in manifest
    assert {r["row"]: r["id"] for r in rejected}[10] is None


# Characters BERT's WordPiece drops: Python's str.strip() keeps them, and each such text tokenizes to [CLS] [SEP].
NOTHING_TO_WORDPIECE = {"replacement": "\ufffd\ufffd", "zero-width": "\u200b", "control": "\x01\x02 \x7f"}


@pytest.mark.parametrize("prefix", ["", "query: "])
def test_a_text_the_vocabulary_drops_whole_is_quarantined_not_embedded_as_its_frame(tmp_path, run_cli, kind_models,
                                                                                     prefix):
    """Without the check, each of these was embedded as its prefix and [CLS] [SEP] alone: the same vector for every
    such row, written as if it were the document's."""
    texts = {"ok-1": "a fine document", **NOTHING_TO_WORDPIECE, "ok-2": "x \ufffd"}
    write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    done = run_cli("run", tmp_path / "in.parquet", "--model", kind_models["bert-mean"], "--out", out,
                   "--prefix", prefix)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(ds.dataset(out, format="arrow").to_table().column("id").to_pylist()) == ["ok-1", "ok-2"]
    rejected = {r["id"]: r["reason"] for r in ds.dataset(out / "_rejected", format="arrow").to_table().to_pylist()}
    assert rejected == dict.fromkeys(NOTHING_TO_WORDPIECE, NO_TOKENS)


def test_a_query_the_vocabulary_drops_whole_is_refused(kind_models):
    from bulkembed import Embedder

    with Embedder(kind_models["bert-mean"], prefix="query: ") as embedder:
        assert embedder.embed(["x \ufffd"]).shape[0] == 1
        for text in NOTHING_TO_WORDPIECE.values():
            with pytest.raises(InputError, match="text 1: no tokens"):
                embedder.embed(["a fine query", text])


@pytest.mark.parametrize("case", ["missing-column", "two-columns", "wrong-type", "unreadable", "empty", "no-files"])
def test_input_errors_stop_before_anything_is_queued(case, tmp_path, run_cli, tiny_model):
    path = tmp_path / "in.parquet"
    if case == "missing-column":
        write_corpus(path, ["a"], ["x"])
        expected, extra = "has no column 'body'", ("--text-column", "body")
    elif case == "two-columns":
        pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])],
                                            names=["id", "text", "text"]), path)
        expected, extra = "2 columns named 'text'", ()
    elif case == "wrong-type":
        pq.write_table(pa.table({"id": ["a"], "text": [1.5]}), path)
        expected, extra = "not a string", ()
    elif case == "unreadable":
        path.write_bytes(b"")
        expected, extra = "cannot read", ()
    elif case == "empty":
        write_corpus(path, [], [])
        expected, extra = "has no rows", ()
    else:
        path = tmp_path / "folder"
        path.mkdir()
        expected, extra = "no .parquet files", ()
    done = run_cli("run", path, "--model", tiny_model, "--out", tmp_path / "o", *extra)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "_shards").exists()


def test_an_id_that_does_not_fit_the_shared_type_is_one_line(tmp_path, run_cli, tiny_model):
    """uint64 ids beside int64 ones are read as int64: one above 2**63 - 1 is named with its file, before any unit."""
    write_corpus(tmp_path / "in" / "a.parquet", [1, 2**64 - 1], ["one", "two"], pa.uint64())
    write_corpus(tmp_path / "in" / "b.parquet", [3, 4], ["three", "four"], pa.int64())
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "a.parquet: an id does not fit int64" in done.stderr.strip().splitlines()[-1], done.stderr


def test_an_out_inside_the_input_folder_is_not_read_as_corpus(tmp_path, run_cli, tiny_model):
    """Files under "_" and "." folders are not the corpus's: a second run over the folder (a resume) used to read
    the first one's _manifest/shards.parquet as a corpus file and fail."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus / "part-0.parquet", ["a", "b"], ["one text", "another"])
    write_corpus(corpus / ".staging" / "part-1.parquet", ["c"], ["not yet published"])
    for _ in range(2):
        done = run_cli("run", corpus, "--model", tiny_model, "--out", corpus / "out")
        assert done.returncode == 0, done.stderr[-2000:]
    assert (corpus / "out" / "_manifest" / "shards.parquet").exists()
    assert sorted(ds.dataset(corpus / "out", format="arrow").to_table().column("id").to_pylist()) == ["a", "b"]


def _shard(tmp_path, tiny_model, rows: list[tuple[str, str, int]], planned_before: str = ""
           ) -> tuple[LocalStore, ShardMessage]:
    """A shard of `rows` (id, text, tokens planned), rows 40, 41, … of in/corpus.parquet."""
    store = LocalStore(tmp_path / "out")
    job = JobSpec(input="x", input_fingerprint="f", out=store.uri, task=Task.RETRIEVAL, role=Role.PASSAGE,
                  prefix="", shard_tokens=1000,
                  model=ModelRef(spec=str(tiny_model), file_name=tiny_model.name, sha256=file_sha256(tiny_model),
                                 queue=queue_name(tiny_model.name)))
    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "n_tokens": [r[2] for r in rows],
                      "chunk": [0] * len(rows), "start": [0] * len(rows), "stop": [r[2] for r in rows],
                      "truncated": [False] * len(rows), "content_hash": [content_hash(r[1]) for r in rows],
                      "row": range(40, 40 + len(rows)), "source": ["in/corpus.parquet"] * len(rows)},
                     schema=shard_input_schema(pa.string()))
    if planned_before == "a shard read one file":  # its file in the metadata
        table = table.drop_columns(["source"]).replace_schema_metadata({SHARD_SOURCE: "in/corpus.parquet"})
    if planned_before == "rows were named":
        table = table.drop_columns(["row", "source"])
    store.put(keys.shard_input(0), to_ipc_bytes(table))
    return store, ShardMessage(job_id="j", job=job, shard=0, n_docs=len(rows), n_tokens=0, longest=1)


def test_a_row_the_worker_tokenizes_differently_is_quarantined(tmp_path, tiny_model):
    engine = Engine(tiny_model, EngineOptions(threads=2))
    try:
        store, message = _shard(tmp_path, tiny_model, [("a", "abc", 3), ("b", "abcd", 99), ("c", "x", 1)])
        result = embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
    finally:
        engine.close()
    assert result.rows == 2 and result.rejected == 1
    assert from_ipc_bytes(store.get(message.output_key)).column("id").to_pylist() == ["a", "c"]
    rejected = from_ipc_bytes(store.get(keys.shard_rejected(0))).to_pylist()
    assert rejected[0]["id"] == "b" and rejected[0]["reason"].startswith("tokenizer mismatch")


@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.NONE])
def test_a_shard_whose_every_row_the_worker_tokenizes_differently_is_written_empty(tmp_path, tiny_model, pooling):
    """Nothing left to decode is not a failed shard: its rows are quarantined, and an empty file is written (a long
    document often fills a shard alone)."""
    engine = Engine(tiny_model, EngineOptions(threads=2))
    try:
        store, message = _shard(tmp_path, tiny_model, [("b", "abcd", 99)])
        message = message.model_copy(update={"job": message.job.model_copy(update={"pooling": pooling})})
        result = embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
    finally:
        engine.close()
    assert result.rows == 0 and result.rejected == 1
    assert from_ipc_bytes(store.get(message.output_key)).num_rows == 0
    rejected = from_ipc_bytes(store.get(keys.shard_rejected(0))).to_pylist()
    assert [r["id"] for r in rejected] == ["b"] and rejected[0]["reason"].startswith("tokenizer mismatch")


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.FLOAT16])
def test_a_vector_of_nan_or_infinity_is_quarantined_not_written(tmp_path, tiny_model, dtype):
    """A value beyond float16's ±65504 (raw sums under --no-normalize, token vectors) became inf, and a NaN from
    llama.cpp was written as is: both passed for vectors."""
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("big", "y", 1), ("nan", "z", 1)])
    job = message.job.model_copy(update={"dtype": dtype, "normalize": False})
    opened = open_shard(message.model_copy(update={"job": job}), job.model.sha256, store)
    vectors = np.array([[1.0, -2.0, 3.0], [7e4, 1.0, 1.0], [np.nan, 0.0, 0.0]], np.float32)
    result = write_shard(opened, EmbeddedRows(vectors, {}, 3), store)
    rejected = {r["id"]: r["reason"] for r in from_ipc_bytes(store.get(keys.shard_rejected(0))).to_pylist()}
    assert set(rejected) == ({"big", "nan"} if dtype is Dtype.FLOAT16 else {"nan"}), rejected
    assert all(reason.startswith("NaN or infinity") for reason in rejected.values())
    written = from_ipc_bytes(store.get(message.output_key))
    assert result.rows == written.num_rows == 3 - len(rejected) and result.rejected == len(rejected)
    assert written.column("embedding").to_pylist()[0] == [1.0, -2.0, 3.0]


class Killed(BaseException):
    pass


class KilledAt:
    """A store whose delivery is killed (kill -9: nothing after it runs) at its first call of `method`."""

    def __init__(self, store, method: str):
        self.store, self.method = store, method

    def __getattr__(self, name):
        if name == self.method:
            raise Killed
        return getattr(self.store, name)


def _vectors(*rows: list[float]) -> EmbeddedRows:
    """An engine's vectors, given rather than computed: no text makes this CPU build's llama.cpp fail on one engine
    and not on another (a GPU out of memory), which is what sets different rows aside in two deliveries."""
    return EmbeddedRows(np.array(rows, np.float32), {}, 3)


ALL_EMBEDDED = ([1.0, 0, 0], [0, 1.0, 0])
SECOND_SET_ASIDE = ([1.0, 0, 0], [np.nan, 0, 0])


def _partition(store, message) -> tuple[list[str], list[str]]:
    """The shard's ids as OUT holds them: written, and in _rejected/; every one in exactly one of them."""
    written = from_ipc_bytes(store.get(message.output_key)).column("id").to_pylist()
    rejected = []
    if store.exists(keys.shard_rejected(message.shard)):
        rejected = from_ipc_bytes(store.get(keys.shard_rejected(message.shard))).column("id").to_pylist()
    return sorted(written), sorted(rejected)


@pytest.mark.parametrize("killed_at", ["put_if_absent", "put"])
def test_a_delivery_killed_while_it_writes_leaves_the_next_one_a_whole_record(tmp_path, tiny_model, killed_at):
    """Killed before its output: the next delivery, which embedded every row (the first one's failure was the GPU's,
    not the text's), writes them all and nothing stays in _rejected/ (the rows set aside used to be written first,
    and stayed: a row both embedded and quarantined). Killed after its output, before _rejected/: the next look at
    the shard writes the record from the output's metadata."""
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    sha = message.job.model.sha256
    with pytest.raises(Killed):
        embed_shard(message, lambda rows: _vectors(*SECOND_SET_ASIDE), sha, KilledAt(store, killed_at))
    result = embed_shard(message, lambda rows: _vectors(*ALL_EMBEDDED), sha, store)
    again = stored_result(message, store)
    assert (again.rows, again.rejected, again.sha256) == (result.rows, result.rejected, result.sha256)
    if killed_at == "put_if_absent":
        assert (result.rows, result.rejected) == (2, 0) and _partition(store, message) == (["a", "b"], [])
    else:
        assert (result.rows, result.rejected) == (1, 1) and _partition(store, message) == (["a"], ["b"])
        assert from_ipc_bytes(store.get(keys.shard_rejected(0))).column("reason").to_pylist() == [NOT_FINITE]


def test_a_delivery_of_an_older_bulkembed_killed_before_its_output_leaves_nothing_set_aside(tmp_path, tiny_model):
    """An older bulkembed wrote _rejected/ before the vectors; the delivery that writes the shard after one was
    killed in between clears it."""
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    stale = pa.table({"id": ["b"], "reason": [NOT_FINITE], "source": ["in/corpus.parquet"], "row": [41]})
    store.put(keys.shard_rejected(0), to_ipc_bytes(stale))
    result = write_shard(open_shard(message, message.job.model.sha256, store), _vectors(*ALL_EMBEDDED), store)
    assert (result.rows, result.rejected) == (2, 0) and _partition(store, message) == (["a", "b"], [])


class RunsTheOtherFirst:
    """A store whose delivery, at its first call of `method`, lets another delivery of the same shard run whole
    before the call is made: one interleaving of two deliveries racing to write a shard."""

    def __init__(self, store, method: str, other):
        self.store, self.method, self.other, self.other_result = store, method, other, None

    def __getattr__(self, name):
        call = getattr(self.store, name)
        if name != self.method or self.other is None:
            return call

        def after_the_other(*args, **kwargs):
            other, self.other = self.other, None
            self.other_result = other()
            return call(*args, **kwargs)

        return after_the_other


@pytest.mark.parametrize("method", ["get", "exists", "put", "delete", "put_if_absent"])
@pytest.mark.parametrize("first_sets_aside", [True, False], ids=["first-sets-aside", "second-sets-aside"])
def test_deliveries_racing_with_different_rows_set_aside_leave_the_winners_record(tmp_path, tiny_model, method,
                                                                                   first_sets_aside):
    """Two deliveries of one shard at once, one of which had a row fail on its engine: whichever writes the shard,
    OUT holds each row once (embedded, or in _rejected/ with its reason), both report what OUT holds, and later
    looks agree. The loser's _rejected/ write or delete used to land after the winner's: a row lost from both (the
    shard then failed on every later look) or in both."""
    store, message = _shard(tmp_path, tiny_model, [("a", "x", 1), ("b", "y", 1)])
    sha = message.job.model.sha256
    first, second = (SECOND_SET_ASIDE, ALL_EMBEDDED) if first_sets_aside else (ALL_EMBEDDED, SECOND_SET_ASIDE)
    opened, opened_too = open_shard(message, sha, store), open_shard(message, sha, store)  # neither written yet
    racing = RunsTheOtherFirst(store, method, lambda: write_shard(opened_too, _vectors(*second), store))
    result = write_shard(opened, _vectors(*first), racing)
    other = racing.other_result or write_shard(opened_too, _vectors(*second), store)
    written, rejected = _partition(store, message)
    assert sorted(written + rejected) == ["a", "b"] and len(written) == result.rows
    assert rejected == (["b"] if result.rejected else [])
    assert (other.rows, other.rejected, other.sha256) == (result.rows, result.rejected, result.sha256)
    again = stored_result(message, store)
    assert (again.rows, again.rejected, again.sha256) == (result.rows, result.rejected, result.sha256)


class FailingOnPoisonEngine(Engine):
    """Stands in for a document that makes llama.cpp fail (a GPU out-of-memory, a kernel error): no such
    document can be made on this CPU build, so this engine refuses any batch holding the token of '~'."""

    poison_token: int = -1

    def embed(self, documents, shape=None, pooling=None):
        if any(self.poison_token in d for d in documents):
            raise EngineError("llama_decode returned -3")
        return super().embed(documents, shape, pooling)


@pytest.mark.parametrize("before", ["", "a shard read one file", "rows were named"])
def test_a_document_llama_cpp_fails_on_is_quarantined_and_the_rest_written(tmp_path, tiny_model, before):
    """The record names the row's corpus file and row (the shard input is deleted once the job is done); a shard
    planned by an older bulkembed names them as its input did: its one file in the metadata, or, older still, the
    input itself and the row's place in it."""
    engine = FailingOnPoisonEngine(tiny_model, EngineOptions(threads=2))
    try:
        engine.poison_token = int(engine.vocab.tokenize("~")[0])
        store, message = _shard(tmp_path, tiny_model, [("a", "abc", 3), ("p", "ab~", 3), ("c", "xy", 2)], before)
        result = embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
    finally:
        engine.close()
    assert result.rows == 2 and result.rejected == 1
    rejected = from_ipc_bytes(store.get(keys.shard_rejected(0))).to_pylist()
    source, row = (keys.shard_input(0), 1) if before == "rows were named" else ("in/corpus.parquet", 41)
    assert rejected == [{"id": "p", "reason": "llama.cpp failed: llama_decode returned -3", "source": source,
                         "row": row}]
    assert read_rejected(from_ipc_bytes(store.get(message.output_key)).schema) == {
        1: "llama.cpp failed: llama_decode returned -3"}, "the written file names the rows it set aside"
    # A second delivery finds the shard written and reports the same thing without embedding again.
    again = embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
    assert (again.rows, again.rejected, again.sha256) == (2, 1, result.sha256)


def _tamper_corrupt(table: pa.Table, data: bytes) -> bytes:
    return data[: len(data) // 2]


def _tamper_other_model(table: pa.Table, data: bytes) -> bytes:
    meta = {**table.schema.metadata, f"{METADATA_PREFIX}model_sha256".encode(): b"0" * 64}
    return to_ipc_bytes(table.replace_schema_metadata(meta))


def _tamper_rows(table: pa.Table, data: bytes) -> bytes:
    return to_ipc_bytes(table.slice(0, 1))


@pytest.mark.parametrize("tamper, error", [
    (_tamper_corrupt, "exists but is not a valid Arrow file"),
    (_tamper_other_model, "exists with 2 rows .* from model 000000000000, expected 2 rows"),
    (_tamper_rows, "exists with 1 rows .* expected 2 rows"),
])
def test_a_duplicate_delivery_refuses_a_stored_result_that_does_not_match(tmp_path, tiny_model, tamper, error):
    """A second delivery finds the shard's output written; a corrupt file, one from another model, or
    one with the wrong row count is a clear error, and the file is left for a person to look at."""
    engine = Engine(tiny_model, EngineOptions(threads=2))
    try:
        store, message = _shard(tmp_path, tiny_model, [("a", "abc", 3), ("b", "xy", 2)])
        embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
        written = store.get(message.output_key)
        bad = tamper(from_ipc_bytes(written), written)
        store.delete(message.output_key)
        store.put(message.output_key, bad)
        with pytest.raises(ShardError, match=error):
            embed_shard(message, partial(embed_rows, engine), message.job.model.sha256, store)
    finally:
        engine.close()
    assert store.get(message.output_key) == bad, "not overwritten"


@pytest.mark.parametrize("column", ["id", "text"])
def test_a_file_damaged_inside_its_data_is_one_line_naming_it(tmp_path, run_cli, tiny_model, column):
    """A valid footer over a page that does not decode: read by the duplicate-id pass (ids) or by planning (texts).
    It was a traceback naming no file."""
    for name, ids in (("a", range(100)), ("b", range(100, 200))):
        write_corpus(tmp_path / "in" / f"{name}.parquet", list(ids), [f"doc number {i}" for i in ids], pa.int64())
    damaged = tmp_path / "in" / "b.parquet"
    chunk = pq.read_metadata(damaged).row_group(0).column(0 if column == "id" else 1)
    data = bytearray(damaged.read_bytes())
    for i in range(chunk.data_page_offset + 30, chunk.data_page_offset + 70):
        data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot read {damaged}" in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]


def test_a_file_whose_id_column_is_all_none_has_its_rows_quarantined(tmp_path, run_cli, tiny_model):
    """An id column of only None (Arrow's null type, as pandas writes it) beside files of string ids: its rows are
    null ids, set aside one by one as any null id is, not a refused corpus. Every file's ids null: refused, said."""
    write_corpus(tmp_path / "in" / "a.parquet", ["a1", "a2"], ["one text", "another"])
    pq.write_table(pa.table({"id": pa.nulls(2), "text": ["x", "y"]}), tmp_path / "in" / "b.parquet")
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ds.dataset(tmp_path / "out", format="arrow").to_table().column("id").to_pylist()) == ["a1", "a2"]
    rejected = ds.dataset(tmp_path / "out" / "_rejected", format="arrow").to_table()
    assert rejected.column("reason").to_pylist() == ["null id", "null id"]
    assert sorted(rejected.column("row").to_pylist()) == [0, 1]
    (tmp_path / "in" / "a.parquet").unlink()
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out2")
    assert done.returncode == 2 and "'id' is null in every file" in done.stderr.strip().splitlines()[-1], \
        done.stderr[-2000:]


def test_a_file_whose_text_column_is_all_none_has_its_rows_quarantined(tmp_path, run_cli, tiny_model):
    """pandas writes a column of only None as Arrow's null type: those rows are null texts, not a refused corpus."""
    write_corpus(tmp_path / "in" / "a.parquet", ["a1", "a2"], ["one text", "another"])
    pq.write_table(pa.table({"id": ["b1", "b2"], "text": pa.nulls(2)}), tmp_path / "in" / "b.parquet")
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ds.dataset(tmp_path / "out", format="arrow").to_table().column("id").to_pylist()) == ["a1", "a2"]
    rejected = ds.dataset(tmp_path / "out" / "_rejected", format="arrow").to_table()
    reasons = dict(zip(rejected.column("id").to_pylist(), rejected.column("reason").to_pylist(), strict=True))
    assert reasons == {"b1": "null text", "b2": "null text"}


def test_strings_held_as_views_or_a_dictionary_are_read_as_strings(tmp_path, run_cli, tiny_model):
    """Polars writes string_view columns, pandas categoricals are dictionaries: they were refused as not strings. The
    output is what the same corpus of plain strings gives, ids typed string."""
    ids, texts = ["a", "b", "c", "d"], ["the first text", "a second one", "the first text", "and a fourth"]
    write_corpus(tmp_path / "plain" / "c.parquet", ids, texts)
    (tmp_path / "held").mkdir()
    views = {"id": pa.array(ids[:2], pa.string_view()), "text": pa.array(texts[:2], pa.string_view())}
    pq.write_table(pa.table(views), tmp_path / "held" / "a.parquet")
    categories = {"id": pa.array(ids[2:]).dictionary_encode(), "text": pa.array(texts[2:]).dictionary_encode()}
    pq.write_table(pa.table(categories), tmp_path / "held" / "b.parquet")
    tables = []
    for corpus in ("plain", "held"):
        done = run_cli("run", tmp_path / corpus, "--model", tiny_model, "--out", tmp_path / f"out-{corpus}")
        assert done.returncode == 0, done.stderr[-3000:]
        tables.append(ds.dataset(tmp_path / f"out-{corpus}", format="arrow").to_table().sort_by("id"))
    plain, held = tables
    assert held.schema.field("id").type == pa.string() and held.column("id").to_pylist() == ids
    assert held.column("embedding").equals(plain.column("embedding"))


def test_files_not_named_parquet_in_the_input_are_said_not_read(tmp_path, run_cli, tiny_model):
    """Hive writes files without an extension: skipping them without a word would drop their rows silently."""
    write_corpus(tmp_path / "in" / "a.parquet", ["a"], ["one text"])
    write_corpus(tmp_path / "in" / "000000_0", ["b"], ["another"])
    (tmp_path / "in" / "_SUCCESS").write_text("")  # a writer's marker: not the corpus's, nothing to say
    done = run_cli("run", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 files not named .parquet are not read" in done.stderr and "000000_0" in done.stderr, done.stderr
    assert "_SUCCESS" not in done.stderr
