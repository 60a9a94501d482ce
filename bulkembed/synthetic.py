"""Write random-weight GGUF embedding models of each kind bulkembed must embed exactly.

- `qwen2vl`: jina-embeddings-v4's text tower (causal, mean pooling declared by nobody);
- `qwen3`: a causal decoder declaring last-token pooling, as Qwen3-Embedding's GGUFs do;
- `bert`: a non-causal encoder (MiniLM, bge, e5) declaring mean or cls pooling.

Tests use tiny ones (real llama.cpp, no download); benchmarks use v4-shaped ones, since speed does
not depend on weight values. The decoders' vocabulary is byte-level BPE (GPT-2 byte alphabet, a few
merges), padded with filler tokens to the requested size so the LM head costs what it would; BERT's is
a small WordPiece one, written the way llama.cpp's convert_hf_to_gguf.py writes BERT vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
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
# jina-embeddings-v4 text tower (Qwen2.5-VL-3B): docs/notes.md item 8.
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


def _write_bpe_vocab(writer, n_vocab: int, add_eos: bool) -> None:
    """Qwen's tokenizer: byte-level BPE, no BOS; `add_eos` appends <|endoftext|> to every text, as
    Qwen3-Embedding's tokenizer does so that its last token is the one it pools."""
    tokens, types = _vocab(n_vocab)
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
    if add_eos:
        writer.add_add_eos_token(True)


OUTLIER_FEATURES = 4  # hidden features an outlier model makes huge
# The model of the batch-invariance tests and benchmarks (with outlier_gain=60): K-quant rows are 256 wide.
OUTLIER = ModelShape(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512)


