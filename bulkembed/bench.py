"""`bulkembed bench`: the real per-shard path against the raw llama_decode ceiling and upstream recipes.

Every mode runs in one process on the same model, corpus and machine. `raw` times only llama_decode (and
llama_memory_seq_rm) over the very decode plans the engine would run, so bulkembed/raw is the share of the
ceiling that tokenizing, planning, packing, pooling and normalizing leave over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bulkembed import synthetic
from bulkembed.producer.planner import Document, ShardPlanner
from bulkembed.worker.engine import Engine, EngineOptions, l2_normalize
from bulkembed.worker.packing import ContextShape, largest_divisor_at_most, next_pow2, plan_decodes

log = logging.getLogger(__name__)

MODES = ("bulkembed", "raw", "llama-embed", "seed")
SWEEP_UBS = (64, 128, 256, 512, 1024, 2048, 4096)  # the seed blog's grid
SWEEP_CTXS = (64, 128, 256, 512, 2048, 4096, 8192, 16384)
SHAPES = {
    "tiny": synthetic.TINY,
    "small": synthetic.ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=8192,
                                  n_ctx_train=32768),
    "v4": synthetic.V4,
}
LLAMA_EMBED_CHUNK = 64  # texts per Llama.embed call
SEED_CHUNK = 1024  # documents per engine.embed call in the seed recipe
MIB = 1 << 20


@dataclass
class Corpus:
    source: str
    texts: list[str]
    tokens: list[np.ndarray]  # tokenized once, untimed: for planning, raw plans and the sweep

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def summary(self) -> dict:
        n = self.lengths
        return {"source": self.source, "docs": len(n), "tokens": sum(n), "min": min(n), "median": float(np.median(n)),
                "max": max(n)}


@dataclass
class Result:
    mode: str
    docs: int
    tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time over the same span: cpu_seconds / seconds < threads = contention
    peak_rss_mib: float | None
    peak_vram_mib: float | None
    note: str = ""

    @classmethod
    def of(cls, mode: str, docs: int, tokens: int, meter: Meter, note: str) -> Result:
        return cls(mode, docs, tokens, meter.seconds, meter.cpu, meter.rss, meter.vram, note)

    def as_dict(self, raw: Result | None) -> dict:
        tok_s = self.tokens / self.seconds
        ratio = tok_s / (raw.tokens / raw.seconds) if raw else None
        return asdict(self) | {"tok_per_s": tok_s, "docs_per_s": self.docs / self.seconds, "ratio_to_raw": ratio,
                               "cpu_per_wall": self.cpu_seconds / self.seconds}


class Meter:
    """Wall seconds, peak RSS (VmHWM, reset on entry) and peak GPU memory (nvidia-smi every 100 ms) of a block."""

    rss_note = "VmHWM reset per measurement via /proc/self/clear_refs"

    def __enter__(self) -> Meter:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.exact_rss = True
        except OSError:
            self.exact_rss = False
            Meter.rss_note = "ru_maxrss: cumulative over the process, not per mode (clear_refs unavailable)"
        self.vram: float | None = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_vram, daemon=True)
        if shutil.which("nvidia-smi"):
            self._sampler.start()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu = time.process_time() - self.cpu_started
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; cumulative
        if self.exact_rss:
            status = Path("/proc/self/status").read_text().splitlines()
            self.rss = next(int(x.split()[1]) / 1024 for x in status if x.startswith("VmHWM:"))

    def _sample_vram(self) -> None:
        while True:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.vram = max(self.vram or 0.0, *map(float, out))
            if self._stop.wait(0.1):
                return


def synthetic_model(name: str, quant: str, work: Path, threads: int) -> Path:
    """A random-weight qwen2vl GGUF of shape `name` at `quant`, written once into `work` and reused."""
    quant = quant.upper()
    path = work / f"synthetic-{name}-{quant}.gguf"
    if path.exists():
        return path
    if quant in ("F32", "F16"):
        return synthetic.write_qwen2vl_gguf(path, SHAPES[name], dtype=quant.lower(), name=f"synthetic-{name}")
    synthetic.quant_ftype(quant)  # unknown names fail before the slow write
    source = work / f"synthetic-{name}-F16.gguf"
    if not source.exists():
        synthetic.write_qwen2vl_gguf(source, SHAPES[name], dtype="f16", name=f"synthetic-{name}")
    # Random weights measure speed only, so an all-ones importance matrix is as good as any for IQ1/IQ2.
    return synthetic.quantize(source, path, quant, threads, uniform_imatrix=True)


def load_corpus(args: argparse.Namespace, engine: Engine) -> Corpus:
    if args.corpus:
        import pyarrow.parquet as pq

        column = pq.read_table(args.corpus, columns=[args.text_column]).column(args.text_column).to_pylist()
        texts = [t for t in column if t and t.strip()]
        source = f"{Path(args.corpus).name} ({len(column) - len(texts)} empty rows skipped)"
    else:
        wanted = synthetic.target_lengths(args.synthetic, args.lengths, args.seed, args.max_doc_tokens)
        texts = synthetic.synthetic_texts(wanted, engine.vocab.count, args.seed)
        source = f"synthetic {args.lengths} (seed {args.seed})"
    pairs = [(t, tokens) for t in texts if 0 < len(tokens := engine.vocab.tokenize(t)) < engine.n_ctx_train]
    if len(pairs) < len(texts):
        source += f", {len(texts) - len(pairs)} docs longer than n_ctx_train skipped"
    return Corpus(source, [t for t, _ in pairs], [k for _, k in pairs])


def plan_shards(corpus: Corpus, shard_tokens: int) -> list[list[Document]]:
    """Shards exactly as the producer cuts them (its token counts are the same vocabulary's)."""
    planner, shards = ShardPlanner(shard_tokens), []
    for i, (text, n) in enumerate(zip(corpus.texts, corpus.lengths, strict=True)):
        if ready := planner.add(Document(i, text, n)):
            shards.append(ready)
    return shards + list(planner.finish())


def drop_context(engine: Engine) -> None:
    """Free the cached llama_context so every mode starts alike and its memory is its own."""
    if engine._context:
        engine._context.free()
        engine._context = None


def run_bulkembed(engine: Engine, corpus: Corpus, shard_tokens: int) -> Result:
    tokens = 0
    with Meter() as meter:
        shards = plan_shards(corpus, shard_tokens)
        for shard in shards:  # what worker.shard.embed_shard does, without the Arrow I/O
            docs = [engine.vocab.tokenize(d.text) for d in shard]
            l2_normalize(engine.embed(docs))
            tokens += sum(len(d) for d in docs)
    return Result.of("bulkembed", len(corpus.texts), tokens, meter, f"{len(shards)} shards of <= {shard_tokens} tokens")


def run_raw(engine: Engine, corpus: Corpus, shard_tokens: int) -> Result:
    """llama_decode alone over the engine's own decode plans, prepared as numpy arrays before timing."""
    import llama_cpp

    plans = []
    for shard in plan_shards(corpus, shard_tokens):
        docs = [corpus.tokens[d.id] for d in shard]
        shape = engine.shape_for([len(d) for d in docs])
        steps = [(np.concatenate([docs[p.doc][p.start:p.stop] for p in pieces]),
                  np.concatenate([np.arange(p.start, p.stop, dtype=np.int32) for p in pieces]),
                  np.concatenate([np.full(p.stop - p.start, p.seq, np.intp) for p in pieces]),
                  [p.seq for p in pieces if p.last])
                 for pieces in plan_decodes([len(d) for d in docs], shape)]
        plans.append((shape, steps))
    decode_s, cpu_s, tokens = 0.0, 0.0, 0
    with Meter() as meter:
        for shape, steps in plans:
            context = engine._context_for(shape)  # untimed, like the copies into its batch below
            for ids, positions, seqs, finished in steps:
                n = len(ids)
                context.tokens[:n], context.positions[:n] = ids, positions
                context.seq_pointers[:n] = context.seq_pointer_of[seqs]
                context.batch.n_tokens = n
                started, cpu_started = time.perf_counter(), time.process_time()
                if llama_cpp.llama_decode(context.ctx, context.batch) != 0:
                    raise RuntimeError(f"llama_decode failed on a {n}-token batch ({shape})")
                llama_cpp.llama_synchronize(context.ctx)  # GPU decodes are async: bill each its own compute
                for seq in finished:
                    llama_cpp.llama_memory_seq_rm(context.memory, seq, -1, -1)
                decode_s += time.perf_counter() - started
                cpu_s += time.process_time() - cpu_started
                tokens += n
    meter.seconds, meter.cpu = decode_s, cpu_s
    decodes = sum(len(steps) for _, steps in plans)
    return Result.of("raw", len(corpus.texts), tokens, meter, f"llama_decode only, {decodes} decodes")


def run_seed(engine: Engine, corpus: Corpus) -> Result:
    """The seed blog's fork: one context for everything, ub 512, logical batch = ctx (long means inexact)."""
    ctx = max(2048, next_pow2(max(corpus.lengths) + 512))
    shape = ContextShape(n_ctx=ctx, n_ubatch=512, n_seq_max=256, n_batch=ctx)
    tokens = 0
    with Meter() as meter:
        for start in range(0, len(corpus.texts), SEED_CHUNK):
            docs = [engine.vocab.tokenize(t) for t in corpus.texts[start:start + SEED_CHUNK]]
            l2_normalize(engine.embed(docs, shape))
            tokens += sum(len(d) for d in docs)
    return Result.of("seed", len(corpus.texts), tokens, meter,
                     f"ub 512, ctx = b = {ctx}; speed only (upstream pooling: long docs inexact)")


def run_llama_embed(model: Path, corpus: Corpus, args: argparse.Namespace, gpu: bool) -> Result:
    """llama-cpp-python's Llama.embed as its docs suggest: one context as large as the longest document."""
    import llama_cpp

    size = max(512, next_pow2(max(corpus.lengths)))
    flash = args.flash_attn != "off"  # Llama takes a bool; auto resolves to on where supported (CPU and CUDA)
    llm = llama_cpp.Llama(str(model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=size,
                          n_batch=size, n_ubatch=size, n_threads=args.threads, n_threads_batch=args.threads,
                          n_gpu_layers=-1 if gpu else 0, flash_attn=flash, verbose=False)
    chunks = [corpus.texts[i:i + LLAMA_EMBED_CHUNK] for i in range(0, len(corpus.texts), LLAMA_EMBED_CHUNK)]

    def timed() -> tuple[Meter, int]:
        with Meter() as meter:
            tokens = sum(llm.embed(chunk, normalize=True, return_count=True)[1] for chunk in chunks)
        return meter, tokens

    try:
        llm.embed(corpus.texts[:1])  # warm-up: the first decode pages the weights in
        meter, tokens = min((timed() for _ in range(args.repeat)), key=lambda run: run[0].seconds)
    finally:
        llm.close()
    return Result.of("llama-embed", len(corpus.texts), tokens, meter,
                     f"Llama.embed, n_ctx = b = ub = {size}, flash_attn={flash}")


def run_sweep(engine: Engine, corpus: Corpus, ubs: list[int], ctxs: list[int], repeat: int = 1) -> list[dict]:
    """The blog's ub x ctx grid; N/A where ub > ctx or the longest document does not fit."""
    cells, longest = [], max(corpus.lengths)
    for ub in ubs:
        for ctx in ctxs:
            if ub > ctx or ctx < longest + 1:
                cells.append({"ub": ub, "ctx": ctx, "status": "N/A"})
                continue
            shape = ContextShape(n_ctx=ctx, n_ubatch=ub, n_seq_max=largest_divisor_at_most(ub, 256))
            meter = min((_timed_embed(engine, corpus.tokens, shape) for _ in range(repeat)), key=lambda m: m.seconds)
            tokens = sum(corpus.lengths)
            cells.append({"ub": ub, "ctx": ctx, "status": "ok", "tokens": tokens, "seconds": meter.seconds,
                          "tok_per_s": tokens / meter.seconds, "peak_rss_mib": meter.rss, "peak_vram_mib": meter.vram,
                          "cpu_per_wall": meter.cpu / meter.seconds})
            log.info("sweep ub %d ctx %d: %.0f tok/s", ub, ctx, tokens / meter.seconds)
    return cells


def _timed_embed(engine: Engine, tokens: list[np.ndarray], shape: ContextShape) -> Meter:
    drop_context(engine)
    with Meter() as meter:
        engine.embed(tokens, shape)
    return meter


def describe(engine: Engine, model: Path, quant: str | None) -> dict:
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(engine.model, buf, len(buf))
    flags = llama_cpp.llama_print_system_info().decode()
    summary = " ".join(part.split("=")[0].strip() for part in flags.split("|") if part.strip().endswith("= 1"))
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    return {
        "model": {"file": model.name, "mib": model.stat().st_size / MIB, "desc": buf.value.decode(), "quant": quant,
                  "n_layer": llama_cpp.llama_model_n_layer(engine.model), "n_embd": engine.n_embd,
                  "n_head": llama_cpp.llama_model_n_head(engine.model),
                  "n_head_kv": llama_cpp.llama_model_n_head_kv(engine.model),
                  "n_vocab": engine.vocab.n_tokens, "n_ctx_train": engine.n_ctx_train},
        "device": {"gpu_offload": gpu, "summary": ("GPU offload; " if gpu else "CPU only; ") + summary,
                   "system_info": flags.strip(), "cpus": os.cpu_count()},
    }


def format_report(report: dict) -> str:
    m, c = report["model"], report["corpus"]
    lines = [
        f"model   {m['file']} ({m['desc']}, quant {m['quant'] or '?'}, {m['mib']:.1f} MiB): {m['n_layer']} layers, "
        f"{m['n_embd']} wide, {m['n_head']}/{m['n_head_kv']} heads, vocab {m['n_vocab']}",
        f"corpus  {c['source']}: {c['docs']} docs, {c['tokens']} tokens, length min/median/max "
        f"{c['min']}/{c['median']:.0f}/{c['max']}",
        f"run     threads {report['threads']}, ubatch cap {report['ubatch']}, flash-attn {report['flash_attn']}, "
        f"shard tokens {report['shard_tokens']}, best of {report['repeat']}",
        f"device  {report['device']['summary']}",
        f"memory  {report['rss_note']}; peak RSS includes the resident model", "",
    ]
    header = ("mode", "docs", "tokens", "seconds", "tok/s", "docs/s", "peak RSS MiB", "peak VRAM MiB", "ratio to raw",
              "CPU s/wall s")
    rows = [header] + [(r["mode"], str(r["docs"]), str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tok_per_s']:.0f}",
                        f"{r['docs_per_s']:.1f}", _num(r["peak_rss_mib"]), _num(r["peak_vram_mib"]),
                        _num(r["ratio_to_raw"], "{:.3f}"), f"{r['cpu_per_wall']:.2f}") for r in report["modes"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
              for row in rows]
    lines += [f"  {r['mode']}: {r['note']}" for r in report["modes"] if r["note"]]
    if (ratio := report["ratio_bulkembed_raw"]) is not None:
        verdict = "meets" if ratio >= 0.9 else "BELOW"
        lines += ["", f"==> bulkembed / raw = {ratio:.3f} ({verdict} the >= 0.9 requirement)"]
    if report.get("sweep"):
        memory = "peak_vram_mib" if report["device"]["gpu_offload"] else "peak_rss_mib"
        lines += ["", "Tokens per second", *_grid(report["sweep"], "tok_per_s"),
                  "", f"Peak {'VRAM' if memory == 'peak_vram_mib' else 'RSS'} (MiB)", *_grid(report["sweep"], memory)]
    return "\n".join(lines)


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _grid(cells: list[dict], key: str) -> list[str]:
    """The blog's layout: rows ubatch_size, at most four ctx_size columns per table, all-N/A rows left out."""
    ubs, ctxs = sorted({c["ub"] for c in cells}), sorted({c["ctx"] for c in cells})
    at = {(c["ub"], c["ctx"]): c for c in cells}
    lines = []
    for group in (ctxs[i:i + 4] for i in range(0, len(ctxs), 4)):
        table = [["ubatch_size", *(f"ctx_size={x}" for x in group)]]
        for ub in ubs:
            row = [at[ub, x] for x in group]
            if any(c["status"] == "ok" for c in row):
                table.append([str(ub), *("N/A" if c["status"] != "ok" else _num(c[key]) for c in row)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        table.insert(1, ["-" * w for w in widths])
        lines += [" | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in table] + [""]
    return lines[:-1]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="measure bulkembed against the raw decode ceiling and peers")
    model = bench.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="a .gguf file")
    model.add_argument("--synthetic-model", choices=sorted(SHAPES), help="a random-weight qwen2vl of this shape")
    bench.add_argument("--quant", default="Q8_0", help="synthetic model's type: F32, F16, Q8_0, Q4_K_M, IQ3_S, ...")
    bench.add_argument("--work", type=Path, help="folder for synthetic models, reused by name (default: a temp dir)")
    corpus = bench.add_mutually_exclusive_group()
    corpus.add_argument("--corpus", type=Path, help="a Parquet file")
    corpus.add_argument("--synthetic", type=int, default=600, help="N synthetic documents (default 600)")
    bench.add_argument("--text-column", default="text")
    bench.add_argument("--lengths", default="mixed", help="mixed (default), short, long or fixed:K tokens")
    bench.add_argument("--max-doc-tokens", type=int, default=None, help="clip synthetic lengths to this")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    bench.add_argument("--sweep", action="store_true", help="also the ub x ctx grid of the seed blog")
    bench.add_argument("--ubs", type=_ints, default=list(SWEEP_UBS))
    bench.add_argument("--ctxs", type=_ints, default=list(SWEEP_CTXS))
    bench.add_argument("--shard-tokens", type=int, default=65536)
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench.add_argument("--ubatch", type=int, default=512, help="largest ubatch the engine may choose")
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
    flash = {"auto": None, "on": True, "off": False}[args.flash_attn]
    engine = Engine(model, EngineOptions(ubatch=args.ubatch, gpu_layers=args.gpu_layers, threads=args.threads,
                                         flash_attn=flash))
    results: dict[str, Result] = {}
    try:
        report = describe(engine, model, quant)
        corpus = load_corpus(args, engine)
        engine.embed(corpus.tokens[:8])  # warm-up: the first decodes page the weights in
        runs = {"bulkembed": lambda: run_bulkembed(engine, corpus, args.shard_tokens),
                "raw": lambda: run_raw(engine, corpus, args.shard_tokens), "seed": lambda: run_seed(engine, corpus)}
        for attempt in range(args.repeat):  # round robin, so a burst of other load hits every mode alike
            for mode in (m for m in modes if m in runs):
                drop_context(engine)
                result = runs[mode]()
                log.info("bench: %s run %d: %.0f tok/s", mode, attempt + 1, result.tokens / result.seconds)
                if mode not in results or result.seconds < results[mode].seconds:
                    results[mode] = result
        sweep = run_sweep(engine, corpus, args.ubs, args.ctxs, args.repeat) if args.sweep else None
    finally:
        engine.close()  # before llama-embed loads its own copy: peak RSS must not count two models
    if "llama-embed" in modes:
        log.info("bench: llama-embed")
        results["llama-embed"] = run_llama_embed(model, corpus, args, report["device"]["gpu_offload"])
    raw = results.get("raw")
    rows = [results[m].as_dict(raw) for m in modes]
    ratio = next((r["ratio_to_raw"] for r in rows if r["mode"] == "bulkembed"), None)
    return report | {"corpus": corpus.summary(), "threads": args.threads, "ubatch": args.ubatch,
                     "flash_attn": args.flash_attn, "shard_tokens": args.shard_tokens, "repeat": args.repeat,
                     "rss_note": Meter.rss_note, "modes": rows, "ratio_bulkembed_raw": ratio, "sweep": sweep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulkembed")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
