"""Which vector is right? Each kernel regime of llama.cpp against the exact computation of the same weights.

    python benchmarks/batch_invariance.py [--texts 200] [--gain 60]

A qwen2vl with the outlier activations of trained weights (synthetic.write_qwen2vl_gguf(outlier_gain=...), the
model of tests/worker/test_batch_invariance.py), quantized by llama.cpp. "Exact" is the quantized file dequantized
to F32 by gguf's reference dequantizers (synthetic.dequantized_copy), each text alone, without flash attention: the
weights the user chose, computed without quantized kernels. Against it, per quantization:

- alone, unpadded: each text in a decode of its own length (below 64 tokens: the small-batch kernels; what a
  query embedded on its own got before padding);
- packed, unpadded: the texts packed 512 tokens a decode (the large-batch kernels; most rows of an old bulk job);
- bulkembed: packed and padded to 64 tokens a decode (every decode in the large-batch regime), alone or packed.

It prints each regime's cosine to exact (worst and median over the texts) and how far each regime's rows are from
bulkembed's. CPU only; the model is small, so it takes about a minute.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bulkembed.synthetic import OUTLIER as SHAPE
from bulkembed.synthetic import dequantized_copy, quantize, synthetic_texts, target_lengths
from bulkembed.synthetic import write_qwen2vl_gguf as write_model
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.packing import MIN_DECODE_TOKENS, single_document_shape


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embed(model: Path, tokens: list[np.ndarray], min_decode: int, alone: bool, flash_attn: bool | None):
    engine = Engine(model, EngineOptions(ubatch=512, threads=2, min_decode=min_decode, flash_attn=flash_attn))
    try:
        if alone:
            return np.stack([engine.embed([t], single_document_shape(len(t)))[0] for t in tokens])
        return engine.embed(tokens)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--gain", type=float, default=60.0, help="outlier features' scale (0: plain random weights)")
    parser.add_argument("--quants", default="Q8_0,Q4_K_M")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto", help="every regime but exact")
    args = parser.parse_args()
    flash = {"auto": None, "on": True, "off": False}[args.flash_attn]
    work = Path(tempfile.mkdtemp(prefix="batch-invariance-"))
    f32 = write_model(work / "outlier-F32.gguf", SHAPE, seed=0, outlier_gain=args.gain)
    probe = Engine(f32, EngineOptions(threads=2))
    lengths = target_lengths(args.texts, "mixed", seed=1, cap=1500)
    texts = synthetic_texts(lengths, lambda t: len(probe.vocab.tokenize(t)), seed=1)
    tokens = [probe.vocab.tokenize(t) for t in texts]
    probe.close()
    short = np.array([len(t) < MIN_DECODE_TOKENS for t in tokens])
    print(f"outlier qwen2vl {SHAPE.n_layer} layers x {SHAPE.n_embd} wide, gain {args.gain}; {len(texts)} texts "
          f"({short.sum()} under {MIN_DECODE_TOKENS} tokens, longest {max(map(len, tokens))}); flash attention "
          f"{args.flash_attn}; 1 - cos, worst / median")
    print(f"{'quant':8} {'regime':28} {'to exact':>22} {'to bulkembed':>22}")
    for quant in args.quants.split(","):
        model = quantize(f32, work / f"outlier-{quant}.gguf", quant, threads=2)
        exact = embed(dequantized_copy(model, work / f"outlier-{quant}-exact.gguf"), tokens, MIN_DECODE_TOKENS,
                      alone=True, flash_attn=False)
        every = np.ones(len(tokens), bool)
        regimes = {
            "alone, unpadded (short texts)": (embed(model, tokens, 0, True, flash), short),
            "packed, unpadded": (embed(model, tokens, 0, False, flash), every),
            "bulkembed, alone": (embed(model, tokens, MIN_DECODE_TOKENS, True, flash), every),
            "bulkembed, packed": (embed(model, tokens, MIN_DECODE_TOKENS, False, flash), every),
        }
        ours = regimes["bulkembed, packed"][0]
        for name, (vectors, rows) in regimes.items():
            to_exact = 1 - cosines(vectors[rows], exact[rows])
            to_ours = 1 - cosines(vectors[rows], ours[rows])
            print(f"{quant:8} {name:28} {to_exact.max():10.2e} / {np.median(to_exact):9.2e} "
                  f"{to_ours.max():10.2e} / {np.median(to_ours):9.2e}")


if __name__ == "__main__":
    main()
