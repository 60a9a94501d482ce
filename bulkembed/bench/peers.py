"""The real peers, measured on the same texts and model: the `llama-embedding` binary with the seed's recipe,
and transformers (bf16, SDPA) on a tower shaped from the GGUF's own metadata."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulkembed.bench.inprocess import Corpus
from bulkembed.bench.meter import Meter, Result
from bulkembed.worker.packing import next_pow2

log = logging.getLogger(__name__)

SEED_UBATCH = 512  # the seed blog's L4 recipe: --ubatch-size 512 --ctx-size 8192 --flash-attn -ngl 99
SEED_CTX = 8192
TRANSFORMERS_BATCH_TOKENS = 8192  # padded tokens per forward pass

# llama_perf_context_print: prompt eval time = 31234.56 ms / 597020 tokens (...)
_PROMPT_EVAL = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms /\s*(\d+) tokens")
_BATCH = re.compile(r"batch_decode: n_tokens = (\d+), n_seq = (\d+)")
_LOAD = re.compile(r"load time\s*=\s*([\d.]+) ms")


@dataclass(frozen=True)
class PeerLog:
    """What llama-embedding says of its own run (stderr)."""

    decode_ms: float  # llama.cpp's own prompt-eval time: every llama_decode until its results were ready
    tokens: int  # tokens it decoded (its own tokenization, prefix and BOS/EOS as it adds them)
    decodes: int  # logical batches it submitted
    sequences: int
    load_ms: float | None


def parse_llama_embedding_log(text: str) -> PeerLog:
    """Read llama-embedding's stderr; ValueError when it did not finish (no perf summary)."""
    found = _PROMPT_EVAL.search(text)
    if not found:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ValueError(f"llama-embedding printed no 'prompt eval time' summary; its log ends:\n{tail}")
    batches = [(int(n), int(s)) for n, s in _BATCH.findall(text)]
    load = _LOAD.search(text)
    return PeerLog(decode_ms=float(found.group(1)), tokens=int(found.group(2)), decodes=len(batches),
                   sequences=sum(s for _, s in batches), load_ms=float(load.group(1)) if load else None)


def find_binary(explicit: str | None) -> str | None:
    return explicit if explicit else shutil.which("llama-embedding")


def seed_command(binary: str, model: Path, texts_file: Path, ubatch: int, ctx: int, gpu: bool) -> list[str]:
    """The seed blog's command (its fork's -b = -c made explicit for upstream), texts one per line."""
    return [binary, "-m", str(model), "-f", str(texts_file), "--pooling", "mean", "--no-escape",
            "--embd-output-format", "array", "--ubatch-size", str(ubatch), "--ctx-size", str(ctx),
            "--batch-size", str(ctx), "--flash-attn", "on", "-ngl", "99" if gpu else "0", "--log-prefix",
            "--log-timestamps"]


def run_llama_embedding(binary: str, model: Path, corpus: Corpus, ubatch: int, gpu: bool, threads: int) -> list[Result]:
    """Two rows: its decode span (llama.cpp's own accounting) and the whole run (load, tokenize, print)."""
    ctx = max(SEED_CTX, next_pow2(max(corpus.lengths) + 1))
    with tempfile.TemporaryDirectory(prefix="bulkembed-peer-") as tmp:
        texts_file = Path(tmp) / "texts.txt"
        # One document a line, as the seed feeds it (its texts' own newlines become spaces).
        texts_file.write_text("\n".join(t.replace("\r", " ").replace("\n", " ") for t in corpus.texts) + "\n")
        command = seed_command(binary, model, texts_file, ubatch, ctx, gpu) + ["-t", str(threads)]
        log.info("bench: %s", " ".join(command))
        with Meter() as meter:
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-embedding exited {done.returncode}: {done.stderr[-2000:]}")
    peer = parse_llama_embedding_log(done.stderr)
    recipe = f"real binary, seed recipe: ub {ubatch}, ctx = b = {ctx}, flash-attn on; {peer.decodes} decodes"
    span = Result("llama-embedding", len(corpus.texts), peer.tokens, peer.decode_ms / 1000, 0.0, None, meter.vram,
                  f"{recipe}; decode span (its own prompt-eval time); long docs pooled per ubatch upstream")
    whole = Result("llama-embedding run", len(corpus.texts), peer.tokens, meter.seconds, 0.0, None, meter.vram,
                   "the same run start to exit: model load, tokenizing and printing the vectors included")
    return [span, whole]


def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def tower_config(model: Path):
    """A Qwen2 config with the GGUF's own shape (v4's text tower is Qwen2.5-VL's: M-RoPE equals RoPE for text)."""
    from gguf import GGUFReader
    from transformers import Qwen2Config

    reader = GGUFReader(str(model))

    def value(key: str, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    vocab = len(value("tokenizer.ggml.tokens"))
    return Qwen2Config(
        vocab_size=vocab, hidden_size=int(value(f"{arch}.embedding_length")),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(value(f"{arch}.block_count")),
        num_attention_heads=int(value(f"{arch}.attention.head_count")),
        num_key_value_heads=int(value(f"{arch}.attention.head_count_kv")),
        rms_norm_eps=float(value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(value(f"{arch}.rope.freq_base", 1e6)),
        max_position_embeddings=int(value(f"{arch}.context_length", 32768)), attn_implementation="sdpa",
    ), arch


def run_transformers(model: Path, corpus: Corpus, batch_tokens: int = TRANSFORMERS_BATCH_TOKENS) -> Result:
    """The anchor a user could run instead: the same tower in transformers, random weights (speed does not depend
    on them), bf16 on the GPU (float32 on CPU), SDPA, length-sorted padded batches, masked mean pooling."""
    import torch
    from transformers import Qwen2Model

    config, arch = tower_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = Qwen2Model(config).to(device=device, dtype=dtype).eval()
    order = np.argsort([-n for n in corpus.lengths], kind="stable")
    batches, batch = [], []
    for i in order:  # longest first: a batch's padded size is its first document's length times its count
        if batch and (len(batch) + 1) * corpus.lengths[batch[0]] > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(int(i))
    batches.append(batch)

    def forward(ids: list[int]) -> None:
        width = corpus.lengths[ids[0]]
        tokens = np.zeros((len(ids), width), np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, i in enumerate(ids):
            tokens[row, :corpus.lengths[i]] = corpus.tokens[i]
            mask[row, :corpus.lengths[i]] = 1
        t, m = torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)
        hidden = net(input_ids=t, attention_mask=m).last_hidden_state
        pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()

    with torch.inference_mode():
        forward(batches[-1])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with Meter() as meter:
            for ids in batches:
                forward(ids)
            if device == "cuda":
                torch.cuda.synchronize()
        meter.seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / (1 << 20) if device == "cuda" else None
    note = f"transformers {__import__('transformers').__version__}, Qwen2Model shaped as this {arch} GGUF, " \
           f"{str(dtype).removeprefix('torch.')}, SDPA, {len(batches)} padded batches of <= {batch_tokens} tokens, " \
           f"random weights, no LM head"
    return Result("transformers", len(corpus.texts), sum(corpus.lengths), meter.seconds, meter.cpu, meter.rss,
                  peak if peak is not None else meter.vram, note)
