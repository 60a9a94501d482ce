"""Job spec and shard message: what the producer promises and the worker fulfils."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from bulkembed.contract import keys
from bulkembed.contract.errors import InputError


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


def choose_prefix(task: Task | None, role: Role, prefix: str | None, file_name: str) -> str:
    """The prefix a text gets, the same for a bulk job and a query: the caller's own, else v4's table for the task
    (given, or read from the model file's name); no guess for other models."""
    if prefix is not None:
        return prefix
    task = task or task_from_model_name(file_name)
    if task is None:
        raise InputError(f"cannot tell the task from the model name {file_name}; pass --task, "
                         f"or --prefix for models outside jina-embeddings-v4")
    return prefix_for(task, role)


def task_from_model_name(name: str) -> Task | None:
    """The task a file name states as v4's GGUF files do (jina-embeddings-v4-text-code-Q8_0.gguf), as words of their
    own. Only that spelling: nomic-embed-code, jina-embeddings-v2-base-code or long-context-retrieval are other
    models, whose prefixes are not v4's."""
    found = re.search(r"(?<![a-z0-9])(text-retrieval|text-code|text-matching)(?![a-z])", name.lower())
    return V4_TASK_NAMES[found.group(1)] if found else None


V4_TASK_NAMES = {"text-retrieval": Task.RETRIEVAL, "text-code": Task.CODE, "text-matching": Task.TEXT_MATCHING}


class Overlength(StrEnum):
    TRUNCATE = "truncate"  # keep the first max_tokens tokens; the row says truncated
    CHUNK = "chunk"  # one row per chunk of at most max_tokens, each with the prefix
    ERROR = "error"  # quarantine the row


class Pooling(StrEnum):
    MEAN = "mean"
    CLS = "cls"  # the first token's vector (BERT-family [CLS], e.g. bge)
    LAST = "last"  # the last token's vector (Qwen3-Embedding: the <|endoftext|> its tokenizer appends)
    NONE = "none"  # one vector per token (late chunking, a user's own projector)


class Dtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


# v4 is trained with Matryoshka loss at these sizes only (model card); other cuts degrade badly.
V4_MATRYOSHKA_DIMS = (128, 256, 512, 1024, 2048)
# v4's GGUFs declare Qwen2.5-VL's 128000-token context, but v4 itself was trained to 32768.
V4_MAX_TOKENS = 32768


@dataclass(frozen=True)
class Span:
    """Which tokens of a document's prefixed tokenization one output row embeds: `[start, stop)` of them, and
    where a cut leaves the text's end out (truncation, chunks), its last `tail` tokens again: the tokenizer's
    closing EOS/[SEP], which a model that pools the last token, or was trained with it, must still see."""

    chunk: int
    start: int
    stop: int
    truncated: bool = False
    tail: int = 0  # closing special tokens appended after the cut (0 where the span reaches the text's end)

    def n_tokens(self, prefix_tokens: int) -> int:
        # Chunks after the first get the prefix's own tokens in front (its opening BOS/[CLS] included, its closing
        # tokens not: they come after the chunk), so each is a valid input on its own.
        return self.stop - self.start + self.tail + (prefix_tokens - self.tail if self.chunk > 0 else 0)


def check_room(max_tokens: int, prefix_tokens: int) -> None:
    """A cut row keeps at least one token of its own text: max_tokens above the prefix framed as a text alone. Below
    it, every truncated row would be the prefix alone (one vector for every text) and no chunk would fit."""
    if max_tokens <= prefix_tokens:
        raise InputError(f"--max-tokens {max_tokens} leaves no room for text: the prefix takes {prefix_tokens} tokens "
                         f"with the tokenizer's framing, so a cut row would be the prefix alone. Use --max-tokens "
                         f"{prefix_tokens + 1} or more")


def document_spans(n_tokens: int, max_tokens: int, policy: Overlength, prefix_tokens: int,
                   tail: int = 0) -> list[Span] | None:
    """The rows a document becomes; None when the policy rejects it. Shared by producer and worker.
    `n_tokens` and `prefix_tokens` count the tokenizer's special tokens (as it frames every text); `tail` is how
    many of them close a text (EOS, [SEP]): every row cut from a longer document still ends with them."""
    if n_tokens <= max_tokens:
        return [Span(0, 0, n_tokens)]
    if policy is Overlength.ERROR:
        return None
    if policy is Overlength.TRUNCATE:
        return [Span(0, 0, max_tokens - tail, truncated=True, tail=tail)]
    body, end = max_tokens - prefix_tokens, n_tokens - tail
    if body <= 0:
        raise ValueError(f"max_tokens {max_tokens} leaves no room after a {prefix_tokens}-token prefix")
    spans = [Span(0, 0, max_tokens - tail, tail=tail)]
    while spans[-1].stop < end:
        start = spans[-1].stop
        spans.append(Span(len(spans), start, min(end, start + body), tail=tail))
    return spans


class ModelRef(BaseModel):
    """The model a job is embedded with: where the user named it and which bytes it is."""

    model_config = ConfigDict(frozen=True)

    spec: str = Field(description="REPO:QUANT as the user passed it, or the .gguf file's absolute path.")
    file_name: str
    sha256: str
    queue: str = Field(description="Celery queue of this model's workers.")


class ReuseSource(BaseModel):
    """An earlier output whose vectors a job copies for unchanged rows (--reuse PREV_OUT)."""

    model_config = ConfigDict(frozen=True)

    uri: str
    job_id: str = Field(description="The job that wrote it.")
    manifest_sha256: str = Field(description="Of its _manifest.json: another PREV_OUT there is another job.")


class JobSpec(BaseModel):
    """Everything that determines a job's output. Its hash is the job id."""

    model_config = ConfigDict(frozen=True)

    input: str
    input_fingerprint: str = Field(description="Hash of the input files' names, sizes and versions (S3 ETag, local "
                                   "modification time), so a replaced file is a new job, not a resumed one.")
    out: str
    model: ModelRef
    task: Task | None = Field(description="v4 task; None for other model families (custom prefix).")
    role: Role
    prefix: str
    id_column: str = "id"
    text_column: str = "text"
    shard_tokens: int
    unit_rows: int = Field(250_000, gt=0, description="Rows a planning unit gathers (whole Parquet row groups): "
                           "units are planned side by side and name their shards, so the job's layout depends on it.")
    units_span_files: bool = Field(
        False, description="A unit gathers row groups across files, so many small files make full shards. The "
        "producer sets it; False is what a job planned before says (units of one file each), and is planned so.",
    )
    max_tokens: int = V4_MAX_TOKENS
    overlength: Overlength = Overlength.TRUNCATE
    pooling: Pooling = Pooling.MEAN
    dims: int | None = Field(None, description="Matryoshka truncation; None keeps the model's n_embd.")
    dtype: Dtype = Dtype.FLOAT32
    normalize: bool = True
    reuse: ReuseSource | None = Field(None, description="Earlier output whose vectors unchanged rows copy.")
    close_cut_rows: bool = Field(
        False, description="Rows cut from a longer text (truncated, chunked) end with the tokenizer's closing "
        "special tokens (document_spans' tail). The producer sets it where the model's tokenizer closes texts; "
        "False is also what a job planned before this rule says, so a worker can refuse such a job's shards.",
    )
    id_type: str | None = Field(
        None, description="The Arrow type every file's ids are cast to, where a file's differs from it (string and "
        "large_string, int32 and int64; strings held as views or a dictionary). None: the files agree, and their type "
        "is kept.",
    )

    def vector_options(self) -> dict[str, str | int | bool | None]:
        """What decides a row's vector besides its text. Two jobs that agree on these give the same vector
        for the same prefixed text, so one's output can serve the other as PREV_OUT. Task and role count
        through the prefix they pick: a task change that keeps the prefix keeps the vectors."""
        return {"model sha256": self.model.sha256, "prefix": self.prefix, "pooling": self.pooling.value,
                "dims": self.dims, "dtype": self.dtype.value, "normalize": self.normalize,
                "max tokens": self.max_tokens, "over-length policy": self.overlength.value,
                "cut rows closed": self.close_cut_rows}

    @property
    def job_id(self) -> str:
        # These enter only when set: jobs from before them keep their ids.
        exclude = {"model", *(name for name in ("close_cut_rows", "id_type", "units_span_files")
                              if not getattr(self, name))}
        identity = self.model_dump(mode="json", exclude=exclude) | {"model_sha256": self.model.sha256}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return digest[:16]


WIRE_FIELDS = ("job_id", "shard", "n_docs", "n_tokens", "longest", "queued_at")  # ShardMessage.wire's order


class ShardMessage(BaseModel):
    """One Celery task: ids and URIs, never the data itself. On the wire (`wire`) it leaves out the job spec, which
    travels once, in the job's registry entry: a queued shard costs Redis ~1.2 KB with Celery's envelope, not 2.8."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    job: JobSpec
    shard: int
    n_docs: int
    n_tokens: int
    longest: int = Field(description="Token count of the shard's longest document.")
    queued_at: float = Field(0.0, description="Unix time it was queued, for the queue-wait metric.")

    @classmethod
    def of(cls, job: JobSpec, shard: int, lengths: list[int]) -> ShardMessage:
        """The message of a shard whose documents have these token counts, queued now."""
        return cls(job_id=job.job_id, job=job, shard=shard, n_docs=len(lengths), n_tokens=sum(lengths),
                   longest=max(lengths), queued_at=time.time())

    def wire(self) -> list:
        """The task's argument: its fields but the job spec, as a list in WIRE_FIELDS order (Redis keeps each queued
        shard: its message should not spell out its keys). `from_wire` makes it whole again."""
        return [self.job_id, self.shard, self.n_docs, self.n_tokens, self.longest, round(self.queued_at, 3)]

    @classmethod
    def from_wire(cls, data: list | dict, spec: Callable[[str], JobSpec]) -> ShardMessage:
        """A message off the queue, its job spec looked up by `spec(job_id)`. A dict is a message an older
        producer queued: it carries its spec, and keeps it."""
        if isinstance(data, dict):
            return cls.model_validate(data)
        fields = dict(zip(WIRE_FIELDS, data, strict=True))
        return cls.model_validate(fields | {"job": spec(fields["job_id"])})

    @property
    def input_key(self) -> str:
        return keys.shard_input(self.shard)

    @property
    def output_key(self) -> str:
        return keys.shard_output(self.shard)
