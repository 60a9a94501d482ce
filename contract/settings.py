"""Process settings from the environment (prefix BULKEMBED_); nothing else reads os.environ.

S3 uses boto3's own standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so they are not repeated here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What every bulkembed process shares."""

    model_config = SettingsConfigDict(env_prefix="BULKEMBED_", extra="ignore")

    redis_url: SecretStr = Field(
        SecretStr("redis://localhost:6379/0"),
        description="Redis URL of the broker and job registry (redis:// or rediss://, may hold a password).",
    )
    visibility_timeout: int = Field(
        7200, description="Seconds before Redis redelivers an unacknowledged shard; above task_time_limit."
    )
    task_time_limit: int = Field(3600, description="Hard limit in seconds for one shard.")
    shard_max_attempts: int = Field(
        3, ge=1, description="Deliveries of one shard that may end without a result (a crashed process, a time "
        "limit) before it is reported failed instead of redelivered again.",
    )
    transient_retries: int = Field(8, ge=0, description="Retries, with backoff, of S3/Redis hiccups in one shard.")
    log_level: str = Field("INFO", description="Python logging level.")


class ProducerSettings(Settings):
    """The producer (submit) side."""

    shard_tokens: int = Field(65536, description="Token budget of one shard.", gt=0)
    max_ubatch: int = Field(
        8192, gt=0, description="Most tokens one ubatch may hold on the workers' devices: the default --max-tokens "
        "of non-causal models (BERT family), which embed each document whole in one ubatch; never above the "
        "model's trained context.",
    )


class WorkerSettings(Settings):
    """The worker side: one process per GPU with one resident model."""

    ubatch: int = Field(512, description="Largest physical batch (n_ubatch) a shard may use.", ge=32)
    gpu_layers: int = Field(-1, description="Layers offloaded to the GPU; -1 = all (when the build has a GPU).")
    threads: int = Field(0, description="CPU threads for llama.cpp; 0 = all cores.", ge=0)
    metrics_port: int = Field(9100, ge=0, description="Port of the Prometheus /metrics endpoint; 0 = off.")
    flash_attn: Literal["auto", "on", "off"] = Field("auto", description="Flash attention (auto: where supported).")
    logical_batch: int = Field(
        0, ge=0, description="Tokens per decode above the ubatch, as upstream tools do. Makes pooled means of "
        "long documents wrong; exists so benchmarks can compare and the start-up self-test can prove it refuses it.",
    )
