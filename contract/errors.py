"""Typed errors: what a caller can catch and what a user reads."""

from __future__ import annotations


class BulkEmbedError(Exception):
    """Base of every error bulkembed raises on purpose; its message is meant for the user."""


class InputError(BulkEmbedError):
    """The corpus cannot be read as asked (missing column, wrong type, unreadable file)."""


class TextError(InputError):
    """A text given to embed (a query) that cannot be embedded; `row`: its place in the call's list."""

    def __init__(self, row: int, reason: str):
        super().__init__(row, reason)  # both in args: the error crosses from the engine's process, pickled
        self.row, self.reason = row, reason

    def __str__(self) -> str:
        return f"text {self.row}: {self.reason}"


class ModelError(BulkEmbedError):
    """The model cannot be found, fetched or loaded, or is not the one the job names."""


class ShardError(BulkEmbedError):
    """A shard cannot be embedded; permanent, retrying it will not help."""


class ForeignOutput(ShardError):
    """A shard's file in OUT was written by another job: a late write of one that submit --force replaced."""


class EngineError(ShardError):
    """llama.cpp refused a decode or a context."""


class TransientError(BulkEmbedError):
    """A failure worth retrying (storage or network hiccup)."""


class JobGone(BulkEmbedError):
    """The job is no longer in Redis (cancelled; forgotten by submit --force, its OUT handed to another job; or
    expired)."""

    @classmethod
    def of(cls, job_id: str, consequence: str) -> JobGone:
        return cls(f"job {job_id} is no longer in Redis ({GONE_WHY}): {consequence}")


# Every way a job leaves Redis, for messages that cannot tell which.
GONE_WHY = ("cancelled, forgotten by submit --force, expired after BULKEMBED_JOB_RETENTION_S, or lost with Redis's "
            "data in a restart without persistence")


class StoreRefused(BulkEmbedError):
    """The store refused a request for good (access denied, say), where boto3 raises nothing of its own."""


class SettingsError(BulkEmbedError):
    """A BULKEMBED_* environment variable holds a value bulkembed cannot use."""
