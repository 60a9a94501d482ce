"""The Celery wiring both sides share: task name and delivery settings for long shards on Redis."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable

import click
import redis
from celery import Celery

from bulkembed.contract.job import ShardMessage
from bulkembed.contract.settings import Settings

TASK_EMBED_SHARD = "bulkembed.embed_shard"  # on the model's queue (ModelRef.queue), served by GPU workers
TASK_PLAN_UNIT = "bulkembed.plan_unit"  # on PLAN_QUEUE, served by `bulkembed planner` (CPU)
TASK_FINALIZE_JOB = "bulkembed.finalize_job"  # on PLAN_QUEUE: the manifest is written off the GPU workers
PLAN_QUEUE = "bulkembed-plan"
WORKER_PROC_ALIVE_TIMEOUT_S = 900
KOMBU_UNACKED = "unacked"  # kombu's hash of the messages delivered and not acknowledged yet, every queue's
BROKER_SOCKET_TIMEOUT_S = 30.0  # far above any Redis answer; kombu's blocking pop waits 1 s at a time


def run_worker(app: Celery, argv: list[str]) -> int:
    """`celery worker ARGV` in this process, and its exit code: Celery.worker_main drops it, so a worker that stopped
    on an "Unrecoverable error" (kombu failing to restore its messages after a Redis restart, say) exited 0, and a
    supervisor that restarts only failures left it down."""
    from celery.bin.celery import celery

    celery.params[0].default = app  # as Celery.start does
    try:
        code = celery.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else 0


def celery_app(settings: Settings, name: str) -> Celery:
    """A Celery app on the settings' Redis. JSON only (never pickle from a broker); a shard is
    acknowledged after it is written, handed back if its process dies, and one worker holds one
    shard at a time. The hard time limit is below Redis's redelivery timeout (Settings checks it)."""
    url = settings.redis_url.get_secret_value()
    app = Celery(name, broker=url)
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        # TLS verified by default; the URL may say otherwise (?ssl_cert_reqs=none&ssl_ca_certs=...).
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_acks_on_timeout=False,  # a shard killed by the hard time limit goes back, and counts an attempt
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        # Look for orphaned (unacknowledged) shards often enough that they return near the timeout,
        # not up to 100 s later (kombu's default 10 s x 10 throttle).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            # A half-open connection (a Redis failed over or its node gone, no RST): without a timeout a publish or
            # an acknowledgement waits on it for ever (kombu passes None), and the worker with it.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_keepalive": True,
        },
        broker_connection_retry_on_startup=True,
        # A pool process is ready once its engine has loaded the model (seconds to minutes for a big GGUF); Celery's
        # default 4 s would kill every replacement of a dead engine mid-load, again and again.
        worker_proc_alive_timeout=WORKER_PROC_ALIVE_TIMEOUT_S,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def shard_sender(app: Celery, producer: object = None) -> Callable[[ShardMessage], None]:
    """Queue a shard on its model's queue. argsrepr: Celery would otherwise keep the arguments a second time, as
    their repr, in the message's headers."""
    return lambda m: app.send_task(TASK_EMBED_SHARD, args=[m.wire()], queue=m.job.model.queue, producer=producer,
                                   argsrepr=f"shard {m.shard}")


def shards_held(client: redis.Redis, queue: str, job_id: str) -> set[int]:
    """The job's shards Redis holds a message of: waiting on `queue`, or delivered and not acknowledged (a shard in a
    worker's hands, or waiting out a retry's countdown there). One snapshot of both; the queue is short (planners
    hold back), and so is the unacked hash (a message a worker's process). A message kombu has popped and not yet
    put in the unacked hash is in neither: a caller that queues such a shard again makes a duplicate delivery."""
    with client.pipeline() as pipe:  # MULTI
        waiting, delivered = pipe.lrange(queue, 0, -1).hvals(KOMBU_UNACKED).execute()
    held = set()
    for raw in [*waiting, *delivered]:
        try:
            message = json.loads(raw)
            if isinstance(message, list):  # an unacked entry: [message, exchange, routing key]
                message = json.loads(message[0]) if isinstance(message[0], str) else message[0]
            if message.get("headers", {}).get("task") != TASK_EMBED_SHARD:
                continue
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            shard = json.loads(body)[0][0]  # args[0]: ShardMessage.wire(), or the dict an older producer queued
            shard_job, number = (shard["job_id"], shard["shard"]) if isinstance(shard, dict) else shard[:2]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # not a message of ours: not a shard
            continue
        if shard_job == job_id:
            held.add(int(number))
    return held
