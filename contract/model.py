"""Find a model file from what the user typed (a .gguf path or REPO:QUANT) and name it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from bulkembed.contract.errors import InputError, ModelError
from bulkembed.contract.job import V4_MATRYOSHKA_DIMS, V4_MAX_TOKENS, ModelRef, Pooling

log = logging.getLogger(__name__)

DEFAULT_MODEL = "jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M"
QUEUE_PREFIX = "bulkembed."


def is_hub_spec(spec: str) -> bool:
    return not Path(spec).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+:[\w.-]+", spec) is not None


def resolve_path(spec: str) -> Path:
    """A local path as is; REPO:QUANT fetched into the Hugging Face cache (or found there offline)."""
    path = Path(spec).expanduser()
    if path.exists():  # a link to a model file is named by the file (models/current.gguf -> …-text-code-Q8_0.gguf),
        target = path.resolve()  # but one to a blob of the hub's cache (named by its hash) by its own name
        return target if target.name.lower().endswith(".gguf") else Path(os.path.abspath(path))
    if not is_hub_spec(spec):
        raise ModelError(f"model {spec!r} is neither a file nor REPO:QUANT (e.g. {DEFAULT_MODEL})")
    repo, quant = spec.rsplit(":", 1)
    allow, ignore = hub_patterns(quant)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=repo, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:  # the hub's many network and auth errors all mean the same to the user
        raise ModelError(
            f"cannot fetch {spec} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Download the .gguf file yourself and pass it with --model /path/to/model.gguf"
        ) from exc
    from huggingface_hub.utils import filter_repo_objects

    # The same patterns again: offline, or with the hub unreachable, the folder is the cache's, other quants included.
    found = sorted(filter_repo_objects((p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf")),
                                       allow_patterns=allow, ignore_patterns=ignore))
    if not found:
        raise ModelError(f"{repo} has no file named …-{quant}.gguf (in the hub's listing, or only in the local cache "
                         f"{folder} where the hub could not be reached): check the quant name, or download the file "
                         f"and pass it with --model /path/to/model.gguf")
    if len(found) > 1:
        raise ModelError(f"{repo} has {len(found)} files for {quant} ({', '.join(found)}): pass the one you mean with "
                         f"--model {folder}/…")
    # The link's name, not its blob's: the cache names blobs by their hash, the link as the repository names the file.
    return Path(os.path.abspath(folder / found[0]))


def hub_patterns(quant: str) -> tuple[list[str], list[str]]:
    """What of a hub repository is QUANT's model: a file named QUANT.gguf or …-QUANT.gguf (.QUANT, _QUANT), in any
    case, never a vision projector (v4's repositories hold mmproj-…-BF16.gguf beside the model). `*F16.gguf` took
    BF16 files too."""
    named = f"{any_case(quant)}.gguf"
    return [named, f"*/{named}", *(f"*{sep}{named}" for sep in "-._")], [f"*{any_case('mmproj')}*"]


def any_case(text: str) -> str:
    """A glob matching `text` in any case: the hub's patterns are case-sensitive."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


@lru_cache(maxsize=8)
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def queue_name(file_name: str) -> str:
    """Workers of different models share one Redis: each model has its queue, named by its file."""
    stem = Path(file_name).stem.lower()
    return QUEUE_PREFIX + re.sub(r"[^a-z0-9_.-]+", "-", stem)


def model_ref(spec: str) -> tuple[ModelRef, Path]:
    path = resolve_path(spec)
    # A file by its absolute path: planners and `embed --index` read the spec back from other folders.
    spec = spec if is_hub_spec(spec) else str(path)
    return ModelRef(spec=spec, file_name=path.name, sha256=file_sha256(path), queue=queue_name(path.name)), path


# `<arch>.pooling_type` as llama.cpp numbers it (LLAMA_POOLING_TYPE_*); 4 is RANK, a reranker's head.
GGUF_POOLING = {0: Pooling.NONE, 1: Pooling.MEAN, 2: Pooling.CLS, 3: Pooling.LAST}
GGUF_POOLING_RANK = 4
# Architectures llama.cpp runs as bidirectional encoders without a KV cache, whatever the header says.
ENCODER_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                           "neo-bert", "eurobert", "t5encoder"})


class ModelInfo(BaseModel):
    """What a model is, read from its GGUF header (no weights): the one place the producer's planning, the
    engine and the self-test learn it from."""

    arch: str
    n_embd: int
    n_ctx_train: int
    trained_dims: tuple[int, ...] | None  # Matryoshka sizes, where known
    trained_tokens: int  # longest input it was trained for: v4's 32768 (its header says 128000), else n_ctx_train
    causal: bool = True  # False: every token sees the whole document, which may then never be split
    pooling_type: int = -1  # declared `<arch>.pooling_type` (GGUF_POOLING); -1: declares none (v4)
    add_bos: bool = False  # the tokenizer puts BOS/[CLS] before every text
    add_eos: bool = False  # ... and EOS/[SEP] after it

    @property
    def declared_pooling(self) -> Pooling | None:
        return GGUF_POOLING.get(self.pooling_type)

    def default_max_tokens(self, max_ubatch: int) -> int:
        """v4: its trained 32768. A non-causal model embeds a document in one ubatch, so at most what one
        ubatch may hold (`max_ubatch`, a setting) and never above its trained context; others: their context."""
        return min(max_ubatch, self.trained_tokens) if not self.causal else self.trained_tokens


