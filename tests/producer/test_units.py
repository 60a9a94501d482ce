"""Planning units with the real token counter and a local store: how a corpus is cut into units, and what planning
a unit again does (a resumed job): the same shards, those already written reported instead of queued."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkembed.contract import keys
from bulkembed.contract.job import Overlength
from bulkembed.contract.registry import JobRegistry, JobTotals
from bulkembed.contract.schema import from_ipc_bytes, row_sources
from bulkembed.contract.settings import ProducerSettings
from bulkembed.local import embed_shards
from bulkembed.producer.corpus import Piece, Unit, open_corpus, plan_units
from bulkembed.producer.submit import JobOptions, plan_claimed, plan_job, prepare, produce
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.engines import EnginePool, EngineSetup
from tests.conftest import mixed_texts, write_corpus


def _pieces(units) -> list[list[tuple[int, int, int, int, int]]]:
    return [[(p.file, p.first_group, p.stop_group, p.first_row, p.rows) for p in u.pieces] for u in units]


def test_units_are_whole_row_groups_gathered_across_files(tmp_path):
    for name, rows in (("a", 250), ("b", 40), ("c", 0), ("d", 30), ("e", 90)):
        write_corpus(tmp_path / f"{name}.parquet", [f"{name}{i}" for i in range(rows)], ["x"] * rows,
                     row_group_size=100)
    corpus = open_corpus(str(tmp_path), "id", "text")
    units = plan_units(corpus, unit_rows=150)
    assert _pieces(units) == [[(0, 0, 2, 0, 200)], [(0, 2, 3, 200, 50), (1, 0, 1, 0, 40), (3, 0, 1, 0, 30),
                                                    (4, 0, 1, 0, 90)]]
    assert [u.index for u in units] == [0, 1] and units == plan_units(corpus, unit_rows=150), "the same again"
    assert sum(u.rows for u in plan_units(corpus, unit_rows=1)) == 410
    assert pq.ParquetFile(units[1].pieces[1].path).metadata.num_rows == 40
    assert [Unit.of_wire(json.loads(json.dumps(u.wire()))) for u in units] == units, "as a planning task sends it"
    # A job planned before units spanned files: one file's row groups each, as it was planned then.
    assert _pieces(plan_units(corpus, unit_rows=150, span_files=False)) == [
        [(0, 0, 2, 0, 200)], [(0, 2, 3, 200, 50)], [(1, 0, 1, 0, 40)], [(3, 0, 1, 0, 30)], [(4, 0, 1, 0, 90)]]
    assert Unit.of_wire([2, 1, "b.parquet", 0, 1, 0, 40]) == Unit(2, (Piece(1, "b.parquet", 0, 1, 0, 40),)), \
        "a unit task queued by that bulkembed"
    assert units[0].wire() == [0, 0, str(tmp_path / "a.parquet"), 0, 2, 0, 200], "as that bulkembed's planners read"


def test_many_small_files_make_full_shards_each_row_named_by_its_file(tmp_path, tiny_model):
    """300 files of 20 documents: each file used to be a unit of its own, ending in a part-filled shard per length
    class: hundreds of shards (and output files) of a few rows. Now they fill shards as one file would; each row of
    a shard's input still names its own file and row, and duplicate ids are found across files."""
    folder = tmp_path / "in"
    texts = mixed_texts(6000, seed=5)
    for f in range(300):
        ids = [f"f{f}-{i}" for i in range(20)]
        if f == 299:
            ids[7] = "f0-3"  # a duplicate of a row of the first file: quarantined, the first kept
        write_corpus(folder / f"part-{f:03d}.parquet", ids, texts[f * 20:(f + 1) * 20])
    options = JobOptions(shard_tokens=8000)
    queued: list = []
    planned = plan_job(str(folder), str(tiny_model), str(tmp_path / "out"), options)
    totals, _ = produce(planned, queued.append, lambda result: None)
    one_file = tmp_path / "one" / "c.parquet"
    write_corpus(one_file, [f"d{i}" for i in range(6000)], texts)
    alone, _ = produce(plan_job(str(one_file.parent), str(tiny_model), str(tmp_path / "out-one"), options),
                       lambda message: None, lambda result: None)
    assert len(planned.units) == 1 and totals.docs == 5999 and totals.rejected == 1
    assert totals.shards <= alone.shards + 1, f"{totals.shards} shards for what one file cuts into {alone.shards}"
    seen = set()
    for message in queued:
        table = from_ipc_bytes(planned.store.get(keys.shard_input(message.shard)))
        sources, rows = row_sources(table, message.input_key)
        for doc_id, source, row in zip(table.column("id").to_pylist(), sources, rows, strict=True):
            f, i = (int(part) for part in doc_id[1:].split("-"))
            assert (source, row) == (str((folder / f"part-{f:03d}.parquet").resolve()), i)
            seen.add(doc_id)
    assert len(seen) == 5999 and "f299-7" not in seen


