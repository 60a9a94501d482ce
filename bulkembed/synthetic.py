"""Write random-weight `qwen2vl` GGUF files: the architecture of jina-embeddings-v4's text models.

Tests use tiny ones (real llama.cpp, no download); benchmarks use v4-shaped ones, since speed does
not depend on weight values. The vocabulary is byte-level BPE (GPT-2 byte alphabet, a few merges),
padded with filler tokens to the requested size so the LM head costs what it would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "t h", "h e", "Ġ a", "i n", "e r", "a n", "Ġt he", "o n", "r e")
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNUSED = 1, 3, 5


@dataclass(frozen=True)
class ModelShape:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_vocab: int = 512
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


TINY = ModelShape()
# jina-embeddings-v4 text tower (Qwen2.5-VL-3B): NOTES.md item 8.
V4 = ModelShape(n_layer=36, n_embd=2048, n_head=16, n_head_kv=2, n_ff=11008, n_vocab=151936,
                n_ctx_train=128000)


def byte_alphabet() -> list[str]:
    """GPT-2's reversible byte → printable-unicode map, the base of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    types = [TOKEN_TYPE_NORMAL] * len(tokens)
    tokens += list(SPECIAL_TOKENS)
    types += [TOKEN_TYPE_CONTROL] * len(SPECIAL_TOKENS)
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be at least {len(tokens)}")
    filler = n_vocab - len(tokens)
    tokens += [f"<|filler_{i}|>" for i in range(filler)]
    types += [TOKEN_TYPE_UNUSED] * filler
    return tokens, types


def write_qwen2vl_gguf(path: str | Path, shape: ModelShape = TINY, seed: int = 0, dtype: str = "f32",
                       name: str = "synthetic-qwen2vl", matryoshka_dims: tuple[int, ...] | None = None) -> Path:
    """Write a random `qwen2vl` model to `path` and return it. dtype: f32 or f16. Matryoshka sizes,
    when given, are declared as `qwen2vl.matryoshka_dims`."""
    import gguf  # only the generator needs it

    path = Path(path)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    writer = gguf.GGUFWriter(str(path), "qwen2vl")
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    half = shape.head_dim // 2  # M-RoPE sections: Qwen2.5-VL's 16/24/24 split, scaled to head_dim
    first = half // 4
    writer.add_rope_dimension_sections([first, (half - first) // 2, half - first - (half - first) // 2, 0])
    if matryoshka_dims:
        writer.add_array("qwen2vl.matryoshka_dims", list(matryoshka_dims))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, types = _vocab(shape.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    eot = tokens.index("<|endoftext|>")
    writer.add_eos_token_id(eot)
    writer.add_pad_token_id(eot)
    writer.add_bos_token_id(eot)
    writer.add_add_bos_token(False)

    def tensor(tensor_name: str, *dims: int, scale: float = 0.02) -> None:
        writer.add_tensor(tensor_name, (rng.standard_normal(dims) * scale).astype(np_dtype))

    def norm(tensor_name: str, n: int) -> None:
        # Norm weights stay f32, as convert_hf_to_gguf writes them.
        writer.add_tensor(tensor_name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    kv = shape.n_head_kv * shape.head_dim
    tensor("token_embd.weight", shape.n_vocab, shape.n_embd, scale=1.0)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", shape.n_embd)
        tensor(b + "attn_q.weight", shape.n_embd, shape.n_embd)
        writer.add_tensor(b + "attn_q.bias", (0.02 * rng.standard_normal(shape.n_embd)).astype(np.float32))
        tensor(b + "attn_k.weight", kv, shape.n_embd)
        writer.add_tensor(b + "attn_k.bias", (0.02 * rng.standard_normal(kv)).astype(np.float32))
        tensor(b + "attn_v.weight", kv, shape.n_embd)
        writer.add_tensor(b + "attn_v.bias", (0.02 * rng.standard_normal(kv)).astype(np.float32))
        tensor(b + "attn_output.weight", shape.n_embd, shape.n_embd)
        norm(b + "ffn_norm.weight", shape.n_embd)
        tensor(b + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        tensor(b + "ffn_up.weight", shape.n_ff, shape.n_embd)
        tensor(b + "ffn_down.weight", shape.n_embd, shape.n_ff)
    norm("output_norm.weight", shape.n_embd)
    tensor("output.weight", shape.n_vocab, shape.n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
