"""Re-index with --reuse PREV_OUT: two versions of a corpus (rows changed, added, deleted, duplicated),
a reuse run compared with a full run on the new version, incompatible PREV_OUTs refused, resume, and a
worker killed during a reuse run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from bulkembed.contract import keys
from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.schema import content_hash, from_ipc_bytes, read_decoded_by, to_ipc_bytes
from bulkembed.contract.store import open_store
from bulkembed.producer.reuse import row_keys
from tests.conftest import Workers, cosines, mixed_texts, write_corpus
from tests.faults_support import RECEIVED, attempts, kill_tree, redis_hash, wait_until

PREFIX = "Passage: "
CHUNKED = ("--max-tokens", "120", "--overlength", "chunk")  # long documents become several rows


def two_versions(folder: Path, n: int = 300, seed: int = 5,
                 row_group: int | None = None) -> tuple[Path, Path, dict, dict]:
    """v1, and v2 with every kind of change (in row groups of `row_group` rows); returns both files and what each
    version's output must hold."""
    texts = mixed_texts(n, seed=seed, long_every=8)
    ids = [f"doc-{i:04d}" for i in range(n)]
    v1 = dict(zip(ids, texts, strict=True))
    deleted, changed = set(ids[::20]), set(ids[3::17]) - set(ids[::20])
    v2 = {i: t + " and changed" if i in changed else t for i, t in v1.items() if i not in deleted}
    v2 |= {f"new-{k}": f"a new document about the river number {k}" for k in range(12)}
    rows = list(v2.items())
    np.random.default_rng(seed).shuffle(rows)  # another row order: matching is by id and content
    # Duplicated ids: a new text first, so the unchanged original later is the duplicate, and the
    # duplicate of an unchanged row; a full run keeps the first occurrence of each, and so must reuse.
    first = (ids[1], "this id now comes first with other text")
    rows = [first] + rows + [(ids[2], "a duplicate id, quarantined"), (None, "no id")]
    v2[ids[1]] = first[1]
    path1 = write_corpus(folder / "v1" / "corpus.parquet", ids, texts)
    path2 = write_corpus(folder / "v2" / "corpus.parquet", [r[0] for r in rows], [r[1] for r in rows],
                         row_group_size=row_group)
    return path1, path2, v1, v2


def read_rows(uri: str | Path) -> dict[tuple, dict]:
    """(id, chunk) → row, every embedding file of an output."""
    store = open_store(str(uri))
    fs, base = store.arrow_fs()
    table = ds.dataset(base, filesystem=fs, format="arrow").to_table()
    ids, chunks = table.column("id").to_pylist(), table.column("chunk").to_pylist()
    assert len(set(zip(ids, chunks, strict=True))) == table.num_rows, "every row exactly once"
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    rows = {}
    for i, row in enumerate(table.drop_columns(["embedding"]).to_pylist()):
        rows[(row["id"], row["chunk"])] = row | {"vector": vectors[i]}
    return rows


def manifest(uri: str | Path) -> dict:
    return json.loads(open_store(str(uri)).get(keys.MANIFEST_KEY))


