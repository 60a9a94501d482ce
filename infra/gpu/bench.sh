#!/usr/bin/env bash
# Run ON the GPU machine from the project root after `bash .gpu/device.sh`: the GPU numbers of
# docs/benchmarks.md, in calls that each fit the device tool's 10 minutes: `bench.sh check` (exactness on
# CUDA, the import-order crash, the v4-shaped models), `bench.sh f16` (auto ubatch vs 512, 1 vs 3 engines, the
# real llama-embedding and transformers), `bench.sh f16-ubs` (3 engines at ub 1024 and 2048), `bench.sh quants`
# (Q8_0, IQ3_S, `bulkembed run` with 1 and auto engines).
# The bench runs as `python3 -m bulkembed.bench`: its in-process modes run llama.cpp in the bench's own process,
# and the `bulkembed` command imports pyarrow, which crashed beside llama.cpp on the H100 image
# (docs/benchmarks.md); `bulkembed run` keeps llama.cpp in llama processes of its own. Results go to $OUT
# (or ./gpu-out). Every step has its own time limit, so one that hangs costs only itself.
set -uo pipefail
. .gpu/env.sh
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT" /tmp/bw
cd /tmp  # python3 -c/-m put the working directory first on sys.path: the installed copy must win
W=/tmp/bw
THREADS=$(nproc)
bench() { # name, limit, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: python3 -m bulkembed.bench $*" | tee -a "$OUT/steps.log"
  local t0=$(date +%s)
  timeout "$limit" python3 -m bulkembed.bench --work "$W" --threads "$THREADS" --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "   rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.log"
  python3 -c "import json,sys; from bulkembed.bench.report import format_report; print(format_report(json.load(open(sys.argv[1]))))" \
    "$OUT/$name.json" > "$OUT/$name.txt" 2>/dev/null && cat "$OUT/$name.txt"
}

case "${1:-check}" in
window)
  # The whole GPU check of the no-wasted-work and batch-invariance issues in one device call of about 8 minutes
  # (the libraries prebuilt by infra/gpu/build-cuda.sh): each step's limit keeps a hang to itself.
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -c "import llama_cpp as l; print('LM head patch:', hasattr(l.llama_cpp._lib, 'llama_get_embeddings_no_logits'))" \
    | tee "$OUT/build.txt"
  # 1. Batch invariance on CUDA (F16, Q8_0, IQ3_S of the outlier model): the engine tests, offloaded.
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider --import-mode=append -o pythonpath= \
    $REPO/tests/worker/test_batch_invariance.py $REPO/tests/worker/test_lm_head.py 2>&1 | tail -6 | tee "$OUT/cuda-tests.txt"
  timeout 90 python3 $REPO/benchmarks/batch_invariance.py --quants F16,Q8_0,IQ3_S 2>/dev/null | tee "$OUT/invariance.txt"
  # 2. v4-shaped F16, 3000 mixed documents: head skipped and computed, raw, the real llama-embedding, auto engines
  #    and ubatch; one process each, then the engines.
  bench f16-window 270 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch probe --engines 3 \
    --modes bulkembed,bulkembed-head,raw,llama-embedding --peer-ubatch 512
  # 3. `bulkembed run` end to end on the GPU (Parquet in, Arrow out; pyarrow here, engines in llama processes).
  python3 - <<'EOF2'
import pyarrow as pa, pyarrow.parquet as pq
from bulkembed import synthetic
from bulkembed.contract.vocab import TokenCounter
counter = TokenCounter("/tmp/bw/synthetic-v4-F16.gguf")
texts = synthetic.synthetic_texts(synthetic.target_lengths(1500, "mixed", 0), counter.count, 0)
pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), "/tmp/bw/corpus.parquet")
EOF2
  t0=$(date +%s.%N)
  timeout 100 bulkembed run /tmp/bw/corpus.parquet --model /tmp/bw/synthetic-v4-F16.gguf --out /tmp/bw/out-auto \
    --prefix '' --engines auto --ubatch auto 2>&1 | grep -v "tok/s]" | tail -4 | tee -a "$OUT/run.txt"
  echo "run --engines auto: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall" | tee -a "$OUT/run.txt"
  ;;
