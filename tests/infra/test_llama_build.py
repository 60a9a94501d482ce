"""The llama.cpp build is what the recipe (infra/llama-cpp/build.sh) says, whatever pip had cached.

The recipe names each build by a key of its patches, CMake arguments and (native builds) this CPU's flags; the
installed llama-cpp-python must carry the key of this machine's native build, so a wheel pip cached from another
build (stock, other flags, AMX) cannot pass for it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from tests.conftest import REPO

RECIPE = REPO / "infra" / "llama-cpp" / "build.sh"


def recipe_version(*args: str, recipe: Path = RECIPE, cmake_args: str | None = None) -> str:
    env = dict(os.environ)
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    result = subprocess.run(["bash", str(recipe), *args, "--version"], env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.strip()


def test_the_installed_llama_cpp_is_this_machines_build_of_the_recipe():
    assert llama_cpp.__version__ == recipe_version("--native"), \
        "llama-cpp-python is not the recipe's native build for this machine: run `bash infra/install.sh`"


def test_the_build_runs_no_amx():
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, info


def test_every_input_of_a_build_changes_its_name(tmp_path: Path):
    native = recipe_version("--native")
    assert native.startswith("0.3.36+bulkembed.")
    assert recipe_version("--native", cmake_args="-DGGML_AVX512=OFF") != native, "CMake arguments"
    assert recipe_version("--portable") != native and recipe_version("--cuda", "89") != recipe_version("--cuda", "90")
    copy = tmp_path / "infra"
    shutil.copytree(REPO / "infra" / "llama-cpp", copy / "llama-cpp")
    shutil.copy(REPO / "infra" / "constraints.txt", copy / "constraints.txt")
    assert recipe_version("--native", recipe=copy / "llama-cpp" / "build.sh") == native, "same inputs, same name"
    patch = next((copy / "llama-cpp" / "patches").glob("*.patch"))
    patch.write_text(patch.read_text() + "\n")
    assert recipe_version("--native", recipe=copy / "llama-cpp" / "build.sh") != native, "a patch"


@pytest.mark.parametrize("args", [["--cuda"], ["--fast"]], ids=" ".join)
def test_a_wrong_argument_is_refused(args):
    result = subprocess.run(["bash", str(RECIPE), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
