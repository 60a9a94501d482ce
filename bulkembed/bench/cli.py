"""`bulkembed bench`: the real per-shard path against the raw llama_decode ceiling and the real peers.

bulkembed and `raw` run in this process on the same model, corpus and machine. `raw` times only llama_decode
(and llama_memory_seq_rm) over the very decode plans the engine would run, so bulkembed/raw is the share of
the ceiling that tokenizing, planning, packing, pooling and normalizing leave over. `--engines N` adds the same
path in N engine processes side by side. The peers: llama-cpp-python's Llama.embed, the real `llama-embedding`
binary with the seed's recipe (when found), and transformers (when importable); `seed` is an in-process
emulation of that recipe, labelled as such, for machines without the binary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from bulkembed.bench import peers
from bulkembed.bench.engines import run_engines
from bulkembed.bench.inprocess import (
    SHAPES,
    VARIANTS,
    drop_context,
    load_corpus,
    run_bulkembed,
    run_llama_embed,
    run_raw,
    run_seed,
    run_sweep,
    synthetic_model,
)
from bulkembed.bench.meter import Meter, Result
from bulkembed.bench.report import describe, format_report
from bulkembed.contract.settings import ubatch_spec
from bulkembed.worker.engine import Engine, EngineOptions, flash_attn_choice
from bulkembed.worker.packing import MIN_DECODE_TOKENS

log = logging.getLogger(__name__)

MODES = ("bulkembed", *VARIANTS, "raw", "llama-embed", "seed", "llama-embedding", "transformers")
DEFAULT_MODES = ("bulkembed", "raw", "llama-embed", "seed", "llama-embedding")
SWEEP_UBS = (64, 128, 256, 512, 1024, 2048, 4096)  # the seed blog's grid
SWEEP_CTXS = (64, 128, 256, 512, 2048, 4096, 8192, 16384)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="measure bulkembed against the raw decode ceiling and peers")
    model = bench.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="a .gguf file")
    model.add_argument("--synthetic-model", choices=sorted(SHAPES),
                       help="a random-weight model: qwen2vl (tiny, small, small-v4vocab, v4) or a non-causal bert "
                       "(minilm)")
    bench.add_argument("--quant", default="Q8_0", help="synthetic model's type: F32, F16, Q8_0, Q4_K_M, IQ3_S, ...")
    bench.add_argument("--work", type=Path, help="folder for synthetic models, reused by name (default: a temp dir)")
    corpus = bench.add_mutually_exclusive_group()
    corpus.add_argument("--corpus", type=Path, help="a Parquet file")
    corpus.add_argument("--synthetic", type=int, default=600, help="N synthetic documents (default 600)")
    bench.add_argument("--text-column", default="text")
    bench.add_argument("--lengths", default="mixed", help="mixed (default), short, long or fixed:K tokens")
    bench.add_argument("--max-doc-tokens", type=int, default=None, help="clip synthetic lengths to this")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--modes", default=",".join(DEFAULT_MODES),
                       help=f"comma list of {', '.join(MODES)} (default {','.join(DEFAULT_MODES)}; llama-embedding "
                            f"is skipped with a note when its binary is not found)")
    bench.add_argument("--engines", type=int, default=0,
                       help="also run bulkembed in N engine processes side by side (the worker's --engines N)")
    bench.add_argument("--peer-binary", help="the llama-embedding binary (default: the one on PATH)")
    bench.add_argument("--peer-ubatch", type=int, default=peers.SEED_UBATCH,
                       help="the seed recipe's ubatch for llama-embedding")
    bench.add_argument("--sweep", action="store_true", help="also the ub x ctx grid of the seed blog")
    bench.add_argument("--ubs", type=_ints, default=list(SWEEP_UBS))
    bench.add_argument("--ctxs", type=_ints, default=list(SWEEP_CTXS))
    bench.add_argument("--shard-tokens", type=int, default=65536)
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench.add_argument("--ubatch", type=ubatch_spec, default=512,
                       help="largest ubatch the engine may choose; auto or probe: measured first, as a worker does")
    bench.add_argument("--min-decode", type=int, default=MIN_DECODE_TOKENS,
                       help=f"fewest tokens a decode carries (padding tops it up; default {MIN_DECODE_TOKENS}); 0 = "
                            "no padding, to measure what batch invariance costs")
    bench.add_argument("--isolate", action="store_true",
                       help="every bulkembed mode one document a decode, as the worker's --isolate (the "
                            "bulkembed-isolated mode compares it with packing in one run)")
    bench.add_argument("--gpu-layers", type=int, default=-1)
    bench.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    bench.add_argument("--repeat", type=int, default=1, help="run each measurement N times, report the fastest")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)
    return bench


def cmd_bench(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        print(f"bulkembed bench: unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bulkembed-bench-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        try:
            model = args.model or synthetic_model(args.synthetic_model, args.quant, work, args.threads)
        except ValueError as exc:
            print(f"bulkembed bench: {exc}", file=sys.stderr)
            return 2
        report = measure(model, args.quant.upper() if args.synthetic_model else None, modes, args)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def measure(model: Path, quant: str | None, modes: list[str], args: argparse.Namespace) -> dict:
    options = EngineOptions(ubatch=args.ubatch if isinstance(args.ubatch, int) else 512, gpu_layers=args.gpu_layers,
                            threads=args.threads, flash_attn=flash_attn_choice(args.flash_attn),
                            min_decode=args.min_decode, isolate=args.isolate)
    ubatch = args.ubatch
    if not isinstance(ubatch, int):  # measured as a worker would, then used by every mode of this process
        ubatch = run_engines_probe(model, options, args)
        options = dataclasses.replace(options, ubatch=ubatch)
    engine = Engine(model, options)
    variants = {mode: Engine(model, dataclasses.replace(options, **VARIANTS[mode])) for mode in modes
                if mode in VARIANTS}
    engines = [engine, *variants.values()]
    results: dict[str, list[Result]] = {}
    try:
        report = describe(engine, model, quant)
        corpus = load_corpus(args, engine)
        for warm in engines:  # the first decodes page the weights in
            warm.embed(corpus.tokens[:8])
        runs = {"bulkembed": lambda: run_bulkembed(engine, corpus, args.shard_tokens),
                "raw": lambda: run_raw(engine, corpus, args.shard_tokens), "seed": lambda: run_seed(engine, corpus)}
        for mode, variant in variants.items():
            runs[mode] = lambda mode=mode, variant=variant: run_bulkembed(variant, corpus, args.shard_tokens, mode)
        pooling = engine.pooling
        if not engine.info.causal:  # the seed recipe splits documents across ubatches: wrong for such a model
            runs.pop("seed")
        for attempt in range(args.repeat):  # round robin, so a burst of other load hits every mode alike
            for mode in (m for m in modes if m in runs):
                for each in engines:
                    drop_context(each)
                result = runs[mode]()
                log.info("bench: %s run %d: %.0f tok/s", mode, attempt + 1, result.tokens / result.seconds)
                if mode not in results or result.seconds < results[mode][0].seconds:
                    results[mode] = [result]
        sweep = run_sweep(engine, corpus, args.ubs, args.ctxs, args.repeat) if args.sweep else None
    finally:
        for each in engines:  # before the other modes load their own copies: peak RSS must not count two models
            each.close()
    gpu = report["device"]["gpu_offload"]
    notes = []
    if "seed" in modes and "seed" not in results:
        notes.append("seed: not run on a non-causal model (its recipe splits documents across ubatches)")
    if args.engines:
        log.info("bench: bulkembed in %d engines", args.engines)
        results["engines"] = [run_engines(str(model), corpus, options, args.engines, ubatch, args.shard_tokens)[0]]
    if "llama-embed" in modes:
        log.info("bench: llama-embed")
        results["llama-embed"] = [run_llama_embed(model, corpus, args, gpu, pooling)]
    if "llama-embedding" in modes:
        binary = peers.find_binary(args.peer_binary)
        if binary:
            results["llama-embedding"] = peers.run_llama_embedding(binary, model, corpus, args.peer_ubatch, gpu,
                                                                   args.threads)
        else:
            notes.append("llama-embedding: no binary (pass --peer-binary or put it on PATH); the `seed` row is "
                         "an in-process emulation of its recipe")
    if "transformers" in modes:
        if peers.transformers_available():
            results["transformers"] = [peers.run_transformers(model, corpus)]
        else:
            notes.append("transformers: torch and transformers are not importable here")
    raw = results.get("raw", [None])[0]
    order = [*modes[:1], *(["engines"] if args.engines else []), *modes[1:]]
    rows = [r.as_dict(raw) for m in order for r in results.get(m, [])]
    ratio = next((r["ratio_to_raw"] for r in rows if r["mode"] == "bulkembed"), None)
    return report | {"corpus": corpus.summary(), "threads": args.threads, "ubatch": ubatch,
                     "flash_attn": args.flash_attn, "shard_tokens": args.shard_tokens, "repeat": args.repeat,
                     "min_decode": args.min_decode, "isolate": args.isolate,
                     "rss_note": Meter.rss_note, "modes": rows, "ratio_bulkembed_raw": ratio, "sweep": sweep,
                     "notes": notes}


def run_engines_probe(model: Path, options: EngineOptions, args: argparse.Namespace) -> int:
    """--ubatch auto/probe: the worker's probe, in as many engines as the bench runs side by side."""
    from bulkembed.worker.engines import EnginePool, EngineSetup

    setup = EngineSetup(options, engines=max(1, args.engines), ubatch=args.ubatch)
    with EnginePool(model, "bench", setup) as pool:
        plan = pool.start(self_test=False)
    if plan.probe:
        log.info("bench: ubatch probe %s → %d", plan.probe.table(), plan.options.ubatch)
    return plan.options.ubatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulkembed")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
