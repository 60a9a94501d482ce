"""Several engines per device: N llama processes, each with the model resident and its own context.

One engine leaves an H100 partly idle: its GPU waits on one host thread between decodes (docs/notes.md 23). N
engine processes on the same device overlap one engine's host work with the others' decodes. Threads in one
process gained only 1.2-1.3x, processes 1.5-1.7x, so engines are processes: llama processes
(contract.llama_process), which load llama.cpp and never Arrow; the process that reads and writes shards calls them.

`EnginePool` starts N engines, runs the ubatch probe in all of them at once and the self-test in one, and can
then embed shards in them (`bulkembed run`, the bench). `EngineProcess` is one engine: a Celery pool process's.
The functions with a leading underscore run in the engine processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkembed.contract.job import Pooling
from bulkembed.contract.llama_process import LlamaProcess, call_all, imap_unordered, start
from bulkembed.worker import probe
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.rows import EmbeddedRows, ShardRows, embed_rows, query_rows

log = logging.getLogger(__name__)

_ENGINE: Engine | None = None  # this engine process's resident model


@dataclass(frozen=True)
class EngineFacts:
    """What an engine process found when it loaded the model."""

    gpu_offload: bool
    load_seconds: float
    candidates: list[int]  # the probe's ubatch candidates this model can take
    lm_head_skipped: bool  # the build leaves the LM head out (infra/llama-cpp/patches/0001) and the options let it
    lm_head: str  # the same in words, for logs and reports
    decoded_by: dict  # Engine.decoded_by at start: the device and the llama.cpp build among it


def _start_engine(model_path: str, options: EngineOptions) -> EngineFacts:
    global _ENGINE
    _ENGINE = Engine(model_path, options)
    candidates = probe.candidates_for(_ENGINE)
    if options.ubatch_auto and (cap := probe.auto_ubatch(_ENGINE.gpu_offload, options.isolate, candidates)):
        _ENGINE.options = dataclasses.replace(_ENGINE.options, ubatch=cap)
    return EngineFacts(_ENGINE.gpu_offload, _ENGINE.load_seconds, candidates,
                       _ENGINE.lm_head_skipped, _ENGINE.lm_head_state, _ENGINE.decoded_by)


def engine() -> Engine:
    if _ENGINE is None:
        raise RuntimeError("not an engine process")
    return _ENGINE


def _embed_rows(rows: ShardRows) -> EmbeddedRows:
    return embed_rows(engine(), rows)


def _embed_queries(texts: list[str], prefix: str, pooling: Pooling, max_tokens: int) -> EmbeddedRows:
    return embed_rows(engine(), query_rows(engine(), texts, prefix, pooling, max_tokens))


def _embed_numbered(item: tuple[int, ShardRows]) -> tuple[int, EmbeddedRows]:
    number, rows = item
    return number, _embed_rows(rows)


def _warm_candidate(ubatch: int) -> None:
    probe.warm_candidate(engine(), ubatch)


def _time_candidate(ubatch: int) -> tuple[int, float]:
    return probe.time_candidate(engine(), ubatch)


def _can_offload() -> bool:
    """Whether this llama.cpp build sees a GPU to offload to (a CPU build, or CUDA_VISIBLE_DEVICES='': no)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _self_test() -> float:
    from bulkembed.worker.selftest import self_test

    return self_test(engine())


def _set_ubatch(ubatch: int) -> None:
    this = engine()
    this.options = dataclasses.replace(this.options, ubatch=ubatch)


class EngineProcess:
    """One engine in a llama process of its own: what a Celery pool process embeds its shards with."""

    def __init__(self, model_path: Path, options: EngineOptions):
        self.options = options
        self.process, self.facts = start(_start_engine, str(model_path), options)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    def embed_rows(self, rows: ShardRows) -> EmbeddedRows:
        return self.process.call(_embed_rows, rows)

    def embed_queries(self, texts: list[str], prefix: str, pooling: Pooling, max_tokens: int) -> EmbeddedRows:
        """Texts planned and embedded as a bulk job's rows (worker.rows.query_rows)."""
        return self.process.call(_embed_queries, texts, prefix, pooling, max_tokens)

    def close(self) -> None:
        self.process.close()


@dataclass(frozen=True)
class EngineSetup:
    """What the user asked for: engine options, how many engines, how to choose the ubatch."""

    options: EngineOptions
    engines: int | str = 1  # or "auto"
    ubatch: int | str = "auto"  # a number pins it; "auto" probes on a GPU (packed); "probe" probes anywhere
    probe_cache: str | None = None  # file of cached probe results; None: probe every start