def test_planning_again_reports_written_shards_instead_of_queueing_them(tmp_path, tiny_model):
    ids = [f"d{i}" for i in range(300)]
    write_corpus(tmp_path / "in" / "c.parquet", ids, mixed_texts(len(ids), seed=3), row_group_size=100)
    options = JobOptions(shard_tokens=2000, unit_rows=100)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    first: list = []
    totals, _ = produce(planned, first.append, lambda result: None)
    assert {m.shard // keys.SHARDS_PER_UNIT for m in first} == {0, 1, 2} and len(first) == totals.shards
    written = first[::2]  # embed every other shard, as an interrupted run would have
    with EnginePool(tiny_model, planned.job.model.sha256, EngineSetup(EngineOptions(threads=1), engines=1,
                                                                      ubatch=512)) as pool:
        pool.start(self_test=False)
        done = list(embed_shards(pool, written, planned.store))
    assert len(done) == len(written)

    planned.store.delete_many([keys.shard_input(m.shard) for m in first])  # as a finished job's are

    again = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    queued, reported = [], []
    produce(again, queued.append, reported.append)
    assert sorted(r.shard for r in reported) == sorted(m.shard for m in written), "found by one listing a unit"
    assert sorted(m.shard for m in queued) == sorted(m.shard for m in first if m not in written)
    inputs = {key for key, _ in again.store.list("_shards/")}
    assert inputs == {keys.shard_input(m.shard) for m in queued}, "an input only for each shard to embed"
    assert [(m.shard, m.n_docs, m.n_tokens) for m in sorted(queued + written, key=lambda m: m.shard)] == \
        [(m.shard, m.n_docs, m.n_tokens) for m in sorted(first, key=lambda m: m.shard)], "the same shards"


def test_a_shard_input_names_each_rows_corpus_file_and_row(tmp_path, tiny_model):
    """What a worker's quarantine record names (the shard input is deleted once the job is done): rows of a file's
    second unit, a quarantined row and a chunked document among them, keep their numbers in the file."""
    ids = [f"d{i}" for i in range(200)]
    texts = mixed_texts(len(ids), seed=7)
    texts[130], texts[150] = "", "alpha beta gamma " * 30  # quarantined; cut into chunks
    path = write_corpus(tmp_path / "in" / "c.parquet", ids, texts, row_group_size=100)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"),
                       JobOptions(shard_tokens=2000, unit_rows=100, max_tokens=40, overlength=Overlength.CHUNK))
    queued: list = []
    produce(planned, queued.append, lambda result: None)
    rows_by_id: dict[str, set[int]] = {}
    for message in queued:
        table = from_ipc_bytes(planned.store.get(keys.shard_input(message.shard)))
        sources, rows = row_sources(table, message.input_key)
        assert set(sources) == {str(path.resolve())}
        for doc_id, row in zip(table.column("id").to_pylist(), rows, strict=True):
            rows_by_id.setdefault(doc_id, set()).add(row)
    assert rows_by_id == {doc_id: {i} for i, doc_id in enumerate(ids) if i != 130}
    assert sum(1 for m in queued for i in from_ipc_bytes(planned.store.get(keys.shard_input(m.shard))).column("id")
               if i.as_py() == "d150") > 1, "d150 was chunked"


