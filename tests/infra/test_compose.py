"""docker-compose.yml, read as Compose would with an empty environment (every ${VAR:-default} at
its default): services, images, environment, volumes, health, GPU and the ports they agree on."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest
import yaml

from bulkembed.contract.model import queue_name
from bulkembed.contract.queue import celery_app
from tests.infra.manifests import (
    COMPOSE_FILE,
    INFRA,
    INIT,
    REPO,
    compose_variables,
    console_scripts,
    duration_s,
    env_name_problem,
    interpolate,
    is_pinned,
    model_file_name,
    option,
    parse_cli,
    parse_dockerfile,
    settings_class,
    without_init,
)

MIN_STOP_GRACE_S = 300


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw) -> dict:
    return interpolate(raw["services"])


def built(services: dict) -> dict:
    """The services built from this repository's Dockerfiles: the bulkembed processes."""
    return {name: s for name, s in services.items() if "build" in s}


def image(service: dict):
    """The Dockerfile a built service comes from, and its target stage."""
    dockerfile = parse_dockerfile(REPO / service["build"]["context"] / service["build"]["dockerfile"])
    return dockerfile, dockerfile.stage(service["build"].get("target"))


def argv(service: dict) -> list[str]:
    """What the container runs: the image's ENTRYPOINT followed by the service's command."""
    dockerfile, stage = image(service)
    entrypoint = service.get("entrypoint") or without_init(dockerfile.exec_form(stage, "ENTRYPOINT"))
    command = service.get("command") or dockerfile.exec_form(stage, "CMD")
    assert isinstance(command, list), "use the exec (list) form for command"
    return entrypoint + command


def role(service: dict) -> str:
    return argv(service)[1]


def container_ports(service: dict) -> set[int]:
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        target = p["target"] if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
        ports.add(int(target))
    return ports


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            mounts.append((v.get("source", ""), v["target"]))
        else:
            source, target = v.split(":")[:2]
            mounts.append((source, target))
    return mounts


def test_the_expected_services_and_profiles(services):
    expected = {"redis": None, "s3": None, "s3-bucket": None, "worker": None, "planner": None,
                "worker-cpu": ["cpu"], "producer": ["submit"], "flower": ["flower"]}
    assert set(services) == set(expected)
    for name, profiles in expected.items():
        assert services[name].get("profiles") == profiles, f"{name}: profiles {services[name].get('profiles')}"


def test_every_image_is_pinned(services):
    for name, service in services.items():
        assert "image" in service, f"{name} has no image (a built service needs one to be tagged)"
        assert is_pinned(service["image"]), f"{name}: {service['image']} is not pinned to a tag"
    assert not services["s3"]["image"].startswith(("minio/", "docker.io/minio/")), \
        "minio/minio left Docker Hub: pull MinIO from quay.io"


def test_built_services_run_the_bulkembed_console_script(services):
    assert set(built(services)) == {"worker", "worker-cpu", "producer", "planner"}
    for name, service in built(services).items():
        path = REPO / service["build"]["context"] / service["build"]["dockerfile"]
        assert path.is_file(), f"{name}: {path} does not exist"
        command = argv(service)
        assert command[0] in console_scripts(), f"{name} runs {command[0]}, not a console script of pyproject"
        args = parse_cli(command[1:])
        assert args.command == {"producer": "submit", "planner": "planner"}.get(name, "worker")
    assert parse_cli(argv(services["worker"])[1:]).gpu_layers != 0, "the GPU worker must offload to the GPU"


def test_workers_and_producer_use_one_model_so_one_queue(services):
    queues = {name: queue_name(model_file_name(option(argv(s), "--model"))) for name, s in built(services).items()
              if name != "planner"}  # planners serve every model: they read a job's model from its spec
    assert set(queues.values()) == {"bulkembed.jina-embeddings-v4-text-retrieval-iq3_m"}, queues


def test_environment_names_are_settings_or_standard_variables(services):
    for name, service in built(services).items():
        settings_cls = settings_class(role(service))
        for key in service.get("environment", {}):
            problem = env_name_problem(key, settings_cls)
            assert problem is None, f"{name}: {problem}"


def test_environment_values_are_valid_settings(services, monkeypatch):
    for name, service in built(services).items():
        with monkeypatch.context() as env:
            for key, value in service["environment"].items():
                env.setenv(key, str(value))
            settings = settings_class(role(service))()
            celery_app(settings, "compose-check")
            assert settings.task_time_limit < settings.visibility_timeout, name
            assert settings.redis_url.get_secret_value().startswith("redis://"), name


