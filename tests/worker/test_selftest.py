import subprocess
import sys

import pytest

from bulkembed.contract.job import Pooling
from bulkembed.synthetic import write_qwen3_gguf
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.selftest import MIN_COSINE, SelfTestError, self_test
from tests.conftest import REPO


def test_exact_engine_passes(tiny_model):
    engine = Engine(tiny_model, EngineOptions(ubatch=64, threads=2))
    try:
        assert self_test(engine) >= MIN_COSINE
    finally:
        engine.close()


def test_a_model_declaring_token_vectors_passes(tmp_path):
    """A GGUF declaring pooling none (late-chunking models) starts a worker: the self-test checks the pooled kinds."""
    engine = Engine(write_qwen3_gguf(tmp_path / "tokens.gguf", pooling="none"), EngineOptions(ubatch=64, threads=2))
    try:
        assert engine.pooling is Pooling.NONE
        assert self_test(engine) >= MIN_COSINE
    finally:
        engine.close()


def test_upstream_style_batching_is_refused(tiny_model):
    """Decodes bigger than the ubatch (what llama-server without ub = b does) split long probes."""
    engine = Engine(tiny_model, EngineOptions(ubatch=64, threads=2, logical_batch=1024))
    try:
        with pytest.raises(SelfTestError, match="packed differs from embedded alone"):
            self_test(engine)
    finally:
        engine.close()


def test_worker_refuses_to_start(tiny_model, cli_env):
    env = cli_env | {"BULKEMBED_LOGICAL_BATCH": "1024"}
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "worker", "--model", str(tiny_model),
                           "--ubatch", "64", "--threads", "1"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3
    assert "self-test failed" in done.stderr and "refusing to start" in done.stderr