@dataclass
class EnginePlan:
    """What the worker runs with: decided once at start."""

    engines: int
    options: EngineOptions
    gpu_offload: bool
    lm_head_skipped: bool
    lm_head: str  # EngineFacts.lm_head
    probe: probe.ProbeResult | None = None
    self_test_cosine: float | None = None


def decide_engines(requested: int | str, model_path: Path, gpu_layers: int, offloads: Callable[[], bool]) -> int:
    """`--engines`: as asked, or for auto one on the CPU and as many as the GPU holds (asked of the llama.cpp build,
    not of nvidia-smi: a CPU build on a GPU host computes on the CPU)."""
    if requested != "auto":
        return int(requested)
    if gpu_layers == 0 or not offloads():
        return 1
    return probe.engines_that_fit(model_path.stat().st_size / (1 << 20), probe.gpu_free_mib())


def split_threads(options: EngineOptions, engines: int) -> EngineOptions:
    """N engines share the cores: each gets its part unless threads were set per engine."""
    if options.threads:
        return options
    return dataclasses.replace(options, threads=max(1, (os.cpu_count() or 1) // engines))


class EnginePool:
    """N engine processes for one model, as a context manager; start() decides and returns the plan."""

    def __init__(self, model_path: Path, sha256: str, setup: EngineSetup):
        self.model_path, self.sha256 = Path(model_path), sha256
        self.setup = setup
        self.ubatch = setup.ubatch
        self.cache = probe.ProbeCache(setup.probe_cache) if setup.probe_cache else None
        self.processes: list[LlamaProcess] = []

    def __enter__(self) -> EnginePool:
        pinned = self.ubatch if isinstance(self.ubatch, int) else probe.CPU_UBATCH
        try:
            self.processes = [LlamaProcess()]
            self.engines = decide_engines(self.setup.engines, self.model_path, self.setup.options.gpu_layers,
                                          lambda: self.processes[0].call(_can_offload))
            self.options = split_threads(self.setup.options, self.engines)
            while len(self.processes) < self.engines:  # one at a time: those made are closed if one fails to start
                self.processes.append(LlamaProcess())
            # The pool decides the cap itself (start()), for every engine at once: not each engine on its own.
            options = dataclasses.replace(self.options, ubatch=pinned, ubatch_auto=False)
            self.facts: EngineFacts = self.call_all(_start_engine, str(self.model_path), options)[0]  # side by side
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.close()

    def call_all(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        """`function(*args)` in every engine at once; their results."""
        return call_all(self.processes, function, *args)

    def start(self, self_test: bool = True) -> EnginePlan:
        """Choose the ubatch (pinned, cached or probed), self-test at that ubatch."""
        if isinstance(self.ubatch, int):
            fixed: int | None = self.ubatch
        elif self.ubatch == "probe":
            fixed = None
        else:
            fixed = probe.auto_ubatch(self.facts.gpu_offload, self.options.isolate, self.facts.candidates)
        measure = fixed is None
        result = None
        if measure:
            device = probe.device_name()
            key = probe.ProbeCache.key(device, self.sha256, self.engines, self.options.flash_attn,
                                       self.options.isolate)
            result = self.cache.get(key) if self.cache else None
        if measure and not result:
            started, timings = time.perf_counter(), [{} for _ in self.processes]
            for ub in self.facts.candidates:  # warmed in every engine, then timed in all side by side
                self.call_all(_warm_candidate, ub)
                for run, timed in zip(timings, self.call_all(_time_candidate, ub), strict=True):
                    run[ub] = timed
            result = probe.combine(device, timings, time.perf_counter() - started)
            if self.cache:
                self.cache.put(key, result)
        ubatch = result.ubatch if result else fixed
        if result:
            log.info("ubatch %s on %s with %d engine(s): %s → %d (%.1fs)", "cached" if result.cached else "probe",
                     result.device, self.engines, result.table(), ubatch, result.seconds)
        self.call_all(_set_ubatch, ubatch)
        cosine = self.processes[0].call(_self_test) if self_test else None
        self.options = dataclasses.replace(self.options, ubatch=ubatch)
        log.info("LM head: %s", self.facts.lm_head)
        return EnginePlan(self.engines, self.options, self.facts.gpu_offload, self.facts.lm_head_skipped,
                          self.facts.lm_head, result, cosine)

    def imap(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`function(item)` in the engine processes (it calls `engine()`), results as they finish."""
        return imap_unordered(self.processes, function, items)

    def embed(self, rows: Iterable[tuple[int, ShardRows]]) -> Iterator[tuple[int, EmbeddedRows]]:
        """Numbered shards' rows embedded on whichever engine is free; (number, vectors) as they finish."""
        return self.imap(_embed_numbered, rows)
