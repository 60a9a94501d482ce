import numpy as np

from bulkembed.producer.dedup import SeenIds, id_hashes


def test_finds_every_duplicate_across_and_within_batches():
    rng = np.random.default_rng(0)
    ids = [f"id-{x}" for x in rng.integers(0, 20_000, 60_000)]
    seen = SeenIds()
    got = np.concatenate([seen.add(id_hashes(ids[i:i + 777])) for i in range(0, len(ids), 777)])
    first = set()
    expected = []
    for x in ids:
        expected.append(x in first)
        first.add(x)
    assert got.tolist() == expected
    assert len(seen) == len(first)


def test_memory_is_eight_bytes_an_id():
    seen = SeenIds()
    for start in range(0, 1_000_000, 10_000):
        seen.add(np.arange(start, start + 10_000, dtype=np.int64))
    assert len(seen) == 1_000_000
    assert sum(r.nbytes for r in seen._runs) == 8 * 1_000_000
    assert len(seen._runs) <= 20, "runs merge: lookups stay a few binary searches"


def test_integer_ids_that_python_hashes_alike_are_not_duplicates():
    """hash(-1) == hash(-2) and hash(2**61 - 1) == hash(0) in CPython: as keys they would quarantine a row."""
    int64 = [-1, -2, 0, 2**61 - 1, 2**63 - 1, -(2**63)]
    uint64 = [0, 1, 2**61 - 1, 2**61, 2**63, 2**64 - 1]  # an Arrow column is one of the two, never both
    assert not SeenIds().add(id_hashes(int64)).any() and not SeenIds().add(id_hashes(uint64)).any()
    assert SeenIds().add(id_hashes([5, -2, 5, 2**64 - 1, 2**64 - 1])).tolist() == [False, False, True, False, True]
