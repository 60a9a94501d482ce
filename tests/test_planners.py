"""Planning as distributed work, with real planner, worker, Redis and S3 processes: a job of many units planned by
two planners; a planner killed mid-unit and a submitting process killed mid-plan, their units taken over without
re-planning finished ones; planners held back by the queue's length; a job cancelled mid-plan. Every row ends up
once in the output and every shard is embedded once."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import redis

from bulkembed.contract import keys
from bulkembed.contract.schema import from_ipc_bytes, to_ipc_bytes
from bulkembed.contract.store import open_store
from tests.conftest import Workers, mixed_texts, write_corpus
from tests.faults_support import (
    Holds,
    attempts,
    check_exactly_once,
    check_vectors,
    cli,
    kill_tree,
    wait_until,
)

QUEUE = "bulkembed.tiny-embeddings-text-retrieval-f32"
UNIT_LOG = re.compile(r"job \w+ unit (\d+): (\d+) shards")


def write_files(folder: Path, rows_per_file: list[int], row_group: int = 100) -> list[str]:
    """One Parquet file per entry, row groups of `row_group` rows; ids unique across files."""
    folder.mkdir(parents=True)
    ids: list[str] = []
    for index, rows in enumerate(rows_per_file):
        file_ids = [f"f{index}-{i:05d}" for i in range(rows)]
        write_corpus(folder / f"part-{index}.parquet", file_ids, mixed_texts(rows, seed=index, long_every=10**9),
                     row_group_size=row_group)
        ids += file_ids
    return ids


def planned_units(log: str) -> dict[int, int]:
    """unit -> shards, from a planner's (or submit's) log."""
    return {int(unit): int(shards) for unit, shards in UNIT_LOG.findall(log)}


def status(env: dict[str, str], job_id: str) -> dict:
    done = cli(env, "status", job_id, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_two_planners_share_a_job_and_every_row_is_embedded_once(tmp_path, bucket, pool, background, fault_env,
                                                                   tiny_model, reference_embedder):
    """Ten units, two planners, one worker, OUT on the S3 endpoint: each unit planned by one planner, every row once
    and exact, every shard embedded once, the shard inputs gone once the job is done."""
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "200"}
    ids = write_files(tmp_path / "in", [400, 400, 400, 400, 300])  # 2 + 2 + 2 + 2 + 2 units
    out = f"s3://{bucket}/out"
    planners = [pool.start_planner(env=env) for _ in range(2)]
    pool.start(tiny_model)
    submit = background(["submit", tmp_path / "in", "--model", tiny_model, "--out", out, "--shard-tokens", "1500",
                         "--queue-only", "--wait"], env, "submit")
    assert submit.wait(180) == 0, submit.stderr[-3000:]
    manifest = check_exactly_once(out, ids)
    check_vectors(out, tmp_path / "in", reference_embedder)  # every file of the folder
    by_planner = [planned_units(p.log.read_text()) for p in planners]
    assert all(by_planner), f"both planners planned units: {by_planner}"
    assert sorted(by_planner[0] | by_planner[1]) == list(range(10))
    assert not set(by_planner[0]) & set(by_planner[1]), "each unit planned once"
    assert planned_units(submit.stderr) == {}, "--queue-only: the submitting process planned nothing"
    shards = sum(by_planner[0].values()) + sum(by_planner[1].values())
    assert manifest["shard_count"] == shards and set(attempts(fault_env["BULKEMBED_REDIS_URL"],
                                                              manifest["job_id"]).values()) == {1}, \
        "every shard embedded once"
    assert open_store(out).list("_shards/") == [], "a done job's shard inputs are deleted"


def queue_length(url: str) -> int:
    return int(redis.Redis.from_url(url).llen(QUEUE))


def test_a_planner_killed_mid_unit_is_taken_over_and_finished_units_are_not_planned_again(
        tmp_path, pool, background, fault_env, tiny_model):
    """Two small units then a big one; the queue may hold 12 shards (no worker yet), so the planner queues the small
    units whole and stops inside the big one, where it is killed with SIGKILL. A second planner waits out the first
    one's lock, plans only the rest of the big unit, and the job completes with each shard queued and embedded once."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "60", "BULKEMBED_QUEUE_MIN": "12", "BULKEMBED_PLAN_LOCK_S": "3"}
    ids = write_files(tmp_path / "in", [60, 60, 900], row_group=1000)  # a unit a file: one row group each
    out = tmp_path / "out"
    first = pool.start_planner(env=env)
    submit = background(["submit", tmp_path / "in", "--model", tiny_model, "--out", out, "--shard-tokens", "1500",
                         "--queue-only", "--wait"], env, "submit")
    job_id = wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]
    wait_until(lambda: status(env, job_id)["units_planned"] == 2 and queue_length(url) == 12, 60,
               "the small units planned, the planner held back inside the big one")
    before = planned_units(first.log.read_text())
    assert sorted(before) == [0, 1] and sum(before.values()) < 12, before
    kill_tree(first, signal.SIGKILL)
    stored = (out / keys.shard_input(keys.shard_number(2, 0))).read_bytes()  # inputs stay until the job is done
    assert len(stored) < 0.8 * len(to_ipc_bytes(from_ipc_bytes(stored))), "shard inputs are zstd-compressed"
    queued = int(redis.Redis.from_url(url).hget(keys.REDIS_JOB_QUEUED.format(job_id=job_id), "2"))
    assert queued == 12 - sum(before.values()), "the big unit's shards queued so far are recorded"
    assert queue_length(url) == 12, "held back at BULKEMBED_QUEUE_MIN"

    second = pool.start_planner(env=env)
    pool.start(tiny_model)
    assert submit.wait(180) == 0, submit.stderr[-3000:]
    manifest = check_exactly_once(str(out), ids)
    after = planned_units(second.log.read_text())
    assert sorted(after) == [2], "finished units are not planned again"
    shards = sum(before.values()) + after[2]
    assert manifest["shard_count"] == shards
    assert set(attempts(url, job_id).values()) == {1} and len(attempts(url, job_id)) == shards, \
        "every shard queued once and embedded once"