def is_v4(file_name: str) -> bool:
    return "jina-embeddings-v4" in file_name.lower()


def model_info(path: Path) -> ModelInfo:
    """Read the GGUF header (no tensors). Matryoshka sizes come from `<arch>.matryoshka_dims` where a
    model declares them, else from v4's model card for v4 files."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises plain ValueError/OSError on foreign files
        raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc

    def value(key: str, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = value("general.architecture") or ""
    declared = value(f"{arch}.matryoshka_dims")
    trained = tuple(int(d) for d in declared) if declared else (V4_MATRYOSHKA_DIMS if is_v4(path.name) else None)
    n_ctx_train = int(value(f"{arch}.context_length", 0))
    wordpiece = value("tokenizer.ggml.model") == "bert"  # llama.cpp's WPM defaults: [CLS] text [SEP]
    return ModelInfo(
        arch=arch, n_embd=int(value(f"{arch}.embedding_length", 0)), n_ctx_train=n_ctx_train, trained_dims=trained,
        trained_tokens=V4_MAX_TOKENS if is_v4(path.name) else (n_ctx_train or V4_MAX_TOKENS),
        causal=arch not in ENCODER_ARCHS and bool(value(f"{arch}.attention.causal", True)),
        pooling_type=int(value(f"{arch}.pooling_type", -1)),
        add_bos=bool(value("tokenizer.ggml.add_bos_token", wordpiece)),
        add_eos=bool(value("tokenizer.ggml.add_eos_token", False) or value("tokenizer.ggml.add_sep_token", wordpiece)),
    )


def choose_pooling(info: ModelInfo, requested: Pooling | None, file_name: str) -> Pooling:
    """The job's pooling: what the user asked for, else what the model declares (mean where it declares
    nothing, as v4's GGUFs). A reranker (rank pooling: a classification head) or an unknown pooling is
    refused whatever was asked: its vectors are not embeddings this tool can vouch for."""
    if info.pooling_type == GGUF_POOLING_RANK:
        raise ModelError(f"{file_name} declares rank pooling: it is a reranker (a classification head scores "
                         f"query-document pairs), not an embedding model; bulkembed cannot embed with it")
    if info.pooling_type != -1 and info.declared_pooling is None:
        raise ModelError(f"{file_name} declares pooling type {info.pooling_type}, which bulkembed does not know; "
                         f"it embeds with none, mean, cls or last")
    pooling = requested or info.declared_pooling or Pooling.MEAN
    if pooling is Pooling.CLS and info.causal:
        raise InputError(f"{file_name} is causal: its first token sees only itself, so cls pooling would give every "
                         f"text the vector of its first token (one vector for all, with a prefix or BOS); use mean "
                         f"or last")
    if pooling is Pooling.CLS and not info.add_bos:
        log.warning("%s: cls pooling takes each text's first token, and its tokenizer puts no BOS/[CLS] there",
                    file_name)
    if pooling is Pooling.LAST and not info.add_eos:
        log.warning("%s: last pooling takes each text's last token, and its tokenizer appends no EOS/[SEP]",
                    file_name)
    return pooling


def choose_max_tokens(requested: int | None, info: ModelInfo, max_ubatch: int, file_name: str) -> int:
    """--max-tokens, or the model's default. A non-causal model embeds each document whole in one ubatch
    with its own positions, so it can take no more than its trained context."""
    if requested is None:
        return info.default_max_tokens(max_ubatch)
    if not info.causal and info.n_ctx_train and requested > info.n_ctx_train:
        raise ModelError(f"--max-tokens {requested}: {file_name} is a non-causal model trained on {info.n_ctx_train} "
                         f"tokens, and each document is embedded whole; use at most {info.n_ctx_train} "
                         f"(--overlength chunk splits longer documents into rows that fit)")
    if info.causal and requested > info.trained_tokens:
        log.warning("--max-tokens %d is beyond the %d tokens %s was trained on: positions past them were never "
                    "seen in training, and vectors of such long texts are untested (--max-tokens %d with "
                    "--overlength chunk cuts longer texts into rows within them)", requested, info.trained_tokens,
                    file_name, info.trained_tokens)
    return requested


def check_dims(dims: int | None, info: ModelInfo, file_name: str) -> int:
    """The output width: n_embd, or a Matryoshka cut the model was trained for."""
    if dims is None or dims == info.n_embd:
        return info.n_embd
    if not 0 < dims <= info.n_embd:
        raise ModelError(f"--dims {dims}: {file_name} has {info.n_embd} dimensions")
    if info.trained_dims is not None and dims not in info.trained_dims:
        sizes = ", ".join(map(str, info.trained_dims))
        raise ModelError(f"--dims {dims} is not a trained Matryoshka size of {file_name}; use one of {sizes} "
                         f"(untrained cuts are much worse than the next trained one)")
    if info.trained_dims is None:
        log.warning("%s declares no Matryoshka sizes; cutting to %d dims on trust", file_name, dims)
    return dims
