"""The registry's list of open jobs per queue, which KEDA's second trigger counts (infra/k8s/keda.yaml),
against a real Redis: a job is listed from when its submit queues work until its last shard is written or failed for
good."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from bulkembed.contract import keys
from bulkembed.contract.job import JobSpec, ModelRef, Role, Task
from bulkembed.contract.registry import JobRegistry, JobTotals, ShardResult


@pytest.fixture
def registry(redis_server: str) -> JobRegistry:
    return JobRegistry.from_url(redis_server)


@pytest.fixture
def queue() -> str:
    return f"bulkembed.test-{uuid.uuid4().hex[:8]}"


def job(tmp_path: Path, queue: str, name: str = "a") -> JobSpec:
    return JobSpec(input=name, input_fingerprint="f", out=str(tmp_path / name), task=Task.RETRIEVAL,
                   role=Role.PASSAGE, prefix="", shard_tokens=1000,
                   model=ModelRef(spec="m.gguf", file_name="m.gguf", sha256="0" * 64, queue=queue))


def result(shard: int) -> ShardResult:
    return ShardResult(shard=shard, key=keys.shard_output(shard), rows=1, tokens=3)


def plan(registry: JobRegistry, job_id: str, totals: JobTotals) -> bool:
    """The job's one unit planned with these totals, and its planning closed; True when it is complete."""
    registry.unit_planned(job_id, 0, totals)
    return registry.close_planning(job_id)


def listed(redis_url: str, queue: str) -> int:
    """What KEDA's redis trigger reads: LLEN of the listName."""
    return redis.Redis.from_url(redis_url).llen(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=queue))


def submitted(registry: JobRegistry, spec: JobSpec) -> None:
    """What submit does before it queues anything: register the job, then list it as open."""
    registry.start(spec, 1)
    registry.open(spec)


def test_a_job_is_open_from_submit_until_its_last_shard_is_written(registry, redis_server, queue, tmp_path):
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    submitted(registry, spec)  # submitted again: still listed once
    assert registry.open_jobs(queue) == [spec.job_id] and listed(redis_server, queue) == 1
    assert not plan(registry, spec.job_id, JobTotals(shards=2))
    assert not registry.shard_done(spec.job_id, result(0))
    assert registry.open_jobs(queue) == [spec.job_id], "a shard is still unfinished (queued or orphaned)"
    assert registry.shard_done(spec.job_id, result(1))
    assert listed(redis_server, queue) == 0, "nothing left to embed: the manifest is a planner's, not a GPU pod's"
    registry.finalize(spec.job_id)
    assert listed(redis_server, queue) == 0


def test_a_job_written_whole_before_its_planning_closes_gets_its_manifest_though_the_first_try_fails(
        registry, redis_server, queue, tmp_path, monkeypatch):
    """Workers wrote every shard while the last unit was still being planned (a resubmitted job; a small one): no
    worker sends the manifest task, so the planner that closes planning writes it. Should that fail (the store
    blinking: the planner's task is retried; Redis failing: it is handed back), the next try writes it, and no GPU
    pod is kept meanwhile. Before, the next try found planning closed and did nothing: the job stayed `finishing`
    and listed for KEDA for ever."""
    from bulkembed.contract import registry as registry_module
    from bulkembed.contract.errors import TransientError
    from bulkembed.contract.settings import ProducerSettings
    from bulkembed.producer.corpus import Piece, Unit
    from bulkembed.producer.submit import plan_claimed

    spec = job(tmp_path, queue)
    submitted(registry, spec)
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=2, docs=2, tokens=6))
    for shard in (0, 1):
        assert not registry.shard_done(spec.job_id, result(shard)), "planning is open: not complete yet"
    unit, write = Unit(0, (Piece(0, "c.parquet", 0, 1, 0, 2),)), registry_module.write_manifest
    context = SimpleNamespace(previous=None)  # what closing planning reads of a planner's context: no --reuse

    def store_blinks(*args, **kwargs):
        raise TransientError("PUT _manifest.json: SlowDown")

    monkeypatch.setattr(registry_module, "write_manifest", store_blinks)
    with pytest.raises(TransientError):
        plan_claimed(registry, spec, lambda: context, unit, lambda message: None, ProducerSettings())
    assert registry.status(spec.job_id).state == "finishing" and listed(redis_server, queue) == 0
    monkeypatch.setattr(registry_module, "write_manifest", write)
    assert plan_claimed(registry, spec, lambda: context, unit, lambda message: None, ProducerSettings())  # the retry
    assert registry.status(spec.job_id).state == "done"
    assert (tmp_path / spec.input / keys.MANIFEST_KEY).exists()


