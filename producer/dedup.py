"""Duplicate ids across a whole corpus at 8 bytes an id: 64-bit hashes in sorted numpy runs.

A Python set costs ~70 bytes an id (600 MB for 10M documents); sorted runs cost 8. Runs merge
when a newer one grows to half the size of the one before it (a log-structured merge), so
insertion stays O(n log n) overall and a lookup is a binary search per run. Any fixed-size numpy
key works: --reuse keeps 16-byte (id, content) keys the same way (producer/reuse.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def id_hashes(ids: Iterable[Any]) -> np.ndarray:
    """64-bit keys, equal for equal ids. Integer ids (Arrow's int64 and uint64, as Python ints) are their own key,
    so two of them never collide: Python's hash() maps -1 and -2 alike, and ints 2**61 - 1 apart. Other ids (str,
    bytes) get Python's SipHash, 64 bits: at 10**9 of them a ~2.7% chance that some pair collides."""
    values = list(ids)
    if values and all(type(v) is int for v in values):  # one Arrow column: all ints or none
        return np.array([v - (1 << 64) if v >= 1 << 63 else v for v in values], np.int64)  # uint64: wrap, still 1:1
    return np.fromiter((hash(i) for i in values), np.int64, count=len(values))


class SeenIds:
    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Mark each hash as a duplicate (seen before, or earlier in this batch) and remember the rest."""
        duplicate = np.zeros(len(hashes), bool)
        if not len(hashes):
            return duplicate
        _, first = np.unique(hashes, return_index=True)
        duplicate[:] = True
        duplicate[first] = False  # the first occurrence in the batch is not a duplicate of the batch
        duplicate |= self.contains(hashes)
        if not duplicate.all():  # an empty run would break the searches above
            self._runs.append(np.sort(hashes[~duplicate]))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            newest = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newest]), kind="mergesort")
        return duplicate

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` were added before (a lookup only: nothing is remembered)."""
        found = np.zeros(len(hashes), bool)
        for run in self._runs:
            where = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[where] == hashes
        return found

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._runs)
