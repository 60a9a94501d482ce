"""llama.cpp runs in processes of its own, and Arrow never runs beside it.

On a CUDA image llama.cpp and pyarrow could not share a process in either order (docs/benchmarks.md, "the
pyarrow crash"): an abort when pyarrow loaded second, a segfault in the model load when it loaded first. So
the producer's token counter and every engine are child processes, `python -m bulkembed.contract.llama_process`,
that load llama.cpp first (before numpy: docs/notes.md 25) and refuse to import pyarrow; the parent reads and writes
Arrow, S3 and Redis and calls them over a socket pair: pickled calls of bulkembed functions, one at a time.

A child lives as long as its parent: it is killed when the parent dies (PR_SET_PDEATHSIG), even by -9, and it
ignores SIGINT and SIGTERM, so the parent alone decides when it stops (a draining worker finishes its shard).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.abc
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

from bulkembed.contract.errors import BulkEmbedError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"  # [pid]: which process said it
_LOG_LEVEL_ENV = "BULKEMBED_LLAMA_PROCESS_LOG_LEVEL"
_PR_SET_PDEATHSIG = 1
CLOSE_WAIT_S = 10


class LlamaProcessDied(BulkEmbedError):
    """A llama.cpp process ended while the parent waited on it (killed, out of memory, a crash in llama.cpp)."""


class LlamaProcess:
    """One child that runs llama.cpp; `call(function, *args)` runs a module-level bulkembed function there."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        # CUDA counts GPUs fastest first unless told otherwise; nvidia-smi (which sizes --engines auto) and operators
        # count them by PCI bus: CUDA_VISIBLE_DEVICES=1 must be the same GPU to both. The user's own order wins.
        env = ({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} | os.environ
               | {_LOG_LEVEL_ENV: str(logging.getLogger().getEffectiveLevel())})
        with theirs:
            self.process = subprocess.Popen(
                # -P: the working directory is not on its path (a checkout there must not shadow the installed
                # package); PYTHONPATH still counts.
                [sys.executable, "-P", "-m", "bulkembed.contract.llama_process", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        self.connection = Connection(ours.detach())
        self.busy = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Start a call; `result()` waits for it. One call at a time per process."""
        if self.busy:
            raise RuntimeError("a llama process runs one call at a time")
        data = ForkingPickler.dumps((function.__module__, function.__qualname__, args))  # fails before writing
        try:
            self.connection.send_bytes(data)
        except OSError as exc:
            raise self._died() from exc
        except BaseException:  # interrupted mid-message: the child would read half a call
            self.process.kill()
            raise
        self.busy = True

    def result(self) -> Any:
        try:
            outcome, value = self.connection.recv()
        except (EOFError, OSError) as exc:
            self.busy = False
            raise self._died() from exc
        except BaseException:
            # Interrupted while waiting (Ctrl-C): the call's reply would answer the next call, so there is none.
            self.process.kill()
            self.busy = False
            raise
        self.busy = False
        if outcome == "error":
            raise value
        return value

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        self.submit(function, *args)
        return self.result()

    def _died(self) -> LlamaProcessDied:
        try:
            code = self.process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        return LlamaProcessDied(f"llama.cpp process {self.pid} {death_cause(code)}")

    def close(self) -> None:
        """End the child: it exits when its socket closes; one busy in a call is killed (its result is abandoned)."""
        if self.busy:
            self.process.kill()
        self.connection.close()
        try:
            self.process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


REBUILD_HINT = "rebuild llama.cpp with `bash infra/install.sh` (infra/llama-cpp/build.sh: native flags, no AMX)"
# What each signal usually means when llama.cpp dies of it, and what to do: one line a user can act on.
SIGNAL_CAUSES = {
    signal.SIGILL: "an illegal instruction: this llama.cpp build runs CPU instructions this machine cannot "
                   f"(llama.cpp's AMX path on Sapphire Rapids-class CPUs, or a build for another CPU); {REBUILD_HINT}",
    signal.SIGSEGV: "a segmentation fault inside llama.cpp: a corrupt or truncated model file, or a llama.cpp bug; "
                    f"check the file's sha256, then {REBUILD_HINT}",
    signal.SIGBUS: "a bus error: the model file changed or shrank while mapped, or the disk under it failed",
    signal.SIGABRT: "an abort: llama.cpp stopped on a failed check (its GGML_ASSERT message is in the log above)",
    signal.SIGFPE: f"an arithmetic fault inside llama.cpp; {REBUILD_HINT}",
    signal.SIGKILL: "a kill: most often the kernel's out-of-memory killer (fewer engines, a smaller ubatch), or a "
                    "person or supervisor",
}


def death_cause(code: int | None) -> str:
    """How a llama process ended, from its exit code (negative: the signal), with what it usually means."""
    if code is None:
        return "stopped answering and did not exit"
    if code >= 0:
        return f"died (exit code {code})"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    cause = SIGNAL_CAUSES.get(-code)
    return f"died of {name}" + (f", {cause}" if cause else "")


def start(function: Callable[..., Any], *args: Any) -> tuple[LlamaProcess, Any]:
    """A new llama process and the result of its first call (the one that loads what it serves); the process is
    ended if that call fails."""
    process = LlamaProcess()
    try:
        return process, process.call(function, *args)
    except BaseException:
        process.close()
        raise


def call_all(processes: list[LlamaProcess], function: Callable[..., Any], *args: Any) -> list[Any]:
    """The same call in every process at once (they run side by side); the results in process order."""
    for process in processes:
        process.submit(function, *args)
    return [process.result() for process in processes]


def imap_unordered(processes: list[LlamaProcess], function: Callable[[Any], Any],
                   items: Iterable[Any]) -> Iterator[Any]:
    """`function(item)` for every item, each on whichever process is free; results as they finish."""
    pending = iter(items)
    by_connection = {p.connection: p for p in processes}
    for process in processes:
        if (item := next(pending, _END)) is _END:
            break
        process.submit(function, item)
    while busy := [c for c, p in by_connection.items() if p.busy]:
        for connection in wait(busy):
            process = by_connection[connection]
            yield process.result()
            if (item := next(pending, _END)) is not _END:
                process.submit(function, item)


_END = object()


# ---- the child ---------------------------------------------------------------------------------------------

class _NoArrow(importlib.abc.MetaPathFinder):
    """pyarrow beside llama.cpp is what this process exists to avoid: importing it here is a bug, said loudly."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"{name} must not be imported in a llama.cpp process (see bulkembed.contract."
                              f"llama_process)")


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed socket still ends the child, after its call
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _serve(connection: Connection) -> None:
    while True:
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the socket or died
        module, name = "?", "?"
        try:
            module, name, args = pickle.loads(data)  # inside the try: a call it cannot read is an error reply
            if not module.startswith("bulkembed."):
                raise ValueError(f"a llama process runs bulkembed functions only, not {module}")
            function = importlib.import_module(module)
            for part in name.split("."):
                function = getattr(function, part)
            reply = ("ok", function(*args))
        except Exception as exc:  # the parent raises it; the traceback stays in this process's log
            log.debug("%s.%s failed:\n%s", module, name, traceback.format_exc())
            reply = ("error", _portable(exc))
        try:
            data = ForkingPickler.dumps(reply)
        except Exception as exc:  # a result that does not pickle: an error reply, not a dead engine
            data = ForkingPickler.dumps(("error", BulkEmbedError(f"{module}.{name} returned what cannot be sent back: "
                                                                 f"{type(exc).__name__}: {exc}")))
        try:
            connection.send_bytes(data)
        except OSError:
            return


def _portable(exc: Exception) -> Exception:
    """The exception itself where it survives pickling both ways, else its text in a BulkEmbedError."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return BulkEmbedError(f"{type(exc).__name__}: {exc}")


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.meta_path.insert(0, _NoArrow())
    try:  # llama.cpp's libraries before numpy: the other order crashed model loads on a CUDA image (docs/notes.md 25)
        import llama_cpp  # noqa: F401
    except ImportError:
        pass
    logging.basicConfig(level=int(os.environ.get(_LOG_LEVEL_ENV, logging.WARNING)), format=LOG_FORMAT)
    _serve(Connection(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
