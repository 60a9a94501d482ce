"""A whole job against llama-cpp-python's Llama.embed, process start to vectors on disk, on the same corpus and model.

    python benchmarks/whole_job.py --docs 300          # the model bench's small-v4vocab: 6 layers, 384 wide, v4's vocab

Both sides are timed from a fresh process to their last vector: `bulkembed run` (plan with the model's vocabulary,
start the engine, self-test off as in `run`, embed, write Arrow) and a script that loads the model into
`Llama(embedding=True, flash_attn=True, n_ctx = n_batch = n_ubatch = 4096)` (documents are at most 3000 tokens),
calls `Llama.embed` 64 texts at a time and saves the vectors with numpy. It also compares their vectors (cosine per
row), so a speed-up that changed the answers would show. With a v4-size vocabulary on a small model the LM head is
most of the work: this is where skipping it shows (the issue's target: >= 2x).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bulkembed.bench.inprocess import SHAPES
from bulkembed.synthetic import synthetic_texts, target_lengths, write_qwen2vl_gguf

LLAMA_EMBED = """
import sys, numpy as np, llama_cpp, pyarrow.parquet as pq
texts = pq.read_table(sys.argv[2]).column("text").to_pylist()
llm = llama_cpp.Llama(sys.argv[1], embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=4096,
                      n_batch=4096, n_ubatch=4096, n_threads=int(sys.argv[4]), n_threads_batch=int(sys.argv[4]),
                      flash_attn=True, verbose=False)
vectors = [v for i in range(0, len(texts), 64) for v in llm.embed(texts[i:i + 64], normalize=True)]
np.save(sys.argv[3], np.asarray(vectors, np.float32))
"""


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--shape", default="small-v4vocab", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder kept between runs (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="whole-job-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"whole-job-{args.shape}-F16.gguf"
    if not model.exists():
        write_qwen2vl_gguf(model, SHAPES[args.shape], dtype="f16")
    corpus = work / f"corpus-{args.docs}.parquet"
    from bulkembed.contract.vocab import TokenCounter  # llama.cpp in a process of its own: pyarrow is here

    counter = TokenCounter(model)
    texts = synthetic_texts(target_lengths(args.docs, "mixed", 0, cap=3000), counter.count, 0)
    tokens = sum(counter.count(t) for t in texts)
    counter.close()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), corpus)

    out = work / "out"
    bulkembed_s = timed([sys.executable, "-m", "bulkembed.cli", "run", str(corpus), "--model", str(model), "--out",
                         str(out), "--prefix", "", "--threads", str(args.threads), "--force"])
    peer_out = work / "llama-embed.npy"
    peer_s = timed([sys.executable, "-c", LLAMA_EMBED, str(model), str(corpus), str(peer_out), str(args.threads)])

    table = ds.dataset(out, format="arrow").to_table().sort_by("id")
    order = {f"d{i}": i for i in range(len(texts))}
    ours = np.stack(table["embedding"].to_numpy(zero_copy_only=False))[np.argsort([order[i] for i in
                                                                                    table["id"].to_pylist()])]
    theirs = np.load(peer_out)
    cos = np.sum(ours * theirs, axis=1)
    print(f"model {model.name}, {args.docs} docs, {tokens} tokens, {args.threads} threads")
    print(f"bulkembed run (whole job)   {bulkembed_s:7.1f} s")
    print(f"Llama.embed   (whole job)   {peer_s:7.1f} s")
    print(f"==> bulkembed run / Llama.embed = {peer_s / bulkembed_s:.2f}x; vectors: min cos {cos.min():.6f}")


if __name__ == "__main__":
    main()
