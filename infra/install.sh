#!/usr/bin/env bash
# Installs bulkembed into the current Python environment with the llama.cpp it is meant to run on: the patched
# llama-cpp-python that infra/llama-cpp/build.sh builds for this machine (embeddings without the LM head, KV
# cells that keep vectors batch-invariant; no AMX), then the project itself.
#
#   bash infra/install.sh           # bulkembed
#   bash infra/install.sh --test    # bulkembed in editable mode with the test tools
#   CMAKE_ARGS="-DGGML_CUDA=on" bash infra/install.sh   # for an NVIDIA GPU (or: --cuda 89)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
target=(--native) test=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test) test=1 ;;
    --portable) target=(--portable) ;;
    --cuda) target=(--cuda "$2"); shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
# A Python its distribution manages (PEP 668: Debian 12, Ubuntu 24.04) refuses pip: say so before the build.
if [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ] && ! "$PYTHON" -c 'import pathlib, sys, sysconfig
sys.exit(sys.prefix == sys.base_prefix and pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())'
then
  echo "install.sh: $PYTHON is the system's Python, which pip may not install into (PEP 668). Make a virtual" \
       "environment first: python3 -m venv .venv && . .venv/bin/activate" >&2
  exit 2
fi
wheel=$(PYTHON=$PYTHON bash "$ROOT/infra/llama-cpp/build.sh" "${target[@]}")
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$wheel"
# The pinned versions of everything else; llama-cpp-python==0.3.36 is met by the local build 0.3.36+bulkembed.*
if [ -n "$test" ]; then
  "$PYTHON" -m pip install -q -c "$ROOT/infra/constraints.txt" -e "$ROOT[test]"
else
  "$PYTHON" -m pip install -q -c "$ROOT/infra/constraints.txt" "$ROOT"
fi
"$PYTHON" - <<'EOF'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
skip = hasattr(llama_cpp.llama_cpp._lib, "llama_get_embeddings_no_logits")
print(f"llama-cpp-python {llama_cpp.__version__}; LM head skipped when embedding: {'yes' if skip else 'no'};"
      f" AMX {'ON' if 'AMX_INT8 = 1' in info else 'off'}")
EOF