def test_every_named_volume_is_declared_and_every_bind_mount_exists(raw, services):
    declared = set(raw.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, target in volume_mounts(service):
            assert target.startswith("/"), f"{name}: {target} is not an absolute container path"
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_the_model_cache_is_on_the_models_volume(services):
    for name, service in built(services).items():
        dockerfile, stage = image(service)
        hf_home = service["environment"].get("HF_HOME") or dockerfile.env(stage)["HF_HOME"]
        assert ("models", hf_home) in volume_mounts(service), f"{name}: HF_HOME {hf_home} is not the models volume"


def test_redis_keeps_queued_shards(services):
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command, "AOF must be on: a restart would lose queued shards"
    assert "--maxmemory-policy noeviction" in command, "eviction would drop queued shards silently"
    assert any(target == "/data" for _, target in volume_mounts(redis)), "the AOF must be on a volume"
    assert is_pinned(redis["image"]) and redis["image"].startswith("redis:7")


def test_redis_and_s3_have_healthchecks(services):
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert services["s3"]["healthcheck"]["test"]


def test_dependencies_wait_for_health_and_for_the_bucket(services):
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert isinstance(spec, dict), f"{name}: depends_on must give a condition"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck for {name} to wait on"
            if spec["condition"] == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} must be a one-shot"
    for name in built(services):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["s3"]["condition"] == "service_healthy", name
        assert depends["s3-bucket"]["condition"] == "service_completed_successfully", name


def test_the_gpu_worker_reserves_one_nvidia_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["worker-cpu"]


def test_the_planner_reads_a_local_input_where_the_producer_was_given_it(services):
    """submit queues units by the path it was given; the planner opens them by that path: both must mount the same
    folder at the same place (a folder on the producer alone failed every job at its first unit)."""
    producer, planner = set(volume_mounts(services["producer"])), set(volume_mounts(services["planner"]))
    assert producer <= planner, f"mounted on the producer, not on the planner: {producer - planner}"


def test_a_dead_containers_shard_or_unit_comes_back_within_the_hour(services, monkeypatch):
    """A container killed mid-shard or mid-unit (OOM, a restart) leaves its message unacknowledged until the
    visibility timeout: the default (7200 s) would stall a single-node job for two hours."""
    for name, service in built(services).items():
        with monkeypatch.context() as env:
            for key, value in service["environment"].items():
                env.setenv(key, str(value))
            assert settings_class(role(service))().visibility_timeout <= 3600, name


def test_workers_and_planners_get_time_to_finish_their_task(services):
    for name, service in built(services).items():
        if role(service) in ("worker", "planner"):
            grace = duration_s(service.get("stop_grace_period", "10s"))
            assert grace >= MIN_STOP_GRACE_S, f"{name}: stop_grace_period {grace}s; Docker's default is 10s"


def test_the_s3_endpoint_is_the_s3_service_port(services):
    s3 = services["s3"]
    command = s3["command"]
    address = command[command.index("--address") + 1] if "--address" in command else ":9000"
    s3_port = int(address.rsplit(":", 1)[1])
    assert s3_port in container_ports(s3), f"s3 listens on {s3_port} but does not expose it"
    for name, service in built(services).items():
        endpoint = urlparse(service["environment"]["AWS_ENDPOINT_URL_S3"])
        assert (endpoint.hostname, endpoint.port) == ("s3", s3_port), f"{name}: {endpoint.geturl()}"
    bucket_cmd = " ".join(services["s3-bucket"]["command"])
    assert f"http://s3:{s3_port}" in bucket_cmd


