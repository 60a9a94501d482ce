"""Exact token counts with the model's own vocabulary: a vocab-only load reads no weights.

`Vocab` is llama.cpp's tokenizer in this process (an engine's); the producer counts with `TokenCounter`, the
same vocabulary in a llama process of its own (contract.llama_process), since the producer reads Arrow.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import numpy as np

from bulkembed.contract.errors import ModelError

log = logging.getLogger(__name__)
_backend_ready = False
TAIL_SAMPLE = "a b c"
# A text of characters the vocabulary drops (BERT's WordPiece: U+FFFD, U+200B, control characters) counts only the
# framing ([CLS] [SEP]) and the prefix: it would be embedded as those alone, a vector of nothing.
NO_TOKENS = "no tokens: the model's vocabulary drops every character"


def init_llama() -> None:
    """Start llama.cpp once per process and keep its chatter out of the logs unless asked."""
    global _backend_ready
    if _backend_ready:
        return
    import llama_cpp

    if not os.environ.get("BULKEMBED_LLAMA_LOG"):
        _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
        init_llama._callback = _silence  # keep the callback alive as long as the process
        llama_cpp.llama_log_set(_silence, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _backend_ready = True


class Vocab:
    """Tokenizer of a loaded llama model (its own, or a vocab-only load of the file)."""

    def __init__(self, vocab_ptr: object, owner: object = None):
        import llama_cpp

        self._llama = llama_cpp
        self._vocab = vocab_ptr
        self._owner = owner  # the model the vocab belongs to must outlive it
        self._buffer = (llama_cpp.llama_token * 4096)()

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        import llama_cpp

        init_llama()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelError(f"llama.cpp cannot read the vocabulary of {path}")
        vocab = cls(llama_cpp.llama_model_get_vocab(model), owner=_ModelHandle(model))
        return vocab

    @property
    def n_tokens(self) -> int:
        return self._llama.llama_vocab_n_tokens(self._vocab)

    def count(self, text: str, special: bool = True) -> int:
        data = text.encode("utf-8")
        n = self._llama.llama_tokenize(self._vocab, data, len(data), None, 0, special, False)
        return -n if n < 0 else n

    def tokenize(self, text: str, special: bool = True) -> np.ndarray:
        """Token ids as int32, framed by the special tokens the model's tokenizer adds to every text (BOS, EOS,
        [CLS], [SEP]) unless `special` is off; special-token text in a document stays text (parse_special off)."""
        data = text.encode("utf-8")

        def fill() -> int:  # the number of tokens, negated when the buffer is too small for them
            return self._llama.llama_tokenize(self._vocab, data, len(data), self._buffer, len(self._buffer), special,
                                              False)

        n = fill()
        if n < 0:
            self._buffer = (self._llama.llama_token * (-n + 1024))()
            n = fill()
        return np.ctypeslib.as_array(self._buffer)[:n].astype(np.int32)

    @functools.cached_property
    def tail(self) -> int:
        """How many special tokens close every text (EOS, [SEP]): found by tokenizing a sample with and without
        them, so it is what this llama.cpp does, not what the header says it should."""
        framed, bare = self.tokenize(TAIL_SAMPLE).tolist(), self.tokenize(TAIL_SAMPLE, special=False).tolist()
        for head in range(len(framed) - len(bare) + 1):
            if framed[head:head + len(bare)] == bare:
                return len(framed) - head - len(bare)
        log.warning("cannot tell where this tokenizer's special tokens go; cut rows keep none after the cut")
        return 0


class TokenCounter:
    """Exact token counts for the producer, from a vocab-only load in a llama process beside it."""

    def __init__(self, path: str | Path):
        from bulkembed.contract.llama_process import start

        self._process, self.tail = start(_load_vocab, str(path))

    def count_many(self, texts: list[str], special: bool = True) -> list[int]:
        """One round trip for a whole batch: counting a row costs microseconds, a call across processes more."""
        return self._process.call(_count_many, texts, special) if texts else []

    def count(self, text: str) -> int:
        return self.count_many([text])[0]

    def close(self) -> None:
        self._process.close()

    def __enter__(self) -> TokenCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COUNTER_VOCAB: Vocab | None = None  # in a counter's llama process


def _load_vocab(path: str) -> int:
    """The vocabulary's `tail`, which the producer's spans need."""
    global _COUNTER_VOCAB
    _COUNTER_VOCAB = Vocab.load(path)
    return _COUNTER_VOCAB.tail


def _count_many(texts: list[str], special: bool = True) -> list[int]:
    return [_COUNTER_VOCAB.count(text, special) for text in texts]


class _ModelHandle:
    """Frees a llama_model when the last Python reference goes."""

    def __init__(self, model: object):
        import llama_cpp

        self.model, self._llama = model, llama_cpp  # kept: at interpreter exit imports fail

    def __del__(self) -> None:
        if self.model:
            self._llama.llama_model_free(self.model)
            self.model = None