def held_back(tmp_path: Path, pool, background, model: Path, env: dict[str, str]) -> tuple:
    """A planner held back inside the one unit of a 600-row job (the queue at BULKEMBED_QUEUE_MIN = 4, no worker):
    (planner, submit --wait, job id, ids, OUT)."""
    env = env | {"BULKEMBED_QUEUE_MIN": "4"}
    ids = write_files(tmp_path / "in", [600], row_group=600)
    out = tmp_path / "out"
    planner = pool.start_planner(env=env)
    submit = background(["submit", tmp_path / "in", "--model", model, "--out", out, "--shard-tokens", "1500",
                         "--queue-only", "--wait"], env, "submit")
    job_id = wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]
    wait_until(lambda: queue_length(env["BULKEMBED_REDIS_URL"]) == 4, 60, "the planner held back")
    return planner, submit, job_id, ids, out


def test_a_planner_held_back_past_the_shard_time_limit_keeps_its_unit(tmp_path, pool, background, fault_env,
                                                                      tiny_model):
    """BULKEMBED_TASK_TIME_LIMIT bounds one shard on a worker; a planner's unit waits on back-pressure for as long as
    the workers take. Held back for twice that limit, the planner keeps its unit and finishes it once workers come.
    Before, Celery killed it at the limit, and the unit came back only after the visibility timeout, to be read again
    from its first row."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    planner, submit, job_id, ids, out = held_back(tmp_path, pool, background, tiny_model,
                                                  fault_env | {"BULKEMBED_TASK_TIME_LIMIT": "3"})
    time.sleep(6)
    log = planner.log.read_text()
    assert "Hard time limit" not in log and "WorkerLostError" not in log, log[-3000:]
    pool.start(tiny_model)
    assert submit.wait(180) == 0, submit.stderr[-3000:]
    manifest = check_exactly_once(str(out), ids)
    assert list(planned_units(planner.log.read_text())) == [0] and manifest["shard_count"] > 4
    assert set(attempts(url, job_id).values()) == {1}, "every shard queued once and embedded once"


def test_a_planner_stopped_while_held_back_hands_its_unit_back(tmp_path, pool, background, fault_env, tiny_model):
    """SIGTERM to a planner held back inside a unit (KEDA scaling planners down at a job's tail, with the plan queue
    empty): it hands the unit back to the plan queue and exits at once, and another planner finishes the unit without
    queueing a shard twice. Before, Celery's warm shutdown waited for the unit (for hours, held back) until the pod
    was killed, and the unit came back only after the visibility timeout. While the job is planned it is listed for
    KEDA, which keeps a planner up to take such a unit."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    first, submit, job_id, ids, out = held_back(tmp_path, pool, background, tiny_model, fault_env)
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.lrange(keys.REDIS_PLANNING_JOBS, 0, -1) == [job_id], "listed while it is planned"
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, first.log.read_text()[-3000:]
    assert "the unit goes back to the plan queue" in first.log.read_text()
    second = pool.start_planner(env=fault_env | {"BULKEMBED_QUEUE_MIN": "4"})
    pool.start(tiny_model)
    assert submit.wait(180) == 0, submit.stderr[-3000:]
    manifest = check_exactly_once(str(out), ids)
    assert list(planned_units(second.log.read_text())) == [0] and manifest["shard_count"] > 4
    assert set(attempts(url, job_id).values()) == {1}, "every shard queued once and embedded once"
    assert client.lrange(keys.REDIS_PLANNING_JOBS, 0, -1) == [], "no longer listed once planned"


