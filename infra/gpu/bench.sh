#!/usr/bin/env bash
# Run ON the GPU machine from the project root after `bash .gpu/device.sh`: the GPU numbers of
# docs/benchmarks.md, in calls that each fit the device tool's 10 minutes: `bench.sh check` (exactness on
# CUDA, the import-order crash, the v4-shaped models), `bench.sh f16` (auto ubatch vs 512, 1 vs 3 engines, the
# real llama-embedding and transformers), `bench.sh f16-ubs` (3 engines at ub 1024 and 2048), `bench.sh quants`
# (Q8_0, IQ3_S, `bulkembed run` with 1 and auto engines), `bench.sh isolated` (--isolate on CUDA: invariance, cost).
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
LOG=$OUT/steps.log  # every step's command, exit status and report: the device tool brings back at most 8 files
bench() { # name, limit, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: python3 -m bulkembed.bench $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout "$limit" python3 -m bulkembed.bench --work "$W" --threads "$THREADS" --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "   rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  python3 -c "import json,sys; from bulkembed.bench.report import format_report; print(format_report(json.load(open(sys.argv[1]))))" \
    "$OUT/$name.json" 2>/dev/null | tee -a "$LOG"
}
# A script or pytest with llama.cpp's libraries loaded before numpy: the other order crashed GPU model loads on the H100
# image (docs/notes.md 25).
LLAMA_FIRST=(python3 -c 'import runpy, sys, llama_cpp; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
PYTEST_LLAMA_FIRST=(python3 -c 'import sys, llama_cpp, pytest; sys.exit(pytest.main(sys.argv[1:]))')
step() { # name, limit, command...: one step of the window, its output in the log, its time and status after it
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "   rc ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
# The v4-shaped F16 model (6.5 GB of random weights, ~90 s of CPU) written in the background while GPU steps run.
v4_model_start() {
  python3 -c "from pathlib import Path; from bulkembed.bench.inprocess import synthetic_model as m
print(m('v4', 'F16', Path('$W'), 8))" > /tmp/model.log 2>&1 &
  maker=$!
}
v4_model_wait() { wait $maker; cat /tmp/model.log | tee -a "$LOG"; }

case "${1:-check}" in
window)
  # The whole GPU check of the no-wasted-work and batch-invariance issues in one device call of about 9 minutes
  # (the libraries prebuilt by infra/gpu/build-cuda.sh), most important first; each step's limit keeps a hang to
  # itself. Three files come back: steps.log (everything), f16-window.json and .err (the bench's report and log).
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$LOG"
  python3 -c "import llama_cpp as l; print('LM head patch:', hasattr(l.llama_cpp._lib, 'llama_get_embeddings_no_logits'))" \
    | tee -a "$LOG"
  v4_model_start
  # 1. Batch invariance on CUDA: every regime and cut of F16, Q8_0, IQ3_S (the outlier model) against exact.
  step invariance 110 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py --quants F16,Q8_0,IQ3_S
  # 2. The LM head left out on CUDA: vectors equal to the head's, every model kind and pooling.
  step lm-head-tests 70 "${PYTEST_LLAMA_FIRST[@]}" -q -p no:cacheprovider --import-mode=append -o pythonpath= \
    $REPO/tests/worker/test_lm_head.py
  v4_model_wait
  # 3. `bulkembed run` end to end (Parquet in, Arrow out; pyarrow here, engines in llama processes), auto engines.
  python3 - <<'EOF2'
import pyarrow as pa, pyarrow.parquet as pq
from bulkembed import synthetic
from bulkembed.contract.vocab import TokenCounter
counter = TokenCounter("/tmp/bw/synthetic-v4-F16.gguf")
texts = synthetic.synthetic_texts(synthetic.target_lengths(1500, "mixed", 0), counter.count, 0)
pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), "/tmp/bw/corpus.parquet")
EOF2
  step run-auto 80 env TQDM_DISABLE=1 bulkembed run /tmp/bw/corpus.parquet --model /tmp/bw/synthetic-v4-F16.gguf --out /tmp/bw/out-auto \
    --prefix '' --engines auto --ubatch auto
  # 4. v4-shaped F16, 3000 mixed documents: head skipped and computed, raw, 3 engines (auto: as many as fit, at
  #    most 3), auto ubatch, the real llama-embedding (the seed's recipe) and transformers bf16 on the same tower.
  bench f16-window 300 --synthetic-model v4 --quant F16 --synthetic 3000 --ubatch probe --engines 3 \
    --modes bulkembed,bulkembed-head,raw,llama-embedding,transformers --peer-ubatch 512
  # 5. If time is left: the same invariance cuts on the v4-shaped F16 (random weights, no exact column).
  step invariance-v4 90 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py --model $W/synthetic-v4-F16.gguf --texts 100
  ;;
