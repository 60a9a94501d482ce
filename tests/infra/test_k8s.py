"""infra/k8s: the worker Deployment, KEDA's ScaledObject on the model's queue, the Secret every
reference points into, Redis, and the producer Job."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from bulkembed.contract import keys
from bulkembed.contract.model import queue_name
from bulkembed.contract.settings import WorkerSettings
from tests.infra.manifests import (
    INFRA,
    K8S_DIR,
    REPO,
    env_name_problem,
    is_pinned,
    model_file_name,
    option,
    parse_cli,
    parse_dockerfile,
    settings_class,
    without_init,
)

NAMESPACE = "bulkembed"
MIN_GRACE_S = 300
MIN_COOLDOWN_S = 600
CLUSTER_SCOPED = {"Namespace"}


@pytest.fixture(scope="module")
def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(documents, kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(documents) -> dict:
    return one(documents, "Deployment", "bulkembed-worker")


@pytest.fixture(scope="module")
def job(documents) -> dict:
    return one(documents, "Job")


@pytest.fixture(scope="module")
def secret(documents) -> dict:
    s = one(documents, "Secret", "bulkembed")
    return {**s.get("stringData", {}), **s.get("data", {})}


@pytest.fixture(scope="module")
def scaled_object(documents) -> dict:
    return one(documents, "ScaledObject", "bulkembed-worker")


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def image_argv(workload: dict, dockerfile: str, target: str | None) -> list[str]:
    """The image's ENTRYPOINT (from its Dockerfile) followed by the pod's args."""
    parsed = parse_dockerfile(INFRA / dockerfile)
    c = container(workload)
    assert "command" not in c, "keep the image's ENTRYPOINT (exec form, tini as PID 1)"
    return without_init(parsed.exec_form(parsed.stage(target), "ENTRYPOINT")) + c["args"]


def worker_model(deployment) -> str:
    return option(image_argv(deployment, "worker.Dockerfile", None), "--model")


def test_every_document_is_named_and_namespaced(documents):
    assert documents
    for path, doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document lacks apiVersion/kind"
        metadata = doc.get("metadata", {})
        assert metadata.get("name") or metadata.get("generateName"), f"{path.name}: {doc['kind']} has no name"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} namespace"


def test_kustomization_lists_existing_files_and_everything_but_the_secret_and_job():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == manifests - {"secret.example.yaml", "producer-job.yaml"}
    assert kustomization["namespace"] == NAMESPACE


def test_every_image_is_pinned(documents):
    for path, doc in documents:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            assert is_pinned(c["image"]), f"{path.name}: {c['image']} is not pinned"


def test_the_worker_requests_one_gpu(deployment):
    resources = container(deployment)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1, "extended resources need limits equal to requests"


def test_the_worker_drains_gracefully(deployment):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= MIN_GRACE_S, "the default 30 s can cut a shard short"

def test_the_first_apply_starts_no_gpu_pod(deployment):
    # Without `replicas` a Deployment starts with 1; KEDA owns the count from then on.
    assert deployment["spec"].get("replicas") == 0


def test_the_worker_runs_bulkembed_worker_as_the_images_user(deployment):
    args = parse_cli(image_argv(deployment, "worker.Dockerfile", None)[1:])
    assert args.command == "worker"
    parsed = parse_dockerfile(INFRA / "worker.Dockerfile")
    uid = int(parsed.last(parsed.stage(), "USER").split(":")[0])
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == uid
    assert security["fsGroup"] == uid, "the models volume must be writable by the image's user"


def test_prometheus_scrapes_the_metrics_port(deployment):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] == int(env["BULKEMBED_METRICS_PORT"])


@pytest.mark.parametrize(("kind", "name", "dockerfile", "target"),
                         [("Deployment", "bulkembed-worker", "worker.Dockerfile", None),
                          ("Deployment", "bulkembed-planner", "producer.Dockerfile", "producer"),
                          ("Job", None, "producer.Dockerfile", "producer")])
def test_the_models_volume_is_the_hf_cache(documents, kind, name, dockerfile, target):
    workload = one(documents, kind, name)
    c = container(workload)
    parsed = parse_dockerfile(INFRA / dockerfile)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    hf_home = env.get("HF_HOME") or parsed.env(parsed.stage(target))["HF_HOME"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert hf_home in mounts, f"{kind}: nothing mounted at HF_HOME {hf_home}"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert mounts[hf_home] in volumes
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[mounts[hf_home]])


@pytest.mark.parametrize(("kind", "name", "role"), [("Deployment", "bulkembed-worker", "worker"),
                                                     ("Deployment", "bulkembed-planner", "planner"),
                                                     ("Job", None, "producer")])
def test_environment_names_are_settings_or_standard_variables(documents, kind, name, role):
    c = container(one(documents, kind, name))
    names = [e["name"] for e in c.get("env", [])]
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, "envFrom a Secret would import key names unchecked; use secretKeyRef"
        names += list(one(documents, "ConfigMap", source["configMapRef"]["name"])["data"])
    assert names
    for name in names:
        problem = env_name_problem(name, settings_class(role))
        assert problem is None, f"{kind}: {problem}"


def secret_references(documents) -> list[tuple[str, str, str]]:
    """(where, secret name, key) of every secretKeyRef and TriggerAuthentication secretTargetRef."""
    refs = []
    for path, doc in documents:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((f"{path.name} {doc['kind']} {e['name']}", ref["name"], ref["key"]))
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"]["secretTargetRef"]:
                refs.append((f"{path.name} TriggerAuthentication {ref['parameter']}", ref["name"], ref["key"]))
    return refs


def test_every_secret_reference_exists_in_the_secret(documents, secret):
    refs = secret_references(documents)
    assert len(refs) >= 8
    for where, name, key in refs:
        assert name == "bulkembed", f"{where}: unknown Secret {name}"
        assert key in secret, f"{where}: the Secret has no key {key}"


def test_redis_url_password_and_keda_address_agree(documents, secret, scaled_object):
    url = urlparse(secret["redis-url"])
    assert url.scheme in ("redis", "rediss")
    assert url.password == secret["redis-password"], "redis-url must carry redis-password"
    for trigger in (t["metadata"] for t in scaled_object["spec"]["triggers"]):
        assert trigger["address"] == f"{url.hostname}:{url.port}", "KEDA must read the Redis the workers use"
        assert trigger.get("databaseIndex", "0") == (url.path.strip("/") or "0")
    service, namespace = url.hostname.split(".")[:2]
    redis = one(documents, "Service", service)
    assert namespace == redis["metadata"]["namespace"]
    assert url.port in {p["port"] for p in redis["spec"]["ports"]}


def test_keda_scales_the_worker_to_zero_on_its_models_queue(documents, deployment, scaled_object):
    spec = scaled_object["spec"]
    assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    assert spec["pollingInterval"] > 0
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert spec["cooldownPeriod"] >= max(MIN_COOLDOWN_S, grace), "KEDA sees queued shards only, not running ones"
    queue = queue_name(model_file_name(worker_model(deployment)))
    queued, open_jobs = spec["triggers"]
    for trigger in (queued, open_jobs):
        assert trigger["type"] == "redis"
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata is string → string"
        assert trigger["metadata"]["activationListLength"] == "0"
        auth = one(documents, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"password"}
    assert queued["metadata"]["listName"] == queue
    assert int(queued["metadata"]["listLength"]) >= 1


def test_one_worker_stays_while_a_job_has_unfinished_shards(deployment, scaled_object):
    """An orphaned shard waits in kombu's unacked hash for a running worker to restore it: the
    second trigger counts the registry's open jobs on the model's queue and asks for one pod."""
    queue = queue_name(model_file_name(worker_model(deployment)))
    [open_jobs] = [t for t in scaled_object["spec"]["triggers"] if t.get("name") == "open-jobs"]
    assert open_jobs["metadata"]["listName"] == keys.REDIS_QUEUE_OPEN_JOBS.format(queue=queue)
    assert int(open_jobs["metadata"]["listLength"]) >= 10_000, "any number of open jobs must ask for one pod only"


def test_the_time_limit_fits_the_grace_period(documents, deployment, monkeypatch):
    config = one(documents, "ConfigMap", "bulkembed")["data"]
    for name, value in config.items():
        if name.startswith("BULKEMBED_"):
            monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.task_time_limit <= grace, "a warm shutdown may wait for one shard's whole time limit"
    assert settings.visibility_timeout <= 3600, "an orphaned shard should not stall a job for hours"


def test_the_queue_name_is_the_one_documented():
    queue = queue_name(model_file_name("jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M"))
    assert queue == "bulkembed.jina-embeddings-v4-text-retrieval-iq3_m"
    assert queue in (REPO / "docs" / "deploy.md").read_text()
    assert queue in (K8S_DIR / "keda.yaml").read_text()


def test_the_producer_job_submits_to_the_workers_queue(job, deployment):
    args = parse_cli(image_argv(job, "producer.Dockerfile", "producer")[1:])
    assert args.command == "submit"
    assert queue_name(model_file_name(args.model)) == queue_name(model_file_name(worker_model(deployment)))
    assert args.out.startswith("s3://")
    assert job["spec"]["backoffLimit"] == 0, "a retried submit would queue the whole job a second time"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_redis_keeps_queued_shards(documents):
    redis = container(one(documents, "StatefulSet", "redis"))
    args = " ".join(redis["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    env = {e["name"] for e in redis["env"]}
    assert "REDIS_PASSWORD" in env, "$(REDIS_PASSWORD) in args expands only from the container's env"
    assert "/data" in {m["mountPath"] for m in redis["volumeMounts"]}


def memory_bytes(quantity: str) -> int:
    """Kubernetes (Mi, Gi) and Redis (mb, gb: 1024-based) memory quantities."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    number, unit = quantity[:-2], quantity[-2:]
    assert unit in units and number.isdigit(), f"not a memory quantity: {quantity}"
    return int(number) * units[unit]


