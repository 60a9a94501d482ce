"""Settings: the time limit derived from the visibility timeout, and errors that name their variable."""

from __future__ import annotations

import pytest

from bulkembed.contract.errors import SettingsError
from bulkembed.contract.queue import celery_app
from bulkembed.contract.settings import ProducerSettings, WorkerSettings


@pytest.fixture(autouse=True)
def no_bulkembed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("BULKEMBED_")]:
        monkeypatch.delenv(name)


def test_the_time_limit_is_half_the_visibility_timeout_when_only_that_is_set(monkeypatch):
    monkeypatch.setenv("BULKEMBED_VISIBILITY_TIMEOUT", "15")
    settings = WorkerSettings()
    assert (settings.visibility_timeout, settings.task_time_limit) == (15, 7)
    app = celery_app(settings, "settings-test")
    assert app.conf.task_time_limit == 7
    assert app.conf.broker_transport_options["visibility_timeout"] == 15


def test_defaults_and_explicit_values_are_kept(monkeypatch):
    assert (ProducerSettings().visibility_timeout, ProducerSettings().task_time_limit) == (7200, 3600)
    monkeypatch.setenv("BULKEMBED_VISIBILITY_TIMEOUT", "100")
    monkeypatch.setenv("BULKEMBED_TASK_TIME_LIMIT", "90")
    assert WorkerSettings().task_time_limit == 90


@pytest.mark.parametrize(("env", "message"), [
    ({"BULKEMBED_TASK_TIME_LIMIT": "7200"}, "BULKEMBED_TASK_TIME_LIMIT (7200) must be below "
                                            "BULKEMBED_VISIBILITY_TIMEOUT (7200)"),
    ({"BULKEMBED_VISIBILITY_TIMEOUT": "50", "BULKEMBED_TASK_TIME_LIMIT": "60"}, "(60) must be below"),
    ({"BULKEMBED_UBATCH": "8"}, "BULKEMBED_UBATCH='8': Input should be greater than or equal to 32"),
    ({"BULKEMBED_FLASH_ATTN": "yes"}, "BULKEMBED_FLASH_ATTN='yes'"),
    ({"BULKEMBED_LOG_LEVEL": "verbose"}, "BULKEMBED_LOG_LEVEL='verbose': must be one of DEBUG"),
])
def test_a_wrong_value_names_its_variable(monkeypatch, env: dict[str, str], message: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match="^invalid settings: ") as raised:
        WorkerSettings()
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_every_problem_is_on_the_one_line(monkeypatch):
    monkeypatch.setenv("BULKEMBED_THREADS", "-1")
    monkeypatch.setenv("BULKEMBED_METRICS_PORT", "http")
    with pytest.raises(SettingsError) as raised:
        WorkerSettings()
    assert "BULKEMBED_THREADS='-1'" in str(raised.value) and "BULKEMBED_METRICS_PORT='http'" in str(raised.value)


def test_a_wrong_redis_url_is_refused_without_showing_it(monkeypatch):
    monkeypatch.setenv("BULKEMBED_REDIS_URL", "https://:s3cret-pass@redis.example.com:6379/0")
    with pytest.raises(SettingsError, match="BULKEMBED_REDIS_URL: must start with redis://") as raised:
        ProducerSettings()
    assert "s3cret" not in str(raised.value)


def test_log_level_is_case_insensitive(monkeypatch):
    monkeypatch.setenv("BULKEMBED_LOG_LEVEL", "debug")
    assert ProducerSettings().log_level == "DEBUG"


def test_a_publish_to_a_redis_that_never_answers_gives_up(monkeypatch):
    """A Redis that takes the connection and never answers, as a half-open connection does after a failover: the
    publish fails after the broker's socket timeout (and is retried or handed back by its caller). Before, kombu
    waited for ever, and the planner or worker with it."""
    import socket
    import threading

    from bulkembed.contract import queue

    monkeypatch.setattr(queue, "BROKER_SOCKET_TIMEOUT_S", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))  # accepted by the kernel, never read or answered
    monkeypatch.setenv("BULKEMBED_REDIS_URL", f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
    app = celery_app(WorkerSettings(), "half-open-test")
    raised: list[Exception] = []

    def publish() -> None:
        try:
            app.send_task("bulkembed.test", queue="half-open", retry=False)
        except Exception as exc:  # noqa: BLE001 - what it raises is the point
            raised.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(20)
    listener.close()
    assert not thread.is_alive(), "the publish still waits on a Redis that never answers"
    assert raised and "Timeout" in f"{type(raised[0]).__name__} {raised[0]}", raised
