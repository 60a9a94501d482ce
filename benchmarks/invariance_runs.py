"""The same corpus run with other shard sizes, ubatch caps and engine counts: how far apart are the vectors?

    python benchmarks/invariance_runs.py [--docs 400] [--quant Q4_K_M] [--isolate]   # BULKEMBED_MIN_DECODE=0: unpadded

The batch-invariance issue's target, measured. One mixed corpus (short texts, one in nine of 300 to 3000 tokens)
goes through `bulkembed run` on the outlier qwen2vl (synthetic.OUTLIER, gain 60: the tests' model). The first run
uses --shard-tokens 65536, --ubatch 512, --engines 1; each variant changes one of them (8192; 256; 2 engines of one
thread each). Every row of each variant is compared with the first run's. `--isolate`: every run with --isolate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bulkembed.synthetic import OUTLIER, WORDS, quantize, write_qwen2vl_gguf

VARIANTS = {
    "--shard-tokens 8192": ["--shard-tokens", "8192"],
    "--ubatch 256": ["--ubatch", "256"],
    "--engines 2 (1 thread each)": ["--engines", "2", "--threads", "1"],
}


def run(corpus: Path, model: Path, out: Path, *options: str, isolate: bool = False) -> dict[str, np.ndarray]:
    base = {"--shard-tokens": "65536", "--ubatch": "512", "--engines": "1", "--threads": "2"}
    for flag, value in zip(options[::2], options[1::2], strict=True):
        base[flag] = value
    argv = [a for pair in base.items() for a in pair] + (["--isolate"] if isolate else [])
    subprocess.run([sys.executable, "-m", "bulkembed.cli", "run", str(corpus), "--model", str(model), "--out",
                    str(out), "--force", "--prefix", "", *argv], check=True, capture_output=True)
    table = ds.dataset(out, format="arrow").to_table()
    return dict(zip(table["id"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                    strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--isolate", action="store_true", help="every run one document a decode")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="invariance-runs-"))
    f32 = write_qwen2vl_gguf(work / "outlier-F32.gguf", OUTLIER, seed=0, outlier_gain=60)
    model = quantize(f32, work / f"outlier-{args.quant}.gguf", args.quant, threads=2)
    rng = np.random.default_rng(3)  # the tiny byte-level vocabulary: about a token a byte
    lengths = [int(rng.integers(300, 3000)) if i % 9 == 0 else int(rng.integers(2, 60)) for i in range(args.docs)]
    texts = [" ".join(rng.choice(WORDS, size=max(1, n // 6)))[:n] for n in lengths]
    ids = [f"d{i}" for i in range(len(texts))]
    corpus = work / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    base = run(corpus, model, work / "base", isolate=args.isolate)
    base_vectors = np.stack([base[i] for i in ids]).astype(np.float64)
    for name, options in VARIANTS.items():
        other = run(corpus, model, work / "other", *options, isolate=args.isolate)
        vectors = np.stack([other[i] for i in ids]).astype(np.float64)
        cos = np.sum(vectors * base_vectors, axis=1) / (np.linalg.norm(vectors, axis=1)
                                                         * np.linalg.norm(base_vectors, axis=1))
        print(f"{name:28} {len(ids)} rows: min cos {cos.min():.9f}, below 0.999999: {(cos < 0.999999).sum()}, "
              f"bit-identical: {(vectors == base_vectors).all(axis=1).sum()}")


if __name__ == "__main__":
    main()
