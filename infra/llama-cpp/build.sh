#!/usr/bin/env bash
# The one recipe for the llama.cpp that bulkembed runs on: CI, the README's install, both images and the GPU
# scripts call it. It takes llama-cpp-python's source archive at the pinned version, applies patches/*.patch
# (0001: embeddings without the LM head and its logits copy; 0002: the CPU flash attention's KV tiles cut from each
# sequence's own cells, so vectors do not depend on cache placement; 0003: a sequence's new KV cells placed after the
# ones it holds, so a split document's cells stay in position order), and builds a wheel with flags that are safe on
# every CPU it may meet (no AMX: llama.cpp's AMX path dies with SIGILL on Sapphire Rapids-class CPUs, docs/notes.md 28).
#
#   infra/llama-cpp/build.sh [--native | --portable | --cuda ARCHS] [--out DIR]   # builds (or reuses) the wheel, prints its path
#   infra/llama-cpp/build.sh --source DIR                                        # only the patched source tree, into DIR
#   infra/llama-cpp/build.sh [--native | ...] --version                          # the version it would build, nothing else
#
#   --native    this machine's instruction set, AVX-512 included where it has it, AMX never (the default)
#   --portable  any x86-64 with AVX2 (images: GGML_NATIVE=OFF)
#   --cuda 89   NVIDIA GPUs of these compute capabilities ("89;90"), portable CPU code
# CMAKE_ARGS from the environment are appended (they win). The wheel's version is 0.3.36+bulkembed.<key>, <key>
# a hash of the patches, the final CMake arguments and (for --native) this CPU's flags: a wheel built with other
# flags or patches never matches, so pip's own cache (keyed by the source archive) cannot hand back a stale build.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/^llama-cpp-python==//p' "$HERE/../constraints.txt")}
CACHE=${BULKEMBED_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkembed/wheels}
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

target=native cuda_archs="" out="" source_only="" version_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --native) target=native ;;
    --portable) target=portable ;;
    --cuda) target=cuda; cuda_archs=$2; shift ;;
    --out) out=$2; shift ;;
    --source) source_only=$2; shift ;;
    --version) version_only=1 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# The patched source tree of llama-cpp-python $VERSION, into $1.
patched_source() {
  local dest=$1 tmp
  tmp=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-cache-dir -d "$tmp" "llama-cpp-python==$VERSION" >&2
  mkdir -p "$dest"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$dest" --strip-components=1
  rm -rf "$tmp"
  for p in "$HERE"/patches/*.patch; do
    patch -s -p1 -d "$dest" < "$p"
  done
}

if [ -n "$source_only" ]; then
  patched_source "$source_only"
  exit 0
fi

case $target in
  native) args="-DGGML_NATIVE=ON" ;;
  portable) args="-DGGML_NATIVE=OFF" ;;
  cuda) args="-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$cuda_archs" ;;
esac
# Quoted for scikit-build-core, which splits CMAKE_ARGS like a shell.
args="-DLLAVA_BUILD=OFF $args '-DCMAKE_C_FLAGS=$NO_AMX' '-DCMAKE_CXX_FLAGS=$NO_AMX' ${CMAKE_ARGS:-}"
cpu=""
[ "$target" = native ] && cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
key=$( { cat "$HERE"/patches/*.patch; echo "$VERSION|$args|$cpu"; } | sha256sum | cut -c1-12)
local_version="$VERSION+bulkembed.$key"
if [ -n "$version_only" ]; then
  echo "$local_version"
  exit 0
fi
out=${out:-$CACHE}
mkdir -p "$out"
wheel=$(ls "$out"/llama_cpp_python-"$local_version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  src=$(mktemp -d)
  patched_source "$src"
  sed -i "s/^__version__ = \"$VERSION\"/__version__ = \"$local_version\"/" "$src/llama_cpp/__init__.py"
  grep -q "$local_version" "$src/llama_cpp/__init__.py" || { echo "build.sh: could not set the version" >&2; exit 1; }
  echo "building llama-cpp-python $local_version ($target): $args" >&2
  t0=$(date +%s)
  CMAKE_ARGS="$args" "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir -w "$out" "$src" >&2
  echo "built in $(( $(date +%s) - t0 )) s" >&2
  rm -rf "$src"
  wheel=$(ls "$out"/llama_cpp_python-"$local_version"-*.whl | head -1)
fi
echo "$wheel"