def test_a_long_documents_chunks_hold_its_text_once_and_tokenize_it_once(tmp_path, tiny_model, monkeypatch):
    """A document of ~140 chunks in a shard: its input held 100 copies of the text and the worker tokenized it 100
    times (quadratic in the document: 78 s for one 50,000-word document, 21 s now). The vectors are each chunk's."""
    from bulkembed.worker.engine import Engine
    from bulkembed.worker.rows import embed_rows
    from bulkembed.worker.shard import open_shard

    long_text = " ".join(f"word{i % 97}" for i in range(4000))
    write_corpus(tmp_path / "in" / "c.parquet", ["long", "short"], [long_text, "a short one"])
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"),
                       JobOptions(shard_tokens=100_000, max_tokens=200, overlength=Overlength.CHUNK, prefix=""))
    queued: list = []
    produce(planned, queued.append, lambda result: None)
    inputs = [(m, from_ipc_bytes(planned.store.get(keys.shard_input(m.shard)))) for m in queued]
    message, table = max(inputs, key=lambda pair: pair[1].num_rows)
    chunks = table.column("id").to_pylist().count("long")
    assert chunks > 50 and table.num_rows == chunks, "the document's chunks in one shard"
    assert len(table.column("text").chunk(0).dictionary) == 1, "its text once"
    engine = Engine(tiny_model, EngineOptions(threads=2, ubatch=512))
    try:
        calls = []
        tokenize = engine.vocab.tokenize
        monkeypatch.setattr(engine.vocab, "tokenize", lambda text, *a, **k: calls.append(text) or tokenize(text, *a,
                                                                                                             **k))
        opened = open_shard(message, planned.job.model.sha256, planned.store)
        embedded = embed_rows(engine, opened.rows)
        assert calls.count(long_text) == 1, f"tokenized {calls.count(long_text)} times"
        monkeypatch.undo()
        tokens = engine.vocab.tokenize(long_text)
        starts, stops = table.column("start").to_pylist(), table.column("stop").to_pylist()
        picked = range(0, table.num_rows, 17)
        alone = engine.embed([tokens[starts[i]:stops[i]] for i in picked])
        assert np.array_equal(embedded.vectors[picked], alone), "each chunk's vector is its tokens' alone"
    finally:
        engine.close()


def one_unit_job(tmp_path, tiny_model, redis_server: str, seed: int):
    """A 120-document corpus planned as a job of one unit, registered in Redis (not yet planned)."""
    ids = [f"d{i}" for i in range(120)]
    write_corpus(tmp_path / "in" / "c.parquet", ids, mixed_texts(len(ids), seed=seed))
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), JobOptions(shard_tokens=800))
    registry = JobRegistry.from_url(redis_server)
    registry.start(planned.job, 1)
    return planned, planned.job, planned.units[0], registry


def test_a_planner_whose_hold_lapses_mid_unit_leaves_the_unit_to_be_planned_again(tmp_path, tiny_model, redis_server):
    """A planner that stalls past BULKEMBED_PLAN_LOCK_S mid-unit (here its send is slow) loses its hold: the unit is
    not planned, and the planner says so (its task comes back later). Looked at again, the unit is planned, each shard
    queued once. Before, the planner reported the unit as handled: its task was acknowledged, and with no submitting
    process left (--queue-only) the job stayed `planning` for ever."""
    planned, job, unit, registry = one_unit_job(tmp_path, tiny_model, redis_server, seed=4)
    settings = ProducerSettings(plan_lock_s=2)
    sent: list = []

    def stalling(message) -> None:
        sent.append(message)
        time.sleep(2.5)  # past the hold

    with planned.counter:
        prepare(planned, settings.dedup_memory_mb)
        ctx = planned.context()
        assert plan_claimed(registry, job, lambda: ctx, unit, stalling, settings) is False
        assert not registry.unit_is_planned(job.job_id, unit.index) and len(sent) == 1
        assert plan_claimed(registry, job, lambda: ctx, unit, sent.append, settings) is True
    assert registry.unit_is_planned(job.job_id, unit.index)
    shards = sorted(m.shard for m in sent)
    assert len(shards) > 2 and shards == list(range(len(shards))), "each shard queued once"
    assert registry.status(job.job_id).state == "running"


def test_a_batch_of_long_documents_keeps_the_planners_hold(tmp_path, tiny_model, redis_server, monkeypatch):
    """Counting a batch of 8,192 long documents takes minutes: the planner keeps its unit's lock alive between
    parts of the count. Here counting is slowed to 40 ms a document and the lock is 2 s (4.8 s to count). Before,
    the batch was counted in one call, the hold lapsed, and every try at the unit lapsed at the same batch: the job
    stayed `planning` for ever."""
    from bulkembed.contract.vocab import TokenCounter
    from bulkembed.producer import submit

    planned, job, unit, registry = one_unit_job(tmp_path, tiny_model, redis_server, seed=7)
    count_many = TokenCounter.count_many

    def slow(self, texts, special=True):
        time.sleep(0.04 * len(texts))
        return count_many(self, texts, special)

    monkeypatch.setattr(TokenCounter, "count_many", slow)
    monkeypatch.setattr(submit, "COUNT_CHARS", 400)  # a few documents a call
    sent: list = []
    with planned.counter:
        prepare(planned, ProducerSettings().dedup_memory_mb)
        ctx = planned.context()
        assert plan_claimed(registry, job, lambda: ctx, unit, sent.append, ProducerSettings(plan_lock_s=2)) is True
    shards = sorted(m.shard for m in sent)
    assert len(shards) > 2 and shards == list(range(len(shards))), "each shard queued once"


