"""Process settings from the environment (prefix BULKEMBED_). Outside them, only switches that must act before
settings exist read os.environ: BULKEMBED_LLAMA_LOG (llama.cpp's own log, contract/vocab.py), the llama process's
log level, and PROMETHEUS_MULTIPROC_DIR.

S3 uses boto3's own standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so they are not repeated here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlparse

from pydantic import DirectoryPath, Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bulkembed.contract.errors import SettingsError

REDIS_SCHEMES = ("redis", "rediss", "unix")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A pinned ubatch (llama.cpp's n_ubatch) or how to choose one; a number of engines or "auto".
UbatchSpec = Annotated[int, Field(ge=32)] | Literal["auto", "probe"]
EngineSpec = Annotated[int, Field(ge=1, le=64)] | Literal["auto"]


def _spec(kind: object, wanted: str) -> Callable[[str], int | str]:
    """An argparse type for a command-line option that follows the same rule as its BULKEMBED_ setting."""

    def parse(text: str) -> int | str:
        try:
            return TypeAdapter(kind).validate_python(text)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"takes {wanted}, not {text!r}") from None

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        value = int(text)  # argparse turns a ValueError into "invalid parse value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = "integer"
    return parse


ubatch_spec = _spec(UbatchSpec, "auto, probe or a number >= 32")
engines_spec = _spec(EngineSpec, "auto or a number from 1 to 64")


class Settings(BaseSettings):
    """What every bulkembed process shares."""

    model_config = SettingsConfigDict(env_prefix="BULKEMBED_", extra="ignore")

    redis_url: SecretStr = Field(
        SecretStr("redis://localhost:6379/0"),
        description="Redis URL of the broker and job registry (redis:// or rediss://, may hold a password).",
    )
    visibility_timeout: int = Field(
        7200, ge=2, description="Seconds before Redis redelivers an unacknowledged shard; above task_time_limit."
    )
    task_time_limit: int = Field(
        3600, ge=1, description="Hard limit in seconds for one shard; below visibility_timeout (half of it when "
        "only the visibility timeout is set).",
    )

    redis_wait_s: float = Field(
        120, ge=0, description="Seconds `bulkembed worker` and `bulkembed planner` wait at start for Redis to answer "
        "before they exit with an error (exit 2), so a wrong address shows as a failed start; once running, they ride "
        "out Redis restarts.",
    )

    def __init__(self, **values: Any) -> None:
        """A wrong setting is one line naming its variable (SettingsError), not a pydantic traceback."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(describe(exc, type(self))) from None

    @model_validator(mode="after")
    def _time_limit_below_visibility_timeout(self) -> Self:
        # Redis redelivers a shard still running at the visibility timeout (docs/notes.md 11), so the hard
        # limit must end it first.
        if "task_time_limit" not in self.model_fields_set and "visibility_timeout" in self.model_fields_set:
            self.task_time_limit = self.visibility_timeout // 2
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError(f"BULKEMBED_TASK_TIME_LIMIT ({self.task_time_limit}) must be below "
                             f"BULKEMBED_VISIBILITY_TIMEOUT ({self.visibility_timeout})")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr) -> SecretStr:
        scheme = urlparse(url.get_secret_value()).scheme
        if scheme not in REDIS_SCHEMES:  # the message never shows the URL: it may hold the password
            raise ValueError(f"must start with {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        return url

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level.upper()
    shard_max_attempts: int = Field(
        3, ge=1, description="Deliveries of one shard that may end without a result (a crashed process, a time "
        "limit) before it is reported failed instead of redelivered again.",
    )
    transient_retries: int = Field(8, ge=0, description="Retries, with backoff, of object-store failures in one "
                                   "shard, after boto3's own (Redis failing hands the shard back instead).")
    log_level: str = Field("INFO", description="Python logging level.")
    job_retention_s: float = Field(
        7 * 24 * 3600, gt=0, description="How long a finished job's Redis keys (its state, shard results and "
        "failures) stay after its manifest is written or its last shard fails for good; status answers until then. "
        "Redis then holds nothing of it: the manifest in the store is the record.",
    )
    store_outage_s: float = Field(
        1800, ge=0, description="Seconds a shard keeps retrying, with backoff, while the object store is unreachable "
        "or failing (after its BULKEMBED_TRANSIENT_RETRIES); past both it is reported failed. Such retries do not "
        "use up the shard's attempts.",
    )


class ProducerSettings(Settings):
    """The producer (submit) side."""

    shard_tokens: int = Field(65536, description="Token budget of one shard.", gt=0)
    unit_rows: int = Field(
        250_000, gt=0, description="Rows of a planning unit: whole Parquet row groups, in corpus order across "
        "files, gathered until they hold this many. Each unit is planned by one planner, so a job plans on as many "
        "planners as it has units; each unit ends with a few part-filled shards (one per length class).",
    )
    queue_per_engine: int = Field(
        16, ge=1, description="Planners hold back while a model's queue holds more shards than this many per engine "
        "serving it (workers report their engines), so Redis holds what the fleet will soon take, not the corpus.",
    )
    queue_min: int = Field(
        1000, ge=1, description="Shards a model's queue may hold whatever engines serve it: planning can run ahead "
        "of the first worker.",
    )
    plan_lock_s: int = Field(
        60, ge=2, description="A planner's hold on the unit it plans, renewed while it works: a planner that stalls "
        "loses its unit to another this long after (one that dies: once its task comes back, after the visibility "
        "timeout).",
    )
    dedup_memory_mb: int = Field(
        1024, ge=64, description="Memory DuckDB may use to find duplicate ids before planning; it spills the rest "
        "to a temporary folder, so the corpus size does not matter.",
    )
    max_ubatch: int = Field(
        8192, gt=0, description="Most tokens one ubatch may hold on the workers' devices: the default --max-tokens "
        "of non-causal models (BERT family), which embed each document whole in one ubatch; never above the "
        "model's trained context.",
    )


class WorkerSettings(Settings):
    """The worker side: one worker per GPU, running one or more engine processes with the model resident."""

    ubatch: UbatchSpec = Field(
        "auto", description="Largest physical batch (n_ubatch) a shard may use: a number (>= 32) pins it; auto "
        "measures the candidates on the resident model at start where a GPU is used (512 on CPU), cached per "
        "device, model, engines, flash attention and isolation; probe measures on CPU too.",
    )
    engines: EngineSpec = Field(
        "auto", description="Engine processes per worker, each with the model resident and its own context, taking "
        "shards from the same queue. auto: as many as fit the GPU's free memory (at most 3), 1 on CPU.",
    )
    probe_cache: str = Field(
        "~/.cache/bulkembed/ubatch-probe.json", min_length=1, description="File of measured ubatch choices (one per "
        "device, model sha256, engines, flash-attention setting and isolation), so restarts skip the probe.",
    )
    gpu_layers: int = Field(-1, description="Layers offloaded to the GPU; -1 = all (when the build has a GPU).")
    threads: int = Field(0, description="CPU threads for llama.cpp per engine; 0 = the cores split between the "
                         "engines.", ge=0)
    metrics_port: int = Field(9100, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 = off.")
    flash_attn: Literal["auto", "on", "off"] = Field("auto", description="Flash attention (auto: where supported).")
    skip_lm_head: bool = Field(
        True, description="Leave the LM head and its logits copy out of every decode (embeddings never read them), "
        "where the llama.cpp build can: infra/install.sh builds one that can. False only to measure what the head "
        "costs; vectors are the same either way.",
    )
    min_decode: int = Field(
        64, ge=0, le=8192, description="Fewest tokens a decode carries: one the documents do not fill is topped up "
        "with padding no one reads, so every decode runs in one kernel regime and a text's vector does not depend on "
        "its neighbours or shard (README, Batch invariance). Padded decodes are also a multiple of 16 tokens (this "
        "too is rounded up to one). 0 turns it off, only to measure what it fixes.",
    )
    isolate: bool = Field(
        False, description="Decode one document at a time, from the first cell of an emptied KV cache: each "
        "document's decodes are then a function of its own tokens, and its vector the same bits whatever its shard, "
        "neighbours, engine count or ubatch cap (where the cap does not cut it), on any backend. For GPUs, where "
        "llama.cpp's kernels move a packed text's vector with its neighbours (cos ~0.9999); on CPU the default packing "
        "is invariant already. Costs throughput: smaller decodes (README, Batch invariance).",
    )
    logical_batch: int = Field(
        0, ge=0, description="Tokens per decode above the ubatch, as upstream tools do. Makes pooled means of "
        "long documents wrong; exists so benchmarks can compare and the start-up self-test can prove it refuses it.",
    )
    store_backoff_max_s: float = Field(
        120, gt=0, description="Longest wait between two retries of a shard while the store is unreachable "
        "(doubling from 1 s, jittered, and at most half the visibility timeout).",
    )
    test_hold_dir: DirectoryPath | None = Field(
        None, description="Test only, never in production: before committing a shard the worker creates "
        "<dir>/<job_id>-<shard>-<pid>.held and waits until that file is removed, so fault tests can kill or stop it "
        "at a known point whatever the machine's speed.",
    )


def describe(exc: ValidationError, settings_cls: type[BaseSettings]) -> str:
    """Every problem of one ValidationError on one line, each named by its environment variable."""
    prefix = settings_cls.model_config["env_prefix"]
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if not field:  # a check across fields: its message names the variables itself
            problems.append(message)
        elif settings_cls.model_fields[field].annotation is SecretStr:
            problems.append(f"{prefix}{field.upper()}: {message}")
        else:
            problems.append(f"{prefix}{field.upper()}={error['input']!r}: {message}")
    return "invalid settings: " + "; ".join(problems)