def write_qwen2vl_gguf(path: str | Path, shape: ModelShape = TINY, seed: int = 0, dtype: str = "f32",
                       name: str = "synthetic-qwen2vl", matryoshka_dims: tuple[int, ...] | None = None,
                       outlier_gain: float = 0.0) -> Path:
    """Write a random `qwen2vl` model to `path` and return it. dtype: f32 or f16. Matryoshka sizes,
    when given, are declared as `qwen2vl.matryoshka_dims`.

    `outlier_gain` > 0 gives it what trained decoders have and random weights lack: a few hidden features (4) with
    activations `outlier_gain` times the rest, in the token embeddings and fed again by every FFN. Real quantized
    models show llama.cpp's kernel regimes through them (docs/notes.md 30); plain random weights do not."""
    import gguf  # only the generator needs it

    path = Path(path)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    writer = gguf.GGUFWriter(str(path), "qwen2vl")
    _write_header(writer, shape, name, dtype, pooling=None)  # v4's GGUFs declare no pooling
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    half = shape.head_dim // 2  # M-RoPE sections: Qwen2.5-VL's 16/24/24 split, scaled to head_dim
    first = half // 4
    writer.add_rope_dimension_sections([first, (half - first) // 2, half - first - (half - first) // 2, 0])
    if matryoshka_dims:
        writer.add_array("qwen2vl.matryoshka_dims", list(matryoshka_dims))

    _write_bpe_vocab(writer, shape.n_vocab, add_eos=False)

    def norm(tensor_name: str, n: int) -> None:
        # Norm weights stay f32, as convert_hf_to_gguf writes them.
        writer.add_tensor(tensor_name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    kv = shape.n_head_kv * shape.head_dim
    outliers = rng.choice(shape.n_embd, OUTLIER_FEATURES, replace=False) if outlier_gain > 0 else []

    def tensor(tensor_name: str, *dims: int, scale: float | None = None) -> None:
        if scale is None:
            # With outliers, weights at 1/sqrt(fan-in) as trained layers are: the outlier features then carry
            # through every layer.
            scale = dims[-1] ** -0.5 if outlier_gain > 0 else 0.02
        weights = rng.standard_normal(dims) * scale
        if outlier_gain > 0 and tensor_name == "token_embd.weight":
            weights[:, outliers] *= outlier_gain
        elif outlier_gain > 0 and tensor_name.endswith("ffn_down.weight"):
            weights[outliers, :] *= outlier_gain / 4
        writer.add_tensor(tensor_name, weights.astype(np_dtype))

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


class _RandomTensors:
    """Random weights in the layouts convert_hf_to_gguf writes: matrices in `dtype`, norms and biases f32."""

    def __init__(self, writer, seed: int, dtype: str):
        self.writer, self.rng = writer, np.random.default_rng(seed)
        self.dtype = np.float32 if dtype == "f32" else np.float16

    def matrix(self, name: str, *dims: int, scale: float | None = None) -> None:
        # 1/sqrt(fan-in) by default: each layer mixes tokens as much as a trained one, so the pooled
        # vectors of different texts differ well beyond the tests' cosine threshold (also cls and last).
        scale = dims[-1] ** -0.5 if scale is None else scale
        self.writer.add_tensor(name, (self.rng.standard_normal(dims) * scale).astype(self.dtype))

    def norm(self, name: str, n: int) -> None:
        self.writer.add_tensor(name, (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32))

    def bias(self, name: str, n: int) -> None:
        self.writer.add_tensor(name, (0.02 * self.rng.standard_normal(n)).astype(np.float32))


def _write_header(writer, shape: ModelShape, name: str, dtype: str, pooling: str | None) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    if pooling:
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _finish(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_qwen3_gguf(path: str | Path, shape: ModelShape = TINY, seed: int = 0, dtype: str = "f32",
                     name: str = "synthetic-qwen3", pooling: str = "last") -> Path:
    """A random causal `qwen3` model declaring `pooling` (Qwen3-Embedding: last, with <|endoftext|>
    appended to every text)."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "qwen3")
    _write_header(writer, shape, name, dtype, pooling)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    _write_bpe_vocab(writer, shape.n_vocab, add_eos=True)
    t = _RandomTensors(writer, seed, dtype)
    kv = shape.n_head_kv * shape.head_dim
    t.matrix("token_embd.weight", shape.n_vocab, shape.n_embd, scale=1.0)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        t.norm(b + "attn_norm.weight", shape.n_embd)
        t.matrix(b + "attn_q.weight", shape.n_embd, shape.n_embd)
        t.norm(b + "attn_q_norm.weight", shape.head_dim)
        t.matrix(b + "attn_k.weight", kv, shape.n_embd)
        t.norm(b + "attn_k_norm.weight", shape.head_dim)
        t.matrix(b + "attn_v.weight", kv, shape.n_embd)
        t.matrix(b + "attn_output.weight", shape.n_embd, shape.n_embd)
        t.norm(b + "ffn_norm.weight", shape.n_embd)
        t.matrix(b + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        t.matrix(b + "ffn_up.weight", shape.n_ff, shape.n_embd)
        t.matrix(b + "ffn_down.weight", shape.n_embd, shape.n_ff)
    t.norm("output_norm.weight", shape.n_embd)
    t.matrix("output.weight", shape.n_vocab, shape.n_embd)
    return _finish(writer, path)


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_WORDS = ("the", "and", "river", "model", "token", "embed", "over", "sea", "alpha", "beta", "gamma", "delta")
# A small BERT: MiniLM's layout, a 512-token trained context (its position table), a tiny vocabulary.
TINY_BERT = ModelShape(n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=128, n_vocab=256, n_ctx_train=512)


def _wordpiece_vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    """[PAD] [UNK] [CLS] [SEP] [MASK], then every printable ASCII character as a word start ("▁c", the
    phantom space convert_hf_to_gguf puts on word starts) and as a continuation ("c", BERT's "##c"), a
    few whole words, and [unused] fillers up to n_vocab. Every ASCII text tokenizes without [UNK]."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]
    tokens = list(BERT_SPECIAL_TOKENS) + ["\u2581" + c for c in chars] + chars + ["\u2581" + w for w in BERT_WORDS]
    types = [TOKEN_TYPE_CONTROL] * len(BERT_SPECIAL_TOKENS) + [TOKEN_TYPE_NORMAL] * (len(tokens) - 5)
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be at least {len(tokens)}")
    tokens += [f"[unused{i}]" for i in range(n_vocab - len(tokens))]
    types += [TOKEN_TYPE_UNUSED] * (n_vocab - len(types))
    return tokens, types


def write_bert_gguf(path: str | Path, shape: ModelShape = TINY_BERT, seed: int = 0, dtype: str = "f32",
                    name: str = "synthetic-bert", pooling: str = "mean") -> Path:
    """A random non-causal `bert` encoder declaring `pooling` (mean: MiniLM, e5; cls: bge). Its tokenizer
    puts [CLS] before and [SEP] after every text, as BERT's does."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "bert")
    _write_header(writer, shape, name, dtype, pooling)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    tokens, types = _wordpiece_vocab(shape.n_vocab)
    writer.add_token_type_count(2)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, token in (("pad", "[PAD]"), ("unk", "[UNK]"), ("bos", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]")):
        getattr(writer, f"add_{key}_token_id")(tokens.index(token))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    t = _RandomTensors(writer, seed, dtype)
    t.matrix("token_embd.weight", shape.n_vocab, shape.n_embd, scale=1.0)
    t.matrix("token_types.weight", 2, shape.n_embd)
    t.matrix("position_embd.weight", shape.n_ctx_train, shape.n_embd, scale=0.5)
    t.norm("token_embd_norm.weight", shape.n_embd)
    t.bias("token_embd_norm.bias", shape.n_embd)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        for part, rows, cols in (("attn_q", shape.n_embd, shape.n_embd), ("attn_k", shape.n_embd, shape.n_embd),
                                 ("attn_v", shape.n_embd, shape.n_embd), ("attn_output", shape.n_embd, shape.n_embd),
                                 ("ffn_up", shape.n_ff, shape.n_embd), ("ffn_down", shape.n_embd, shape.n_ff)):
            t.matrix(b + part + ".weight", rows, cols)
            t.bias(b + part + ".bias", rows)
        for part in ("attn_output_norm", "layer_output_norm"):
            t.norm(b + part + ".weight", shape.n_embd)
            t.bias(b + part + ".bias", shape.n_embd)
    return _finish(writer, path)


# ---- Quantization (llama.cpp's own quantizer) -------------------------------------------------------------------

# Measured with llama-cpp-python 0.3.36: these fail ("this quantization requires an imatrix!") without one.
IMATRIX_QUANTS = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "IQ3_XXS"})


def quant_ftype(quant: str) -> int:
    """`Q8_0` → llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0 (F32 → ALL_F32); ValueError for unknown names."""
    import llama_cpp

    name, prefix = quant.upper(), "LLAMA_FTYPE_MOSTLY_"
    ftype = llama_cpp.LLAMA_FTYPE_ALL_F32 if name == "F32" else getattr(llama_cpp, prefix + name, None)
    if ftype is None:
        known = sorted(n.removeprefix(prefix) for n in dir(llama_cpp) if n.startswith(prefix))
        raise ValueError(f"unknown quantization {quant!r}; known: F32, {', '.join(known)}")
    return ftype


def quantize(src: Path, dst: Path, quant: str, threads: int, uniform_imatrix: bool = False) -> Path:
    """Quantize the GGUF `src` (F32/F16) to `dst` with llama_model_quantize; return dst.

    IQ1/IQ2 (and IQ3_XXS, Q2_K_S) need an importance matrix. `uniform_imatrix` passes an all-ones one: fine for
    random-weight models that only measure speed (the kernels are the same), meaningless for real weights.
    """
    import llama_cpp

    from bulkembed.contract.vocab import init_llama

    init_llama()
    name = quant.upper()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = quant_ftype(name)
    keep_alive: list[object] = []
    if name in IMATRIX_QUANTS:
        if not uniform_imatrix:
            raise ValueError(f"{name} needs an importance matrix (llama.cpp refuses it without one); quantize with "
                             f"llama-quantize --imatrix, or pass uniform_imatrix=True for a speed-only synthetic model")
        params.imatrix, keep_alive = _uniform_imatrix(Path(src))
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    del keep_alive  # the quantizer has returned: the imatrix buffers may go
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} → {name}) returned {status}")
    return Path(dst)


def _uniform_imatrix(src: Path) -> tuple[object, list[object]]:
    """An all-ones importance matrix for every weight matrix of `src`, NULL-name terminated, and its buffers."""
    import ctypes

    import gguf
    import llama_cpp

    matrices = [t for t in gguf.GGUFReader(str(src)).tensors if len(t.shape) >= 2]
    entries = (llama_cpp.llama_model_imatrix_data * (len(matrices) + 1))()
    buffers: list[object] = [entries]
    for entry, tensor in zip(entries, matrices, strict=False):
        ones = np.ones(int(tensor.shape[0]), np.float32)  # one weight per input column (ne[0])
        name = tensor.name.encode()
        buffers += [ones, name]
        entry.name, entry.size = name, ones.size
        entry.data = ones.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    entries[len(matrices)].name = None
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), buffers


def dequantized_copy(src: Path, dst: Path) -> Path:
    """`src` with every tensor dequantized to F32 (gguf's reference dequantizers), its metadata unchanged: the same
    weights computed without quantized kernels, the exact answer a quantized model's vectors approximate."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if field.types[0] is gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, weights.reshape([int(n) for n in reversed(tensor.shape)]))
    return _finish(writer, Path(dst))


# ---- Synthetic corpora ------------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is was for on that with as by at from his her they this have are be which one had not but "
    "all were when we there can an your more if will so about out many then them these some would other into has "
    "time two like water river model token embed over sea data mill grain boat light stone city market north "
    "winter summer garden window letter number system network paper energy music history science value report"
).split()


def target_lengths(n: int, dist: str = "mixed", seed: int = 0, cap: int | None = None) -> np.ndarray:
    """Wanted token counts of `n` documents. dist: `mixed` (~85% short 10-120, ~15% long 300-3000, lognormal-ish),
    `short`, `long` or `fixed:K`; `cap` clips every length."""
    rng = np.random.default_rng(seed)

    def lognormal(median: float, low: int, high: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(np.log(median), 0.6, n)), low, high)

    if dist.startswith("fixed:"):
        lengths = np.full(n, int(dist.removeprefix("fixed:")), np.float64)
    elif dist in ("mixed", "short", "long"):
        short, long = lognormal(40, 10, 120), lognormal(900, 300, 3000)
        pick_long = rng.random(n) < 0.15 if dist == "mixed" else np.full(n, dist == "long")
        lengths = np.where(pick_long, long, short)
    else:
        raise ValueError(f"unknown length distribution {dist!r}: mixed, short, long or fixed:K")
    if cap is not None:
        lengths = np.minimum(lengths, cap)
    return np.maximum(lengths, 1).astype(np.int64)


def synthetic_texts(lengths: np.ndarray, count: Callable[[str], int], seed: int = 0) -> list[str]:
    """Random word sequences, each the longest run of words whose token count (by `count`, the model's own
    tokenizer) is at most its target; at least one word. Lengths come out close, not exact."""
    rng = np.random.default_rng(seed)
    tokens_per_word = 2.0  # refined as texts are made
    texts = []
    for target in lengths:
        words = list(rng.choice(WORDS, size=int(target / tokens_per_word * 1.3) + 2))
        while count(" ".join(words)) < target:  # too few words: add more
            words += list(rng.choice(WORDS, size=len(words)))
        low, high = 1, len(words)  # binary search: the most words within the target
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if count(" ".join(words[:mid])) <= target else (low, mid - 1)
        text = " ".join(words[:low])
        tokens_per_word = 0.8 * tokens_per_word + 0.2 * max(count(text), 1) / low
        texts.append(text)
    return texts
