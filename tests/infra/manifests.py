"""Read the deployment files the way Docker, Compose and Kubernetes would, without any of them:
Dockerfiles (stages, ARG defaults, exec-form ENTRYPOINT/CMD), Compose `${VAR:-default}`
interpolation, durations, and the names the code defines (console scripts, settings, queues)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bulkembed.contract.settings import ProducerSettings, Settings, WorkerSettings

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S_DIR = INFRA / "k8s"


# Environment names that are not bulkembed settings but are read by what bulkembed uses: boto3
# (AWS_*) and huggingface_hub (HF_*).
FOREIGN_ENV_PREFIXES = ("AWS_", "HF_")


# PID 1 of every image: it forwards SIGTERM to bulkembed (which, as PID 1 itself, would ignore it
# until Celery installs its handlers) and reaps orphans.
INIT = ["/usr/bin/tini", "--"]


def without_init(entrypoint: list[str]) -> list[str]:
    """The program an ENTRYPOINT starts under the init."""
    assert entrypoint[:len(INIT)] == INIT, f"ENTRYPOINT {entrypoint} does not start with {INIT}"
    return entrypoint[len(INIT):]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def console_scripts() -> set[str]:
    return set(pyproject()["project"]["scripts"])


def project_packages() -> list[str]:
    """Source folders `pip install .` ships: [tool.setuptools.package-dir] maps each into `bulkembed`."""
    return sorted(set(pyproject()["tool"]["setuptools"]["package-dir"].values()))


def settings_class(role: str) -> type[Settings]:
    return WorkerSettings if role == "worker" else ProducerSettings


def env_name_problem(name: str, settings_cls: type[Settings]) -> str | None:
    """Why `name` should not be in a bulkembed container's environment, or None when it is fine."""
    prefix = settings_cls.model_config["env_prefix"]
    if name.startswith(prefix):
        field_name = name[len(prefix):].lower()
        if field_name in settings_cls.model_fields:
            return None
        return f"{name} is not a field of {settings_cls.__name__} (it would be ignored silently)"
    if name.startswith(FOREIGN_ENV_PREFIXES) or name == "TMPDIR":  # TMPDIR: Python's tempfile (DuckDB's spill)
        return None
    return f"{name} is neither a {prefix}* setting nor an AWS_*/HF_* variable nor TMPDIR"


def model_file_name(spec: str) -> str:
    """REPO:QUANT → the GGUF file it resolves to: jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M
    → jina-embeddings-v4-text-retrieval-IQ3_M.gguf (the naming of jinaai's GGUF repositories)."""
    if spec.endswith(".gguf"):
        return Path(spec).name
    repo, quant = spec.rsplit(":", 1)
    name = repo.split("/")[-1]
    name = re.sub(r"-GGUF$", "", name, flags=re.IGNORECASE)
    return f"{name}-{quant}.gguf"


def parse_cli(argv: list[str]):
    """The arguments as `bulkembed` itself parses them, a test failure instead of SystemExit; worker
    options are held to WorkerSettings' bounds and --model must be REPO:QUANT or a .gguf path."""
    from bulkembed.cli import build_parser
    from bulkembed.contract.errors import SettingsError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`bulkembed {shlex.join(argv)}` is rejected by bulkembed's own argument parser")
    model = getattr(args, "model", None)
    if model is not None:
        assert model.endswith(".gguf") or re.fullmatch(r"[\w.-]+/[\w.-]+:[\w.-]+", model), \
            f"--model {model!r} is neither REPO:QUANT nor a .gguf path"
    if hasattr(args, "ubatch"):
        try:
            WorkerSettings(ubatch=args.ubatch, gpu_layers=args.gpu_layers, threads=args.threads)
        except SettingsError as exc:
            pytest.fail(f"`bulkembed {shlex.join(argv)}`: {exc}")
    return args


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def is_pinned(image: str) -> bool:
    """A tag (or digest) that is not `latest`."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and tag != "latest"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_s(value: str | int) -> float:
    """Compose durations ("10m", "1m30s", "600s")."""
    if isinstance(value, int):
        return float(value)
    parts = _DURATION.findall(value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


# Compose interpolation: $$ is a literal $, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR.
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable the Compose file interpolates, with its default (None: no default)."""
    found: dict[str, str | None] = {}
    for match in _INTERPOLATION.finditer(text):
        name = match.group(1) or match.group(4)
        if name is None:
            continue
        default = match.group(3) if match.group(2) in ("-", ":-") else None
        if found.get(name) is not None and default is not None:
            assert found[name] == default, f"${{{name}}} has two defaults: {found[name]!r} and {default!r}"
        found[name] = default if default is not None else found.get(name)
    return found


def interpolate(value):
    """A Compose value as it is with an empty environment: defaults filled in, $$ → $."""
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        if match.group(2) in ("-", ":-"):
            return match.group(3)
        pytest.fail(f"${{{name}}} has no default: `docker compose up` would need it set")

    return _INTERPOLATION.sub(substitute, value)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for kw, value in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, target: str | None = None) -> Stage:
        if target is None:
            return self.stages[-1]
        named = [s for s in self.stages if s.name == target]
        assert named, f"{self.path.name} has no stage {target!r}"
        return named[0]

    def image_of(self, stage: Stage) -> str:
        """The base image with the global ARG defaults substituted."""
        return substitute_args(stage.base, self.global_args)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, root first: what the final image inherits."""
        parent = [s for s in self.stages if s.name == stage.base]
        return (self.chain(parent[0]) if parent else []) + [stage]

    def last(self, stage: Stage, keyword: str) -> str | None:
        for s in reversed(self.chain(stage)):
            found = s.values(keyword)
            if found:
                return found[-1]
        return None

    def exec_form(self, stage: Stage, keyword: str) -> list[str]:
        value = self.last(stage, keyword)
        assert value is not None, f"{self.path.name} stage {stage.name}: no {keyword}"
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            pytest.fail(f"{self.path.name} stage {stage.name}: {keyword} {value} is not exec form: "
                        "a shell would be PID 1 and swallow SIGTERM")
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
        return parsed

    def env(self, stage: Stage) -> dict[str, str]:
        env: dict[str, str] = {}
        for s in self.chain(stage):
            for value in s.values("ENV"):
                for token in shlex.split(value):
                    key, _, val = token.partition("=")
                    env[key] = val
        return env

    def stage_args(self, stage: Stage) -> dict[str, str]:
        args: dict[str, str] = {}
        for value in stage.values("ARG"):
            token = shlex.split(value)[0]
            key, _, default = token.partition("=")
            args[key] = default
        return args


def substitute_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comment lines dropped, split into stages."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name} ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            key, _, default = shlex.split(value)[0].partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, value))
    assert stages, f"{path.name} has no FROM"
    return Dockerfile(path=path, global_args=global_args, stages=stages)


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return []
    return [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: the last matching pattern wins, `!` re-includes,
    and a pattern that matches a parent folder matches everything below it."""
    from fnmatch import fnmatch

    result = False
    parts = Path(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if body == "**":
            hit = True
        elif body.startswith("**/"):
            hit = any(fnmatch(part, body[3:]) for part in parts)
        else:
            hit = any(fnmatch(c, body) for c in candidates)
        if hit:
            result = not negate
    return result
