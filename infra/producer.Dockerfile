# The CPU image: the whole `bulkembed` CLI with llama-cpp-python built without CUDA. The producer
# needs llama.cpp too: it counts tokens with the model's own vocabulary.
#
#   docker build -f infra/producer.Dockerfile -t bulkembed/producer:0.1.0 .                        # producer (last stage)
#   docker build -f infra/producer.Dockerfile --target worker-cpu -t bulkembed/worker:0.1.0-cpu .  # CPU worker, laptops
#
# LLAMA_TARGET=--portable keeps the image portable across x86-64 CPUs (AVX2 on, AMX never); for a CPU
# worker built and run on the same machine, --build-arg LLAMA_TARGET=--native is faster (AVX-512 where the
# CPU has it). llama.cpp is built by the project's one recipe, infra/llama-cpp/build.sh.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG LLAMA_TARGET=--portable
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# llama.cpp first, then the other dependencies, each in its own layer (see infra/worker.Dockerfile).
# constraints.txt pins the tested versions (llama-cpp-python among them), the same in every image.
COPY infra/constraints.txt infra/constraints.txt
COPY infra/llama-cpp infra/llama-cpp
RUN wheel=$(bash infra/llama-cpp/build.sh "${LLAMA_TARGET}" --out /tmp/wheels) \
 && pip install -c infra/constraints.txt --no-deps "$wheel"
COPY pyproject.toml README.md infra/constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY bulkembed bulkembed
COPY contract contract
COPY producer producer
COPY worker worker
RUN pip install -c constraints.txt . && bulkembed --help > /dev/null && python -c "import llama_cpp"

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/*
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

# A worker on the CPU: same interface as the GPU image (arguments after `bulkembed worker`).
FROM runtime AS worker-cpu
EXPOSE 9100
# tini as PID 1 forwards SIGTERM (see infra/worker.Dockerfile).
ENTRYPOINT ["/usr/bin/tini", "--", "bulkembed", "worker"]
CMD ["--model", "jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M", "--gpu-layers", "0"]

# The producer and every other subcommand: submit, status, run.
FROM runtime AS producer
ENTRYPOINT ["/usr/bin/tini", "--", "bulkembed"]
CMD ["--help"]
