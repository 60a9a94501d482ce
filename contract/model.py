"""Find a model file from what the user typed (a .gguf path or REPO:QUANT) and name it."""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from bulkembed.contract.errors import ModelError
from bulkembed.contract.job import V4_MATRYOSHKA_DIMS, V4_MAX_TOKENS, ModelRef

log = logging.getLogger(__name__)

DEFAULT_MODEL = "jinaai/jina-embeddings-v4-text-retrieval-GGUF:IQ3_M"
QUEUE_PREFIX = "bulkembed."


def is_hub_spec(spec: str) -> bool:
    return not Path(spec).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+:[\w.-]+", spec) is not None


def resolve_path(spec: str) -> Path:
    """A local path as is; REPO:QUANT fetched into the Hugging Face cache (or found there offline)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    if not is_hub_spec(spec):
        raise ModelError(f"model {spec!r} is neither a file nor REPO:QUANT (e.g. {DEFAULT_MODEL})")
    repo, quant = spec.rsplit(":", 1)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=repo, allow_patterns=[f"*{quant}.gguf", f"*{quant.lower()}.gguf"]))
    except Exception as exc:  # the hub's many network and auth errors all mean the same to the user
        raise ModelError(
            f"cannot fetch {spec} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Download the .gguf file yourself and pass it with --model /path/to/model.gguf"
        ) from exc
    found = sorted(p for p in folder.rglob("*.gguf") if p.name.lower().endswith(f"{quant.lower()}.gguf"))
    if not found:
        raise ModelError(f"{repo} has no file ending in {quant}.gguf; check the quant name")
    return found[0].resolve()


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
    return ModelRef(spec=spec, file_name=path.name, sha256=file_sha256(path), queue=queue_name(path.name)), path


class ModelInfo(BaseModel):
    """What the producer needs to know of a model without loading its weights."""

    arch: str
    n_embd: int
    n_ctx_train: int
    trained_dims: tuple[int, ...] | None  # Matryoshka sizes, where known
    default_max_tokens: int


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

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture") or ""
    n_embd = int(value(f"{arch}.embedding_length") or 0)
    n_ctx_train = int(value(f"{arch}.context_length") or 0)
    declared = value(f"{arch}.matryoshka_dims")
    trained = tuple(int(d) for d in declared) if declared else (V4_MATRYOSHKA_DIMS if is_v4(path.name) else None)
    max_tokens = V4_MAX_TOKENS if is_v4(path.name) else (n_ctx_train or V4_MAX_TOKENS)
    return ModelInfo(arch=arch, n_embd=n_embd, n_ctx_train=n_ctx_train, trained_dims=trained,
                     default_max_tokens=max_tokens)


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
