"""The transformers anchor, run as a script in its own process (bench.peers.run_transformers): no llama.cpp here.

    python anchor.py MODEL.gguf TOKENS.npz BATCH_TOKENS  → one JSON line: tokens, seconds, cpu_seconds, peak_mib, note

The same tower as the GGUF (shape read from its metadata) as a transformers Qwen2Model with random weights (speed
does not depend on them), bf16 on a GPU (float32 on CPU), SDPA, length-sorted padded batches, masked mean pooling.
v4's text tower is Qwen2.5-VL's, whose M-RoPE equals ordinary RoPE for text. It has no LM head, unlike llama.cpp.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def tower_config(model: str):
    from gguf import GGUFReader
    from transformers import Qwen2Config

    reader = GGUFReader(model)

    def value(key: str, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    config = Qwen2Config(
        vocab_size=len(value("tokenizer.ggml.tokens")), hidden_size=int(value(f"{arch}.embedding_length")),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(value(f"{arch}.block_count")),
        num_attention_heads=int(value(f"{arch}.attention.head_count")),
        num_key_value_heads=int(value(f"{arch}.attention.head_count_kv")),
        rms_norm_eps=float(value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(value(f"{arch}.rope.freq_base", 1e6)),
        max_position_embeddings=int(value(f"{arch}.context_length", 32768)), attn_implementation="sdpa",
    )
    return config, arch


def batches(lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Longest first: a batch's padded size is its first document's length times its count."""
    out, batch = [], []
    for i in np.argsort(-lengths, kind="stable"):
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            out.append(batch)
            batch = []
        batch.append(int(i))
    return out + [batch]


def main(model: str, tokens_file: str, batch_tokens: int) -> dict:
    import torch
    import transformers
    from transformers import Qwen2Model

    data = np.load(tokens_file)
    lengths, flat = data["lengths"], data["ids"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    config, arch = tower_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = Qwen2Model(config).to(device=device, dtype=dtype).eval()
    plan = batches(lengths, batch_tokens)

    def forward(ids: list[int]) -> None:
        width = int(lengths[ids[0]])
        tokens = np.zeros((len(ids), width), np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, i in enumerate(ids):
            tokens[row, :lengths[i]] = flat[starts[i]:starts[i] + lengths[i]]
            mask[row, :lengths[i]] = 1
        t, m = torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)
        hidden = net(input_ids=t, attention_mask=m).last_hidden_state
        pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()

    with torch.inference_mode():
        forward(plan[-1])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
        for ids in plan:
            forward(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = torch.cuda.max_memory_allocated() / (1 << 20) if device == "cuda" else None
    note = (f"transformers {transformers.__version__}, Qwen2Model shaped as this {arch} GGUF, "
            f"{str(dtype).removeprefix('torch.')}, SDPA, {len(plan)} padded batches of <= {batch_tokens} tokens, "
            f"random weights, no LM head")
    return {"tokens": int(lengths.sum()), "seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "note": note}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
