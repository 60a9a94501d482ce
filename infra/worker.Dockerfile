# GPU worker: `bulkembed worker` with llama-cpp-python built for CUDA.
#
#   docker build -f infra/worker.Dockerfile -t bulkembed/worker:0.1.0-cuda .
#
# CUDA_ARCHS picks the GPU architecture the kernels are compiled for: 89 = NVIDIA L4 (the default),
# 86 = A10/A10G, 80 = A100, 90 = H100/H200; several at once as "89;90" (each one adds build time).
# The CPU-only worker for laptops is the `worker-cpu` target of infra/producer.Dockerfile.
#
# The build stage has the CUDA toolkit (nvcc); the final stage only the CUDA runtime libraries
# (cudart, cuBLAS). libcuda itself comes from the host's driver through the NVIDIA container
# toolkit. Both stages are Ubuntu 24.04 with its Python 3.12, so the virtualenv copies across.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ARG CUDA_ARCHS=89
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# llama.cpp first, in its own layer, by the project's one recipe (infra/llama-cpp/build.sh): llama-cpp-python at
# the pinned version with its patches (the LM head left out of embedding decodes; KV cells that keep vectors
# batch-invariant), for CUDA_ARCHS, portable CPU code (GGML_NATIVE=OFF, no AMX). Redone only when the recipe, its patches or CUDA_ARCHS change.
COPY infra/constraints.txt infra/constraints.txt
COPY infra/llama-cpp infra/llama-cpp
RUN wheel=$(bash infra/llama-cpp/build.sh --cuda "${CUDA_ARCHS}" --out /tmp/wheels) \
 && pip install -c infra/constraints.txt --no-deps "$wheel"
# Then the other dependencies, read from pyproject.toml, so a code change does not redo them.
# constraints.txt pins the tested versions (llama-cpp-python==0.3.36 is met by the local build 0.3.36+bulkembed.*).
COPY pyproject.toml README.md infra/constraints.txt ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY bulkembed bulkembed
COPY contract contract
COPY producer producer
COPY worker worker
RUN pip install -c constraints.txt . && bulkembed --help > /dev/null

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
# A numeric non-root user (Kubernetes' runAsNonRoot can only verify a numeric USER); /models is
# the Hugging Face cache, a mounted volume, owned by that user so a fresh named volume is writable.
RUN groupadd --gid 10001 bulkembed \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/bulkembed --shell /usr/sbin/nologin bulkembed \
 && mkdir -p /models \
 && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/bulkembed
# Prometheus metrics (BULKEMBED_METRICS_PORT).
EXPOSE 9100
# tini is PID 1: the kernel ignores a signal PID 1 has no handler for, so a bare `bulkembed` would
# ignore SIGTERM until Celery installs its handlers (model download, self-test) and keep the GPU
# for the whole grace period. tini forwards SIGTERM to `bulkembed`, which stops at once before
# Celery starts and afterwards gets Celery's warm shutdown (the shard in progress finishes,
# nothing new is taken); tini also reaps orphaned children. Arguments come from CMD, or from
# compose `command:` / Kubernetes `args:`.
ENTRYPOINT ["/usr/bin/tini", "--", "bulkembed", "worker"]
CMD ["--model", "jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M", "--ubatch", "512"]