check)
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
  # Exactness on CUDA: packed == alone, pieces across decodes (tiny models, offloaded to the GPU). The installed
  # copy (/tmp/site) must win over the source folders, hence append mode and no extra pythonpath.
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider --import-mode=append -o pythonpath= \
    $REPO/tests/worker/test_engine.py $REPO/tests/worker/test_selftest.py 2>&1 | tail -4 | tee "$OUT/cuda-tests.txt"
  # NOTES.md 25 and the pyarrow crash: numpy before llama_cpp, then a GPU model load (crashed on the H100 image);
  # then what bulkembed does: pyarrow in this process, the engine in a llama process (contract.llama_process).
  python3 -c "from bulkembed.synthetic import TINY, write_qwen2vl_gguf as w; w('$W/tiny.gguf', TINY)"
  { timeout 60 python3 -c "
import numpy, llama_cpp
from bulkembed.worker.engine import Engine, EngineOptions
e = Engine('$W/tiny.gguf', EngineOptions()); print('numpy first: load ok, gpu', e.gpu_offload)" 2>&1 | tail -3
  echo "[numpy first] rc $?"
  timeout 60 python3 -c "
import pyarrow, numpy
from bulkembed.worker.engines import EngineProcess
from bulkembed.worker.engine import EngineOptions
e = EngineProcess('$W/tiny.gguf', EngineOptions()); print('pyarrow here, engine in a llama process: gpu', e.facts.gpu_offload)
e.close()" 2>&1 | tail -3
  echo "[pyarrow + llama process] rc $?"; } 2>&1 | tee "$OUT/import-order.txt"
  python3 - 2>&1 <<'EOF' | tee "$OUT/models.txt"
import time
from pathlib import Path
from bulkembed.bench.inprocess import synthetic_model
for quant in ("F16", "Q8_0", "IQ3_S"):
    t0 = time.time()
    path = synthetic_model("v4", quant, Path("/tmp/bw"), 16)
    print(quant, path, round(path.stat().st_size / 2**20), "MiB", round(time.time() - t0), "s", flush=True)
EOF
  ;;
f16)
  bench f16-auto 330 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch probe --engines 3 \
    --modes bulkembed,raw,llama-embedding,transformers --peer-ubatch 512
  bench f16-ub512 200 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch 512 --engines 3 --modes bulkembed,raw
  ;;
f16-ubs)
  # The 30k target of issue 9: 3 engines at the ubatches one engine liked best on the H100 (NOTES.md 22).
  bench f16-ub1024 270 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch 1024 --engines 3 --modes bulkembed,raw
  bench f16-ub2048 270 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch 2048 --engines 3 --modes bulkembed,raw
  ;;
quants)
  bench q8-auto 170 --synthetic-model v4 --quant Q8_0 --synthetic 1500 --ubatch probe --engines 3 \
    --modes bulkembed,raw,llama-embedding
  bench iq3s-auto 190 --synthetic-model v4 --quant IQ3_S --synthetic 1500 --ubatch probe --engines 3 \
    --modes bulkembed,raw,llama-embedding
  # The main job end to end (Parquet in, Arrow out) with 1 engine and with auto (as many as fit).
  python3 - <<'EOF'
import pyarrow as pa, pyarrow.parquet as pq
from bulkembed import synthetic
from bulkembed.contract.vocab import TokenCounter
counter = TokenCounter("/tmp/bw/synthetic-v4-F16.gguf")  # llama.cpp in its own process: pyarrow is here
texts = synthetic.synthetic_texts(synthetic.target_lengths(1500, "mixed", 0), counter.count, 0)
pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), "/tmp/bw/corpus.parquet")
EOF
  for engines in 1 auto; do
    t0=$(date +%s.%N)
    timeout 120 bulkembed run /tmp/bw/corpus.parquet --model /tmp/bw/synthetic-v4-F16.gguf --out /tmp/bw/out-$engines \
      --prefix '' --engines $engines --ubatch auto 2>&1 | grep -v "tok/s]" | tail -4 | tee -a "$OUT/run.txt"
    echo "run --engines $engines: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall" | tee -a "$OUT/run.txt"
  done
  ;;
esac
