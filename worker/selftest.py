"""Before a worker takes work: packed embeddings must equal one-by-one embeddings.

This catches a llama.cpp build (or a configuration) whose pooling or batching changed: the probes
are embedded packed together the way shards are, and each alone in one ubatch; one probe is longer
than the ubatch, so it is decoded in pieces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bulkembed.contract.errors import BulkEmbedError
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.packing import single_document_shape

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
PROBES = (
    "Query: A beautiful sunset over the beach",
    "Passage: Un beau coucher de soleil sur la plage",
    "Passage: 海滩上美丽的日落",
    "x",
    "Passage: def mean(xs):\n    return sum(xs) / len(xs)",
    "Query: What does mean pooling average over?",
)
LONG_SENTENCE = "Passage: The river carried the boat past the mill, and the miller counted sacks of grain. "


class SelfTestError(BulkEmbedError):
    """Packed and one-by-one embeddings differ: this build or configuration is not exact."""


def embed_alone(engine: Engine, tokens: np.ndarray) -> np.ndarray:
    """One document in one ubatch: the definition of its embedding."""
    return engine.embed([tokens], single_document_shape(len(tokens)))[0]


def self_test(engine: Engine) -> float:
    """The worst cosine between packed and alone; raises SelfTestError under MIN_COSINE."""
    tokens = [engine.vocab.tokenize(p) for p in PROBES]
    long = engine.vocab.tokenize(LONG_SENTENCE)
    while len(long) <= engine.options.ubatch * 3 // 2:  # one and a half ubatches: decoded in pieces
        long = np.concatenate([long, long])
    tokens.append(long[: engine.options.ubatch * 3 // 2 + 1])
    packed = engine.embed(tokens)
    alone = np.stack([embed_alone(engine, t) for t in tokens])
    cos = np.sum(packed * alone, axis=1) / (np.linalg.norm(packed, axis=1) * np.linalg.norm(alone, axis=1))
    worst = int(np.argmin(cos))
    if cos[worst] < MIN_COSINE:
        raise SelfTestError(
            f"self-test failed: probe {worst} ({len(tokens[worst])} tokens) embedded packed differs from "
            f"embedded alone (cosine {cos[worst]:.6f} < {MIN_COSINE}); this llama.cpp build or configuration "
            f"(ubatch {engine.options.ubatch}, logical batch {engine.options.logical_batch}) is not exact"
        )
    return float(cos.min())


def self_test_file(model_path: Path, options: EngineOptions) -> float:
    """Load, test, free: run in a spawned process so the worker's parent never starts a GPU context."""
    engine = Engine(model_path, options)
    try:
        return self_test(engine)
    finally:
        engine.close()
