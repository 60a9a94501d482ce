"""Measuring one block: wall seconds, this process's CPU seconds, peak RSS and peak GPU memory; one bench row."""

from __future__ import annotations

import resource
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Result:
    mode: str
    docs: int
    tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time over the same span: cpu_seconds / seconds < threads = contention
    peak_rss_mib: float | None
    peak_vram_mib: float | None
    note: str = ""

    @classmethod
    def of(cls, mode: str, docs: int, tokens: int, meter: Meter, note: str) -> Result:
        return cls(mode, docs, tokens, meter.seconds, meter.cpu, meter.rss, meter.vram, note)

    def as_dict(self, raw: Result | None) -> dict:
        tok_s = self.tokens / self.seconds
        ratio = tok_s / (raw.tokens / raw.seconds) if raw else None
        return asdict(self) | {"tok_per_s": tok_s, "docs_per_s": self.docs / self.seconds, "ratio_to_raw": ratio,
                               "cpu_per_wall": self.cpu_seconds / self.seconds}


class Meter:
    """Wall seconds, peak RSS (VmHWM, reset on entry) and peak GPU memory (nvidia-smi every 100 ms) of a block."""

    rss_note = "VmHWM reset per measurement via /proc/self/clear_refs"

    def __enter__(self) -> Meter:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.exact_rss = True
        except OSError:
            self.exact_rss = False
            Meter.rss_note = "ru_maxrss: cumulative over the process, not per mode (clear_refs unavailable)"
        self.vram: float | None = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_vram, daemon=True)
        if shutil.which("nvidia-smi"):
            self._sampler.start()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu = time.process_time() - self.cpu_started
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; cumulative
        if self.exact_rss:
            status = Path("/proc/self/status").read_text().splitlines()
            self.rss = next(int(x.split()[1]) / 1024 for x in status if x.startswith("VmHWM:"))

    def _sample_vram(self) -> None:
        while True:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.vram = max(self.vram or 0.0, *map(float, out))
            if self._stop.wait(0.1):
                return