def test_a_job_failed_for_good_is_closed_and_reopened_when_resubmitted(registry, queue, tmp_path):
    spec, other = job(tmp_path, queue, "a"), job(tmp_path, queue, "b")
    submitted(registry, spec)
    submitted(registry, other)
    plan(registry, spec.job_id, JobTotals(shards=2))
    registry.shard_done(spec.job_id, result(0))
    registry.shard_failed(spec.job_id, 1, "poison")
    assert registry.open_jobs(queue) == [other.job_id]
    registry.plan_failed_again(spec.job_id)  # as submit does before it registers the job again
    submitted(registry, spec)
    assert registry.open_jobs(queue) == [other.job_id, spec.job_id]


def test_failures_before_the_job_is_fully_queued_close_it_when_it_is(registry, queue, tmp_path):
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    registry.shard_failed(spec.job_id, 0, "poison")
    assert registry.open_jobs(queue) == [spec.job_id], "more shards may still be queued"
    assert not plan(registry, spec.job_id, JobTotals(shards=1))
    assert registry.open_jobs(queue) == []


def test_a_forgotten_job_is_closed(registry, queue, tmp_path):
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    registry.forget(spec.job_id)
    assert registry.open_jobs(queue) == []


def test_a_job_is_done_only_once_its_manifest_is_written(registry, queue, tmp_path):
    """`submit --wait` and `status` say done when a reader can open _manifest.json, not when the last shard is
    recorded: between the two the job is finishing, not finished."""
    spec = job(tmp_path, queue)
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=1))
    assert registry.status(spec.job_id).state == "running"
    assert registry.shard_done(spec.job_id, result(0))
    status = registry.status(spec.job_id)
    assert status.state == "finishing" and not status.finished and status.shards_done == 1
    assert not (tmp_path / spec.input / keys.MANIFEST_KEY).exists()
    registry.finalize(spec.job_id)
    assert registry.status(spec.job_id).state == "done" and registry.status(spec.job_id).finished
    assert (tmp_path / spec.input / keys.MANIFEST_KEY).exists()


def test_a_job_whose_manifest_cannot_be_written_is_failed_not_finishing_forever(registry, queue, tmp_path):
    """The last shard written, then finalize failing for good (the store gone for longer than the outage budget):
    the worker reports the shard failed, and a waiter sees the job failed instead of waiting forever."""
    spec = job(tmp_path, queue)
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=2))
    registry.shard_done(spec.job_id, result(0))
    assert registry.shard_done(spec.job_id, result(1))
    registry.shard_failed(spec.job_id, 1, "the store kept failing for 1800s and 8 retries: ...")
    status = registry.status(spec.job_id)
    assert status.state == "failed" and status.finished and status.failures == {1: status.failures[1]}


