"""Before a worker takes work: packed embeddings must equal one-by-one embeddings.

This catches a llama.cpp build (or a configuration) whose pooling or batching changed: the probes
are embedded packed together the way shards are, and each alone in one ubatch, with every pooling a
job may ask for; one probe is longer than the ubatch, so a causal model decodes it in pieces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bulkembed.contract.errors import BulkEmbedError
from bulkembed.contract.job import Pooling
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.packing import single_document_shape

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999  # on the CPU packed and alone agree to the last bits (batch invariance)
# CUDA's kernels move a vector with its neighbours, by 1 − cos up to 1.25e-4 on a v4-shaped F16 (docs/benchmarks.md,
# "Batch invariance on CUDA"): a GPU worker held to the CPU's bound would refuse to start. What the test is for, a
# pooling broken across ubatches, gives cos 0.86–0.90 with mean and below 0.3 with cls on the test models.
MIN_COSINE_GPU = 0.999
PROBES = (
    "Query: A beautiful sunset over the beach",
    "Passage: Un beau coucher de soleil sur la plage",
    "Passage: 海滩上美丽的日落",
    "x",
    "Passage: def mean(xs):\n    return sum(xs) / len(xs)",
    "Query: What does mean pooling average over?",
)
POOLINGS = (Pooling.MEAN, Pooling.CLS, Pooling.LAST)  # every pooled kind a job may ask for
LONG_SENTENCE = "Passage: The river carried the boat past the mill, and the miller counted sacks of grain. "


class SelfTestError(BulkEmbedError):
    """Packed and one-by-one embeddings differ: this build or configuration is not exact."""


def embed_alone(engine: Engine, tokens: np.ndarray, pooling: Pooling | None = None) -> np.ndarray:
    """One document in one ubatch, pooled by llama.cpp as asked (default: the model's own pooling): the
    definition of its embedding."""
    return engine.embed([tokens], single_document_shape(len(tokens)), pooling)[0]


def probe_tokens(engine: Engine) -> list[np.ndarray]:
    """The probes, and one longer than one and a half ubatches: decoded in pieces by a causal model, in a
    grown ubatch by a non-causal one (which takes no more than its trained context)."""
    tokens = [engine.vocab.tokenize(p) for p in PROBES]
    n_long = engine.options.ubatch * 3 // 2 + 1
    if not engine.info.causal and engine.info.n_ctx_train:
        n_long = min(n_long, engine.info.n_ctx_train)
    long = engine.vocab.tokenize(LONG_SENTENCE)
    while len(long) < n_long:
        long = np.concatenate([long, long])
    return [*tokens, long[:n_long]]


def self_test(engine: Engine) -> float:
    """The worst cosine between packed and alone over every pooling a job may ask for, the model's own
    first; raises SelfTestError under MIN_COSINE (MIN_COSINE_GPU on a GPU)."""
    tokens = probe_tokens(engine)
    bound = MIN_COSINE_GPU if engine.gpu_offload else MIN_COSINE
    worst_of_all = 1.0
    # A model declaring pooling none (token vectors) is tested on the pooled kinds: they read the same token states.
    for pooling in dict.fromkeys(p for p in (engine.pooling, *POOLINGS) if p is not Pooling.NONE):
        packed = engine.embed(tokens, pooling=pooling)
        alone = np.stack([embed_alone(engine, t, pooling) for t in tokens])
        cos = np.sum(packed * alone, axis=1) / (np.linalg.norm(packed, axis=1) * np.linalg.norm(alone, axis=1))
        worst = int(np.argmin(cos))
        if cos[worst] < bound:
            raise SelfTestError(
                f"self-test failed: probe {worst} ({len(tokens[worst])} tokens) embedded packed differs from "
                f"embedded alone with {pooling.value} pooling (cosine {cos[worst]:.6f} < {bound}); this "
                f"llama.cpp build or configuration (ubatch {engine.options.ubatch}, logical batch "
                f"{engine.options.logical_batch}) is not exact"
            )
        worst_of_all = min(worst_of_all, float(cos.min()))
    return worst_of_all


def self_test_file(model_path: Path, options: EngineOptions) -> float:
    """Load, test, free: run in a spawned process so the worker's parent never starts a GPU context."""
    engine = Engine(model_path, options)
    try:
        return self_test(engine)
    finally:
        engine.close()
