"""Does `bulkembed run --engines N --threads 1` give N times `--engines 1 --threads 1`, with the same vectors?

    python benchmarks/engines_cpu.py --engines 2 --docs 1500

Writes a synthetic model (6 layers, 384 wide, 8k vocab: embedding, not Python, is the work) and a mixed-length
corpus, runs the same job with 1 engine and with N (one thread each), reads the embedding time each logs
("N tokens embedded in S s") and compares every row's vector. The target on 2 cores: N=2 >= 1.6x, cos >= 0.9999.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bulkembed.synthetic import ModelShape, synthetic_texts, target_lengths, write_qwen2vl_gguf

SMALL = ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=8192, n_ctx_train=32768)
EMBEDDED = re.compile(r"(\d+) tokens embedded in ([\d.]+)s on (\d+) engine")


def run(corpus: Path, model: Path, out: Path, engines: int) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "run", str(corpus), "--model", str(model), "--out",
                           str(out), "--prefix", "", "--engines", str(engines), "--threads", "1", "--ubatch", "512",
                           "--shard-tokens", "8192"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    tokens, seconds, _ = EMBEDDED.search(done.stderr).groups()
    return int(tokens), float(seconds)


def vectors(out: Path) -> np.ndarray:
    table = ds.dataset(str(out), format="arrow").to_table(columns=["id", "embedding"]).sort_by("id")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--docs", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_qwen2vl_gguf(work / "small-F32.gguf", SMALL, name="small")
        from bulkembed.contract.vocab import Vocab

        vocab = Vocab.load(model)
        texts = synthetic_texts(target_lengths(args.docs, "mixed", 0, 2000), vocab.count, 0)
        corpus = work / "corpus.parquet"
        pq.write_table(pa.table({"id": [f"d{i:06d}" for i in range(len(texts))], "text": texts}), corpus)
        rates = {}
        for engines in (1, args.engines):
            tokens, seconds = run(corpus, model, work / f"out{engines}", engines)
            rates[engines] = tokens / seconds
            print(f"--engines {engines} --threads 1: {tokens} tokens in {seconds:.1f}s = {rates[engines]:.0f} tok/s")
        one, many = vectors(work / "out1"), vectors(work / f"out{args.engines}")
        cos = np.sum(one * many, axis=1) / (np.linalg.norm(one, axis=1) * np.linalg.norm(many, axis=1))
        print(f"speed-up {rates[args.engines] / rates[1]:.2f}x (target >= 1.6x for 2 engines); {len(cos)} rows, "
              f"min cosine {cos.min():.7f}")


if __name__ == "__main__":
    main()
