"""The `bulkembed` command: run, submit, planner, worker, status, embed, eval, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import time
from datetime import UTC, datetime
from typing import NoReturn

from bulkembed.bench.cli import add_bench_parser
from bulkembed.contract import keys
from bulkembed.contract.errors import GONE_WHY, BulkEmbedError, JobGone
from bulkembed.contract.job import Dtype, Overlength, Pooling, Role, Task
from bulkembed.contract.llama_process import LOG_FORMAT
from bulkembed.contract.model import DEFAULT_MODEL
from bulkembed.contract.settings import ProducerSettings, WorkerSettings, at_least, engines_spec, ubatch_spec
from bulkembed.evaluate import add_eval_parser
from bulkembed.query import add_embed_parser

log = logging.getLogger("bulkembed")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _job_arguments(parser: argparse.ArgumentParser, model_default: str | None) -> None:
    parser.add_argument("input", help="a Parquet file, a folder of them, or an s3:// prefix")
    parser.add_argument("--model", required=model_default is None, default=model_default,
                        help="a local .gguf path or REPO:QUANT of a Hugging Face GGUF repo"
                        + (f" (default {model_default})" if model_default else ""))
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    parser.add_argument("--task", choices=[t.value for t in Task], default=None,
                        help="v4 task; read from the model file name when it says it")
    parser.add_argument("--role", choices=[r.value for r in Role], default=Role.PASSAGE.value,
                        help="query or passage; picks the prefix from v4's table")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--shard-tokens", type=at_least(1), default=ProducerSettings().shard_tokens,
                        help="token budget of one shard")
    parser.add_argument("--prefix", default=None,
                        help="text put before every document instead of v4's task/role prefix ('' for none)")
    parser.add_argument("--max-tokens", type=at_least(1), default=None,
                        help="longest input in tokens (default: the model's trained context, 32768 for v4; "
                        "non-causal models: what one ubatch may hold, BULKEMBED_MAX_UBATCH, within that context)")
    parser.add_argument("--overlength", choices=[o.value for o in Overlength], default=Overlength.TRUNCATE.value,
                        help="longer documents: keep the first max-tokens, one row per chunk, or quarantine")
    parser.add_argument("--dims", type=at_least(1), default=None,
                        help="Matryoshka dimensions (v4: 128, 256, 512, 1024 or 2048), re-normalized")
    parser.add_argument("--dtype", choices=[d.value for d in Dtype], default=Dtype.FLOAT32.value)
    parser.add_argument("--no-normalize", action="store_true", help="write raw means, not L2-normalized")
    parser.add_argument("--force", action="store_true",
                        help="start over: delete the output OUT holds (this job's, instead of resuming it; another "
                        "job's, stopped first where it still runs, instead of refusing)")
    parser.add_argument("--pooling", choices=[p.value for p in Pooling], default=None,
                        help="mean, cls (first token) or last (last token): one vector per row; none: every token's "
                        "vector (late chunking). Default: what the model declares (mean where it declares nothing)")
    parser.add_argument("--reuse", metavar="PREV_OUT", default=None,
                        help="an earlier output (folder or s3://) of the same model and options: rows whose id and "
                             "content are unchanged are copied from it, the rest embedded")
    parser.add_argument("--ignore-incompatible-reuse", action="store_true",
                        help="embed every row instead of failing when PREV_OUT has another model or options")


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerSettings()
    parser.add_argument("--engines", type=engines_spec, default=defaults.engines,
                        help="engine processes, each with the model resident, taking shards side by side; auto = as "
                             "many as fit the GPU's free memory (at most 3), 1 on CPU")
    parser.add_argument("--ubatch", type=ubatch_spec, default=defaults.ubatch,
                        help="largest physical batch (n_ubatch): a number pins it; auto = measured at start on a GPU "
                             "(cached per device, model, engines, flash attention and isolation), 512 on CPU; "
                             "probe = measured on CPU too")
    parser.add_argument("--gpu-layers", type=at_least(-1), default=defaults.gpu_layers,
                        help="layers on the GPU; -1 = all (when llama.cpp has a GPU backend)")
    parser.add_argument("--threads", type=at_least(0), default=defaults.threads,
                        help="CPU threads per engine; 0 = the cores split between the engines")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default=defaults.flash_attn,
                        help="flash attention; auto = on wherever the backend supports it")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=defaults.isolate,
                        help="one document a decode, from an emptied cache: vectors the same bits wherever a text is "
                             "embedded, on any backend (GPUs need it for that), at a cost in throughput")


def _engine_setup(args: argparse.Namespace):
    from bulkembed.worker.engine import EngineOptions
    from bulkembed.worker.engines import EngineSetup

    settings = WorkerSettings()
    options = EngineOptions.from_settings(settings, ubatch=args.ubatch, gpu_layers=args.gpu_layers,
                                          threads=args.threads, flash_attn=args.flash_attn, isolate=args.isolate)
    return EngineSetup(options, engines=args.engines, ubatch=args.ubatch, probe_cache=settings.probe_cache)


def _plan(args: argparse.Namespace):
    from bulkembed.producer.submit import JobOptions, plan_job

    options = JobOptions(
        task=Task(args.task) if args.task else None, role=Role(args.role), prefix=args.prefix,
        id_column=args.id_column, text_column=args.text_column, shard_tokens=args.shard_tokens,
        unit_rows=ProducerSettings().unit_rows, max_tokens=args.max_tokens, max_ubatch=ProducerSettings().max_ubatch,
        overlength=Overlength(args.overlength),
        pooling=Pooling(args.pooling) if args.pooling else None,
        dims=args.dims, dtype=Dtype(args.dtype), normalize=not args.no_normalize, reuse=args.reuse,
        ignore_incompatible_reuse=args.ignore_incompatible_reuse,
    )
    return plan_job(args.input, args.model, args.out, options)


def cmd_run(args: argparse.Namespace) -> int:
    from bulkembed.contract.model import resolve_path
    from bulkembed.local import run_local

    planned = _plan(args)
    manifest = run_local(planned, str(resolve_path(args.model)), _engine_setup(args), force=args.force)
    print(f"job {planned.job.job_id}: {manifest['rows']} rows ({manifest['reused_rows']} reused), "
          f"{manifest['tokens']} tokens, {manifest['rejected_rows']} rejected → {planned.store.uri}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from celery import Celery

    from bulkembed.contract.queue import PLAN_QUEUE, TASK_PLAN_UNIT, celery_app, shard_sender
    from bulkembed.contract.registry import JobRegistry
    from bulkembed.producer.submit import claim_out, stop_job, submit_job

    settings = ProducerSettings()
    planned = _plan(args)
    registry = JobRegistry.from_url(settings.redis_url.get_secret_value(), retention_s=settings.job_retention_s)
    claim_out(planned, args.force, lambda earlier: stop_job(registry, earlier))
    job = planned.job  # OUT's, where it holds this job with its input spelled otherwise; forgotten if --force
    print(job.job_id, flush=True)  # before planning: `status` follows it from now on
    app: Celery = celery_app(settings, "bulkembed-producer")
    with app.producer_or_acquire() as producer:
        try:
            submit_job(planned, registry, shard_sender(app, producer),
                       lambda unit: app.send_task(TASK_PLAN_UNIT, args=[job.job_id, unit.wire()], queue=PLAN_QUEUE,
                                                  producer=producer, argsrepr=f"job {job.job_id} unit {unit.index}"),
                       settings, plan_here=not args.queue_only)
        except JobGone:
            if (cancelled := registry.cancelled(job.job_id)) is None:
                raise
            print(_cancelled_line(cancelled), file=sys.stderr)  # while this process planned it
            return 1
    log.info("job %s: %d units %s on %s", job.job_id, len(planned.units),
             "queued for planners" if args.queue_only else "planned", job.model.queue)
    if args.wait:
        return wait_for(registry, job.job_id)
    if error := registry.planning_error(job.job_id):  # a unit's, found by a planner while this one planned
        print(f"job {job.job_id}: planning failed: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_planner(args: argparse.Namespace) -> int:
    from bulkembed.contract.registry import wait_for_redis

    settings = ProducerSettings()
    wait_for_redis(settings.redis_url.get_secret_value(), settings.redis_wait_s)
    from bulkembed.producer.tasks import serve

    return serve(args.concurrency)


NO_WORKER_S = 120.0  # how long submit --wait watches a job no worker of its model serves before it says so


def wait_for(registry, job_id: str, poll_s: float = 1.0, no_worker_s: float = NO_WORKER_S) -> int:
    """A progress bar until every shard is written (exit 0) or some failed for good (exit 1); a line if no worker of
    the job's model reports for `no_worker_s` (it would wait for ever, the bar at 0)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    spec, unserved_since, said = registry.spec(job_id), None, False
    # Log lines (a manifest written here, say) above the bar, not run into it.
    with tqdm(unit="tok", unit_scale=True, desc=f"job {job_id}") as bar, logging_redirect_tqdm():
        while True:
            status = registry.status(job_id)
            if status is None:
                break
            if spec is not None and not said and status.state in ("planning", "running"):
                if registry.model_served(spec.model.queue, spec.model.sha256):
                    unserved_since = None
                elif unserved_since is None:
                    unserved_since = time.monotonic()
                elif time.monotonic() - unserved_since >= no_worker_s:
                    bar.write(f"no worker of {spec.model.file_name} (sha256 {spec.model.sha256[:12]}) has served its "
                              f"queue {spec.model.queue} for {no_worker_s:.0f}s: start one (`bulkembed worker --model "
                              f"{spec.model.spec}`); on Kubernetes, KEDA starts them from the queue", file=sys.stderr)
                    said = True
            bar.total = status.planned.tokens  # grows while units are planned
            bar.update(status.tokens_done - bar.n)
            if status.planned.reused_rows:
                bar.set_postfix(reused_rows=status.planned.reused_rows, refresh=False)
            if status.finished:
                break
            if status.state == "finishing":  # a planner writes the manifest; this (CPU) process may as well, first
                registry.finalize(job_id, keep_planner=False)
                continue
            time.sleep(poll_s)
    if status is None:  # said once the bar is closed, on a line of its own
        if (cancelled := registry.cancelled(job_id)) is not None:
            print(_cancelled_line(cancelled), file=sys.stderr)
            return 1
        print(f"job {job_id} is gone from Redis ({GONE_WHY}); what was written stays, and the same submit command "
              f"resumes the job", file=sys.stderr)
        return 1
    if status.state == "done":
        reused = status.totals.reused_rows if status.totals else 0
        print(f"job {job_id} done: {status.rows_done} rows embedded ({status.tokens_done} tokens), {reused} reused, "
              f"{status.rejected_rows} rejected")
        return 0
    if status.error:
        print(f"job {job_id} failed while planning: {status.error}", file=sys.stderr)
        return 1
    for shard, error in sorted(status.failures.items()):
        print(f"shard {keys.shard_name(int(shard))} failed: {error}", file=sys.stderr)
    if status.failed > len(status.failures):
        print(f"… and {status.failed - len(status.failures)} more: bulkembed status {job_id} --failures",
              file=sys.stderr)
    print(f"job {job_id} failed: {status.failed} of {status.totals.shards} shards", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from bulkembed.contract.registry import JobRegistry

    if args.job is None and args.failures:
        raise BulkEmbedError("status --failures lists one job's failed shards: name the job")
    registry = JobRegistry.from_url(ProducerSettings().redis_url.get_secret_value())
    if args.job is None:
        return list_jobs(registry, args.json)
    status = registry.status(args.job)
    if status is None and (cancelled := registry.cancelled(args.job)) is not None:
        print(json.dumps(_cancelled_json(cancelled)) if args.json else _cancelled_line(cancelled))
        return 0
    if status is None:
        print(f"no job {args.job} in this Redis (a finished job's keys expire after BULKEMBED_JOB_RETENTION_S; its "
              f"_manifest.json stays)", file=sys.stderr)
        return 2
    if args.failures:  # every one, a page of Redis at a time
        if not status.failed:
            print(f"job {args.job}: no failed shards", file=sys.stderr)
        for shard, error in registry.failures(args.job):
            print(f"shard {keys.shard_name(int(shard))}: {error}")
        return 0
    if args.json:
        print(json.dumps(status.model_dump(mode="json") | {"finished": status.finished}))
        return 0
    totals, planning = status.planned, status.totals is None  # while planning, what the planned units found
    more = "+" if planning else ""
    print(f"job {status.job_id}: {status.state}; units planned {status.units_planned}/{status.units}; "
          f"shards {status.shards_done}/{totals.shards}{more}; tokens {status.tokens_done}/{totals.tokens}{more}; "
          f"failed {status.failed}; rejected rows {status.rejected_rows}{more}; reused rows {totals.reused_rows}")
    if status.error:
        print(f"  failed while planning: {status.error}")
    for shard, error in sorted(status.failures.items()):
        print(f"  shard {keys.shard_name(int(shard))}: {error}")
    if status.failed > len(status.failures):
        print(f"  … and {status.failed - len(status.failures)} more (--failures lists them all)")
    return 0


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cancelled_json(job) -> dict:
    return {"job_id": job.job_id, "state": "cancelled", "finished": True, "cancelled": _utc(job.cancelled),
            "state_then": job.state, "shards_done": job.shards_done, "shards": job.shards, "input": job.spec.input,
            "out": job.spec.out, "model": job.spec.model.file_name}


def _written(done: int, shards: int | None) -> str:
    """Shards written of the job's, "?" for its count while it is planned."""
    return f"{done}/{'?' if shards is None else shards}"


def _cancelled_line(job) -> str:
    return (f"job {job.job_id}: cancelled {_utc(job.cancelled)} while {job.state} (shards written "
            f"{_written(job.shards_done, job.shards)}); what it wrote stays in {job.spec.out}, and submitting it "
            f"again resumes it")


def list_jobs(registry, as_json: bool) -> int:
    """`status` without a job: a line for each job Redis knows, cancelled ones too, newest first."""
    lines: list[tuple[float, str]] = []
    for started, spec in registry.jobs():
        status = registry.status(spec.job_id)
        if status is None:  # its keys expired, or it was cancelled, since the listing
            continue
        if as_json:
            lines.append((started, json.dumps(status.model_dump(mode="json") | {
                "finished": status.finished, "submitted": _utc(started), "input": spec.input, "out": spec.out,
                "model": spec.model.file_name})))
            continue
        more = "+" if status.totals is None else ""
        lines.append((started, f"{spec.job_id}  {status.state:<9}  shards {status.shards_done}/"
                               f"{status.planned.shards}{more}  rows {status.rows_done}  failed {status.failed}  "
                               f"submitted {_utc(started)}  {spec.model.file_name}  {spec.input} → {spec.out}"))
    for job in registry.cancelled_jobs():
        lines.append((job.cancelled, json.dumps(_cancelled_json(job)) if as_json else
                      f"{job.job_id}  cancelled  shards {_written(job.shards_done, job.shards)}  was {job.state}  "
                      f"cancelled {_utc(job.cancelled)}  {job.spec.model.file_name}  {job.spec.input} → "
                      f"{job.spec.out}"))
    for _, line in sorted(lines, key=lambda line: line[0], reverse=True):
        print(line)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from bulkembed.contract.registry import JobRegistry

    settings = ProducerSettings()
    registry = JobRegistry.from_url(settings.redis_url.get_secret_value(), retention_s=settings.job_retention_s)
    outcome, unlisted = registry.cancel(args.job)
    if outcome in ("done", "finishing", "failed"):
        settled = "every shard written" if outcome != "failed" else "every shard settled, some failed for good"
        print(f"job {args.job} is {outcome} ({settled}): nothing to cancel")
        return 0
    if (cancelled := registry.cancelled(args.job)) is not None:  # now, or before
        if outcome == "cancelled":
            print(f"job {args.job} cancelled while {cancelled.state} (shards written "
                  f"{_written(cancelled.shards_done, cancelled.shards)}): workers drop its queued shards, its planners "
                  f"stop at their next shard; what it wrote stays in {cancelled.spec.out}, and the same submit "
                  f"command resumes it")
        else:
            print(_cancelled_line(cancelled))
        return 0
    if outcome == "cancelled":  # submitted again at that very moment, which took the record back
        print(f"job {args.job} cancelled; it has been submitted again since")
        return 0
    if unlisted:
        print(f"job {args.job} is no longer in this Redis (its keys expired); {unlisted} KEDA entries of it, which "
              f"kept a worker up, are removed")
        return 0
    print(f"no job {args.job} in this Redis (a finished job's keys expire after BULKEMBED_JOB_RETENTION_S); "
          f"nothing to cancel", file=sys.stderr)
    return 2


def cmd_worker(args: argparse.Namespace) -> int:
    from bulkembed.contract.model import choose_pooling, model_info, model_ref
    from bulkembed.contract.registry import wait_for_redis
    from bulkembed.worker.serve import serve

    ref, path = model_ref(args.model)
    choose_pooling(model_info(path), None, ref.file_name)  # a reranker is refused before anything loads
    settings = WorkerSettings()
    wait_for_redis(settings.redis_url.get_secret_value(), settings.redis_wait_s)  # before the model loads
    return serve(ref, path, _engine_setup(args), settings)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bulkembed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="plan a job and queue its shards on Redis")
    _job_arguments(submit, model_default=None)
    submit.add_argument("--wait", action="store_true", help="show progress; exit 0 when every shard is written")
    submit.add_argument("--queue-only", action="store_true",
                        help="queue the job's planning units for `bulkembed planner` processes and return at once; "
                             "by default this process plans units too, beside them, until every unit is planned")
    submit.set_defaults(func=cmd_submit)

    planner = commands.add_parser("planner", help="a Celery worker that plans jobs' units and writes their manifests")
    planner.add_argument("--concurrency", type=at_least(1), default=os.cpu_count() or 1,
                         help="planning processes (each counts tokens on one core)")
    planner.set_defaults(func=cmd_planner)

    worker = commands.add_parser("worker", help="a Celery worker with one resident model")
    worker.add_argument("--model", required=True, help="a local .gguf path or REPO:QUANT")
    _worker_arguments(worker)
    worker.set_defaults(func=cmd_worker)

    status = commands.add_parser("status", help="progress of a job")
    status.add_argument("job", nargs="?", help="a job id; without one, every job Redis knows, newest first")
    status.add_argument("--json", action="store_true")
    status.add_argument("--failures", action="store_true", help="list every failed shard and its error")
    status.set_defaults(func=cmd_status)

    cancel = commands.add_parser("cancel", help="stop a job: its queued shards are dropped, what it wrote stays")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)

    run = commands.add_parser("run", help="embed in this process: no Redis, no workers")
    _job_arguments(run, model_default=DEFAULT_MODEL)
    _worker_arguments(run)
    run.set_defaults(func=cmd_run)

    add_embed_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    return parser