def test_credentials_are_the_s3_servers(raw):
    """The keys the workers sign with are the MinIO root user's: the same ${VAR:-default}."""
    s3_env = raw["services"]["s3"]["environment"]
    for name in ("worker", "worker-cpu", "producer"):
        env = raw["services"][name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == s3_env["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == s3_env["MINIO_ROOT_PASSWORD"], name
    secret = interpolate(s3_env["MINIO_ROOT_PASSWORD"])
    assert len(secret) >= 8, "MinIO refuses root passwords shorter than 8 characters"


def test_the_producer_writes_to_the_bucket_that_is_created(services):
    out = urlparse(option(argv(services["producer"]), "--out"))
    assert out.scheme == "s3"
    bucket_cmd = " ".join(services["s3-bucket"]["command"])
    assert re.search(rf"mc mb (--\S+ )*local/{re.escape(out.netloc)}\b", bucket_cmd), bucket_cmd
    data = [target for source, target in volume_mounts(services["producer"]) if source == "./samples"]
    assert data, "./samples is not mounted into the producer"
    corpus = argv(services["producer"])[2]
    assert corpus.startswith(data[0] + "/") and (REPO / "samples" / corpus[len(data[0]) + 1:]).is_file(), corpus


def test_redis_url_points_at_the_redis_service(services):
    redis_command = services["redis"]["command"]
    port = int(redis_command[redis_command.index("--port") + 1]) if "--port" in redis_command else 6379
    assert port in container_ports(services["redis"])
    for name, service in built(services).items():
        url = urlparse(service["environment"]["BULKEMBED_REDIS_URL"])
        assert (url.hostname, url.port or 6379) == ("redis", port), name
    assert f"--broker=redis://redis:{port}/0" in services["flower"]["command"]


def test_metrics_port_is_declared(services):
    for name, service in built(services).items():
        if role(service) == "worker":
            port = int(service["environment"]["BULKEMBED_METRICS_PORT"])
            assert port in container_ports(service), f"{name}: metrics port {port} neither exposed nor published"


def test_every_interpolated_variable_has_a_default_and_is_documented(raw):
    variables = compose_variables(COMPOSE_FILE.read_text())
    missing_default = sorted(name for name, default in variables.items() if default is None)
    assert not missing_default, f"no default for {missing_default}: `docker compose up` would need them set"
    example = {}
    for line in (INFRA / "compose.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert set(example) == set(variables), f"compose.env.example vs compose: {set(example) ^ set(variables)}"
    for name, default in variables.items():
        assert example[name] == default, f"{name}: example {example[name]!r}, compose default {default!r}"


def test_redis_has_a_memory_limit_for_noeviction_to_act_on(raw, services):
    command = services["redis"]["command"]
    assert "--maxmemory" in command, "noeviction without maxmemory never refuses anything: Redis grows until killed"
    limit = option(command, "--maxmemory")
    assert re.fullmatch(r"\d+(mb|gb)", limit), limit
    assert re.search(r"#.*\n.*--maxmemory", COMPOSE_FILE.read_text()), "say where the value comes from"


def test_every_published_port_is_on_loopback(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"


def test_bulkembed_runs_under_an_init(services):
    """PID 1 ignores signals it has no handler for: an init must forward SIGTERM to bulkembed."""
    for name, service in built(services).items():
        dockerfile, stage = image(service)
        entrypoint = service.get("entrypoint") or dockerfile.exec_form(stage, "ENTRYPOINT")
        assert service.get("init") is True or entrypoint[:len(INIT)] == INIT, f"{name}: bulkembed would be PID 1"
        assert not (service.get("init") and entrypoint[:len(INIT)] == INIT), f"{name}: two inits"


def test_the_cpu_worker_is_started_without_the_gpu_one():
    text = COMPOSE_FILE.read_text()
    assert "docker compose up -d worker-cpu" in text
    assert not re.search(r"^\s*#\s*(\S+\s+)*--profile cpu up -d\s*$", text, re.MULTILINE), \
        "`--profile cpu up -d` alone also starts the GPU worker"


def test_the_env_file_with_secrets_is_not_committed():
    patterns = (REPO / ".gitignore").read_text().split()
    assert ".env" in patterns or "/.env" in patterns
    assert "HF_TOKEN" in (INFRA / "compose.env.example").read_text()


def test_the_docs_name_the_drivers_the_cuda_image_accepts():
    # nvidia/cuda:12.6.3's NVIDIA_REQUIRE_CUDA: cuda>=12.6 (driver 560+) or the 470, 535 and 550 branches.
    dockerfile = (INFRA / "worker.Dockerfile").read_text()
    assert "ARG CUDA_VERSION=12.6." in dockerfile and "FROM nvidia/cuda:${CUDA_VERSION}-" in dockerfile
    deploy = " ".join((REPO / "docs" / "deploy.md").read_text().split())
    for claim in ("560 or newer", "535 or 550 branch", "NVIDIA_REQUIRE_CUDA"):
        assert claim in deploy, claim
    assert "525 or newer" not in deploy


def test_the_minio_pin_says_it_predates_the_security_fix(services):
    release = services["s3"]["image"].rsplit(":", 1)[1]
    text = COMPOSE_FILE.read_text()
    fix = "RELEASE.2025-10-15T17-29-55Z"
    assert release < fix and fix in text and "CVE-2025-62506" in text, "say the pin predates the fix, and why"
    assert "loopback" in text
