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
bulkembed's, with the rows bit-identical to it. Then the cuts a job may give a text, padded as bulkembed runs: another
ubatch cap (256, 2048) and other neighbours (the texts in reverse order). The model is small: about a minute on CPU.
On a GPU it runs offloaded (the device's kernels are what is measured); `--model` measures any GGUF the same way,
without the exact column (a dequantized copy of a large model would not fit a quick run). `--isolate` runs every
bulkembed row with --isolate (one document a decode): every row that no ubatch cap cuts should be bit-identical.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bulkembed.synthetic import OUTLIER as SHAPE
from bulkembed.synthetic import dequantized_copy, quantize, synthetic_texts, target_lengths
from bulkembed.synthetic import write_qwen2vl_gguf as write_model
from bulkembed.worker.engine import Engine, EngineOptions, flash_attn_choice
from bulkembed.worker.packing import MIN_DECODE_TOKENS, single_document_shape


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embed(model: Path, tokens: list[np.ndarray], min_decode: int, alone: bool, flash_attn: bool | None,
          ubatch: int = 512, reverse: bool = False, isolate: bool = False):
    engine = Engine(model, EngineOptions(ubatch=ubatch, threads=2, min_decode=min_decode, flash_attn=flash_attn,
                                         isolate=isolate))
    try:
        if alone:
            return np.stack([engine.embed([t], single_document_shape(len(t)))[0] for t in tokens])
        if reverse:  # every text beside other neighbours, in other places of the cache
            return engine.embed(tokens[::-1])[::-1]
        return engine.embed(tokens)
    finally:
        engine.close()


def measure(model: Path, tokens: list[np.ndarray], label: str, flash: bool | None, exact: np.ndarray | None,
            full: bool = False, isolate: bool = False) -> None:
    """Print each regime and cut of `model` against bulkembed's packed rows (and against exact, when given).
    `full`: bulkembed's decodes padded to the whole ubatch (every decode the same size) instead of 64 tokens.
    `isolate`: bulkembed's rows embedded one document a decode."""
    short = np.array([len(t) < MIN_DECODE_TOKENS for t in tokens])
    every = np.ones(len(tokens), bool)

    def padded(ubatch: int = 512) -> int:
        return ubatch if full else MIN_DECODE_TOKENS

    ours = embed(model, tokens, padded(), False, flash, isolate=isolate)
    rows = {
        "alone, unpadded (short texts)": (embed(model, tokens, 0, True, flash), short),
        "packed, unpadded": (embed(model, tokens, 0, False, flash), every),
        "bulkembed, alone": (embed(model, tokens, padded(), True, flash, isolate=isolate), every),
        "bulkembed, packed": (ours, every),
        "bulkembed, ubatch 256": (embed(model, tokens, padded(256), False, flash, ubatch=256, isolate=isolate),
                                  every),
        "bulkembed, ubatch 2048": (embed(model, tokens, padded(2048), False, flash, ubatch=2048, isolate=isolate),
                                   every),
        "bulkembed, other neighbours": (embed(model, tokens, padded(), False, flash, reverse=True, isolate=isolate),
                                        every),
    }
    if isolate:  # what isolation is measured against: the same texts packed
        rows["packed, not isolated"] = (embed(model, tokens, padded(), False, flash), every)
    for name, (vectors, chosen) in rows.items():
        to_ours = 1 - cosines(vectors[chosen], ours[chosen])
        identical = int(np.all(vectors[chosen] == ours[chosen], axis=1).sum())
        if exact is not None:
            to_exact = 1 - cosines(vectors[chosen], exact[chosen])
            against_exact = f"{to_exact.max():10.2e} / {np.median(to_exact):9.2e}"
        else:
            against_exact = f"{'-':>22}"
        print(f"{label:8} {name:30} {against_exact} {to_ours.max():10.2e} / {np.median(to_ours):9.2e} "
              f"{identical:5d} / {int(chosen.sum())}", flush=True)


def texts_for(model: Path, n: int) -> list[np.ndarray]:
    probe = Engine(model, EngineOptions(threads=2))
    try:
        lengths = target_lengths(n, "mixed", seed=1, cap=1500)
        texts = synthetic_texts(lengths, lambda t: len(probe.vocab.tokenize(t)), seed=1)
        return [probe.vocab.tokenize(t) for t in texts]
    finally:
        probe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--gain", type=float, default=60.0, help="outlier features' scale (0: plain random weights)")
    parser.add_argument("--quants", default="Q8_0,Q4_K_M",
                        help="F16 too; types that need an importance matrix get a uniform one")
    parser.add_argument("--model", type=Path, help="measure this GGUF instead (no exact column)")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto", help="every regime but exact")
    parser.add_argument("--full", action="store_true", help="pad bulkembed's decodes to the whole ubatch, not 64")
    parser.add_argument("--isolate", action="store_true", help="bulkembed's rows one document a decode")
    args = parser.parse_args()
    flash = flash_attn_choice(args.flash_attn)
    header = f"{'quant':8} {'regime':30} {'to exact':>22} {'to bulkembed (packed)':>22} {'bit-identical':>13}"
    if args.model:
        tokens = texts_for(args.model, args.texts)
        print(f"{args.model.name}; {len(tokens)} texts (longest {max(map(len, tokens))}); flash attention "
              f"{args.flash_attn}{'; isolated' if args.isolate else ''}; 1 - cos, worst / median", flush=True)
        print(header)
        measure(args.model, tokens, "model", flash, None, args.full, args.isolate)
        return
    work = Path(tempfile.mkdtemp(prefix="batch-invariance-"))
    f32 = write_model(work / "outlier-F32.gguf", SHAPE, seed=0, outlier_gain=args.gain)
    tokens = texts_for(f32, args.texts)
    short = sum(len(t) < MIN_DECODE_TOKENS for t in tokens)
    print(f"outlier qwen2vl {SHAPE.n_layer} layers x {SHAPE.n_embd} wide, gain {args.gain}; {len(tokens)} texts "
          f"({short} under {MIN_DECODE_TOKENS} tokens, longest {max(map(len, tokens))}); flash attention "
          f"{args.flash_attn}{'; isolated' if args.isolate else ''}; 1 - cos, worst / median", flush=True)
    print(header)
    for quant in args.quants.split(","):
        model = quantize(f32, work / f"outlier-{quant}.gguf", quant, threads=2, uniform_imatrix=True)
        exact = embed(dequantized_copy(model, work / f"outlier-{quant}-exact.gguf"), tokens, MIN_DECODE_TOKENS,
                      alone=True, flash_attn=False)
        measure(model, tokens, quant, flash, exact, args.full, args.isolate)


if __name__ == "__main__":
    main()