def test_a_planners_retry_that_could_not_be_queued_hands_the_unit_back(redis_server, monkeypatch):
    """A unit held by another planner is retried later; should that retry not be queued (Redis blinking: Celery then
    raises Reject without requeue), the unit goes back to the plan queue once Redis takes writes. Before, the Reject
    was taken for the unit's own error and failed the job. Run in this process: Celery's side is what raises."""
    from celery.exceptions import Reject

    from bulkembed.producer import tasks

    def retry_not_queued(self, job_id, unit):
        raise Reject("OperationalError: Error 111 connecting to redis", requeue=False)

    registry = JobRegistry.from_url(redis_server)
    monkeypatch.setattr(tasks, "_plan", retry_not_queued)
    monkeypatch.setattr(tasks.PlannerTask, "registry", property(lambda self: registry))
    with pytest.raises(Reject) as handed_back:
        tasks.plan_unit_task.run("job-of-a-blink", [0, 0, "part-0.parquet", 0, 1, 0, 100])
    assert handed_back.value.requeue, "back to the plan queue"
    assert registry.status("job-of-a-blink") is None, "the job is not failed"


def test_a_written_shard_failed_by_its_manifest_is_not_queued_again(tmp_path, tiny_model, redis_server):
    """The last shard written, then its job's manifest failing for good after some inputs were deleted: the worker
    reports the written shard failed. Submitted again, the job does not queue that shard from its deleted input: it
    is written; the job closes and its manifest is written. Before, the resubmission crashed reading the input."""
    from bulkembed.contract.registry import ShardResult
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(60)], mixed_texts(60, seed=5))
    options = JobOptions(shard_tokens=800)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    job, store = planned.job, planned.store
    registry = JobRegistry.from_url(redis_server)
    sent: list = []
    settings = ProducerSettings()
    submit_job(planned, registry, sent.append, lambda unit: None, settings)
    assert len(sent) > 2
    for message in sent:  # every shard written, as workers would have
        store.put(message.output_key, b"an embedding file")
        registry.shard_done(job.job_id, ShardResult(shard=message.shard, key=message.output_key,
                                                    rows=message.n_docs, tokens=message.n_tokens))
    store.delete(keys.shard_input(sent[-1].shard))  # deleted by the manifest that then failed
    registry.shard_failed(job.job_id, sent[-1].shard, "the store kept failing for 1800s: ...")
    assert registry.status(job.job_id).state == "failed"

    again: list = []
    submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), registry,
               again.append, lambda unit: None, settings)
    assert again == [], "nothing to embed"
    assert registry.status(job.job_id).state == "done" and store.exists(keys.MANIFEST_KEY)


def test_failed_shards_queued_again_are_held_back_as_planned_ones(tmp_path, tiny_model, redis_server):
    """A store outage can fail millions of shards; submitted again, their units are planned again, so they are
    queued no faster than the engines take them (the planners' back-pressure), not all at once into Redis's memory.
    Here no engine serves the queue and the floor is 3: the queue never holds more than 3 while a slow consumer
    drains it."""
    import json
    import threading

    from bulkembed.contract.queue import KOMBU_UNACKED, TASK_EMBED_SHARD
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(80)], mixed_texts(80, seed=10))
    options = JobOptions(shard_tokens=400)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    job, registry = planned.job, JobRegistry.from_url(redis_server)
    first: list = []
    submit_job(planned, registry, first.append, lambda unit: None, ProducerSettings())
    assert len(first) > 8
    for message in first:
        registry.shard_failed(job.job_id, message.shard, "the store kept failing for 1800s")
    queue, again, longest, done = job.model.queue, [], 0, threading.Event()
    tags: list[str] = []  # of the messages taken

    def send(message) -> None:  # as kombu queues it, so that a shard waiting is seen held, not lost
        again.append(message.shard)
        registry.redis.rpush(queue, json.dumps({"headers": {"task": TASK_EMBED_SHARD},
                                                "body": json.dumps([[message.wire()], {}, {}])}))

    def engine() -> None:  # takes a shard as a worker does: into kombu's unacknowledged hash, still held
        nonlocal longest
        while not done.is_set():
            longest = max(longest, registry.queue_length(queue))
            taken = registry.redis.lpop(queue)
            if taken is not None:
                tags.append(f"{job.job_id}-{len(tags)}")
                registry.redis.hset(KOMBU_UNACKED, tags[-1], json.dumps([taken, "", queue]))
            time.sleep(0.05)

    consumer = threading.Thread(target=engine, daemon=True)
    consumer.start()
    try:
        submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), registry, send,
                   lambda unit: None, ProducerSettings(queue_min=3, queue_per_engine=1))
    finally:
        done.set()
        consumer.join(5)
        if tags:
            registry.redis.hdel(KOMBU_UNACKED, *tags)
    assert sorted(again) == sorted(m.shard for m in first), "every failed shard queued again, once"
    assert longest <= 3, f"the queue held {longest}"