def test_a_job_keeps_a_planner_while_its_manifest_is_written(registry, redis_server, queue, tmp_path, monkeypatch):
    """KEDA keeps a planner up while bulkembed:planning-jobs is not empty. Writing a big job's manifest takes minutes
    with the plan queue empty: the job is listed meanwhile, once per writer, so the planner writing it is not scaled
    away. A writer that fails takes its entry off; once one succeeds the job is done and every entry goes, a killed
    writer's too. `submit --wait`, not a pod, lists nothing. Before, the list was empty while the manifest was
    written."""
    from bulkembed.contract import registry as registry_module

    spec = job(tmp_path, queue)
    registry.start(spec, 1)
    plan(registry, spec.job_id, JobTotals(shards=1))
    assert registry.shard_done(spec.job_id, result(0))
    client = redis.Redis.from_url(redis_server, decode_responses=True)

    def listed_now() -> int:
        return client.lrange(keys.REDIS_PLANNING_JOBS, 0, -1).count(spec.job_id)

    assert listed_now() == 0
    seen: list[int] = []
    write = registry_module.write_manifest

    def writing(*args, **kwargs):
        seen.append(listed_now())
        if len(seen) == 1:
            raise OSError("the store failed")
        return write(*args, **kwargs)

    monkeypatch.setattr(registry_module, "write_manifest", writing)
    client.rpush(keys.REDIS_PLANNING_JOBS, spec.job_id)  # a writer killed mid-way (SIGKILL) left its entry
    with pytest.raises(OSError):
        registry.finalize(spec.job_id)
    assert listed_now() == 1, "a failed writer takes its own entry off, not another's"
    registry.finalize(spec.job_id, keep_planner=False)
    registry.finalize(spec.job_id)
    # The killed writer's entry and the first planner's; the killed writer's only (--wait lists nothing); the last
    # planner's only (the --wait write, done, took the killed writer's off).
    assert seen == [2, 1, 1]
    assert listed_now() == 0, "the job done: no entry left, the killed writer's neither"
    assert registry.status(spec.job_id).state == "done"


def test_no_planning_record_comes_back_after_planning_closed_or_the_job_is_forgotten(registry, queue, tmp_path):
    """A planner whose hold lapsed may still record a shard queued after another closed the job's planning (which
    deletes the record), or after submit --force forgot the job: the record is not made again, since nothing would
    ever expire it."""
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    registry.shard_queued(spec.job_id, 0, 4)
    assert registry.queued_shards(spec.job_id, 0) == 5, "recorded while planning"
    plan(registry, spec.job_id, JobTotals(shards=5))
    registry.shard_queued(spec.job_id, 0, 5)
    assert not registry.redis.exists(keys.REDIS_JOB_QUEUED.format(job_id=spec.job_id)), "closed: not made again"
    registry.forget(spec.job_id)
    registry.shard_queued(spec.job_id, 0, 6)
    assert not list(registry.redis.scan_iter(f"*{spec.job_id}*")), "forgotten: nothing made again"


def test_a_failed_shard_behind_a_half_planned_units_planner_is_returned_to_be_queued(registry, queue, tmp_path):
    """A unit half planned (its planner died, or is still at it) resumes after the shards it queued: a failed one
    among those is returned for the resubmit to queue from its input, and stays failed until then. Before, it was
    taken off the failed list and never queued again: the job ran for ever."""
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    first, second = keys.shard_number(0, 0), keys.shard_number(0, 1)
    registry.shard_queued(spec.job_id, 0, 0)
    registry.shard_queued(spec.job_id, 0, 1)
    registry.shard_failed(spec.job_id, first, "the store kept failing")
    assert registry.plan_failed_again(spec.job_id) == [first]
    assert registry.status(spec.job_id).failed == 1, "failed until it is queued again"
    registry.unfail(spec.job_id, [first])
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=2))
    registry.close_planning(spec.job_id)
    registry.shard_done(spec.job_id, result(first))
    assert registry.shard_done(spec.job_id, result(second)) and registry.status(spec.job_id).state == "finishing"


