"""Cut documents into token-budgeted shards of similar lengths. Pure: no I/O, no model.

Documents go into buckets by length class (powers of two of their token count); a bucket becomes a
shard when the next document would push it past the budget. Memory is bounded by the number of
classes times the budget, whatever the corpus size. Similar lengths in a shard let the worker size
its context to the shard's longest document and keep its ubatches full.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bulkembed.contract.job import Span


@dataclass
class Document:
    id: Any
    text: str
    n_tokens: int
    span: Span = Span(0, 0, 0)  # which tokens of the text this row embeds
    content_hash: bytes = b""  # of the prefixed text (bulkembed.contract.schema.content_hash)
    row: int = -1  # its row number in its corpus file
    source: str = ""  # that file, as quarantine records name it (producer.corpus.source_name)


@dataclass
class Bucket:
    documents: list[Document] = field(default_factory=list)
    tokens: int = 0


def length_class(n_tokens: int) -> int:
    """0 for 1 token, 1 for 2, 2 for 3-4, 3 for 5-8, ... (ceil log2)."""
    return max(0, n_tokens - 1).bit_length()


class ShardPlanner:
    def __init__(self, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError("shard_tokens must be positive")
        self.shard_tokens = shard_tokens
        self._buckets: dict[int, Bucket] = {}

    def add(self, document: Document) -> list[Document] | None:
        """Add a document; return a full shard when one is ready."""
        bucket = self._buckets.setdefault(length_class(document.n_tokens), Bucket())
        ready = None
        if bucket.documents and bucket.tokens + document.n_tokens > self.shard_tokens:
            ready = bucket.documents
            bucket.documents, bucket.tokens = [], 0
        bucket.documents.append(document)
        bucket.tokens += document.n_tokens
        return ready

    def finish(self) -> Iterator[list[Document]]:
        """The partly filled shards, shortest documents first."""
        for _, bucket in sorted(self._buckets.items()):
            if bucket.documents:
                yield bucket.documents
        self._buckets.clear()
