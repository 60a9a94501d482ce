"""Secrets stay secret, TLS and passwords work, and a worker never embeds with the wrong model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import redis

from bulkembed.contract import keys
from bulkembed.synthetic import TINY, write_qwen2vl_gguf
from tests.conftest import REPO, Workers, _wait_for_port, free_port, mixed_texts, write_corpus
from tests.faults_support import Holds, check_exactly_once, wait_until
from tests.worker.test_metrics import scrape

PASSWORD = "s3cr3t-redis-pw-7f1c"
AWS_SECRET = "aws-secret-key-that-must-not-leak-9c2e"


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server with TLS only and a password; a CA and a localhost certificate made here."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.crt", "r.key", "r.csr", "r.crt"))
    run = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=bulkembed-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", ext)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", cert,
         "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no", "--requirepass", PASSWORD,
         "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_port(port)
    yield f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    process.terminate()
    process.wait(10)


def test_tls_redis_with_password_and_no_secret_in_any_output(tls_redis, cli_env, tmp_path, tiny_model, bucket):
    env = cli_env | {"BULKEMBED_REDIS_URL": tls_redis, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    corpus = write_corpus(tmp_path / "c.parquet", [f"d{i}" for i in range(200)], mixed_texts(200, seed=5))
    pool = Workers(env, tmp_path)
    try:
        pool.start(tiny_model)
        out = f"s3://{bucket}/tls"
        done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model",
                               str(tiny_model), "--out", out, "--shard-tokens", "3000", "--wait"],
                              env=env | {"BULKEMBED_LOG_LEVEL": "DEBUG"}, cwd=REPO, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        status = subprocess.run([sys.executable, "-m", "bulkembed.cli", "status", done.stdout.split()[0], "--json"],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert json.loads(status.stdout)["state"] == "done"
    finally:
        pool.stop_all()
    everything = done.stdout + done.stderr + status.stdout + status.stderr + pool.processes[0].log.read_text()
    assert "celery@" in everything or "ready" in everything  # the logs are there
    assert PASSWORD not in everything and AWS_SECRET not in everything


def test_wrong_redis_password_is_a_clear_error_without_the_password(tls_redis, cli_env, tmp_path, tiny_model):
    wrong = tls_redis.replace(PASSWORD, "wrong-password-123")
    corpus = write_corpus(tmp_path / "c.parquet", ["a"], ["x"])
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model", str(tiny_model),
                           "--out", str(tmp_path / "o")], env=cli_env | {"BULKEMBED_REDIS_URL": wrong}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "wrong-password-123" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_worker_with_another_model_leaves_shards_to_the_right_one_or_fails_them(cli_env, tmp_path, workers,
                                                                                 tiny_model, run_cli):
    """Same file name (same queue), other weights: the sha256 differs and the impostor writes nothing. While a worker
    of the job's model serves the queue, the impostor hands the shards it takes back to it, and the job completes.
    Before, it failed every shard it took for good: one such worker in a fleet (a repository updated under it) failed
    whole jobs. Alone, it fails them, saying why, rather than passing them round for ever."""
    holds = Holds(tmp_path / "held")
    workers.env = cli_env | holds.env
    right = workers.start(tiny_model)  # it holds its first shard: the impostor takes the next ones meanwhile
    port = free_port()
    workers.env = cli_env | {"BULKEMBED_METRICS_PORT": str(port)}
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    impostor = workers.start(write_qwen2vl_gguf(impostor_dir / tiny_model.name, TINY, seed=42))
    ids = [f"d{i}" for i in range(40)]
    corpus = write_corpus(tmp_path / "c.parquet", ids, mixed_texts(len(ids), seed=8))
    out = tmp_path / "out"
    submit = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model",
                               str(tiny_model), "--out", str(out), "--shard-tokens", "400", "--wait"], env=cli_env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holds.wait()
        wait_until(lambda: "left to a worker of that model" in impostor.log.read_text(), 120,
                   "the impostor to hand a shard back")
        assert not list(out.glob("0*.arrow")), "no vectors from the wrong model"
        handed_back = f'bulkembed_shards_total{{model="{tiny_model.name}",outcome="handed_back"}}'
        wait_until(lambda: scrape(port).get(handed_back, 0) >= 1, 30, "the hand-back counted in the metrics")
        holds.auto_release()
        assert submit.wait(240) == 0, submit.stderr.read()[-3000:]
    finally:
        holds.stop()
    check_exactly_once(str(out), ids)

    right.send_signal(signal.SIGTERM)  # a worker that stops withdraws its model from the queue's report
    assert right.wait(60) == 0
    done = run_cli("submit", corpus, "--model", tiny_model, "--out", tmp_path / "alone", "--wait", timeout=120)
    assert done.returncode == 1
    assert "is not the job's" in done.stderr and "no worker of that model serves its queue" in done.stderr
    assert not list((tmp_path / "alone").glob("0*.arrow")), "no vectors from the wrong model"


def test_rediss_refuses_an_untrusted_certificate_by_default(tls_redis):
    """A rediss:// URL that names no CA and no ssl_cert_reqs: the server's certificate (from a CA the
    system does not trust) is refused by the broker connection and by the job registry alike."""
    from bulkembed.contract.errors import BulkEmbedError
    from bulkembed.contract.queue import celery_app
    from bulkembed.contract.registry import JobRegistry
    from bulkembed.contract.settings import Settings

    untrusted = tls_redis.split("?")[0]
    app = celery_app(Settings(redis_url=untrusted), "tls-test")
    with pytest.raises(Exception) as caught, app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(caught.value) + repr(caught.value.__cause__), repr(caught.value)
    with pytest.raises(BulkEmbedError, match="cannot reach Redis"):
        JobRegistry.from_url(untrusted)
    # The same server with its CA named in the URL: the refusal was the certificate.
    with celery_app(Settings(redis_url=tls_redis), "tls-test").connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)


def test_a_pickle_serialized_message_is_refused(cli_env, tmp_path, tiny_model):
    """A shard message serialized with pickle (what an attacker with access to Redis could send to run
    code in a worker) is refused and dropped, never run; the worker goes on."""
    from bulkembed.contract.queue import TASK_EMBED_SHARD, celery_app
    from bulkembed.contract.settings import Settings
    from tests.faults_support import RedisProcess, redis_hash, wait_until

    server = RedisProcess(free_port(), tmp_path / "redis", "--save", "", "--appendonly", "no")
    server.start()
    pool = Workers(cli_env | {"BULKEMBED_REDIS_URL": server.url}, tmp_path)
    try:
        worker = pool.start(tiny_model)
        app = celery_app(Settings(redis_url=server.url), "attacker")
        queue = f"bulkembed.{tiny_model.stem.lower()}"
        app.send_task(TASK_EMBED_SHARD, args=[{"job_id": "evil"}], queue=queue, serializer="pickle")
        wait_until(lambda: "Refusing to deserialize untrusted content of type pickle" in worker.log.read_text(), 30,
                   "the worker to refuse the message")
        client = redis.Redis.from_url(server.url)
        wait_until(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 10, "the message to be dropped")
        assert not redis_hash(server.url, keys.REDIS_JOB_ATTEMPTS.format(job_id="evil")), "the task never ran"
        assert "] received" not in worker.log.read_text() and worker.poll() is None
    finally:
        pool.stop_all()
        server.stop()