def test_a_written_failed_shard_whose_file_was_lost_keeps_the_counts_right(registry, queue, tmp_path):
    """A written shard reported failed (its manifest could not be written), its file then lost: planned again, it
    counts as failed only, so taking it off the failed list leaves the count at zero, and the job settles when it
    fails again. Before, the count went to -1 and the job ran for ever."""
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    first, second = keys.shard_number(0, 0), keys.shard_number(0, 1)
    plan(registry, spec.job_id, JobTotals(shards=2))
    registry.shard_done(spec.job_id, result(first))
    registry.shard_done(spec.job_id, result(second))
    registry.shard_failed(spec.job_id, second, "its manifest could not be written")
    registry.plan_again(spec.job_id, 0, [second])  # its file lost: a resubmit plans the unit again
    assert registry.plan_failed_again(spec.job_id) == []
    registry.start(spec, 1)
    assert int(registry.redis.hget(keys.REDIS_JOB.format(job_id=spec.job_id), "failed_only")) == 0
    plan(registry, spec.job_id, JobTotals(shards=2))
    registry.shard_failed(spec.job_id, second, "the store kept failing")
    assert registry.status(spec.job_id).state == "failed" and registry.open_jobs(queue) == []


def test_a_close_of_planning_cut_short_still_gets_the_manifest_written(registry, queue, tmp_path, monkeypatch):
    """Redis failing right after a complete job's planning closed (the planner's task is handed back): delivered
    again, it writes the manifest, since `manifest_due` was set in the same step as the close."""
    import redis as redis_client

    from bulkembed.producer.submit import close_if_planned

    spec = job(tmp_path, queue)
    submitted(registry, spec)
    registry.shard_done(spec.job_id, result(0))  # a resubmitted job: written whole already
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=1))
    delete = registry.redis.delete

    def restarting(*names):
        monkeypatch.setattr(registry.redis, "delete", delete)
        raise redis_client.ConnectionError("Redis restarted")

    monkeypatch.setattr(registry.redis, "delete", restarting)
    context = SimpleNamespace(previous=None)
    with pytest.raises(redis_client.ConnectionError):
        close_if_planned(registry, spec, lambda: context)
    close_if_planned(registry, spec, lambda: context)  # the task delivered again
    assert registry.status(spec.job_id).state == "done"


def test_a_unit_taken_back_by_a_resubmit_keeps_planning_open(registry, queue, tmp_path):
    """A resubmit takes a planned unit back (its failed shards, or its lost files) while another process is about to
    close planning (copying --reuse rows takes minutes): planning is open again in the same step, and that late
    close does nothing. Before, it closed the job short of the unit's shards, complete before they were written."""
    spec = job(tmp_path, queue)
    registry.start(spec, 2)
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=1))
    registry.unit_planned(spec.job_id, 1, JobTotals(shards=2))
    assert registry.all_units_planned(spec.job_id)  # the closer's look, before it copies
    registry.shard_done(spec.job_id, result(0))
    registry.plan_again(spec.job_id, 1, [], always=True)  # the resubmit
    assert not registry.close_planning(spec.job_id), "the late close"
    status = registry.status(spec.job_id)
    assert status.state == "planning" and status.totals is None and registry.planning_open(spec.job_id)
    registry.unit_planned(spec.job_id, 1, JobTotals(shards=2))
    assert not registry.close_planning(spec.job_id)
    assert not registry.close_planning(spec.job_id), "closed once"
    assert registry.status(spec.job_id).totals.shards == 3


def test_a_finished_job_with_a_unit_taken_back_is_not_finishing(registry, queue, tmp_path):
    """A unit of a finished job taken back (a resubmit, killed right after): the job reads as being planned, not as
    finishing with nobody to write its manifest."""
    spec = job(tmp_path, queue)
    submitted(registry, spec)
    plan(registry, spec.job_id, JobTotals(shards=1))
    registry.shard_done(spec.job_id, result(0))
    registry.finalize(spec.job_id)
    registry.plan_again(spec.job_id, 0, [0])
    assert registry.status(spec.job_id).totals is None and registry.planning_open(spec.job_id)


