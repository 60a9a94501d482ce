"""Where everything lives: object keys under a job's OUT, and Redis keys of the job registry.

Everything but the embedding files starts with "_", which pyarrow's dataset discovery skips, so
`pyarrow.dataset.dataset(OUT, format="arrow")` reads exactly the embeddings.
"""

import re

# A shard is named by its planning unit and its place in it ("000012-000003"), so planners of different units never
# need a common counter; its number is unit * SHARDS_PER_UNIT + place, one integer for messages and Redis.
SHARDS_PER_UNIT = 1_000_000
SHARD_INPUT_KEY = "_shards/{name}.arrow"
SHARD_OUTPUT_KEY = "{name}.arrow"
REUSED_OUTPUT_KEY = "reused-{index:06d}.arrow"  # rows copied from the index-th embedding file of PREV_OUT
REUSED_OUTPUT_PREFIX = REUSED_OUTPUT_KEY.split("{")[0]  # "reused-": one listing finds the copies
REJECTED_KEY = "_rejected/{name}.arrow"
MANIFEST_KEY = "_manifest.json"  # a small summary; the shards are listed in MANIFEST_SHARDS_KEY
MANIFEST_SHARDS_KEY = "_manifest/shards.parquet"  # one row per written shard (ShardResult's fields)
JOB_KEY = "_job.json"
PLAN_PREFIX = "_plan/"  # what planning leaves for planners and the manifest: duplicate ids, reused files
DUPLICATES_KEY = "_plan/duplicates.parquet"  # every row whose id an earlier row has (ordinal, first), by ordinal
REUSED_KEYS_PREFIX = "_plan/reused-keys/"  # each unit's --reuse matches (reused_keys)
REUSED_FILES_KEY = "_plan/reused.json"  # the files copied from PREV_OUT (--reuse), as ReusedFile records

# Every key a job writes under OUT, for --force to delete exactly those (and nothing else there). Unit numbers are
# padded to 6 digits and simply grow past 999999, so the pattern takes 6 or more; it also takes the plain shard
# numbers of jobs planned before units.
JOB_OUTPUT_KEY = re.compile(r"^((reused-)?\d{6,}\.arrow|\d{6,}-\d{6}\.arrow|_manifest\.json|_manifest/shards\.parquet"
                            r"|_job\.json|_shards/\d{6,}(-\d{6})?\.arrow|_rejected/[\w-]+\.arrow|_plan/[\w./-]+)$")

REDIS_JOB = "bulkembed:job:{job_id}"  # hash: spec, totals, state
REDIS_JOB_DONE = "bulkembed:job:{job_id}:done"  # hash: shard -> result json
REDIS_JOB_FAILED = "bulkembed:job:{job_id}:failed"  # hash: shard -> error
REDIS_JOB_ATTEMPTS = "bulkembed:job:{job_id}:attempts"  # hash: shard -> deliveries started
REDIS_JOB_UNITS = "bulkembed:job:{job_id}:units"  # hash: unit -> its planning totals, once all its shards are queued
REDIS_JOB_QUEUED = "bulkembed:job:{job_id}:queued"  # hash: unit -> how many of its shards are queued so far
# hash: what `bulkembed cancel` left of a job it forgot (when, its state and shards then, its spec), for `status`;
# expires after the retention, deleted when the job is submitted again.
REDIS_JOB_CANCELLED = "bulkembed:cancelled:{job_id}"
REDIS_PLAN_LOCK = "bulkembed:plan-lock:{job_id}:{unit}"  # held by the one planner planning a unit
# hash: worker -> "engines expiry": the engines serving a model's queue, which bound how long planners let it grow.
REDIS_QUEUE_ENGINES = "bulkembed:engines:{queue}"
REDIS_WRITE_LOCK = "bulkembed:write-lock:{key}"  # a store URI/key written if absent where the store cannot
# list: ids of the jobs on a model's queue that still have unfinished shards. KEDA's second trigger
# reads its length: while it is not empty a worker stays up to restore an orphaned shard.
REDIS_QUEUE_OPEN_JOBS = "bulkembed:open-jobs:{queue}"
# list: ids of the jobs whose units are queued for planners and whose planning is not closed, or whose manifest is
# being written. KEDA keeps a planner up while it is not empty: a planner stopped inside a unit hands the unit back,
# and one must be there to take it; the planner writing a manifest must not be scaled away.
REDIS_PLANNING_JOBS = "bulkembed:planning-jobs"


def shard_number(unit: int, place: int) -> int:
    if place >= SHARDS_PER_UNIT:
        raise ValueError(f"unit {unit} cut into more than {SHARDS_PER_UNIT} shards: plan with fewer rows a unit "
                         f"(BULKEMBED_UNIT_ROWS)")
    return unit * SHARDS_PER_UNIT + place


def unit_shards(unit: int, count: int) -> list[int]:
    """The numbers of a unit's `count` shards."""
    return [shard_number(unit, place) for place in range(count)]


def shard_name(shard: int) -> str:
    unit, place = divmod(shard, SHARDS_PER_UNIT)
    return f"{unit:06d}-{place:06d}"


def unit_outputs(unit: int) -> str:
    """The prefix of every embedding file of a unit's shards: one listing finds those written."""
    return f"{unit:06d}-"


def reused_keys(unit: int) -> str:
    """A unit's --reuse matches (16-byte row keys): PREV_OUT's rows are copied from them once every unit is planned,
    and again should OUT lose a copy."""
    return f"{REUSED_KEYS_PREFIX}{unit:06d}.arrow"


def shard_input(shard: int) -> str:
    return SHARD_INPUT_KEY.format(name=shard_name(shard))


def shard_output(shard: int) -> str:
    return SHARD_OUTPUT_KEY.format(name=shard_name(shard))


def reused_output(index: int) -> str:
    return REUSED_OUTPUT_KEY.format(index=index)


def shard_rejected(shard: int) -> str:
    return REJECTED_KEY.format(name=f"shard-{shard_name(shard)}")


def rejected(name: str) -> str:
    return REJECTED_KEY.format(name=name)
