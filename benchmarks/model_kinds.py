"""Non-causal speed: bulkembed vs llama-cpp-python's Llama.embed on the same synthetic BERT model.

    python benchmarks/model_kinds.py --docs 100 --threads 2 [--pooling mean|cls]

Writes a MiniLM-shaped random `bert` (6 layers, 384 wide, 12 heads, 512 positions, WordPiece vocab padded to
30522) and a mixed-length corpus (most documents short, some up to 510 tokens), then embeds it with
bulkembed's engine (length-bucketed shards, whole documents packed into one ubatch) and with Llama.embed
(one context as large as the longest document, the model's own pooling). Prints tok/s of each and the worst
cosine between the two, which must be 1 to within float error.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bulkembed.contract.vocab import Vocab
from bulkembed.producer.planner import Document, ShardPlanner
from bulkembed.synthetic import ModelShape, synthetic_texts, target_lengths, write_bert_gguf
from bulkembed.worker.engine import Engine, EngineOptions

MINILM = ModelShape(n_layer=6, n_embd=384, n_head=12, n_head_kv=12, n_ff=1536, n_vocab=30522, n_ctx_train=512)


def shards(lengths: list[int], shard_tokens: int) -> list[list[int]]:
    """Document indices per shard, bucketed by length as the producer does."""
    planner, out = ShardPlanner(shard_tokens), []
    for i, n in enumerate(lengths):
        ready = planner.add(Document(i, "", n))
        if ready:
            out.append([d.id for d in ready])
    out.extend([d.id for d in shard] for shard in planner.finish())
    return out


def bulkembed_vectors(model: Path, texts: list[str], args: argparse.Namespace) -> tuple[np.ndarray, int, float]:
    engine = Engine(model, EngineOptions(ubatch=args.ubatch, threads=args.threads))
    try:
        tokens = [engine.vocab.tokenize(t) for t in texts]
        engine.embed(tokens[:8])  # warm-up
        out = np.zeros((len(texts), engine.n_embd), np.float32)
        started = time.perf_counter()
        for shard in shards([len(t) for t in tokens], args.shard_tokens):
            out[shard] = engine.embed([tokens[i] for i in shard])
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    return out, sum(map(len, tokens)), seconds


def llama_embed_vectors(model: Path, texts: list[str], args: argparse.Namespace) -> tuple[np.ndarray, float]:
    import llama_cpp

    size = 512  # the model's positions: no document is longer
    llm = llama_cpp.Llama(str(model), embedding=True, n_ctx=size, n_batch=size, n_ubatch=size,
                          n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True, verbose=False)
    try:
        llm.embed(texts[:8])  # warm-up
        started = time.perf_counter()
        out = np.array(llm.embed(texts, normalize=False), np.float32)
        return out, time.perf_counter() - started
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ubatch", type=int, default=512)
    parser.add_argument("--shard-tokens", type=int, default=16384)
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = write_bert_gguf(Path(folder) / "minilm-shaped.gguf", MINILM, pooling=args.pooling)
        vocab = Vocab.load(model)
        texts = synthetic_texts(target_lengths(args.docs, "mixed", cap=500), vocab.count)
        ours, tokens, our_seconds = bulkembed_vectors(model, texts, args)
        theirs, their_seconds = llama_embed_vectors(model, texts, args)
    cos = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    print(f"{args.docs} documents, {tokens} tokens, {args.pooling} pooling, {args.threads} threads")
    print(f"bulkembed    {tokens / our_seconds:9.0f} tok/s  ({our_seconds:.2f} s, ubatch cap {args.ubatch})")
    print(f"Llama.embed  {tokens / their_seconds:9.0f} tok/s  ({their_seconds:.2f} s, n_ctx = b = ub = 512)")
    print(f"worst cosine bulkembed vs Llama.embed: {cos.min():.7f}")


if __name__ == "__main__":
    main()
