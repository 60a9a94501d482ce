"""Wrong settings and wrong options, through the real `bulkembed` command: exit 2, one line on
stderr that names what is wrong, never a traceback."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulkembed.contract.settings import ProducerSettings, Settings, WorkerSettings

# Every command, with arguments that are otherwise fine, so only the wrong setting can stop it.
COMMANDS = [
    ["submit", "corpus.parquet", "--model", "model.gguf", "--out", "out"],
    ["worker", "--model", "model.gguf"],
    ["status", "0123456789abcdef"],
    ["run", "corpus.parquet", "--model", "model.gguf", "--out", "out"],
    ["eval", "dataset", "--model", "model.gguf"],
    ["bench", "--synthetic-model", "tiny"],
    ["--help"],
]

# One or more wrong values of every BULKEMBED_* setting.
WRONG_SETTINGS = [
    ("REDIS_URL", "http://user:hunter2@redis:6379/0"),
    ("REDIS_URL", "localhost:6379"),
    ("VISIBILITY_TIMEOUT", "ten"),
    ("VISIBILITY_TIMEOUT", "1"),
    ("TASK_TIME_LIMIT", "0"),
    ("TASK_TIME_LIMIT", "9000"),  # above the default visibility timeout, 7200
    ("SHARD_MAX_ATTEMPTS", "0"),
    ("TRANSIENT_RETRIES", "-1"),
    ("LOG_LEVEL", "LOUD"),
    ("SHARD_TOKENS", "0"),
    ("MAX_UBATCH", "0"),
    ("UBATCH", "16"),
    ("UBATCH", "big"),
    ("ENGINES", "0"),
    ("ENGINES", "many"),
    ("PROBE_CACHE", ""),
    ("STORE_OUTAGE_S", "-1"),
    ("STORE_BACKOFF_MAX_S", "0"),
    ("TEST_HOLD_DIR", "/no/such/folder"),
    ("GPU_LAYERS", "all"),
    ("THREADS", "-2"),
    ("METRICS_PORT", "70000"),
    ("FLASH_ATTN", "maybe"),
    ("LOGICAL_BATCH", "-1"),
    ("SKIP_LM_HEAD", "sometimes"),
    ("MIN_DECODE", "-1"),
    ("ISOLATE", "always"),
    ("JOB_RETENTION_S", "0"),
    ("REDIS_WAIT_S", "-5"),
    ("UNIT_ROWS", "0"),
    ("QUEUE_PER_ENGINE", "0"),
    ("QUEUE_MIN", "none"),
    ("PLAN_LOCK_S", "1"),
    ("DEDUP_MEMORY_MB", "8"),
]

# Wrong option values of each command (the parser's and the command's own checks).
WRONG_OPTIONS = [
    (["submit", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--shard-tokens", "0"], "--shard-tokens"),
    (["submit", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--role", "author"], "--role"),
    (["worker", "--model", "model.gguf", "--ubatch", "16"], "--ubatch"),
    (["run", "c.parquet", "--out", "o", "--engines", "0"], "--engines"),
    (["worker", "--model", "model.gguf", "--threads", "-1"], "--threads"),
    (["worker", "--model", "model.gguf", "--gpu-layers", "-5"], "--gpu-layers"),
    (["worker", "--model", "no-such-model.gguf"], "no-such-model.gguf"),
    (["worker"], "--model"),
    (["cancel"], "job"),
    (["status", "--failures"], "name the job"),
    (["planner", "--concurrency", "0"], "--concurrency"),
    (["embed", "a text", "--model", "model.gguf", "--out", "vectors.csv"], "--out"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--max-tokens", "0"], "--max-tokens"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--dims", "0"], "--dims"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--dtype", "int4"], "--dtype"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "out", "--pooling", "rank"], "--pooling"),
    (["run", "missing.parquet", "--model", "model.gguf", "--out", "out"], "missing.parquet"),
    (["eval", "dataset", "--model", "model.gguf", "--k", "x"], "--k"),
    (["eval", "no-such-dataset", "--model", "model.gguf"], "no-such-dataset"),
    (["bench", "--synthetic-model", "huge"], "--synthetic-model"),
    (["embed", "--model", "model.gguf"], "no texts"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", ""], "--out is empty"),
    (["run", "", "--model", "model.gguf", "--out", "out"], "the input is empty"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "corpus.parquet/out"], "cannot make the folder"),
    (["run", "corpus.parquet", "--model", "model.gguf", "--out", "s3://"], "names no bucket"),
]


def every_setting() -> set[str]:
    return set(Settings.model_fields) | set(ProducerSettings.model_fields) | set(WorkerSettings.model_fields)


def test_every_setting_is_tried_with_a_wrong_value():
    assert {name.lower() for name, _ in WRONG_SETTINGS} == every_setting()


def test_every_command_is_tried_with_a_wrong_option():
    from bulkembed.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {argv[0] for argv, _ in WRONG_OPTIONS} >= set(commands)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A folder with a corpus, a model and a dataset folder, outside the repository."""
    from tests.conftest import write_corpus

    folder = tmp_path_factory.mktemp("cli-errors")
    write_corpus(folder / "corpus.parquet", ["a", "b"], ["hello world", "the sea"])
    (folder / "model.gguf").symlink_to(tiny_model)
    (folder / "dataset").mkdir()
    return folder


