"""Job spec and shard message: what the producer promises and the worker fulfils."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from contract import keys

ARROW_FORMAT_VERSION = 1


class Task(StrEnum):
    RETRIEVAL = "retrieval"
    CODE = "code"
    TEXT_MATCHING = "text-matching"


class Role(StrEnum):
    QUERY = "query"
    PASSAGE = "passage"


# jina-embeddings-v4's prompt table (model card, "Consistency wrt. AutoModel.from_pretrained"):
# text-matching is symmetric, so its passages take "Query: " too.
PREFIXES: dict[tuple[Task, Role], str] = {
    (Task.RETRIEVAL, Role.QUERY): "Query: ",
    (Task.RETRIEVAL, Role.PASSAGE): "Passage: ",
    (Task.TEXT_MATCHING, Role.QUERY): "Query: ",
    (Task.TEXT_MATCHING, Role.PASSAGE): "Query: ",
    (Task.CODE, Role.QUERY): "Query: ",
    (Task.CODE, Role.PASSAGE): "Passage: ",
}


def prefix_for(task: Task, role: Role) -> str:
    return PREFIXES[(Task(task), Role(role))]


def task_from_model_name(name: str) -> Task | None:
    """v4's GGUF files name their task (jina-embeddings-v4-text-code-Q8_0.gguf)."""
    lowered = name.lower()
    for task in (Task.TEXT_MATCHING, Task.RETRIEVAL, Task.CODE):
        if f"-{task.value}" in lowered or f"text-{task.value}" in lowered:
            return task
    return None


class ModelRef(BaseModel):
    """The model a job is embedded with: where the user named it and which bytes it is."""

    model_config = ConfigDict(frozen=True)

    spec: str = Field(description="What the user passed: a .gguf path or REPO:QUANT.")
    file_name: str
    sha256: str
    queue: str = Field(description="Celery queue of this model's workers.")


class JobSpec(BaseModel):
    """Everything that determines a job's output. Its hash is the job id."""

    model_config = ConfigDict(frozen=True)

    input: str
    input_fingerprint: str = Field(description="Hash of the input files' names and sizes.")
    out: str
    model: ModelRef
    task: Task
    role: Role
    prefix: str
    id_column: str = "id"
    text_column: str = "text"
    shard_tokens: int
    pooling: str = "mean"
    normalize: bool = True

    @property
    def job_id(self) -> str:
        identity = self.model_dump(mode="json", exclude={"model"}) | {"model_sha256": self.model.sha256}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return digest[:16]


class ShardMessage(BaseModel):
    """One Celery task: ids and URIs, never the data itself."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    job: JobSpec
    shard: int
    n_docs: int
    n_tokens: int
    longest: int = Field(description="Token count of the shard's longest document.")

    @property
    def input_key(self) -> str:
        return keys.shard_input(self.shard)

    @property
    def output_key(self) -> str:
        return keys.shard_output(self.shard)