def test_failed_shards_stay_failed_until_their_units_are_to_be_planned_again(tmp_path, tiny_model, redis_server,
                                                                               monkeypatch):
    """A resubmit killed while it takes failed shards back leaves them failed (or their units to be planned), never
    neither: the next resubmit embeds them. Before, the failed list was cleared first and the shards were then sent
    one by one: a kill in between lost the rest, and the job waited for them for ever."""
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(80)], mixed_texts(80, seed=12))
    options = JobOptions(shard_tokens=400)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    job_id, registry = planned.job.job_id, JobRegistry.from_url(redis_server)
    first: list = []
    submit_job(planned, registry, first.append, lambda unit: None, ProducerSettings())
    for message in first:
        registry.shard_failed(job_id, message.shard, "the store kept failing for 1800s")
    assert registry.status(job_id).state == "failed"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or the pod deleted, while the failed shards are taken back

    monkeypatch.setattr(registry, "_unfail", killed)
    with pytest.raises(KeyboardInterrupt):
        submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), registry,
                   lambda message: None, lambda unit: None, ProducerSettings())
    assert registry.status(job_id).failed == len(first), "still failed, for the next submit"
    monkeypatch.undo()
    again: list = []
    submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), registry,
               again.append, lambda unit: None, ProducerSettings())
    status = registry.status(job_id)
    assert sorted(m.shard for m in again) == sorted(m.shard for m in first), "each queued again"
    assert status.failed == 0 and status.state == "running"


def test_a_manifest_that_meets_a_redis_failure_is_handed_back(redis_server, monkeypatch):
    """The planner writing a job's manifest meets Redis failing (a restart, writes refused): the task goes back to
    the plan queue once Redis takes writes. Before, it failed and was acknowledged: the job stayed `finishing` until
    someone submitted it again."""
    import redis as redis_client
    from celery.exceptions import Reject

    from bulkembed.producer import tasks

    registry = JobRegistry.from_url(redis_server)

    def redis_fails(job_id: str, keep_planner: bool = True) -> None:
        raise redis_client.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr(registry, "finalize", redis_fails)
    monkeypatch.setattr(tasks.PlannerTask, "registry", property(lambda self: registry))
    with pytest.raises(Reject) as handed_back:
        tasks.finalize_job_task.run("job-of-a-restart")
    assert handed_back.value.requeue, "back to the plan queue"


@pytest.mark.parametrize("killed_in", ["the duplicate-id pass", "sending its units"])
def test_a_submit_that_dies_before_queueing_everything_holds_no_worker(tmp_path, tiny_model, redis_server,
                                                                       monkeypatch, killed_in):
    """KEDA keeps a GPU worker up while a model's queue has an open job. A submit killed in the duplicate-id pass
    (minutes at 10^9 rows, before any unit or shard is queued), or while it sends its units to planners, leaves its
    job registered but not open; submitted again it runs. Before, a job listed before it was queued whole kept a GPU
    pod up for ever: the units never sent are never planned, so its shards never all settle."""
    from bulkembed.producer import submit
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(40)], mixed_texts(40, seed=6),
                 row_group_size=20)
    options = JobOptions(shard_tokens=800, unit_rows=20)  # two units
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    registry = JobRegistry.from_url(redis_server)
    queue = planned.job.model.queue
    registry.redis.delete(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=queue))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or the pod deleted

    sent: list = []
    units: list = []
    if killed_in == "the duplicate-id pass":
        monkeypatch.setattr(submit, "find_duplicates", killed)
        send_unit = units.append
    else:
        def send_unit(unit) -> None:
            if units:
                killed()
            units.append(unit)

    with pytest.raises(KeyboardInterrupt):
        submit_job(planned, registry, sent.append, send_unit, ProducerSettings())
    assert sent == [] and registry.open_jobs(queue) == [], "nothing listed, no worker held"
    assert planned.job.job_id not in registry.redis.lrange(keys.REDIS_PLANNING_JOBS, 0, -1), "no planner held"
    monkeypatch.undo()
    submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options),
               registry, sent.append, lambda unit: None, ProducerSettings())
    assert sent and registry.open_jobs(queue) == [planned.job.job_id], "open once its shards are queued"