def test_redis_refuses_writes_below_its_memory_limit(documents):
    redis = container(one(documents, "StatefulSet", "redis"))
    maxmemory = memory_bytes(option(redis["args"], "--maxmemory"))
    limit = memory_bytes(redis["resources"]["limits"]["memory"])
    # Room for the AOF rewrite's fork: ~75% of the limit, not so low that the limit is wasted.
    assert 0.6 * limit <= maxmemory <= 0.8 * limit, (maxmemory, limit)


def test_redis_is_evicted_last_and_may_take_minutes_to_load_its_aof(documents):
    """Redis holds every job's queue and state: it requests the memory it may use (a pod under its request is the
    last the kubelet evicts), and reading its AOF back (LOADING, seconds per GB) is not taken for a dead Redis."""
    redis = container(one(documents, "StatefulSet", "redis"))
    resources = redis["resources"]
    assert memory_bytes(resources["requests"]["memory"]) == memory_bytes(resources["limits"]["memory"])
    startup = redis["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert startup["exec"] == redis["livenessProbe"]["exec"]


def test_each_submit_is_a_new_job_with_a_generated_name(job):
    assert "name" not in job["metadata"], "a fixed name makes the second `kubectl create` fail"
    assert job["metadata"]["generateName"].endswith("-")
    assert "generateName" in (REPO / "docs" / "deploy.md").read_text()


def test_planners_run_bulkembed_planner_and_scale_on_the_plan_queue(documents):
    from bulkembed.contract.queue import PLAN_QUEUE

    planner = one(documents, "Deployment", "bulkembed-planner")
    args = parse_cli(image_argv(planner, "producer.Dockerfile", "producer")[1:])
    assert args.command == "planner" and args.concurrency >= 1
    scaled = one(documents, "ScaledObject", "bulkembed-planner")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "bulkembed-planner" and scaled["spec"]["minReplicaCount"] == 0
    # Queued units, and a planner kept while a job is planned: one stopped inside a unit hands it back to it.
    assert [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]] == [PLAN_QUEUE, keys.REDIS_PLANNING_JOBS]
    assert all(t["authenticationRef"]["name"] == "bulkembed-redis" for t in scaled["spec"]["triggers"])
    assert int(scaled["spec"]["triggers"][1]["metadata"]["listLength"]) >= 10_000, "one pod, however many jobs"
    assert planner["spec"]["replicas"] == 0, "KEDA starts planners when units are queued"


def test_the_deploy_guide_names_every_manifest_whose_image_must_be_set():
    """A manifest left at the placeholder registry pulls nothing (ImagePullBackOff): the planners were missed once."""
    guide = (REPO / "docs" / "deploy.md").read_text()
    step = guide[guide.index("Build and push the images"):][:400]
    placeholders = [path.name for path in sorted((REPO / "infra" / "k8s").glob("*.yaml"))
                    if "registry.example.com" in path.read_text()]
    assert placeholders and [name for name in placeholders if f"`{name}`" not in step] == []
