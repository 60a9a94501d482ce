"""Real parts only: a redis-server process, a moto S3 HTTP server, `bulkembed worker` processes and
llama.cpp on tiny generated qwen2vl GGUFs. No GPU exists here, so everything runs on the CPU."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bulkembed.synthetic import (
    OUTLIER,
    TINY,
    dequantized_copy,
    quantize,
    write_bert_gguf,
    write_qwen2vl_gguf,
    write_qwen3_gguf,
)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """A 2-layer qwen2vl (v4's architecture) named like a v4 retrieval file, so the task is inferred."""
    return write_qwen2vl_gguf(models_dir / "tiny-embeddings-text-retrieval-F32.gguf", TINY, seed=0)


@pytest.fixture(scope="session")
def other_model(models_dir: Path) -> Path:
    """Same shape and vocabulary, other weights: a different sha256."""
    return write_qwen2vl_gguf(models_dir / "tiny-embeddings-text-retrieval-F32-b.gguf", TINY, seed=1)


@pytest.fixture(scope="session")
def kind_models(models_dir: Path) -> dict[str, Path]:
    """One tiny model of each kind: non-causal BERTs declaring mean and cls pooling (512 positions, as MiniLM),
    a causal qwen3 declaring last-token pooling (Qwen3-Embedding), and a reranker (rank pooling)."""
    return {
        "bert-mean": write_bert_gguf(models_dir / "tiny-bert-mean.gguf", pooling="mean", seed=2),
        "bert-cls": write_bert_gguf(models_dir / "tiny-bert-cls.gguf", pooling="cls", seed=3),
        "qwen3-last": write_qwen3_gguf(models_dir / "tiny-qwen3-last.gguf", pooling="last", seed=4),
        "bert-rank": write_bert_gguf(models_dir / "tiny-bert-rank.gguf", pooling="rank", seed=5),
    }




@pytest.fixture(scope="session")
def outlier_models(models_dir: Path) -> dict[str, Path]:
    """The outlier model as F32, quantized by llama.cpp (Q8_0, Q4_K_M, IQ3_S), and its Q4_K_M dequantized back to F32
    ("exact": the quantized weights computed without quantized kernels). Named like v4 retrieval files."""
    f32 = write_qwen2vl_gguf(models_dir / "outlier-text-retrieval-F32.gguf", OUTLIER, seed=0, outlier_gain=60)
    models = {"F32": f32}
    for quant in ("Q8_0", "Q4_K_M", "IQ3_S"):
        models[quant] = quantize(f32, models_dir / f"outlier-text-retrieval-{quant}.gguf", quant, threads=2)
    models["exact"] = dequantized_copy(models["Q4_K_M"], models_dir / "outlier-text-retrieval-Q4_K_M-exact.gguf")
    return models


def letter_texts(n: int, seed: int = 0, longest: int = 400) -> list[str]:
    """Random lowercase words: about a token a letter in every synthetic vocabulary (BERT's too), so lengths
    reach `longest` tokens; every fifth text is long (100 to `longest`), the rest short."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        letters = int(rng.integers(100, longest)) if i % 5 == 0 else int(rng.integers(1, 40))
        word_lengths = rng.integers(1, 9, size=letters)
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=k)) for k in word_lengths]
        texts.append(" ".join(words)[:letters].strip() or "a")
    return texts


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


def _wait_for_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 in server mode: a real HTTP endpoint that boto3 and pyarrow talk to."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(s3_env(endpoint))
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def mixed_texts(n: int, seed: int = 0, long_every: int = 10, long_tokens: tuple[int, int] = (150, 500)) -> list[str]:
    """Short texts with some 2-8x longer than a 64-token ubatch (the tiny vocab is about a token a byte)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "river", "model", "token", "embed", "over", "and", "sea"]
    texts = []
    for i in range(n):
        length = int(rng.integers(*long_tokens)) if i % long_every == 0 else int(rng.integers(2, 60))
        text = " ".join(rng.choice(words, size=max(1, length // 5)))
        texts.append(text[:length] if length > 1 else text[:1])
    return texts


def write_corpus(path: Path, ids: list, texts: list, id_type: pa.DataType | None = None,
                 row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, id_type or pa.string()), "text": pa.array(texts, pa.string())}), path,
                   row_group_size=row_group_size)
    return path


