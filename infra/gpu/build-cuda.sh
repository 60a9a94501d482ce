#!/usr/bin/env bash
# Run HERE (no GPU, 2 cores): llama.cpp's shared libraries for CUDA, patched by the project's recipe
# (infra/llama-cpp/build.sh --source: LM head left out of embedding decodes), so a GPU session spends its device
# time measuring, not building (docs/notes.md 34: ~40 MB as tar.xz, it fits one call's 64 MiB). It takes 25 to 61 min on
# 2 cores (3,639 s on 2026-11-28, a CPU wheel's build beside it for 8 of them), and a loan can end meanwhile (it did
# then): where a GPU is lent and the check needs no patch, call first with `prepare.sh --prebuilt` instead.
#
#   bash infra/gpu/build-cuda.sh [ARCHS]      # default 90 (H100/H200); 89 for an L4
#
# This machine's CUDA toolkit has nvcc and cudart but no cuBLAS: the nvidia-cublas wheel from PyPI supplies its
# headers and libraries in a copy of the toolkit. GGML_CUDA_NO_VMM needs no libcuda stub to link. CPU code is
# portable (AVX2/FMA/F16C, no AMX). Output: .gpu/llama-cuda-sm$ARCHS.tar.xz (git-ignored): bin/ with the libraries
# and the real llama-embedding (the peer the bench measures). Where it is in .gpu/, device.sh unpacks it instead of
# building (and finds the image's libcublas.so.13 / libcudart.so.13 for the loader).
set -euo pipefail
ARCHS=${1:-90}
ROOT=$(git rev-parse --show-toplevel)
HERE=$ROOT/infra/gpu
CUDA=${CUDA_HOME:-/usr/local/cuda-13.0}
work=$(mktemp -d)
out=$ROOT/.gpu
mkdir -p "$out"
grep -qx '/.gpu/' "$(git -C "$ROOT" rev-parse --git-dir)/info/exclude" 2>/dev/null \
  || echo '/.gpu/' >> "$(git -C "$ROOT" rev-parse --git-dir)/info/exclude"

bash "$ROOT/infra/llama-cpp/build.sh" --source "$work/src"
cp -a "$CUDA" "$work/cuda"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/whl" "nvidia-cublas>=13,<14"
python3 -m zipfile -e "$work"/whl/nvidia_cublas*.whl "$work/cublas"
cp -a "$work"/cublas/nvidia/cu13/include/. "$work/cuda/include/"
mkdir -p "$work/cuda/lib64"
cp -a "$work"/cublas/nvidia/cu13/lib/. "$work/cuda/lib64/"
( cd "$work/cuda/lib64" && for lib in libcublas libcublasLt; do ln -sf "$lib.so.13" "$lib.so"; done )

t0=$(date +%s)
cmake -S "$work/src/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCUDAToolkit_ROOT="$work/cuda" -DCMAKE_CUDA_COMPILER="$work/cuda/bin/nvcc" \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_CUDA_NO_VMM=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
  "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$work/cuda/lib64" \
  > "$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log"; exit 1; }
cmake --build "$work/build" -j "$(nproc)" --target llama llama-embedding > "$work/make.log" 2>&1 \
  || { tail -30 "$work/make.log"; exit 1; }
mkdir -p "$work/pack/bin"
find "$work/build" -name 'lib*.so*' -exec cp -a {} "$work/pack/bin/" \;
cp -a "$work/build/bin/llama-embedding" "$work/pack/bin/"
tar -C "$work/pack" -cJf "$out/llama-cuda-sm$ARCHS.tar.xz" bin
echo "built in $(( $(date +%s) - t0 )) s: $(du -h "$out/llama-cuda-sm$ARCHS.tar.xz" | cut -f1) $out/llama-cuda-sm$ARCHS.tar.xz"
rm -rf "$work"