def test_a_job_whose_planning_failed_is_planned_no_further_until_it_is_submitted_again(tmp_path, redis_server):
    """A planner without the model fails the job's unit 1; the planner of unit 0, or the submitting process, does not
    go on planning the job (queueing GPU work for a failed job) and does not close it: it stayed failed only until
    then, when it turned running, then done, its planning error still shown beside the state."""
    from bulkembed.producer.corpus import Piece, Unit
    from bulkembed.producer.submit import plan_claimed
    from tests.contract.test_open_jobs import job

    registry = JobRegistry.from_url(redis_server)
    spec = job(tmp_path, f"q-{time.monotonic_ns()}")
    registry.start(spec, 2)

    def no_context():
        raise AssertionError("a failed job's unit is not read")

    registry.planning_failed(spec.job_id, 1, "ModelError: the model is not on this planner")
    sent: list = []
    unit = Unit(0, (Piece(0, "c.parquet", 0, 1, 0, 2),))
    assert plan_claimed(registry, spec, no_context, unit, sent.append, ProducerSettings()), "its task is done"
    assert sent == [] and not registry.unit_is_planned(spec.job_id, 0)
    assert registry.planning_error(spec.job_id) == "unit 1: ModelError: the model is not on this planner"


def test_a_submit_whose_job_a_planner_failed_stops_planning_it(tmp_path, tiny_model, redis_server):
    """The submitting process plans units beside planners; one of them fails unit 1 while it plans unit 0. It stops
    there (its log says why and to submit again) instead of planning on, or waiting for ever for unit 1."""
    import threading

    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(40)], mixed_texts(40, seed=6),
                 row_group_size=20)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"),
                       JobOptions(shard_tokens=800, unit_rows=20))
    registry = JobRegistry.from_url(redis_server)
    job_id, sent = planned.job.job_id, []

    def send(message) -> None:  # a planner fails unit 1 as the first shard of unit 0 is queued
        if not sent:
            registry.planning_failed(job_id, 1, "ModelError: the model is not on this planner")
        sent.append(message)

    submitting = threading.Thread(target=submit_job, daemon=True,
                                  args=(planned, registry, send, lambda unit: None, ProducerSettings()))
    submitting.start()
    submitting.join(60)
    assert not submitting.is_alive(), "submit still waits on a unit of a failed job"
    assert {m.shard // keys.SHARDS_PER_UNIT for m in sent} == {0} and not registry.unit_is_planned(job_id, 1)
    assert registry.status(job_id).state == "failed"


def test_submit_without_wait_exits_1_when_a_planner_failed_a_unit(tmp_path, tiny_model, redis_server, monkeypatch,
                                                                   capsys):
    """`submit` (no --wait) stops planning a job a planner failed; it says why and exits 1, not 0 as if queued."""
    from bulkembed import cli
    from bulkembed.producer import submit

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(20)], mixed_texts(20, seed=2))
    monkeypatch.setenv("BULKEMBED_REDIS_URL", redis_server)

    def planner_fails_a_unit(planned, registry, *args, **kwargs) -> None:
        registry.start(planned.job, len(planned.units))
        registry.planning_failed(planned.job.job_id, 0, "ModelError: the model is not on this planner")

    monkeypatch.setattr(submit, "submit_job", planner_fails_a_unit)
    code = cli.main(["submit", str(tmp_path / "in"), "--model", str(tiny_model), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "planning failed: unit 0: ModelError: the model is not on this planner" in capsys.readouterr().err


def test_force_over_a_running_job_stops_it_before_its_files_go(tmp_path, tiny_model, redis_server, monkeypatch):
    """submit --force into an OUT that holds another job still running: that job is forgotten in Redis, its
    planners' holds too, and its files are deleted only STOPPING_S later, once its planners have had the time to
    notice. Before, --force forgot only the new job: the old one's planners and workers went on writing into the new
    job's OUT under the same names. The same job forced again while it runs is stopped the same way: forgotten only
    after its files were deleted, a planner of it recorded a shard queued into the new run's record, whose planner
    then skipped shards whose inputs were gone (the job stuck, its resubmission crashing on a missing input)."""
    from redis.exceptions import LockNotOwnedError

    from bulkembed.producer import submit
    from bulkembed.producer.submit import claim_out, stop_job, submit_job

    write_corpus(tmp_path / "v1" / "c.parquet", [f"d{i}" for i in range(60)], mixed_texts(60, seed=8))
    write_corpus(tmp_path / "v2" / "c.parquet", [f"d{i}" for i in range(60)], mixed_texts(60, seed=9))
    options, out = JobOptions(shard_tokens=800), str(tmp_path / "out")
    old = plan_job(str(tmp_path / "v1"), str(tiny_model), out, options)
    registry = JobRegistry.from_url(redis_server)
    submit_job(old, registry, lambda message: None, lambda unit: None, ProducerSettings())
    assert registry.status(old.job.job_id).state == "running"
    hold = registry.plan_lock(old.job.job_id, 7, 60)  # a planner of it, mid-unit
    assert hold.acquire()

    monkeypatch.setattr(submit, "STOPPING_S", 1.0)
    events: list[tuple[str, float]] = []
    forget, forget_outputs = registry.forget, submit.forget_outputs
    monkeypatch.setattr(registry, "forget", lambda job_id: (events.append(("forget", time.monotonic())),
                                                             forget(job_id)))
    monkeypatch.setattr(submit, "forget_outputs", lambda store: (events.append(("delete", time.monotonic())),
                                                                 forget_outputs(store))[1])
    stopped: list[str] = []

    def stop(job_id: str) -> None:
        stopped.append(job_id)
        stop_job(registry, job_id)

    new = plan_job(str(tmp_path / "v2"), str(tiny_model), out, options)
    claim_out(new, True, stop)
    assert stopped == [old.job.job_id, new.job.job_id]
    assert [name for name, _ in events] == ["forget", "forget", "delete"]
    assert events[2][1] - events[0][1] >= 1.0, "its files deleted only once its planners have had the time to stop"
    assert registry.status(old.job.job_id) is None
    with pytest.raises(LockNotOwnedError):
        hold.reacquire()
    assert not [key for key, _ in new.store.list() if keys.JOB_OUTPUT_KEY.match(key)], "its files deleted"
    claim_out(old, True, stop)  # nothing of the job in OUT
    assert stopped[2:] == [old.job.job_id]

    submit_job(new, registry, lambda message: None, lambda unit: None, ProducerSettings())  # the same job, running
    hold = registry.plan_lock(new.job.job_id, 3, 60)
    assert hold.acquire()
    events.clear()
    claim_out(new, True, stop)
    assert stopped[3:] == [new.job.job_id] and [name for name, _ in events] == ["forget", "delete"]
    assert events[1][1] - events[0][1] >= 1.0, "the same job's files too, once its planners have had the time"
    assert registry.status(new.job.job_id) is None
    with pytest.raises(LockNotOwnedError):
        hold.reacquire()


def test_a_forgotten_jobs_submit_stops_planning_and_writes_nothing_more(tmp_path, tiny_model, redis_server):
    """The old job's own submit process, planning its units, when another submit --force forgets the job: it stops
    before its next shard's input is written (its hold is gone), sends nothing more, and brings none of the job's
    keys back to Redis. Before, it planned the whole job again: its inputs landed in the new job's OUT."""
    import threading

    from bulkembed.contract.errors import JobGone
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(120)], mixed_texts(120, seed=11))
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), JobOptions(shard_tokens=400))
    job_id, registry = planned.job.job_id, JobRegistry.from_url(redis_server)
    sent, started, forgotten, raised = [], threading.Event(), threading.Event(), []

    def send(message) -> None:
        sent.append(message)
        if len(sent) == 2:  # mid-unit, when the other submit forgets the job
            started.set()
            forgotten.wait(10)

    def old_submit() -> None:
        try:
            submit_job(planned, registry, send, lambda unit: None, ProducerSettings())
        except JobGone as exc:
            raised.append(exc)

    thread = threading.Thread(target=old_submit, daemon=True)
    thread.start()
    assert started.wait(30)
    inputs_then = {key for key, _ in planned.store.list("_shards/")}
    registry.forget(job_id)
    forgotten.set()
    thread.join(30)
    assert raised and "no longer in Redis" in str(raised[0]), "the old submit says why it stopped"
    assert len(sent) == 2, "nothing sent after the job was forgotten"
    assert {key for key, _ in planned.store.list("_shards/")} == inputs_then, "no input written after"
    assert not list(registry.redis.scan_iter(f"*{job_id}*")), "no key of the job comes back"