class Workers:
    """`bulkembed worker` processes, each in its own process group so a test can kill the tree."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir, self.processes = env, log_dir, []

    def start(self, model: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
        log = self.log_dir / f"worker-{len(self.processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "bulkembed.cli", "worker", "--model", str(model), "--threads", "1", *extra],
            env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        process.log = log
        self.processes.append(process)
        if wait:
            self.wait_ready(process)
        return process

    def start_planner(self, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen:
        """A `bulkembed planner` of one process (it serves the plan queue of this test's Redis)."""
        log = self.log_dir / f"planner-{len(self.processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "bulkembed.cli", "planner", "--concurrency", "1", *extra],
            env=env or self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        process.log = log
        self.processes.append(process)
        if wait:
            self.wait_ready(process)
        return process

    def wait_ready(self, process: subprocess.Popen, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = process.log.read_text()
            if " ready." in text or "ready with" in text and "celery@" in text:
                return
            if process.poll() is not None:
                raise RuntimeError(f"worker exited {process.returncode}:\n{text}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready:\n{process.log.read_text()}")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)


def hub_cache(home: Path, repo: str, file_name: str, model: Path) -> Path:
    """A Hugging Face cache under HF_HOME=`home` holding `model` as huggingface_hub stores a download: the content in
    blobs/, named by its hash, and the file's name in snapshots/REV/ a symbolic link to it."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    revision, blob = "0" * 40, hashlib.sha256(file_name.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "blobs").mkdir(exist_ok=True)
    shutil.copyfile(model, folder / "blobs" / blob)
    (folder / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    link = folder / "snapshots" / revision / file_name
    link.symlink_to(Path("../../blobs") / blob)
    return link


@pytest.fixture
def cli_env(redis_server: str, s3_server: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    env.update(s3_env(s3_server))
    env.update({"BULKEMBED_REDIS_URL": redis_server, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "BULKEMBED_METRICS_PORT": "0"})
    return env


@pytest.fixture
def workers(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(cli_env, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def run_cli(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bulkembed.cli", *map(str, args)], env=cli_env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def reference_embedder(tiny_model: Path) -> Callable[[list[str]], np.ndarray]:
    """Each text decoded alone in one ubatch by llama-cpp-python's own Llama.embed: an independent path."""
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    cache: dict[Path, Llama] = {}

    def embed(texts: list[str], model: Path = tiny_model) -> np.ndarray:
        if model not in cache:
            cache[model] = Llama(str(model), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=4096,
                                 n_batch=4096, n_ubatch=4096, n_threads=2, verbose=False)
        vectors = np.array([cache[model].embed(t, normalize=False) for t in texts], np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return embed


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator:
    """A Redis of this test's own: nothing left over by another test's killed workers."""
    from tests.faults_support import RedisProcess  # it imports this module

    server = RedisProcess(free_port(), tmp_path / "redis", "--save", "", "--appendonly", "no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(cli_env: dict[str, str], fresh_redis) -> dict[str, str]:
    """Short redelivery and time limits, for the workers and submit alike."""
    return cli_env | {"BULKEMBED_REDIS_URL": fresh_redis.url, "BULKEMBED_VISIBILITY_TIMEOUT": "10",
                      "BULKEMBED_TASK_TIME_LIMIT": "8"}



@pytest.fixture
def pool(fault_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    """Workers and planners on this test's own Redis (fault_env), stopped at teardown."""
    processes = Workers(fault_env, tmp_path)
    yield processes
    processes.stop_all()


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Callable]:
    """Start CLI commands in the background; whatever is still running at teardown is killed."""
    from tests.faults_support import Background  # it imports this module

    started: list[Background] = []

    def start(args: list, env: dict[str, str], name: str) -> Background:
        started.append(Background(args, env, tmp_path, f"{name}-{len(started)}"))
        return started[-1]

    yield start
    for command in started:
        command.stop()
