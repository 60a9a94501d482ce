"""The images: what they build, what they run, as whom, and with which cache folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.infra.manifests import (
    INFRA,
    INIT,
    REPO,
    console_scripts,
    dockerignore_patterns,
    ignored,
    is_pinned,
    parse_cli,
    parse_dockerfile,
    project_packages,
    pyproject,
    without_init,
)

WORKER = INFRA / "worker.Dockerfile"
CPU = INFRA / "producer.Dockerfile"
DOCKERFILES = [WORKER, CPU]
# The images that are run, as (Dockerfile, target stage or None for the last one, subcommand).
RUNNABLE = [(WORKER, None, "worker"), (CPU, "worker-cpu", "worker"), (CPU, "producer", None)]
HF_HOME = "/models"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_or_a_stage(path):
    dockerfile = parse_dockerfile(path)
    names = {s.name for s in dockerfile.stages}
    for stage in dockerfile.stages:
        image = dockerfile.image_of(stage)
        assert "$" not in image, f"{path.name}: FROM {stage.base} uses an ARG without a default"
        assert stage.base in names or is_pinned(image), f"{path.name}: FROM {image} is not pinned to a tag"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_build_stage_installs_the_project_from_files_that_are_copied(path):
    dockerfile = parse_dockerfile(path)
    build = dockerfile.stages[0]
    copied: set[str] = set()
    patterns = dockerignore_patterns(path)
    for value in build.values("COPY"):
        words = [w for w in shlex.split(value) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"
            assert not ignored(source, patterns), f"{path.name}: COPY {source} is excluded by its .dockerignore"
            copied.add(source.rstrip("/"))
    needed = {"pyproject.toml", "README.md", *project_packages()}  # README.md: pyproject's readme
    assert needed <= copied, f"{path.name} does not copy {sorted(needed - copied)} before `pip install .`"
    assert any(re.search(r"\bpip install (-c \S+ )?\.(\s|$)", run) for run in build.values("RUN")), \
        f"{path.name}: no `pip install .`"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerignore_keeps_the_context_small(path):
    patterns = dockerignore_patterns(path)
    assert patterns, f"{path.name}.dockerignore is missing: the whole repository (.venv too) would be sent"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "out/000000.arrow"):
        assert ignored(heavy, patterns), f"{heavy} would be in the build context of {path.name}"


@pytest.mark.parametrize(("path", "target", "subcommand"), RUNNABLE)
def test_the_entrypoint_is_the_console_script_in_exec_form(path, target, subcommand):
    dockerfile = parse_dockerfile(path)
    stage = dockerfile.stage(target)
    entrypoint = without_init(dockerfile.exec_form(stage, "ENTRYPOINT"))
    assert entrypoint[0] in console_scripts(), f"{entrypoint[0]} is not in pyproject's [project.scripts]"
    assert entrypoint[1:2] == ([subcommand] if subcommand else [])
    # The default command is valid for bulkembed itself.
    cmd = dockerfile.exec_form(stage, "CMD")
    if cmd != ["--help"]:
        parse_cli(entrypoint[1:] + cmd)


@pytest.mark.parametrize(("path", "target", "subcommand"), RUNNABLE)
def test_runs_as_a_numeric_non_root_user_with_the_hf_cache_on_a_volume(path, target, subcommand):
    dockerfile = parse_dockerfile(path)
    stage = dockerfile.stage(target)
    user = dockerfile.last(stage, "USER")
    assert user is not None, f"{path.name} {target}: runs as root"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: Kubernetes' runAsNonRoot needs a numeric non-root uid"
    env = dockerfile.env(stage)
    assert env.get("HF_HOME") == HF_HOME
    assert env.get("PATH", "").startswith("/opt/venv/bin:")
    copies = [v for s in dockerfile.chain(stage) for v in s.values("COPY")]
    assert any(c.startswith("--from=build") and "/opt/venv" in c for c in copies), "the virtualenv is not copied"
    if subcommand == "worker":
        assert "9100" in (dockerfile.last(stage, "EXPOSE") or "").split(), "the metrics port is not exposed"


@pytest.mark.parametrize(("path", "target", "subcommand"), RUNNABLE)
def test_the_init_is_installed_where_the_image_runs(path, target, subcommand):
    dockerfile = parse_dockerfile(path)
    stage = dockerfile.stage(target)
    installs = [run for s in dockerfile.chain(stage) for run in s.values("RUN") if "apt-get install" in run]
    package = Path(INIT[0]).name
    assert any(package in shlex.split(run) for run in installs), f"{path.name} {target}: {package} not installed"


CONSTRAINTS = "infra/constraints.txt"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in (REPO / CONSTRAINTS).read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[\w.+!-]+", e) for e in entries), "name==version lines only"
    return dict(e.split("==") for e in entries)


def test_the_constraints_pin_every_dependency_within_pyproject_and_the_tested_llama_cpp():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = pins()
    assert pinned["llama-cpp-python"] == "0.3.36", "the version the tests and docs/notes.md measured"
    for text in pyproject()["project"]["dependencies"]:
        requirement = Requirement(text)
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not pinned in {CONSTRAINTS}"
        assert requirement.specifier.contains(version), f"{CONSTRAINTS}: {requirement.name}=={version} breaks {text}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_uses_the_constraints(path):
    dockerfile = parse_dockerfile(path)
    build = dockerfile.stages[0]
    copied = [shlex.split(v) for v in build.values("COPY")]
    targets = [words[-1] for words in copied if CONSTRAINTS in words[:-1]]
    assert targets, f"{path.name} does not copy {CONSTRAINTS}"
    inside = {Path(CONSTRAINTS).name if target.endswith("/") else target for target in targets}
    installs = [command for run in build.values("RUN") for command in run.split("&&") if "pip install" in command]
    assert installs
    for command in installs:
        words = " ".join(command.split())
        assert any(f"-c {c}" in words for c in inside), f"{path.name}: `{command.strip()}` ignores the constraints"


def test_the_gpu_image_builds_llama_cpp_for_cuda_for_the_l4_by_default():
    dockerfile = parse_dockerfile(WORKER)
    build, runtime = dockerfile.stages[0], dockerfile.stage()
    assert dockerfile.stage_args(build).get("CUDA_ARCHS") == "89", "the default architecture is the L4's (sm_89)"
    assert recipe_arguments(build) == ["--cuda", "${CUDA_ARCHS}"], "llama.cpp for CUDA by the project's recipe"
    build_image, run_image = dockerfile.image_of(build), dockerfile.image_of(runtime)
    match_build = re.fullmatch(r"nvidia/cuda:(12\.[\d.]+)-devel-(ubuntu[\d.]+)", build_image)
    match_run = re.fullmatch(r"nvidia/cuda:(12\.[\d.]+)-runtime-(ubuntu[\d.]+)", run_image)
    assert match_build and match_run, f"expected CUDA 12 devel → runtime, got {build_image} → {run_image}"
    assert match_build.groups() == match_run.groups(), "build and runtime must share CUDA version and OS"


def test_the_cpu_image_has_no_cuda_and_one_python_for_build_and_run():
    dockerfile = parse_dockerfile(CPU)
    images = {dockerfile.image_of(s) for s in dockerfile.stages if s.base not in {t.name for t in dockerfile.stages}}
    assert len(images) == 1 and next(iter(images)).startswith("python:3.11-slim"), images
    build = dockerfile.stages[0]
    assert recipe_arguments(build) == ["${LLAMA_TARGET}"]
    assert dockerfile.stage_args(build).get("LLAMA_TARGET") == "--portable", "an image runs on any x86-64 CPU"
    assert "CMAKE_ARGS" not in dockerfile.env(build) and "CMAKE_ARGS" not in dockerfile.stage_args(build)
    assert dockerfile.stage().name == "producer", "a plain `docker build` of producer.Dockerfile gives the producer"


RECIPE = "infra/llama-cpp/build.sh"


def recipe_arguments(build) -> list[str]:
    """The arguments the build stage gives llama.cpp's one recipe (infra/llama-cpp/build.sh), which it must call
    before any other pip install, and install with the constraints."""
    runs = build.values("RUN")
    calls = [shlex.split(command.split("$(", 1)[1].split(")", 1)[0]) for command in runs if RECIPE in command]
    assert len(calls) == 1, f"one call of {RECIPE}, found {len(calls)}"
    first_install = next(i for i, run in enumerate(runs) if "pip install" in run)
    assert RECIPE in runs[first_install], "llama.cpp is built by the recipe before the other dependencies"
    assert calls[0][:2] == ["bash", RECIPE] and calls[0][-2:] == ["--out", "/tmp/wheels"], calls[0]
    return calls[0][2:-2]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_image_builds_llama_cpp_outside_the_recipe(path):
    """pip would otherwise build a stock llama-cpp-python (LM head computed, maybe AMX) from PyPI's source."""
    build = parse_dockerfile(path).stages[0]
    recipe_arguments(build)
    installs = [c for run in build.values("RUN") for c in run.split("&&") if "pip install" in c]
    assert not any("llama-cpp-python" in c or "llama_cpp" in c for c in installs)
