"""Choose the ubatch cap per device by measuring it, and the number of engines per GPU by memory.

The seed's L4 was fastest at ub 512, an H100 at 1024 (docs/notes.md 22): a fixed default is right for one GPU and
wrong for another. The probe decodes a few full packed ubatches of each candidate on the resident model, in
every engine at once (so it measures what the worker will run), and keeps the fastest. Its choice is cached
per (device, model sha256, engines, flash attention, --isolate), so a restart skips it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bulkembed.worker.engine import Engine
from bulkembed.worker.packing import ContextShape

log = logging.getLogger(__name__)

CANDIDATES = (256, 512, 1024, 2048)
CPU_UBATCH = 512  # `auto` on CPU: probing a real model there would take minutes
PROBE_DOC_TOKENS = 192  # documents of a typical passage length, packed many to a ubatch
PROBE_WARM_DECODES = 2  # untimed full ubatches first: a new context and its first decodes (CUDA graphs) cost more
PROBE_DECODES = 6  # timed full ubatches per candidate, at least
PROBE_MIN_S = 1.0  # and at least this long, so a fast device is not timed on a few milliseconds
NEAR_BEST = 0.97  # a smaller ubatch within 3% of the fastest wins: less memory, same speed
MAX_AUTO_ENGINES = 3  # on an H100, 3 engines gave 1.33-1.55x one (docs/benchmarks.md); more were not measured
CONTEXT_RESERVE_MIB = 1536  # per engine beside its weights: KV cache and compute buffers at ub 2048


@dataclass(frozen=True)
class ProbeResult:
    ubatch: int
    tok_per_s: dict[int, float]  # candidate -> tokens per second over all engines
    seconds: float
    device: str
    measured_at: str = ""
    cached: bool = False

    def table(self) -> str:
        return ", ".join(f"ub {ub}: {rate:,.0f} tok/s" for ub, rate in sorted(self.tok_per_s.items()))


def _first_gpu(field: str) -> str | None:
    """`field` of the GPU CUDA uses first here, from nvidia-smi (without starting CUDA in this process); None where
    there is none. nvidia-smi ignores CUDA_VISIBLE_DEVICES, so its first entry is asked for by id (an index or a
    UUID, as both take them); an empty or negative one hides every GPU from CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else None
    if first is not None and (not first or first.startswith("-")) or not shutil.which("nvidia-smi"):
        return None
    done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits",
                           *(["-i", first] if first else [])], capture_output=True, text=True, timeout=30)
    values = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return values[0] if done.returncode == 0 and values else None


def device_name() -> str:
    """The GPU as nvidia-smi names it, else the CPU."""
    if name := _first_gpu("name"):
        return name
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "cpu")
    return f"{model} ({os.cpu_count()} cpus)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def gpu_free_mib() -> float | None:
    free = _first_gpu("memory.free")
    try:
        return float(free) if free else None
    except ValueError:  # "[N/A]", as some virtual GPUs answer
        return None


def engines_that_fit(model_mib: float, free_mib: float | None) -> int:
    """`--engines auto` on a GPU: as many resident copies as its free memory holds with room for their contexts."""
    if free_mib is None:
        return 1
    fits = int(free_mib * 0.9 // (model_mib + CONTEXT_RESERVE_MIB))
    return max(1, min(MAX_AUTO_ENGINES, fits))


def candidates_for(engine: Engine) -> list[int]:
    return [ub for ub in CANDIDATES if ub <= max(CANDIDATES[0], engine.n_ctx_train)]


def auto_ubatch(gpu_offload: bool, isolate: bool, candidates: Sequence[int]) -> int | None:
    """`--ubatch auto`'s cap where it is not measured; None where it is (a GPU, packed). Isolated, the cap only decides
    where long documents are cut, and so their vectors: a timing, which changes with the engine count and the device's
    load, must not choose it. There it is the largest candidate the model takes (what the probe chose for packing on
    the H100 and H200: fewest pieces, fullest decodes)."""
    if not gpu_offload:
        return CPU_UBATCH
    return max(candidates, default=CANDIDATES[0]) if isolate else None


def probe_documents(engine: Engine, ubatch: int, decodes: int) -> list[np.ndarray]:
    """Same-length documents that fill `decodes` ubatches of `ubatch` tokens. Isolated (one document a decode), where
    the cap only decides how long documents are cut: documents of a whole ubatch, so each candidate is timed on full
    decodes of its size, as packing times them."""
    length = ubatch if engine.options.isolate else PROBE_DOC_TOKENS
    text = " ".join(["The river carried the boat past the mill, and the miller counted sacks of grain."] * 40)
    tokens = engine.vocab.tokenize(text)
    while len(tokens) < length:
        tokens = np.concatenate([tokens, tokens])
    return [tokens[:length]] * -(-decodes * ubatch // length)


def _probe_shape(engine: Engine, ubatch: int) -> tuple[list[np.ndarray], ContextShape]:
    docs = probe_documents(engine, ubatch, PROBE_DECODES)
    return docs, engine.shape_for([len(d) for d in docs], ubatch_cap=ubatch)


def warm_candidate(engine: Engine, ubatch: int) -> None:
    """Untimed full ubatches at this cap, in the context the timed ones use."""
    _, shape = _probe_shape(engine, ubatch)
    engine.embed(probe_documents(engine, ubatch, PROBE_WARM_DECODES), shape)


def time_candidate(engine: Engine, ubatch: int) -> tuple[int, float]:
    """(tokens, seconds) of full packed ubatches at this cap, after warm_candidate (in every engine)."""
    docs, shape = _probe_shape(engine, ubatch)
    tokens, started = 0, time.perf_counter()
    while not tokens or time.perf_counter() - started < PROBE_MIN_S:
        engine.embed(docs, shape)
        tokens += sum(len(d) for d in docs)
    return tokens, time.perf_counter() - started


def pick(tok_per_s: dict[int, float]) -> int:
    best = max(tok_per_s.values())
    return min(ub for ub, rate in tok_per_s.items() if rate >= NEAR_BEST * best)


class ProbeCache:
    """Measured choices in one JSON file: {"device|sha256|engines|flash|isolate": ProbeResult}."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    @staticmethod
    def key(device: str, sha256: str, engines: int, flash_attn: bool | None, isolate: bool = False) -> str:
        return f"{device}|{sha256}|{engines}|flash={flash_attn}" + ("|isolated" if isolate else "")

    def _entries(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> ProbeResult | None:
        entry = self._entries().get(key)
        if not entry:
            return None
        entry["tok_per_s"] = {int(k): v for k, v in entry["tok_per_s"].items()}
        return ProbeResult(**entry | {"cached": True})

    def put(self, key: str, result: ProbeResult) -> None:
        entries = self._entries() | {key: asdict(result) | {"cached": False}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_suffix(f".{os.getpid()}.tmp")
            temp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            temp.replace(self.path)
        except OSError as exc:  # a read-only home only costs the next start a probe
            log.warning("cannot cache the ubatch probe in %s: %s", self.path, exc)


def combine(device: str, runs: list[dict[int, tuple[int, float]]], seconds: float) -> ProbeResult:
    """Per-engine (tokens, seconds) of each candidate → total tok/s (engines ran side by side) and the pick."""
    tok_per_s = {ub: sum(run[ub][0] for run in runs) / max(run[ub][1] for run in runs) for ub in runs[0]}
    return ProbeResult(ubatch=pick(tok_per_s), tok_per_s=tok_per_s, seconds=seconds, device=device,
                       measured_at=datetime.now(UTC).isoformat(timespec="seconds"))