def run_ok(run_cli, *args) -> str:
    done = run_cli("run", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_reuse_run_equals_a_full_run_on_the_new_version(tmp_path, run_cli, tiny_model, reference_embedder):
    path1, path2, v1, v2 = two_versions(tmp_path)
    common = ("--model", tiny_model, "--shard-tokens", "1500", "--ubatch", "64", *CHUNKED)
    run_ok(run_cli, path1, "--out", tmp_path / "v1-out", *common)
    run_ok(run_cli, path2, "--out", tmp_path / "full", *common)
    out = run_ok(run_cli, path2, "--out", tmp_path / "reuse", "--reuse", tmp_path / "v1-out", *common)
    previous, full, reused = (read_rows(tmp_path / name) for name in ("v1-out", "full", "reuse"))

    assert reused.keys() == full.keys(), "the same rows as a full run: deleted ones gone, new ones there"
    assert {i for i, _ in reused} == set(v2)
    vectors = np.stack([reused[k]["vector"] for k in full])
    assert cosines(vectors, np.stack([full[k]["vector"] for k in full])).min() >= 0.9999
    for key, row in reused.items():
        assert row["content_hash"] == content_hash(PREFIX + v2[key[0]])
        assert (row["n_tokens"], row["truncated"]) == (full[key]["n_tokens"], full[key]["truncated"])
    unchanged = {k for k in full if k[0] in v1 and v1[k[0]] == v2[k[0]]}
    assert all(previous[k]["vector"].tobytes() == reused[k]["vector"].tobytes() for k in unchanged), \
        "reused vectors are byte-identical to PREV_OUT's"
    embedded = [k for k in full if k not in unchanged]
    assert embedded and any(c > 0 for _, c in unchanged), "both kinds, and chunked documents reused whole"
    single = [k for k in embedded if k[1] == 0 and (k[0], 1) not in full]
    got = np.stack([reused[k]["vector"] for k in single])
    assert cosines(got, reference_embedder([PREFIX + v2[i] for i, _ in single])).min() >= 0.9999

    counts, expected = manifest(tmp_path / "reuse"), manifest(tmp_path / "full")
    assert (counts["reused_rows"], counts["embedded_rows"]) == (len(unchanged), len(embedded))
    assert (counts["rows"], counts["tokens"], counts["rejected_rows"], counts["truncated_rows"]) == \
        (expected["rows"], expected["tokens"], expected["rejected_rows"], expected["truncated_rows"]) == \
        (len(full), expected["tokens"], 3, 0)  # no id, and two duplicate ids
    assert f"({len(unchanged)} reused)" in out
    # Reused rows keep the record of how they were decoded: the earlier job's workers decoded them.
    source = read_decoded_by(pa.ipc.open_file(next((tmp_path / "v1-out").glob("0*.arrow"))).schema)
    assert source["layout"] == "packed"
    for copied in (tmp_path / "reuse").glob("reused-*.arrow"):
        assert read_decoded_by(pa.ipc.open_file(copied).schema) == source
    # Any output can be the next PREV_OUT: a second generation reuses every row of the first.
    run_ok(run_cli, path2, "--out", tmp_path / "again", "--reuse", tmp_path / "reuse", *common)
    assert manifest(tmp_path / "again")["reused_rows"] == len(full)
    assert {k: r["vector"].tobytes() for k, r in read_rows(tmp_path / "again").items()} == \
        {k: r["vector"].tobytes() for k, r in reused.items()}


def test_rows_whose_key_ends_in_a_nul_byte_are_reused(tmp_path, run_cli, tiny_model):
    """A row's 16-byte key ends in a NUL byte for one row in 256, which numpy's bytes drop: such keys broke every
    reuse run of a corpus past a few hundred rows (ArrowInvalid: expected length 16, was 15)."""
    texts = mixed_texts(40, seed=9, long_every=10**9)
    ids = [f"doc-{i:04d}" for i in range(len(texts))]
    nul = next(f"nul-{k}" for k in range(100_000)
               if row_keys([f"nul-{k}"], [content_hash(PREFIX + texts[0])]).tobytes().endswith(b"\0"))
    ids[0] = nul
    path = write_corpus(tmp_path / "corpus.parquet", ids, texts)
    common = ("--model", tiny_model, "--shard-tokens", "1500")
    run_ok(run_cli, path, "--out", tmp_path / "first", *common)
    run_ok(run_cli, path, "--out", tmp_path / "again", "--reuse", tmp_path / "first", *common)
    assert manifest(tmp_path / "again")["reused_rows"] == len(ids)
    assert {k: r["vector"].tobytes() for k, r in read_rows(tmp_path / "again").items()} == \
        {k: r["vector"].tobytes() for k, r in read_rows(tmp_path / "first").items()}


def test_an_incompatible_prev_out_is_refused_before_anything_is_written(tmp_path, run_cli, tiny_model, other_model):
    path1, path2, _, v2 = two_versions(tmp_path, n=40)
    prev = tmp_path / "prev"
    run_ok(run_cli, path1, "--out", prev, "--model", tiny_model)
    cases = [(("--model", other_model), "model sha256"), (("--model", tiny_model, "--no-normalize"), "normalize"),
             (("--model", tiny_model, "--prefix", "Query: "), "prefix"),
             (("--model", tiny_model, "--max-tokens", "50"), "max tokens")]
    for flags, difference in cases:
        out = tmp_path / "refused"
        done = run_cli("run", path2, "--out", out, "--reuse", prev, *flags)
        assert done.returncode == 2 and difference in done.stderr and "--ignore-incompatible-reuse" in done.stderr, \
            done.stderr[-2000:]
        assert "Traceback" not in done.stderr and not out.exists(), "refused before anything is written"
    run_ok(run_cli, path2, "--out", tmp_path / "ignored", "--reuse", prev, "--model", other_model,
           "--ignore-incompatible-reuse")
    assert manifest(tmp_path / "ignored")["reused_rows"] == 0 and manifest(tmp_path / "ignored")["rows"] == len(v2)

    done = run_cli("run", path2, "--out", prev, "--reuse", prev, "--model", tiny_model)
    assert done.returncode == 2 and "the job's own --out" in done.stderr
    done = run_cli("run", path2, "--out", tmp_path / "o", "--reuse", tmp_path / "nothing", "--model", tiny_model)
    assert done.returncode == 2 and "finished job" in done.stderr
    # Its files changed since its job finished: one gone is found before anything is written, one damaged is named.
    damaged = tmp_path / "damaged"
    shutil.copytree(prev, damaged)
    (damaged / keys.shard_output(0)).unlink()
    done = run_cli("run", path2, "--out", tmp_path / "o2", "--reuse", damaged, "--model", tiny_model)
    assert done.returncode == 2 and "files its manifest lists are gone" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "o2").exists()
    run_ok(run_cli, path2, "--out", tmp_path / "o5", "--reuse", damaged, "--model", tiny_model, "--no-normalize",
           "--ignore-incompatible-reuse")  # incompatible anyway: what is gone does not matter
    shutil.copy(prev / keys.shard_output(0), damaged / keys.shard_output(0))
    (damaged / keys.shard_output(0)).write_bytes(b"not Arrow")
    done = run_cli("run", path2, "--out", tmp_path / "o3", "--reuse", damaged, "--model", tiny_model)
    assert done.returncode == 2 and "cannot read" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    several = tmp_path / "several"  # damaged beyond its first file, which alone is read before planning
    run_ok(run_cli, path1, "--out", several, "--model", tiny_model, "--shard-tokens", "400")
    last = sorted(several.glob("*.arrow"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    done = run_cli("run", path2, "--out", tmp_path / "o4", "--reuse", several, "--model", tiny_model)
    assert done.returncode == 2 and f"--reuse {several}: cannot read" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    # Altered inside its data, it still parses: its vectors would be copied wrong (a reviewer's flipped bytes gave
    # rows of norm 0.66 in a normalized output, exit 0). Its sha256 is not its manifest's: named, not copied.
    altered = tmp_path / "altered"
    shutil.copytree(prev, altered)
    table = from_ipc_bytes((altered / keys.shard_output(0)).read_bytes())
    vectors = table.column("embedding").combine_chunks()
    halved = pa.FixedSizeListArray.from_arrays(pc.multiply(vectors.flatten(), pa.scalar(0.5, pa.float32())),
                                               type=vectors.type)
    (altered / keys.shard_output(0)).write_bytes(to_ipc_bytes(table.set_column(
        table.schema.get_field_index("embedding"), table.schema.field("embedding"), halved)))
    done = run_cli("run", path2, "--out", tmp_path / "o6", "--reuse", altered, "--model", tiny_model)
    assert done.returncode == 2 and f"--reuse {altered}: cannot read {keys.shard_output(0)}" in done.stderr, \
        done.stderr[-2000:]
    assert "its sha256 is not the" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o6" / keys.reused_output(0)).exists(), "its rows are not copied"
    # An output written before content hashes existed cannot say which rows are unchanged.
    first = prev / keys.shard_output(0)
    first.write_bytes(to_ipc_bytes(from_ipc_bytes(first.read_bytes()).drop_columns(["content_hash"])))
    done = run_cli("run", path2, "--out", tmp_path / "o", "--reuse", prev, "--model", tiny_model)
    assert done.returncode == 2 and "no content_hash column" in done.stderr


def test_an_interrupted_reuse_run_resumes_and_writes_each_row_once(tmp_path, run_cli, tiny_model):
    path1, path2, _, v2 = two_versions(tmp_path, n=120)
    common = ("--model", tiny_model, "--shard-tokens", "800")
    run_ok(run_cli, path1, "--out", tmp_path / "prev", *common)
    out = tmp_path / "out"
    args = (path2, "--out", out, "--reuse", tmp_path / "prev", *common)
    run_ok(run_cli, *args)
    before = read_rows(out)
    reused, shards = sorted(out.glob("reused-*.arrow")), sorted(out.glob("0*.arrow"))
    assert len(reused) > 2 and shards
    stamps = {p: p.stat().st_mtime_ns for p in reused + shards}
    for lost in (reused[1], shards[0], out / keys.MANIFEST_KEY):  # as if the run died before writing them
        lost.unlink()
    run_ok(run_cli, *args)
    assert {k: r["vector"].tobytes() for k, r in read_rows(out).items()} == \
        {k: r["vector"].tobytes() for k, r in before.items()}, "the same rows, each once"
    assert all(p.stat().st_mtime_ns == stamps[p] for p in stamps if p not in (reused[1], shards[0])), "kept"
    assert manifest(out)["rows"] == len(before) == len(v2)
    run_ok(run_cli, *args, "--force")
    assert all(p.stat().st_mtime_ns != stamps[p] for p in stamps if p not in (reused[1], shards[0])), "rewritten"
    assert read_rows(out).keys() == before.keys()


@pytest.mark.parametrize("matches_kept", [True, False])
def test_a_done_reuse_job_submitted_again_copies_and_embeds_what_out_lost(tmp_path, run_cli, fault_env, pool,
                                                                            tiny_model, matches_kept):
    """submit, the job done and still known to Redis, then a reused copy and a shard file deleted: submitting again
    copies the lost rows from PREV_OUT again (from the matches the job kept: no unit planned again for it) and
    embeds the lost shard (its unit planned again), touching nothing else. Before, the second submit reported done
    over the missing files. An output whose matches are gone (written by a bulkembed that dropped them) has every
    unit planned again instead."""
    from tests.faults_support import cli

    path1, path2, _, v2 = two_versions(tmp_path, n=120, row_group=25)
    common = ("--model", tiny_model, "--shard-tokens", "800")
    run_ok(run_cli, path1, "--out", tmp_path / "prev", *common)
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "50"}  # 3 units
    out = tmp_path / "out"
    args = ("submit", path2, "--out", out, "--reuse", tmp_path / "prev", *common, "--wait")
    pool.start(tiny_model)
    first = cli(env, *args, timeout_s=180)
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_rows(out)
    reused, shards = sorted(out.glob("reused-*.arrow")), sorted(out.glob("0*.arrow"))
    assert len(reused) > 2 and shards
    stamps = {p: p.stat().st_mtime_ns for p in reused + shards}
    lost = (reused[1], shards[-1])
    for path in lost:
        path.unlink()
    if not matches_kept:
        for path in out.glob("_plan/reused-keys/*"):
            path.unlink()

    again = cli(env, *args, timeout_s=180)
    assert again.returncode == 0, again.stderr[-3000:]
    replanned = "planning 1 units again" if matches_kept else "planning 3 units again"
    assert "OUT lost 1 shard files and 1 reused files" in again.stderr and replanned in again.stderr, \
        again.stderr[-3000:]
    assert {k: r["vector"].tobytes() for k, r in read_rows(out).items()} == \
        {k: r["vector"].tobytes() for k, r in before.items()}, "the same rows, each once"
    assert all(p.stat().st_mtime_ns == stamps[p] for p in stamps if p not in lost), "the files still there kept"
    assert manifest(out)["rows"] == len(before) == len(v2)
    job_id = first.stdout.split()[0]
    assert {keys.shard_name(s) for s in attempts(env["BULKEMBED_REDIS_URL"], job_id)} == {shards[-1].stem}
    assert len(list(out.glob("_plan/reused-keys/*"))) == 3, "each unit's matches are kept"


# --- a worker killed during a reuse run, PREV_OUT and OUT on S3 ------------------------------------------



def busy_with(worker) -> str | None:
    """The task a worker has received and not finished, if any."""
    text = worker.log.read_text()
    received = RECEIVED.findall(text)
    if not received or f"[{received[-1]}] succeeded" in text or f"[{received[-1]}] raised" in text:
        return None
    return received[-1]


def test_a_worker_killed_during_a_reuse_run_loses_nothing(tmp_path, fault_env, bucket, tiny_model):
    from tests.faults_support import Background, cli

    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "the", "river", "sea", "model", "token"]
    long_texts = [" ".join(rng.choice(words, 700)) for _ in range(24)]  # ~3-4k tokens: slow shards
    short = mixed_texts(400, seed=4, long_every=10**9)
    ids = [f"doc-{i:04d}" for i in range(len(short) + len(long_texts))]
    path1 = write_corpus(tmp_path / "v1.parquet", ids, short + long_texts)
    v2_texts = short + [t + " changed" for t in long_texts]  # the long ones change: embedding work to kill
    path2 = write_corpus(tmp_path / "v2.parquet", ids, v2_texts)
    prev, out = f"s3://{bucket}/v1", f"s3://{bucket}/v2"
    assert cli(fault_env, "run", path1, "--model", tiny_model, "--out", prev, timeout_s=300).returncode == 0

    workers = Workers(fault_env, tmp_path)
    try:
        victim = workers.start(tiny_model)
        submit = Background(["submit", path2, "--model", tiny_model, "--out", out, "--reuse", prev,
                             "--shard-tokens", "12000", "--wait"], fault_env, tmp_path, "submit")
        try:
            job_id = wait_until(lambda: (submit.stdout.split() or [None])[0], 120, "the job id")
            url = fault_env["BULKEMBED_REDIS_URL"]
            done = keys.REDIS_JOB_DONE.format(job_id=job_id)

            def embedding() -> bool:  # a shard started (its attempt counted) and not written: inside it
                return busy_with(victim) is not None and bool(set(attempts(url, job_id)) - set(map(int, redis_hash(
                    url, done))))

            wait_until(embedding, 120, "the worker inside a shard", interval_s=0.01)
            time.sleep(0.2)  # one takes seconds
            kill_tree(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            visibility = int(fault_env["BULKEMBED_VISIBILITY_TIMEOUT"])
            wait_until(lambda: time.monotonic() > killed_at + visibility + 1, visibility + 5, "the visibility timeout")
            workers.start(tiny_model)  # restores the orphaned shard when it starts
            assert submit.wait(240) == 0, submit.stderr[-3000:]
        finally:
            submit.stop()
    finally:
        workers.stop_all()

    rows, previous = read_rows(out), read_rows(prev)
    assert sorted(i for i, _ in rows) == sorted(ids), "every id exactly once"
    assert all(rows[(i, 0)]["vector"].tobytes() == previous[(i, 0)]["vector"].tobytes() for i in ids[:len(short)])
    counts = manifest(out)
    assert (counts["reused_rows"], counts["embedded_rows"]) == (len(short), len(long_texts))
    store = open_store(out)
    listed = [k for k, _ in store.list() if "/" not in k and k.endswith(".arrow")]
    shard_keys = manifest_shards(store).column("key").to_pylist()
    assert sorted(listed) == sorted(shard_keys + [f["key"] for f in counts["reused_files"]])
    assert max(attempts(fault_env["BULKEMBED_REDIS_URL"], job_id).values()) >= 2, "the killed shard ran again"
    assert pa.compute.sum(ds.dataset(store.arrow_fs()[1], filesystem=store.arrow_fs()[0], format="arrow")
                          .to_table(columns=["n_tokens"]).column("n_tokens")).as_py() == counts["tokens"]


def test_reuse_copies_stop_once_the_job_is_forgotten(tmp_path, run_cli, tiny_model):
    """Copying PREV_OUT's rows takes minutes at the close of planning; once the job is forgotten meanwhile by
    submit --force (its OUT another job's now), no more copies are written there. Before, every copy was written."""
    import threading

    from bulkembed.contract.errors import JobGone
    from bulkembed.producer.reuse import copy_reused, open_previous
    from bulkembed.producer.submit import JobOptions, plan_job

    path1, path2, _, _ = two_versions(tmp_path)
    run_ok(run_cli, path1, "--out", tmp_path / "v1-out", "--model", tiny_model, "--shard-tokens", "1500")
    planned = plan_job(str(path2), str(tiny_model), str(tmp_path / "new"), JobOptions(shard_tokens=1500))
    previous = open_previous(str(tmp_path / "v1-out"), planned.job, None)
    assert len(previous.files) > 2
    asked, lock = [], threading.Lock()

    def forgotten_after_the_first() -> bool:
        with lock:
            asked.append(1)
            return len(asked) == 1

    with pytest.raises(JobGone):
        copy_reused(previous, previous.load_index(), planned.store, planned.job, still_ours=forgotten_after_the_first)
    copies = [key for key, _ in planned.store.list() if key.startswith("reused-")]
    assert len(copies) == 1, f"only the copy written while the job was its own: {copies}"


def test_a_reused_copy_of_the_job_force_replaced_is_written_over(tmp_path, run_cli, tiny_model):
    """A copy of PREV_OUT's rows that the replaced job's planner wrote late (past --force's wait) is not taken for
    this job's: it is written over. Before, it was kept where its row count matched, and refused otherwise."""
    from bulkembed.contract.schema import METADATA_PREFIX, from_ipc_bytes, read_metadata, to_ipc_bytes
    from bulkembed.producer.reuse import copy_reused, open_previous
    from bulkembed.producer.submit import JobOptions, plan_job

    path1, path2, _, _ = two_versions(tmp_path)
    run_ok(run_cli, path1, "--out", tmp_path / "v1-out", "--model", tiny_model, "--shard-tokens", "1500")
    planned = plan_job(str(path2), str(tiny_model), str(tmp_path / "new"), JobOptions(shard_tokens=1500))
    previous = open_previous(str(tmp_path / "v1-out"), planned.job, None)
    first = copy_reused(previous, previous.load_index(), planned.store, planned.job)
    key = first[0].key
    mine = planned.store.get(key)
    table = from_ipc_bytes(mine)
    metadata = dict(table.schema.metadata) | {(METADATA_PREFIX + "job_id").encode(): b"0123456789abcdef"}
    planned.store.put(key, to_ipc_bytes(table.slice(1).replace_schema_metadata(metadata)))  # the late copy
    again = copy_reused(previous, previous.load_index(), planned.store, planned.job)
    assert planned.store.get(key) == mine and again[0].sha256 == first[0].sha256
    assert read_metadata(from_ipc_bytes(planned.store.get(key)).schema)["job_id"] == planned.job.job_id