@pytest.mark.parametrize("fails_again", [False, True])
def test_a_failed_shard_of_a_half_planned_unit_is_queued_again_on_resubmit(tmp_path, tiny_model, redis_server,
                                                                            fails_again):
    """A submit killed mid-unit, a shard it queued then failed for good: resubmitted, that shard is queued again
    (its unit resumes after it) and taken off the failed list, and the rest of the unit is planned. Should it fail
    again at once, while the resubmit still sends, that failure is kept (it was erased: the job ran for ever)."""
    from bulkembed.producer.submit import submit_job

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(120)], mixed_texts(120, seed=11))
    options = JobOptions(shard_tokens=400)
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options)
    job_id, registry = planned.job.job_id, JobRegistry.from_url(redis_server)
    first: list = []

    def killed_after_three(message) -> None:
        first.append(message)
        if len(first) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit_job(planned, registry, killed_after_three, lambda unit: None, ProducerSettings())
    registry.shard_failed(job_id, first[0].shard, "the store kept failing for 1800s")
    again: list = []

    def send(message) -> None:
        again.append(message)
        if fails_again and message.shard == first[0].shard:  # a worker takes it at once and fails it
            registry.shard_failed(job_id, message.shard, "the store kept failing, again")

    submit_job(plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), options), registry,
               send, lambda unit: None, ProducerSettings())
    shards = sorted(m.shard for m in again)
    assert first[0].shard in shards and first[1].shard not in shards, "the failed one queued again, once"
    assert registry.status(job_id).failed == (1 if fails_again else 0)


