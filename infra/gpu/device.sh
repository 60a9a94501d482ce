#!/usr/bin/env bash
# Run ON the GPU machine from the project root (after prepare.sh here, with carry=[".gpu"]): installs the
# carried wheels and the project into /tmp/site, builds llama.cpp for the GPU it finds
# (shared libraries + llama-embedding + llama-bench) into /tmp/llama-build. Idempotent on a warm machine.
set -uo pipefail
G=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 1
rm -rf /tmp/site/llama_cpp && cp -r "$G/lcpp/llama_cpp" /tmp/site/llama_cpp
# DuckDB, carried as its wheel's contents (prepare.sh): unpacked where pip would have installed it.
[ -f "$G/duckdb.tar.xz" ] && tar -xJf "$G/duckdb.tar.xz" -C /tmp/site
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
prebuilt=$(ls "$G"/llama-cuda-sm*.tar.xz 2>/dev/null | head -1)
if [ ! -f /tmp/llama-build/bin/libllama.so ] && [ -n "$prebuilt" ]; then
  # Built here ahead of time by infra/gpu/build-cuda.sh (patched, sm_$arch): no device time spent building.
  mkdir -p /tmp/llama-build && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
    "$prebuilt" /tmp/llama-build
  # shared/gpu-prebuilt's archive (unpatched: the LM head is computed) holds the libraries at its top, not in bin/.
  if [ ! -f /tmp/llama-build/bin/libllama.so ] && [ -f /tmp/llama-build/libllama.so ]; then
    mkdir -p /tmp/llama-build/bin && mv /tmp/llama-build/lib*.so* /tmp/llama-build/bin/
  fi
  echo "llama.cpp CUDA libraries from $(basename "$prebuilt")"
fi
if [ ! -f /tmp/llama-build/bin/libllama.so ]; then
  t0=$(date +%s)
  cmake -S "$G/lcpp/vendor/llama.cpp" -B /tmp/llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    > /tmp/llama-cmake.log 2>&1 || { tail -30 /tmp/llama-cmake.log; exit 1; }
  cmake --build /tmp/llama-build -j "$(nproc)" --target llama llama-embedding llama-bench 2>&1 | tail -2
  echo "llama.cpp CUDA build: $(( $(date +%s) - t0 )) s"
fi
. "$G/env.sh"
# The working tree as it is (uncommitted changes too), installed (not editable: worker/, producer/, contract/
# become bulkembed.*) with its console script into /tmp/site.
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site "$G/.." \
  >/tmp/pip-project.log 2>&1 || { tail -20 /tmp/pip-project.log; exit 1; }
# The `bulkembed` command (bulkembed/__init__ loads llama_cpp before numpy, docs/notes.md 25).
mkdir -p /tmp/site/bin
printf '#!/usr/bin/env python3\nimport sys\nfrom bulkembed.cli import main\nsys.exit(main())\n' > /tmp/site/bin/bulkembed
chmod +x /tmp/site/bin/bulkembed
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload', llama_cpp.llama_supports_gpu_offload())"
