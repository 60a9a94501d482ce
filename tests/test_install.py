"""A non-editable install is one namespace, `bulkembed`, and the installed command works on its own.

The package is built and installed (pip without build isolation, which is why the test extra brings
setuptools; no dependencies) into a fresh venv whose only other path is this test venv's
site-packages, for the dependencies. That directory's .pth files are not run from there, so the
editable install of the worktree cannot leak in; every command runs from a folder outside the
repository, so the source tree cannot shadow it either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, mixed_texts, write_corpus

SOURCE_FOLDERS = ("worker", "producer", "contract")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv the package was installed into."""
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", "--no-cache-dir", str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    return venv


def run_installed(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKEMBED_", "PYTHON"))}
    return subprocess.run(args, cwd=cwd, env=env | {"PATH": f"{venv / 'bin'}:{env['PATH']}", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)


def test_only_bulkembed_is_installed_at_top_level(installed: Path, tmp_path: Path):
    record = next(installed.glob("lib/python*/site-packages/bulkembed-*.dist-info/RECORD")).read_text()
    top_level = {line.split("/")[0] for line in record.splitlines() if line and "dist-info" not in line
                 and not line.startswith("..")}
    assert top_level == {"bulkembed"}, top_level
    probe = ("import importlib.util, bulkembed.worker.app, bulkembed.producer.submit, bulkembed.contract.job\n"
             f"print([n for n in {SOURCE_FOLDERS!r} if importlib.util.find_spec(n)])\n"
             "print(bulkembed.__file__)")
    result = run_installed(installed, ["python", "-c", probe], tmp_path)
    assert result.returncode == 0, result.stderr
    leaked, location = result.stdout.splitlines()
    assert leaked == "[]"
    assert Path(location).is_relative_to(installed), location  # not the worktree's source


@pytest.mark.parametrize("args", [["bulkembed", "--help"], ["bulkembed", "worker", "--help"]], ids=" ".join)
def test_the_installed_command_helps(installed: Path, tmp_path: Path, args: list[str]):
    result = run_installed(installed, args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(args[:-1])}"), result.stdout


def test_the_installed_command_embeds_locally(installed: Path, tmp_path: Path, tiny_model: Path):
    texts = mixed_texts(40, seed=3)
    write_corpus(tmp_path / "corpus.parquet", [f"d{i}" for i in range(len(texts))], texts)
    result = run_installed(installed, ["bulkembed", "run", "corpus.parquet", "--model", str(tiny_model), "--out",
                                       "out", "--threads", "1", "--shard-tokens", "2000"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "40 rows" in result.stdout, result.stdout
    import pyarrow.dataset as ds

    table = ds.dataset(tmp_path / "out", format="arrow").to_table()
    assert sorted(table["id"].to_pylist()) == sorted(f"d{i}" for i in range(len(texts)))


def _system_python() -> str | None:
    """A Python its distribution marks as managed (PEP 668), where this machine has one."""
    check = ("import pathlib, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
             "pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').exists())")
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(python).exists() and subprocess.run([python, "-c", check], capture_output=True,
                                                    text=True).stdout.strip() == "True":
            return python
    return None


@pytest.mark.skipif(_system_python() is None, reason="no PEP 668 system Python on this machine")
def test_install_into_a_managed_system_python_says_to_make_a_venv_before_building():
    """Debian 12 and Ubuntu 24.04 refuse pip outside a venv: said at once, not after the llama.cpp build."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_BREAK_SYSTEM_PACKAGES"} | {"PYTHON": _system_python()}
    done = subprocess.run(["bash", str(REPO / "infra" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "python3 -m venv .venv" in done.stderr, done.stderr[-2000:]
    assert "building llama-cpp-python" not in done.stderr + done.stdout