def test_a_job_whose_planning_failed_stays_failed_though_its_other_units_are_planned(registry, queue, tmp_path):
    """Unit 1's planning failed (the model missing on its planner); a planner that has it then plans unit 1 (a
    duplicate delivery) and the job's shards are written. It stays failed, its error said, until it is submitted
    again: its planning used to close as if nothing had failed, and the job went running, then done, with the error
    still beside the state (`submit --wait` exited 0, or 1 if it looked in between)."""
    spec = job(tmp_path, queue)
    registry.start(spec, 2)
    registry.open(spec)
    registry.unit_planned(spec.job_id, 0, JobTotals(shards=1))
    registry.planning_failed(spec.job_id, 1, "ModelError: no model")
    registry.unit_planned(spec.job_id, 1, JobTotals(shards=1))
    assert not registry.close_planning(spec.job_id)
    for shard in (0, 1):
        registry.shard_done(spec.job_id, result(shard))
    status = registry.status(spec.job_id)
    assert (status.state, status.error) == ("failed", "unit 1: ModelError: no model")
    assert registry.open_jobs(queue) == []
    registry.start(spec, 2)  # submitted again: its planning is open once more, the error gone
    assert registry.planning_error(spec.job_id) is None and registry.close_planning(spec.job_id)


def test_no_pod_is_kept_for_a_job_with_nothing_left_to_do(registry, redis_server, queue, tmp_path):
    """A submit lists its job for KEDA after sending its units: planners may have planned it whole, and workers
    written it, by then; a done job submitted again has nothing to embed. Neither is listed: each entry used to stay
    for ever (nothing else takes it off), a planner pod or a GPU pod kept up with it."""
    spec = job(tmp_path, queue)
    registry.start(spec, 1)
    assert plan(registry, spec.job_id, JobTotals(shards=0)) is True  # planned, closed and complete before it lists
    registry.units_queued(spec.job_id)
    registry.open(spec)
    assert redis.Redis.from_url(redis_server).lrange(keys.REDIS_PLANNING_JOBS, 0, -1).count(spec.job_id) == 0
    assert registry.open_jobs(queue) == []
    other = job(tmp_path, queue, "b")
    submitted(registry, other)
    plan(registry, other.job_id, JobTotals(shards=1))
    registry.shard_done(other.job_id, result(0))
    registry.finalize(other.job_id)
    assert registry.status(other.job_id).state == "done"
    submitted(registry, other)  # a done job submitted again, nothing of it lost
    assert registry.open_jobs(queue) == []


def settle(registry: JobRegistry, spec: JobSpec, shards: int, written: int, failed: int = 0) -> None:
    """The job submitted, planned into `shards` shards, `written` of them written and the next `failed` failed."""
    submitted(registry, spec)
    registry.units_queued(spec.job_id)
    plan(registry, spec.job_id, JobTotals(shards=shards))
    for shard in range(written):
        registry.shard_done(spec.job_id, result(shard))
    for shard in range(written, written + failed):
        registry.shard_failed(spec.job_id, shard, "for good")


def test_cancel_forgets_a_running_job_takes_it_off_the_lists_and_keeps_a_record(registry, redis_server, queue,
                                                                                 tmp_path):
    """`bulkembed cancel`: a running job is forgotten (its workers drop its shards: not registered) and no longer
    listed for KEDA's workers or planners; a record says it was cancelled, until the retention ends or the job is
    submitted again (or replaced by --force)."""
    running = job(tmp_path, queue, "running")
    settle(registry, running, shards=3, written=1, failed=1)  # one shard neither written nor failed
    assert registry.open_jobs(queue) == [running.job_id]
    assert registry.cancel(running.job_id) == ("cancelled", 0)
    assert not registry.is_registered(running.job_id) and registry.status(running.job_id) is None
    assert registry.open_jobs(queue) == [] and running.job_id not in registry.redis.lrange(keys.REDIS_PLANNING_JOBS,
                                                                                           0, -1)
    kept = registry.cancelled(running.job_id)  # for `status`, which would not know the job otherwise
    assert (kept.state, kept.shards_done, kept.shards, kept.spec) == ("running", 1, 3, running)
    assert 0 < registry.redis.ttl(keys.REDIS_JOB_CANCELLED.format(job_id=running.job_id)) <= registry.retention_s
    assert [job.job_id for job in registry.cancelled_jobs()] == [running.job_id]
    assert registry.cancel(running.job_id) == ("unknown", 0), "already forgotten"
    assert registry.cancelled(running.job_id) is not None, "the record stays"

    submitted(registry, running)  # submitted again: running, no longer cancelled (deleted by the same script)
    assert registry.cancelled(running.job_id) is None and registry.is_registered(running.job_id)
    registry.cancel(running.job_id)
    registry.forget(running.job_id)  # submit --force of another job into its OUT: its files are deleted
    assert registry.cancelled(running.job_id) is None, "a record saying its output stays would lie"


