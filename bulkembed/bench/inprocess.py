"""The modes that run in this process, on one resident model: bulkembed's per-shard path, raw llama_decode over
the same decode plans, the seed recipe emulated, llama-cpp-python's Llama.embed, and the seed blog's ub x ctx grid."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bulkembed import synthetic
from bulkembed.bench.meter import Meter, Result
from bulkembed.contract.job import Pooling
from bulkembed.producer.planner import Document, ShardPlanner
from bulkembed.worker.engine import Engine, l2_normalize
from bulkembed.worker.packing import PAD_TOKEN, ContextShape, largest_divisor_at_most, next_pow2, plan_decodes

log = logging.getLogger(__name__)

SHAPES = {
    "tiny": synthetic.TINY,
    "small": synthetic.ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=8192,
                                  n_ctx_train=32768),
    "v4": synthetic.V4,
    # `small` with v4's 151,936-token vocabulary: the LM head is most of a small model's work (docs/notes.md 31).
    "small-v4vocab": synthetic.ModelShape(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1536, n_vocab=151936,
                                          n_ctx_train=32768),
    # A MiniLM-shaped non-causal `bert` (mean pooling): documents are never split, so every ubatch holds whole ones.
    "minilm": synthetic.ModelShape(n_layer=6, n_embd=384, n_head=12, n_head_kv=12, n_ff=1536, n_vocab=30522,
                                   n_ctx_train=512),
}
LLAMA_EMBED_CHUNK = 64  # texts per Llama.embed call
SEED_CHUNK = 1024  # documents per engine.embed call in the seed recipe


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


def synthetic_model(name: str, quant: str, work: Path, threads: int) -> Path:
    """A random-weight qwen2vl GGUF of shape `name` at `quant`, written once into `work` and reused."""
    quant = quant.upper()
    path = work / f"synthetic-{name}-{quant}.gguf"
    if path.exists():
        return path
    write = synthetic.write_bert_gguf if name == "minilm" else synthetic.write_qwen2vl_gguf
    if quant in ("F32", "F16"):
        return write(path, SHAPES[name], dtype=quant.lower(), name=f"synthetic-{name}")
    synthetic.quant_ftype(quant)  # unknown names fail before the slow write
    source = work / f"synthetic-{name}-F16.gguf"
    if not source.exists():
        write(source, SHAPES[name], dtype="f16", name=f"synthetic-{name}")
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


def embed_texts(engine: Engine, texts: list[str]) -> int:
    """What the worker does with a shard's texts (worker.rows.embed_rows, without its checks); tokens embedded."""
    docs = [engine.vocab.tokenize(t) for t in texts]
    l2_normalize(engine.embed(docs))
    return sum(len(d) for d in docs)


# The bulkembed path with one option changed, in its own engine: bulkembed-head computes the LM head, as on a stock
# llama.cpp build (what skipping it saves); bulkembed-isolated decodes one document at a time (what --isolate costs).
VARIANTS = {"bulkembed-head": {"skip_lm_head": False}, "bulkembed-isolated": {"isolate": True}}


def run_bulkembed(engine: Engine, corpus: Corpus, shard_tokens: int, mode: str = "bulkembed") -> Result:
    tokens, made, seconds = 0, engine.contexts_made, engine.context_seconds
    with Meter() as meter:
        shards = plan_shards(corpus, shard_tokens)
        for shard in shards:
            tokens += embed_texts(engine, [d.text for d in shard])
    # Making a context (a new shard shape) is part of the per-shard path; on a GPU it is not free.
    contexts = f"{engine.contexts_made - made} contexts made in {engine.context_seconds - seconds:.2f}s"
    return Result.of(mode, len(corpus.texts), tokens, meter,
                     f"{len(shards)} shards of <= {shard_tokens} tokens, {contexts}, LM head {engine.lm_head_state}"
                     f"{', one document a decode' if engine.options.isolate else ''}")


def run_raw(engine: Engine, corpus: Corpus, shard_tokens: int) -> Result:
    """llama_decode alone over the engine's own decode plans, prepared as numpy arrays before timing."""
    import llama_cpp

    plans = []
    for shard in plan_shards(corpus, shard_tokens):
        docs = [corpus.tokens[d.id] for d in shard]
        shape = engine.shape_for([len(d) for d in docs])
        if engine.pools_on_host:  # the engine's own contexts: its pooling is host work, not llama_decode's
            shape = replace(shape, pooling=Pooling.NONE)
        steps = []
        for pieces in plan_decodes([len(d) for d in docs], shape):
            padding = shape.padding(sum(p.stop - p.start for p in pieces))  # as the engine pads: the same work
            steps.append((np.concatenate([docs[p.doc][p.start:p.stop] for p in pieces] + [np.full(padding, PAD_TOKEN)]),
                          np.concatenate([np.arange(p.start, p.stop) for p in pieces] + [np.arange(padding)]),
                          np.concatenate([np.full(p.stop - p.start, p.seq, np.intp) for p in pieces]
                                         + [np.full(padding, shape.padding_seq, np.intp)]),
                          [p.seq for p in pieces if p.last] + ([shape.padding_seq] if padding else []), padding))
        plans.append((shape, steps))
    decode_s, cpu_s, tokens = 0.0, 0.0, 0
    with Meter() as meter:
        for shape, steps in plans:
            context = engine._context_for(shape)  # untimed, like the copies into its batch below
            for ids, positions, seqs, finished, padding in steps:
                n = len(ids)
                context.tokens[:n], context.positions[:n] = ids, positions
                context.seq_pointers[:n] = context.seq_pointer_of[seqs]
                context.batch.n_tokens = n
                started, cpu_started = time.perf_counter(), time.process_time()
                if llama_cpp.llama_decode(context.ctx, context.batch) != 0:
                    raise RuntimeError(f"llama_decode failed on a {n}-token batch ({shape})")
                llama_cpp.llama_synchronize(context.ctx)  # GPU decodes are async: bill each its own compute
                for seq in finished:
                    context.forget(seq)
                decode_s += time.perf_counter() - started
                cpu_s += time.process_time() - cpu_started
                tokens += n - padding  # document tokens, as every mode counts them
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
    return Result.of("seed emulated", len(corpus.texts), tokens, meter,
                     f"an in-process emulation of the seed's llama-embedding recipe, not the binary: ub 512, "
                     f"ctx = b = {ctx}; speed only (upstream pooling: long docs inexact)")


def run_llama_embed(model: Path, corpus: Corpus, args: argparse.Namespace, gpu: bool, pooling: Pooling) -> Result:
    """llama-cpp-python's Llama.embed as its docs suggest: one context as large as the longest document, with the
    pooling bulkembed uses for this model."""
    import llama_cpp

    size = max(512, next_pow2(max(corpus.lengths)))
    flash = args.flash_attn != "off"  # Llama takes a bool; auto resolves to on where supported (CPU and CUDA)
    kind = getattr(llama_cpp, f"LLAMA_POOLING_TYPE_{pooling.name}")
    llm = llama_cpp.Llama(str(model), embedding=True, pooling_type=kind, n_ctx=size,
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
                     f"Llama.embed, n_ctx = b = ub = {size}, {pooling.value} pooling, flash_attn={flash}")


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


