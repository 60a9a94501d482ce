"""Test only (WorkerSettings.test_hold_dir): hold a shard just before its commit, or a pool process before it
starts its engine (as a slow model load would), so a fault test can kill or stop a worker at a known point instead
of guessing how long a shard or a load takes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bulkembed.contract.job import ShardMessage
from bulkembed.worker.shard import Guard

log = logging.getLogger(__name__)

POLL_S = 0.02


def hold_marker(folder: Path, job_id: str, shard: int) -> Path:
    """The file a held shard waits on, named with the pool process holding it; a test removes it to let
    the shard go on."""
    return folder / f"{job_id}-{shard:05d}-{os.getpid()}.held"


def holding(folder: Path | None, message: ShardMessage, guard: Guard) -> Guard:
    """`guard`, preceded by a wait on the shard's hold marker when `folder` is set."""
    if folder is None:
        return guard

    @contextmanager
    def held() -> Iterator[None]:
        marker = hold_marker(folder, message.job_id, message.shard)
        marker.touch()
        log.warning("job %s shard %d: held before its commit until %s is removed (test only)", message.job_id,
                    message.shard, marker)
        while marker.exists():
            time.sleep(POLL_S)
        with guard():
            yield

    return held


ENGINE_STARTS = "hold-engine-starts"  # in the folder: engine starts are held too (only where a test asks)


def hold_engine_start(folder: Path | None) -> None:
    """Wait, before this pool process starts its engine, until engine-start-<pid>.held is removed."""
    if folder is None or not (folder / ENGINE_STARTS).exists():
        return
    marker = folder / f"engine-start-{os.getpid()}.held"
    marker.touch()
    log.warning("engine start held until %s is removed (test only)", marker)
    while marker.exists():
        time.sleep(POLL_S)
