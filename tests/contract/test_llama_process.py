"""llama.cpp in processes of its own: no Arrow there, no llama.cpp in the process that reads and writes Arrow,
errors cross back as themselves, and a llama process never outlives its parent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bulkembed.contract import schema
from bulkembed.contract.errors import ModelError
from bulkembed.contract.llama_process import LlamaProcess, LlamaProcessDied
from bulkembed.contract.vocab import TokenCounter, Vocab
from tests.conftest import REPO, write_corpus
from tests.faults_support import alive, wait_until


def test_the_counter_counts_what_the_vocabulary_counts(tiny_model):
    texts = ["hello world", "x", "a longer sentence, with punctuation; and more words."]
    with TokenCounter(tiny_model) as counter:
        counted = counter.count_many(texts)
        assert counter.count(texts[0]) == counted[0]
        assert counter.count_many([]) == []
    vocab = Vocab.load(tiny_model)
    assert counted == [vocab.count(t) for t in texts]


def test_pyarrow_cannot_be_imported_in_a_llama_process():
    process = LlamaProcess()
    try:
        with pytest.raises(ImportError, match="must not be imported in a llama.cpp process"):
            process.call(schema.to_ipc_bytes, None)  # its module imports pyarrow
    finally:
        process.close()


@pytest.mark.parametrize("users", [None, "FASTEST_FIRST"])
def test_a_llama_process_counts_gpus_as_nvidia_smi_does_unless_told_otherwise(monkeypatch, users):
    """CUDA numbers GPUs fastest first by default and nvidia-smi by PCI bus: on a host of mixed GPUs a worker pinned
    with CUDA_VISIBLE_DEVICES=1 ran on one GPU and was sized (--engines auto) by another."""
    if users is None:
        monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", users)
    process = LlamaProcess()
    try:
        proc = Path("/proc") / str(process.pid)  # its environment once it runs Python (forked, it shows ours)
        wait_until(lambda: b"bulkembed.contract.llama_process" in (proc / "cmdline").read_bytes(), 30, "its exec")
        environ = dict(line.split(b"=", 1) for line in (proc / "environ").read_bytes().split(b"\0") if b"=" in line)
        assert environ[b"CUDA_DEVICE_ORDER"].decode() == (users or "PCI_BUS_ID")
    finally:
        process.close()


def test_an_error_in_a_llama_process_is_raised_as_itself(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelError, match="cannot read the vocabulary"):
        TokenCounter(bad)


def test_a_killed_llama_process_is_reported_with_how_it_died(tiny_model):
    counter = TokenCounter(tiny_model)
    os.kill(counter._process.pid, signal.SIGKILL)
    with pytest.raises(LlamaProcessDied, match=r"died of SIGKILL, a kill"):
        counter.count("hello")
    counter.close()


def test_a_llama_process_dies_with_its_parent_even_under_sigkill(tiny_model):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from bulkembed.contract.vocab import TokenCounter
        counter = TokenCounter({str(tiny_model)!r})
        print(counter._process.pid, flush=True)
        time.sleep(600)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_until(lambda: not alive(child), 10, "the llama process to die with its parent")


def test_run_keeps_llama_cpp_out_of_its_own_process(tmp_path, tiny_model):
    """`bulkembed run` reads and writes Arrow; its token counter and engines are llama processes."""
    corpus = write_corpus(tmp_path / "c.parquet", [f"d{i}" for i in range(40)], [f"text {i} " * (i + 1)
                                                                                 for i in range(40)])
    script = textwrap.dedent(f"""
        import sys
        from bulkembed.cli import main
        code = main(["run", {str(corpus)!r}, "--model", {str(tiny_model)!r}, "--out", {str(tmp_path / 'out')!r},
                     "--engines", "2", "--threads", "1", "--shard-tokens", "300", "--prefix", ""])
        print("exit", code, "llama_cpp" in sys.modules, "pyarrow" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-4:] == ["exit", "0", "False", "True"], done.stdout
    assert "40 rows" in done.stdout, done.stdout


def test_a_call_a_llama_process_cannot_read_is_an_error_and_it_lives_on(tiny_model):
    """An argument that would pull pyarrow into the llama process (a pyarrow table) is refused as an error reply;
    the process is not lost."""
    import pyarrow as pa

    from bulkembed.contract.vocab import _count_many

    with TokenCounter(tiny_model) as counter:
        with pytest.raises(ImportError, match="must not be imported in a llama.cpp process"):
            counter._process.call(_count_many, pa.table({"text": ["a"]}))
        assert counter.count("hello world") == Vocab.load(tiny_model).count("hello world")


def test_a_llama_process_dead_of_an_illegal_instruction_says_how_to_rebuild(tiny_model):
    """What a build with instructions the CPU lacks (llama.cpp's AMX path, docs/notes.md 28) looks like to a user: one
    line naming the signal, what it means and the command that rebuilds."""
    counter = TokenCounter(tiny_model)
    os.kill(counter._process.pid, signal.SIGILL)
    with pytest.raises(LlamaProcessDied) as died:
        counter.count("hello")
    counter.close()
    message = str(died.value)
    assert "\n" not in message
    assert re.search(r"died of SIGILL, an illegal instruction: .*AMX.*bash infra/install\.sh", message), message