def test_a_cancelled_job_stops_drops_its_queued_shards_and_the_same_submit_resumes_it(tmp_path, pool, background,
                                                                                      fault_env, tiny_model):
    """`bulkembed cancel` on a job mid-plan (its planner held back inside its one unit, four shards queued, no worker
    yet): `submit --wait` exits 1 saying so, the planner stops planning it, no KEDA list holds it, and a worker drops
    its queued shards without embedding them; what it wrote stays, and the same submit command resumes it to a whole
    output. Before, stopping a job took `submit --force` (which deletes its output) or redis-cli."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    env = fault_env | {"BULKEMBED_PLAN_LOCK_S": "3", "BULKEMBED_QUEUE_MIN": "4", "BULKEMBED_JOB_RETENTION_S": "900"}
    planner, submit, job_id, ids, out = held_back(tmp_path, pool, background, tiny_model, env)
    listing = cli(env, "status")  # every job this Redis knows: this one
    assert listing.returncode == 0 and listing.stdout.startswith(f"{job_id}  planning   shards 0/"), listing
    assert listing.stdout.count("\n") == 1 and f"{tmp_path / 'in'} → {out}" in listing.stdout, listing.stdout
    cancelled = cli(env, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    assert f"job {job_id} cancelled while planning (shards written 0/?)" in cancelled.stdout, cancelled.stdout
    assert submit.wait(30) == 1, submit.stderr[-2000:]
    assert re.search(rf"job {job_id}: cancelled [\d-]+ [\d:]+Z while planning \(shards written 0/\?\)",
                     submit.stderr), submit.stderr[-2000:]
    wait_until(lambda: f"job {job_id} is no longer in Redis" in planner.log.read_text(), 30,
               "the planner to stop at its next look")
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.lrange(keys.REDIS_PLANNING_JOBS, 0, -1) == []
    assert client.lrange(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=QUEUE), 0, -1) == []
    assert 0 < client.ttl(keys.REDIS_JOB_CANCELLED.format(job_id=job_id)) <= 900, "kept for the job's retention"
    assert len(open_store(str(out)).list("_shards/")) >= 4, "the shard inputs it wrote stay"

    worker = pool.start(tiny_model)
    wait_until(lambda: queue_length(url) == 0, 60, "the worker to take the cancelled job's shards")
    wait_until(lambda: worker.log.read_text().count("dropped, not written") == 4, 30, "the four shards dropped")
    assert not list(out.glob("*.arrow")), "no shard of a cancelled job is embedded"
    for command in ("status", "cancel"):  # what cancel kept of it, until the job's retention ends
        again = cli(env, command, job_id)
        assert again.returncode == 0 and f"job {job_id}: cancelled" in again.stdout, again
        assert f"what it wrote stays in {out}, and submitting it again resumes it" in again.stdout
    assert status(env, job_id)["state"] == "cancelled"
    listing = cli(env, "status").stdout
    assert listing.startswith(f"{job_id}  cancelled  shards 0/?  was planning  cancelled ") and \
        listing.count("\n") == 1, listing

    again = cli(env, "submit", tmp_path / "in", "--model", tiny_model, "--out", out, "--shard-tokens", "1500",
                "--queue-only", "--wait", timeout_s=180)
    assert again.returncode == 0 and again.stdout.split()[0] == job_id, again.stderr[-3000:]
    check_exactly_once(str(out), ids)
    done = cli(env, "cancel", job_id)
    assert done.returncode == 0 and f"job {job_id} is done (every shard written): nothing to cancel" in done.stdout
    assert status(env, job_id)["state"] == "done", "a done job is left as it is"
    listed = [json.loads(line) for line in cli(env, "status", "--json").stdout.splitlines()]
    assert [(job["job_id"], job["state"], job["out"]) for job in listed] == [(job_id, "done", str(out))], \
        "submitted again, it is no longer listed as cancelled"


def test_a_submit_planning_a_job_that_is_cancelled_ends_saying_so(tmp_path, pool, background, fault_env, tiny_model):
    """`submit --wait` (planning the job itself, held back inside its unit) when the job is cancelled: exit 1 with the
    cancelled line, as for one that waits on planners. Before: exit 2 and a line listing every way a job leaves Redis.
    And `cancel` of a job whose keys expired while it was listed for KEDA removes the entry and says so (exit 0)."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    env = fault_env | {"BULKEMBED_QUEUE_MIN": "4", "BULKEMBED_PLAN_LOCK_S": "3"}
    write_files(tmp_path / "in", [600], row_group=600)
    submit = background(["submit", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out",
                         "--shard-tokens", "1500", "--wait"], env, "submit")
    job_id = wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]
    wait_until(lambda: queue_length(url) == 4, 60, "submit held back mid-plan")
    assert cli(env, "cancel", job_id).returncode == 0
    assert submit.wait(60) == 1, submit.stderr[-2000:]
    assert submit.stderr.strip().splitlines()[-1].startswith(f"job {job_id}: cancelled "), submit.stderr[-2000:]

    redis.Redis.from_url(url).rpush(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=QUEUE), "0123456789abcdef")
    stranded = cli(env, "cancel", "0123456789abcdef")
    assert stranded.returncode == 0 and "1 KEDA entries of it, which kept a worker up, are removed" in \
        stranded.stdout, stranded
    assert redis.Redis.from_url(url).llen(keys.REDIS_QUEUE_OPEN_JOBS.format(queue=QUEUE)) == 0