isolated)
  # --isolate on CUDA (one document a decode, from an emptied cache): are the rows bit-identical whatever the cut,
  # the neighbours and the run (packing's are not: `window`), and what does it cost against packing? About 8
  # minutes; steps.log and the two benches' reports come back. The bits need no patch: without build-cuda.sh's
  # libraries (33 to 61 min here), `prepare.sh --prebuilt` (the LM head is then computed, in both modes alike, which
  # makes isolation's cost look smaller than it is).
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$LOG"
  v4_model_start
  step invariance-isolated 120 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py --quants F16,Q8_0,IQ3_S --isolate
  # The issue's target as a user meets it: whole `bulkembed run`s with another shard size, ubatch cap, engine count.
  step runs-isolated 100 "${LLAMA_FIRST[@]}" $REPO/benchmarks/invariance_runs.py --isolate
  v4_model_wait
  # A GPU worker's self-test, never run on a GPU yet: packed against alone, held to MIN_COSINE_GPU (0.999). Its
  # worst cosine is printed, or the SelfTestError that would stop every worker.
  step selftest-v4 60 python3 -c "import llama_cpp; from pathlib import Path
from bulkembed.worker.engine import EngineOptions
from bulkembed.worker.selftest import MIN_COSINE_GPU, self_test_file
print('self-test worst cosine', self_test_file(Path('$W/synthetic-v4-F16.gguf'), EngineOptions(ubatch=512)),
      'bound', MIN_COSINE_GPU)"
  step invariance-v4-isolated 120 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py \
    --model $W/synthetic-v4-F16.gguf --texts 100 --isolate
  # One engine each, taking turns in one process; then isolated with 3 engines (small decodes leave a GPU idle).
  bench iso-f16 150 --synthetic-model v4 --quant F16 --synthetic 1500 --ubatch 1024 --modes bulkembed,bulkembed-isolated
  bench iso-f16-engines 120 --synthetic-model v4 --quant F16 --synthetic 1500 --ubatch 1024 --engines 3 --isolate \
    --modes bulkembed
  # Last, if time is left: the same whole runs packed (what two runs on CUDA give without --isolate).
  step runs-packed 90 "${LLAMA_FIRST[@]}" $REPO/benchmarks/invariance_runs.py
  ;;
padding)
  # Batch invariance on CUDA with every decode padded to the whole ubatch (one decode size, so one kernel shape),
  # against the window's 64-token padding: the outlier model, then the v4-shaped F16 (written meanwhile).
  v4_model_start
  step invariance-full 90 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py --quants F16,Q8_0,IQ3_S --full
  v4_model_wait
  step invariance-v4-full 100 "${LLAMA_FIRST[@]}" $REPO/benchmarks/batch_invariance.py --model $W/synthetic-v4-F16.gguf \
    --texts 100 --full
  ;;
check)
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
  # Exactness on CUDA: packed == alone, pieces across decodes (tiny models, offloaded to the GPU). The installed
  # copy (/tmp/site) must win over the source folders, hence append mode and no extra pythonpath.
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider --import-mode=append -o pythonpath= \
    $REPO/tests/worker/test_engine.py $REPO/tests/worker/test_selftest.py 2>&1 | tail -4 | tee "$OUT/cuda-tests.txt"
  # docs/notes.md 25 and the pyarrow crash: numpy before llama_cpp, then a GPU model load (crashed on the H100 image);
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
  # The 30k target of issue 9: 3 engines at the ubatches one engine liked best on the H100 (docs/notes.md 22).
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
