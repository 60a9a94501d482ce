"""Several engines per device: N spawned processes, each with the model resident and its own context.

One engine leaves an H100 partly idle: its GPU waits on one host thread between decodes (NOTES.md 23). N
engine processes on the same device overlap one engine's host work with the others' decodes. Threads in one
process gained only 1.2-1.3x, processes 1.5-1.7x, so engines are processes.

`EnginePool` starts the engines (spawned, so the parent never starts llama.cpp or CUDA before Celery forks),
runs the ubatch probe in all of them at once and the self-test in one, and can then embed shards in them
(`bulkembed run`). The Celery worker uses it only to decide; its prefork pool then runs the engines.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkembed.worker import probe
from bulkembed.worker.engine import Engine, EngineOptions

log = logging.getLogger(__name__)

_ENGINE: Engine | None = None  # this engine process's resident model
_BARRIER: Any = None  # lines the engines up: one call each, and each probe candidate timed side by side
BARRIER_TIMEOUT_S = 900  # a peer that died loading must not hang the others


def _start_engine(model_path: str, options: EngineOptions, barrier: Any) -> None:
    global _ENGINE, _BARRIER
    _ENGINE, _BARRIER = Engine(model_path, options), barrier


def engine() -> Engine:
    if _ENGINE is None:
        raise RuntimeError("not an engine process")
    return _ENGINE


def _inspect(measure: bool) -> dict:
    """In every engine at once (the barrier makes the N calls land in N processes): facts and probe timings."""
    line_up()
    this = engine()
    timings = {}
    if measure == "always" or (measure and this.gpu_offload):
        for ub in probe.candidates_for(this):
            timings[ub] = probe.time_candidate(this, ub, line_up)
    return {"gpu_offload": this.gpu_offload, "timings": timings}


def line_up() -> None:
    _BARRIER.wait(BARRIER_TIMEOUT_S)


def _self_test() -> float:
    from bulkembed.worker.selftest import self_test

    return self_test(engine())


def _set_ubatch(ubatch: int) -> None:
    line_up()
    this = engine()
    this.options = dataclasses.replace(this.options, ubatch=ubatch)


@dataclass(frozen=True)
class EngineSetup:
    """What the user asked for: engine options, how many engines, how to choose the ubatch."""

    options: EngineOptions
    engines: int | str = 1  # or "auto"
    ubatch: int | str = "auto"  # a number pins it; "auto" probes on a GPU; "probe" probes anywhere
    probe_cache: str | None = None  # file of cached probe results; None: probe every start


@dataclass
class EnginePlan:
    """What the worker runs with: decided once at start."""

    engines: int
    options: EngineOptions
    gpu_offload: bool
    probe: probe.ProbeResult | None = None
    self_test_cosine: float | None = None


def decide_engines(requested: int | str, model_path: Path, gpu_layers: int) -> int:
    if requested != "auto":
        return int(requested)
    if gpu_layers == 0:
        return 1
    return probe.engines_that_fit(model_path.stat().st_size / (1 << 20), probe.gpu_free_mib())


def split_threads(options: EngineOptions, engines: int) -> EngineOptions:
    """N engines share the cores: each gets its part unless threads were set per engine."""
    if options.threads:
        return options
    return dataclasses.replace(options, threads=max(1, (os.cpu_count() or 1) // engines))


class EnginePool:
    """N spawned engine processes for one model, as a context manager; start() decides and returns the plan."""

    def __init__(self, model_path: Path, sha256: str, setup: EngineSetup):
        self.model_path, self.sha256 = Path(model_path), sha256
        self.engines = decide_engines(setup.engines, self.model_path, setup.options.gpu_layers)
        self.options = split_threads(setup.options, self.engines)
        self.ubatch = setup.ubatch
        self.cache = probe.ProbeCache(setup.probe_cache) if setup.probe_cache else None
        self._pool: Any = None

    def __enter__(self) -> EnginePool:
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(self.engines)
        pinned = self.ubatch if isinstance(self.ubatch, int) else probe.CPU_UBATCH
        options = dataclasses.replace(self.options, ubatch=pinned)
        self._pool = context.Pool(self.engines, _start_engine, (str(self.model_path), options, barrier))
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.terminate()
        self._pool.join()

    def start(self, self_test: bool = True) -> EnginePlan:
        """Load the engines, choose the ubatch (pinned, cached or probed), self-test at that ubatch."""
        measure: bool | str = {"auto": True, "probe": "always"}.get(str(self.ubatch), False)
        result = None
        if measure:
            device = probe.device_name()
            key = probe.ProbeCache.key(device, self.sha256, self.engines, self.options.flash_attn)
            result = self.cache.get(key) if self.cache else None
            if result:
                measure = False
        started = time.perf_counter()
        facts = self._pool.map(_inspect, [measure] * self.engines, chunksize=1)
        gpu = facts[0]["gpu_offload"]
        if measure and facts[0]["timings"]:
            result = probe.combine(device, [f["timings"] for f in facts], time.perf_counter() - started)
            if self.cache:
                self.cache.put(key, result)
        ubatch = result.ubatch if result and (gpu or self.ubatch == "probe") else \
            (self.ubatch if isinstance(self.ubatch, int) else probe.CPU_UBATCH)
        if result:
            log.info("ubatch %s on %s with %d engine(s): %s → %d (%.1fs)", "cached" if result.cached else "probe",
                     result.device, self.engines, result.table(), ubatch, result.seconds)
        self._pool.map(_set_ubatch, [ubatch] * self.engines, chunksize=1)
        cosine = self._pool.apply(_self_test) if self_test else None
        self.options = dataclasses.replace(self.options, ubatch=ubatch)
        return EnginePlan(self.engines, self.options, gpu, result, cosine)

    def imap(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`function(item)` in the engine processes (it calls `engine()`), results as they finish."""
        return self._pool.imap_unordered(function, items, chunksize=1)