def bulkembed(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    return subprocess.run([sys.executable, "-m", "bulkembed.cli", *argv], env=clean | env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, names: str) -> str:
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert names in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("setting", "argv"), list(zip(WRONG_SETTINGS, itertools.cycle(COMMANDS), strict=False)),
                         ids=lambda v: "=".join(v) if isinstance(v, tuple) else v[0])
def test_a_wrong_setting_is_one_line_and_exit_2(setting: tuple[str, str], argv: list[str], workdir: Path):
    name, value = setting
    variable = f"BULKEMBED_{name}"
    line = assert_one_line_error(bulkembed(argv, {variable: value}, workdir), variable)
    assert "hunter2" not in line  # a Redis URL's password never reaches the terminal


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_every_command_refuses_a_wrong_setting(argv: list[str], workdir: Path):
    assert_one_line_error(bulkembed(argv, {"BULKEMBED_UBATCH": "0"}, workdir), "BULKEMBED_UBATCH")


@pytest.mark.parametrize(("argv", "names"), WRONG_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_wrong_option_is_one_line_and_exit_2(argv: list[str], names: str, workdir: Path):
    assert_one_line_error(bulkembed(argv, {}, workdir), names)


def test_the_issue_example_derives_the_time_limit_and_fails_only_on_the_missing_model(workdir: Path):
    """`BULKEMBED_VISIBILITY_TIMEOUT=15 bulkembed worker --model m.gguf` used to end in a traceback."""
    result = bulkembed(["worker", "--model", "m.gguf"], {"BULKEMBED_VISIBILITY_TIMEOUT": "15"}, workdir)
    line = assert_one_line_error(result, "m.gguf")
    assert "BULKEMBED" not in line


def test_a_worker_that_cannot_reach_redis_says_so_and_exits(tmp_path, tiny_model):
    """Not a silent retry loop: it waits BULKEMBED_REDIS_WAIT_S for Redis (which may start after it), then exits 2
    with one line naming the host, before loading the model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    env |= {"BULKEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0", "BULKEMBED_REDIS_WAIT_S": "3",
            "BULKEMBED_METRICS_PORT": "0"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "worker", "--model", str(tiny_model)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - started >= 3, "it waited for Redis first"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bulkembed: cannot reach Redis at 127.0.0.1:{port}") and "BULKEMBED_REDIS_WAIT_S" in last
    assert "model" not in done.stderr.lower().replace("--model", ""), "it stopped before loading the model"


def test_no_aws_credentials_is_one_line(workdir: Path, s3_server: str, bucket: str):
    """Wherever S3 is first touched: OUT, an S3 input (listed anonymously by pyarrow first), PREV_OUT, an index."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).upload_file(str(workdir / "corpus.parquet"), bucket, "in/c.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKEMBED_", "AWS_"))}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"), "AWS_CONFIG_FILE": str(workdir / "none"),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": s3_server, "AWS_REGION": "us-east-1"}
    for argv in (["run", "corpus.parquet", "--model", "model.gguf", "--out", f"s3://{bucket}/out"],
                 ["run", f"s3://{bucket}/in", "--model", "model.gguf", "--out", "out-anonymous"],
                 ["run", "corpus.parquet", "--model", "model.gguf", "--out", "out-reuse", "--reuse",
                  f"s3://{bucket}/prev"],
                 ["embed", "--index", f"s3://{bucket}/prev", "a query"]):
        result = subprocess.run([sys.executable, "-m", "bulkembed.cli", *argv], env=env, cwd=workdir,
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, "no AWS credentials")


def test_an_unreachable_s3_input_is_one_line(workdir: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_MAX_ATTEMPTS": "1"}
    assert_one_line_error(bulkembed(["run", "s3://bucket/corpus", "--model", "model.gguf", "--out", "out"], env,
                                    workdir), "cannot list the input s3://bucket/corpus")


def test_ctrl_c_is_one_line(workdir: Path):
    """SIGINT while a command waits (here `embed` reading its texts from stdin): no KeyboardInterrupt traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    process = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "embed", "--model", "model.gguf"],
                               env=clean, cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # into its read of stdin
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "bulkembed: interrupted", \
        "embed has no job to resume: " + stderr


def test_a_reader_that_stops_early_is_no_error(workdir: Path):
    """`bulkembed embed … | head -1`: the reader closes the pipe after one line. Before, a BrokenPipeError
    traceback (twice: again at exit, flushing stdout)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BULKEMBED_")}
    texts = "".join(f"text number {i}\n" for i in range(3000))
    done = subprocess.run(f"{sys.executable} -m bulkembed.cli embed --model model.gguf | head -1", shell=True,
                          env=clean, cwd=workdir, input=texts, capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout)["text"] == "text number 0"
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr[-2000:]


def test_a_broken_pipe_other_than_stdouts_is_not_taken_quietly(monkeypatch):
    """Only a closed standard output ends a command quietly; a pipe or socket of its own breaking is an error."""
    from bulkembed import cli

    def broken(args) -> int:
        raise BrokenPipeError("an engine's pipe")

    monkeypatch.setattr(cli, "cmd_status", broken)
    with pytest.raises(BrokenPipeError, match="an engine's pipe"):
        cli.main(["status", "some-job"])
