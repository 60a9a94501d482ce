"""Where everything lives: object keys under a job's OUT, and Redis keys of the job registry.

Everything but the embedding files starts with "_", which pyarrow's dataset discovery skips, so
`pyarrow.dataset.dataset(OUT, format="arrow")` reads exactly the embeddings.
"""

import re

SHARD_INPUT_KEY = "_shards/{shard:06d}.arrow"
SHARD_OUTPUT_KEY = "{shard:06d}.arrow"
REUSED_OUTPUT_KEY = "reused-{index:06d}.arrow"  # rows copied from the index-th embedding file of PREV_OUT
REJECTED_KEY = "_rejected/{name}.arrow"
MANIFEST_KEY = "_manifest.json"
JOB_KEY = "_job.json"

# Every key a job writes under OUT, for --force to delete exactly those (and nothing else there).
# Shard numbers are padded to 6 digits and simply grow past 999999, so the pattern takes 6 or more.
JOB_OUTPUT_KEY = re.compile(r"^((reused-)?\d{6,}\.arrow|_manifest\.json|_job\.json|_shards/\d{6,}\.arrow"
                            r"|_rejected/[\w-]+\.arrow)$")

REDIS_JOB = "bulkembed:job:{job_id}"  # hash: spec, totals, state
REDIS_JOB_DONE = "bulkembed:job:{job_id}:done"  # hash: shard -> result json
REDIS_JOB_FAILED = "bulkembed:job:{job_id}:failed"  # hash: shard -> error
REDIS_JOB_ATTEMPTS = "bulkembed:job:{job_id}:attempts"  # hash: shard -> deliveries started
REDIS_SHARD_LOCK = "bulkembed:lock:{job_id}:{shard}"  # for stores without conditional writes
# list: ids of the jobs on a model's queue that still have unfinished shards. KEDA's second trigger
# reads its length: while it is not empty a worker stays up to restore an orphaned shard.
REDIS_QUEUE_OPEN_JOBS = "bulkembed:open-jobs:{queue}"


def shard_input(shard: int) -> str:
    return SHARD_INPUT_KEY.format(shard=shard)


def shard_output(shard: int) -> str:
    return SHARD_OUTPUT_KEY.format(shard=shard)


def reused_output(index: int) -> str:
    return REUSED_OUTPUT_KEY.format(index=index)


def shard_rejected(shard: int) -> str:
    return REJECTED_KEY.format(name=f"shard-{shard:06d}")


def rejected(name: str) -> str:
    return REJECTED_KEY.format(name=name)