def test_the_submitting_process_killed_mid_plan_leaves_its_units_to_planners(tmp_path, pool, background, fault_env,
                                                                             tiny_model):
    """`submit` plans units itself (beside planners); killed with SIGKILL while planning, the units it had queued for
    planners are planned by a planner started afterwards, the one it was inside once its lock lapses."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "100", "BULKEMBED_QUEUE_MIN": "6", "BULKEMBED_PLAN_LOCK_S": "3"}
    ids = write_files(tmp_path / "in", [300, 300])
    out = tmp_path / "out"
    submit = background(["submit", tmp_path / "in", "--model", tiny_model, "--out", out, "--shard-tokens", "1500"],
                        env, "submit")
    job_id = wait_until(lambda: submit.stdout.split()[:1], 60, "submit to print the job id")[0]
    wait_until(lambda: queue_length(url) == 6, 60, "submit held back mid-plan")
    kill_tree(submit.process, signal.SIGKILL)
    assert status(env, job_id)["state"] == "planning"

    pool.start_planner(env=env)
    pool.start(tiny_model)
    wait_until(lambda: status(env, job_id)["state"] == "done", 180, "the job done, its manifest written by a planner")
    manifest = check_exactly_once(str(out), ids)
    assert set(attempts(url, job_id).values()) == {1} and len(attempts(url, job_id)) == manifest["shard_count"]


def test_a_unit_that_cannot_be_planned_fails_the_job_with_its_reason(tmp_path, pool, background, fault_env,
                                                                     tiny_model):
    """A file replaced by garbage after submit queued its units: the planner reports the job failed, naming the
    unit and the error, and `submit --wait` exits 1 with it instead of waiting forever."""
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "100"}
    write_files(tmp_path / "in", [200])
    submit = background(["submit", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out",
                         "--queue-only", "--wait"], env, "submit")
    wait_until(lambda: status(env, submit.stdout.split()[0])["units"] == 2 if submit.stdout else False, 60,
               "the units queued")
    (tmp_path / "in" / "part-0.parquet").write_bytes(b"PAR1 not parquet at all")
    pool.start_planner(env=env)
    assert submit.wait(120) == 1
    assert re.search(r"failed while planning: unit [01]: ArrowInvalid: Parquet magic bytes", submit.stderr), \
        submit.stderr[-2000:]
    job_id = submit.stdout.split()[0]
    plain = cli(env, "status", job_id)  # says why, as --json and --wait do
    assert plain.returncode == 0 and re.search(r"failed while planning: unit [01]: ArrowInvalid", plain.stdout), \
        plain.stdout
    # Failed is finished: the job's keys go after the retention, as a done job's do (they stayed for ever).
    client = redis.Redis.from_url(env["BULKEMBED_REDIS_URL"])
    assert client.ttl(keys.REDIS_JOB.format(job_id=job_id)) > 0


def test_a_done_job_submitted_again_writes_what_out_lost(tmp_path, pool, fault_env, tiny_model, reference_embedder):
    """A done job whose output lost files since (deleted by hand, by a lifecycle rule) is submitted again while Redis
    still knows it: only the lost shards are embedded again (their units are planned again: a done job's shard inputs
    are gone), the files still there are not touched, and the manifest and counters are whole. Before, the second
    submit reported the job done at once, over the missing files."""
    env = fault_env | {"BULKEMBED_UNIT_ROWS": "100"}
    ids = write_files(tmp_path / "in", [300])  # 3 units
    out = tmp_path / "out"
    pool.start(tiny_model)
    args = ("submit", tmp_path / "in", "--model", tiny_model, "--out", out, "--shard-tokens", "1500", "--wait")
    first = cli(env, *args, timeout_s=180)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = first.stdout.split()[0]
    files = sorted(out.glob("0*.arrow"))
    lost = [files[1], next(p for p in files if p.name.startswith("000002-"))]
    kept = {p: p.stat().st_mtime_ns for p in files if p not in lost}
    for path in lost:
        path.unlink()

    again = cli(env, *args, timeout_s=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "OUT lost 2 shard files and 0 reused files" in again.stderr and "planning 2 units again" in again.stderr
    assert all(path.exists() for path in lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "the files still there are not written again"
    check_exactly_once(str(out), ids)
    check_vectors(str(out), tmp_path / "in", reference_embedder)
    embedded = set(attempts(env["BULKEMBED_REDIS_URL"], job_id))  # deliveries since the second submit
    assert {keys.shard_name(shard) for shard in embedded} == {path.stem for path in lost}, \
        "only the lost shards were embedded again"
    done = status(env, job_id)
    assert done["state"] == "done" and done["rows_done"] == len(ids) and done["shards_done"] == len(files)
    assert done["totals"]["docs"] == len(ids) and done["totals"]["shards"] == len(files), "planned counted once"
    assert cli(env, *args, timeout_s=180).stderr.count("OUT lost") == 0, "nothing lost: nothing planned again"


def test_a_planner_hands_its_unit_back_when_redis_refuses_writes(tmp_path, pool, background, fault_env, tiny_model):
    """Redis refuses writes (at maxmemory under noeviction, as in a failover or a full instance) while a planner
    queues a unit's shards: the planner waits until Redis takes writes again and hands the unit back, and the unit
    is finished without a shard queued twice. Before, the publish error failed the job, and recording that failure
    was refused too: the unit's message was acknowledged and lost, and the job stayed `planning` for ever."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    env = fault_env | {"BULKEMBED_PLAN_LOCK_S": "3"}
    planner, submit, job_id, ids, out = held_back(tmp_path, pool, background, tiny_model, env)
    client = redis.Redis.from_url(url, decode_responses=True)
    with client.pipeline() as pipe:  # one step: the planner is let go, and its next write is refused
        registry = keys.REDIS_QUEUE_ENGINES.format(queue=QUEUE)
        pipe.hset(registry, "a-test", f"100 {time.time() + 600:.0f}").config_set("maxmemory", 1).execute()
    wait_until(lambda: "handed back to the plan queue once Redis takes writes" in planner.log.read_text(), 60,
               "the planner to meet the refused write")
    time.sleep(2)
    assert status(env, job_id)["state"] == "planning"
    client.config_set("maxmemory", 0)
    client.hdel(registry, "a-test")
    pool.start(tiny_model)
    assert submit.wait(180) == 0, submit.stderr[-3000:]
    manifest = check_exactly_once(str(out), ids)
    assert manifest["shard_count"] > 4
    assert set(attempts(url, job_id).values()) == {1}, "every shard queued once and embedded once"
    assert "command not allowed when used memory > 'maxmemory'" in planner.log.read_text()