RESUMABLE = ("run", "submit")  # the commands a Ctrl-C leaves a job of, resumed by the same command


def main(argv: list[str] | None = None) -> int:
    args = None
    try:  # settings are read while the parser is built (defaults) and by every command
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=ProducerSettings().log_level, format=LOG_FORMAT)  # as llama processes log
        logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in …" at every start
        return args.func(args)
    except BulkEmbedError as exc:
        print(f"bulkembed: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever a library said
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what is written is whole (objects are written once), a job resumes
        resumes = "; what was written stays, and the same command resumes the job" if (
            args is not None and args.command in RESUMABLE) else ""
        print(f"bulkembed: interrupted{resumes}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe or socket (an engine's, say): not to be taken quietly
            raise
        # `bulkembed status --json | head -1`: the reader has gone, and with it what was to be read.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit, flushing stdout
        return 1
    except Exception as exc:
        if (line := s3_refusal(exc)) is None:
            raise
        print(f"bulkembed: {' '.join(line.split())}", file=sys.stderr)
        return 2


def _stdout_reader_gone() -> bool:
    """Standard output is a pipe whose reading end is closed (poll says POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor, or no poll on this platform
        return False


def s3_refusal(exc: Exception) -> str | None:
    """What a user reads of a boto3 error that reached the command (no credentials, access denied, a bad parameter:
    transient ones are retried below it); None for anything else. boto3 is imported only where S3 is used."""
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is None or not isinstance(exc, (botocore.BotoCoreError, botocore.ClientError)):
        return None
    if isinstance(exc, botocore.NoCredentialsError):
        return "S3: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or a role)"
    return f"S3: {exc}"


if __name__ == "__main__":
    sys.exit(main())