def test_cancel_leaves_a_job_done_finishing_or_settled_as_it_is(registry, queue, tmp_path):
    """A done job keeps its status; a finishing one (every shard written, its manifest not yet) would have no
    manifest until submitted again, and one failed with every shard settled would lose its list of failures. The
    look and the forgetting are one step: no last shard written in between can be forgotten with its job."""
    done, finishing, failed = (job(tmp_path, queue, name) for name in ("done", "finishing", "failed"))
    settle(registry, done, shards=1, written=1)
    registry.finalize(done.job_id)
    settle(registry, finishing, shards=2, written=2)
    settle(registry, failed, shards=2, written=1, failed=1)
    for spec, outcome in ((done, "done"), (finishing, "finishing"), (failed, "failed")):
        assert registry.cancel(spec.job_id) == (outcome, 0)
        assert registry.status(spec.job_id).state == outcome and registry.cancelled(spec.job_id) is None
    assert len(list(registry.failures(failed.job_id))) == 1


def test_cancel_takes_a_job_redis_no_longer_knows_off_every_queues_list(registry, redis_server, queue, tmp_path):
    """A job abandoned while listed (a resubmit killed while it queued lost shards again) whose keys have expired
    since: its entry would keep a GPU pod up for ever. cancel drops it though Redis holds no spec to name its queue."""
    stranded, other = job(tmp_path, queue, "stranded"), job(tmp_path, queue, "other")
    for spec in (stranded, other):
        submitted(registry, spec)
    registry.redis.delete(keys.REDIS_JOB.format(job_id=stranded.job_id))  # expired
    assert registry.open_jobs(queue) == [stranded.job_id, other.job_id]
    assert registry.cancel(stranded.job_id) == ("unknown", 1)
    assert registry.open_jobs(queue) == [other.job_id], "only the stranded entry is dropped"
    assert registry.cancel(stranded.job_id) == ("unknown", 0)


def test_jobs_lists_every_job_redis_knows_newest_first_and_not_their_other_hashes(tmp_path, fresh_redis, queue):
    """`bulkembed status` without a job: each job once (not its done, failed, units... hashes, which share its
    prefix), the last submitted first; a cancelled one is gone from the list."""
    registry = JobRegistry.from_url(fresh_redis.url)
    specs = [job(tmp_path, queue, name) for name in ("first", "second", "third")]
    for spec in specs:
        submitted(registry, spec)
        plan(registry, spec.job_id, JobTotals(shards=2))
        registry.shard_done(spec.job_id, result(0))
        if spec is not specs[1]:  # the one to be cancelled stays unsettled (a settled job is not cancelled)
            registry.shard_failed(spec.job_id, 1, "for good")
        time.sleep(0.01)
    registry.cancel(specs[1].job_id)
    listed_jobs = registry.jobs()
    assert [spec.job_id for _, spec in listed_jobs] == [specs[2].job_id, specs[0].job_id]
    assert listed_jobs[0][0] > listed_jobs[1][0] > time.time() - 60