def test_a_job_forgotten_while_it_is_prepared_writes_nothing_more(tmp_path, tiny_model):
    """The duplicate-id pass takes minutes at 10^9 rows; a job forgotten meanwhile by another submit --force writes
    neither its spec nor its duplicates into what is now the other job's OUT, and says why (JobGone)."""
    from bulkembed.contract.errors import JobGone

    write_corpus(tmp_path / "in" / "c.parquet", [f"d{i}" for i in range(40)], mixed_texts(40, seed=13))
    planned = plan_job(str(tmp_path / "in"), str(tiny_model), str(tmp_path / "out"), JobOptions(shard_tokens=800))
    answers = iter([True])  # ours when the spec is written, forgotten by the end of the duplicate-id pass
    with pytest.raises(JobGone, match="another job's output"):
        prepare(planned, 64, lambda: next(answers, False))
    assert not planned.store.exists(keys.DUPLICATES_KEY)


def test_two_jobs_submitted_into_one_fresh_out_at_once_do_not_both_take_it(tmp_path, tiny_model):
    """claim_out looks for another job's spec in OUT and prepare wrote this job's with an overwrite: two jobs
    submitted into one fresh OUT within a second both passed, and each took the other's shard files for its own.
    The spec is now written only where none is, or where it is this job's."""
    from bulkembed.contract.errors import InputError
    from bulkembed.producer.submit import claim_out

    write_corpus(tmp_path / "v1" / "c.parquet", [f"d{i}" for i in range(20)], mixed_texts(20, seed=3))
    write_corpus(tmp_path / "v2" / "c.parquet", [f"d{i}" for i in range(20)], mixed_texts(20, seed=4))
    out = str(tmp_path / "out")
    first, second = (plan_job(str(tmp_path / name), str(tiny_model), out, JobOptions(shard_tokens=800))
                     for name in ("v1", "v2"))
    try:
        claim_out(first, False)
        claim_out(second, False)  # both look before either writes
        prepare(first, 64)
        with pytest.raises(InputError, match=f"claimed by job {first.job.job_id} while job {second.job.job_id}"):
            prepare(second, 64)
        prepare(first, 64)  # the same job again: its own spec
        assert first.store.get(keys.JOB_KEY) == first.job.model_dump_json(indent=2).encode()
    finally:
        first.counter.close()
        second.counter.close()


def test_force_over_a_job_whose_planning_failed_waits_for_its_workers(tmp_path, redis_server, monkeypatch):
    """A job whose planning failed is finished for status, but its other units' shards are still being embedded:
    --force deleted its files at once, and those workers' late writes landed in the new job's OUT."""
    from bulkembed.producer import submit
    from bulkembed.producer.submit import stop_job
    from tests.contract.test_open_jobs import job

    registry = JobRegistry.from_url(redis_server)
    spec = job(tmp_path, "bulkembed.test-force-failed")
    registry.start(spec, 2)
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=3, docs=3, tokens=9))
    registry.planning_failed(spec.job_id, 1, "cannot read b.parquet")
    assert registry.status(spec.job_id).finished
    monkeypatch.setattr(submit, "STOPPING_S", 1.0)
    started = time.monotonic()
    stop_job(registry, spec.job_id)
    assert time.monotonic() - started >= 1.0 and registry.status(spec.job_id) is None
