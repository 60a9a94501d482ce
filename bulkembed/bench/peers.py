"""The real peers, measured on the same texts and model: the `llama-embedding` binary with the seed's recipe,
and transformers (bf16, SDPA) on a tower shaped from the GGUF's own metadata."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
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

# With --log-prefix --log-timestamps every decode is announced as "0.02.697.213 I batch_decode: n_tokens = 7308,
# n_seq = 64" (minutes.seconds.ms.us since start). Its perf summary is not printed by every build.
_BATCH = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I batch_decode: n_tokens = (\d+), n_seq = (\d+)")


@dataclass(frozen=True)
class PeerLog:
    """What llama-embedding says of its own run (stderr with timestamps)."""

    decode_s: float  # second decode's start to the last one's estimated end (the mean gap added)
    tokens: int  # tokens of those decodes (its own tokenization, with the BOS/EOS it adds)
    decodes: int  # logical batches counted (all but the first)
    sequences: int


def parse_llama_embedding_log(text: str) -> PeerLog:
    """Read llama-embedding's stderr; ValueError when it announced fewer than two decodes."""
    found = _BATCH.findall(text)
    if len(found) < 2:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ValueError(f"llama-embedding announced {len(found)} decodes (run it with --log-prefix "
                         f"--log-timestamps); its log ends:\n{tail}")
    stamps = [int(m) * 60 + int(s) + int(ms) / 1e3 + int(us) / 1e6 for m, s, ms, us, _, _ in found]
    # From the second decode on: the first carries CUDA's warm-up, which bulkembed's rows leave out too.
    span = stamps[-1] - stamps[1]
    return PeerLog(decode_s=span + span / max(1, len(stamps) - 2), tokens=sum(int(f[4]) for f in found[1:]),
                   decodes=len(found) - 1, sequences=sum(int(f[5]) for f in found[1:]))


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
    span = Result("llama-embedding", peer.sequences, peer.tokens, peer.decode_s, 0.0, None, meter.vram,
                  f"{recipe}; decode span from its log's timestamps, first (warm-up) decode left out; long docs "
                  f"pooled per ubatch upstream")
    whole = Result("llama-embedding run", len(corpus.texts), sum(corpus.lengths), meter.seconds, 0.0, None, meter.vram,
                   "the same run start to exit: model load, tokenizing and printing the vectors included")
    return [span, whole]


def transformers_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("torch", "transformers"))


def run_transformers(model: Path, corpus: Corpus, batch_tokens: int = TRANSFORMERS_BATCH_TOKENS) -> Result:
    """The anchor a user could run instead (bench/anchor.py), in its own process: torch, transformers and the
    pyarrow they pull in must not share a process with llama.cpp (they crashed together on a CUDA image)."""
    import json
    import sys

    with tempfile.TemporaryDirectory(prefix="bulkembed-anchor-") as tmp:
        tokens = Path(tmp) / "tokens.npz"
        np.savez(tokens, lengths=np.array(corpus.lengths), ids=np.concatenate(corpus.tokens))
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("anchor.py")), str(model), str(tokens),
                               str(batch_tokens)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the transformers anchor exited {done.returncode}: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return Result("transformers", len(corpus.texts), out["tokens"], out["seconds"], out["cpu_seconds"], None,
                  out["peak_mib"], out["note"])