def test_a_running_job_submitted_again_queues_the_shards_whose_messages_redis_lost(tmp_path, fault_env, tiny_model):
    """Two queued shard messages vanish (a Redis crash losing its last second of writes, a purged queue): the job
    would wait for them for ever. Submitted again while a worker holds a third shard and the rest wait on the queue,
    it queues again exactly the two (from their inputs), and the job is done with every shard embedded once. Before,
    a resubmission queued again only failed shards, and the job waited for ever (KEDA keeping a GPU worker up)."""
    url = fault_env["BULKEMBED_REDIS_URL"]
    ids = write_files(tmp_path / "in", [300])
    args = ("submit", tmp_path / "in", "--model", tiny_model, "--out", tmp_path / "out", "--shard-tokens", "1500")
    first = cli(fault_env, *args, timeout_s=120)  # no worker yet: every shard waits on the queue
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = first.stdout.split()[0]
    client = redis.Redis.from_url(url)
    shards = client.llen(QUEUE)
    assert shards > 4 and client.lpop(QUEUE) and client.rpop(QUEUE)
    holds = Holds(tmp_path / "holds")
    workers = Workers(fault_env | holds.env, tmp_path)
    try:
        workers.start(tiny_model)
        held, _ = holds.wait()  # in the worker's hands: delivered, not acknowledged

        again = cli(fault_env, *args, timeout_s=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"job {job_id}: 2 shards were neither written nor queued" in again.stderr, again.stderr[-3000:]
        workers.start_planner()  # it writes the manifest
        holds.auto_release()
        wait_until(lambda: status(fault_env, job_id)["state"] == "done", 120, "the job done")
    finally:
        holds.stop()
        workers.stop_all()
    check_exactly_once(str(tmp_path / "out"), ids)
    counts = attempts(url, job_id)  # deliveries since the second submit: all but the held shard, once each
    assert held not in counts and len(counts) == shards - 1 and set(counts.values()) == {1}, counts
