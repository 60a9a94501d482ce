"""Find a model file from what the user typed (a .gguf path or REPO:QUANT) and name it."""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path

from contract.errors import ModelError
from contract.job import ModelRef

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
