from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bulkembed.producer import dedup
from bulkembed.producer.corpus import Corpus
from bulkembed.producer.dedup import (
    RESULT_SCHEMA,
    ROW_BITS,
    SeenIds,
    duplicates_between,
    find_duplicates,
    id_batches,
    ordinal,
    source_of,
)


def write_corpus(folder: Path, files: list[pa.Array], row_group_size: int = 1000) -> Corpus:
    """One Parquet file per array of ids (plus a text column the pre-pass must not need), several row groups each."""
    listed = []
    for index, ids in enumerate(files):
        path = folder / f"part-{index}.parquet"
        pq.write_table(pa.table({"text": pa.array(["x"] * len(ids)), "id": ids}), path, row_group_size=row_group_size)
        listed.append((str(path), path.stat().st_size, ""))
    return Corpus(fs=pafs.LocalFileSystem(), files=listed, id_type=files[0].type)


def reference(files: list[pa.Array]) -> list[tuple[int, int]]:
    """(ordinal, first) of every duplicate, by a plain dict of the first ordinal of each id."""
    first: dict = {}
    found = []
    for index, ids in enumerate(files):
        for row, value in enumerate(ids.to_pylist()):
            if value is None:
                continue
            place = ordinal(index, row)
            if value in first:
                found.append((place, first[value]))
            else:
                first[value] = place
    return found


def run(tmp_path: Path, files: list[pa.Array], **kwargs) -> tuple[int, list[tuple[int, int]]]:
    corpus = write_corpus(tmp_path, files)
    out = tmp_path / "out" / "duplicates.parquet"
    count = find_duplicates(id_batches(corpus, "id"), corpus.id_type, out, tmp_path / "work", **kwargs)
    table = pq.read_table(out)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in RESULT_SCHEMA], table.schema
    assert not list((tmp_path / "work").iterdir()), "the temporary database is removed"
    return count, list(zip(table.column("ordinal").to_pylist(), table.column("first").to_pylist(), strict=True))


def test_ordinals_keep_corpus_order_and_give_back_their_source():
    assert ordinal(0, 5) < ordinal(0, 6) < ordinal(1, 0) < ordinal(2, 0)
    assert source_of(ordinal(3, 12345)) == (3, 12345)
    assert source_of(ordinal(2**23 - 1, 2**ROW_BITS - 1)) == (2**23 - 1, 2**ROW_BITS - 1)
    assert ordinal(2**23 - 1, 2**ROW_BITS - 1) == 2**63 - 1, "the largest ordinal is still an int64"
    for bad in [(0, 2**ROW_BITS), (2**23, 0), (-1, 0), (0, -1)]:
        with pytest.raises(ValueError):
            ordinal(*bad)


def test_id_batches_read_the_id_column_with_ordinals_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "ID_BATCH_ROWS", 700)
    files = [pa.array(range(2500), pa.int32()), pa.array([], pa.int32()), pa.array(range(10), pa.int32())]
    batches = list(id_batches(write_corpus(tmp_path, files), "id"))
    assert all(b.schema.names == ["id", "ordinal"] and b.schema.field("ordinal").type == pa.int64() for b in batches)
    assert all(b.schema.field("id").type == pa.int32() and b.num_rows <= 700 for b in batches)
    table = pa.Table.from_batches(batches)
    assert table.column("id").to_pylist() == list(range(2500)) + list(range(10))
    expected = [ordinal(0, r) for r in range(2500)] + [ordinal(2, r) for r in range(10)]
    assert table.column("ordinal").to_pylist() == expected


@pytest.mark.parametrize("id_type", [pa.int64(), pa.int32(), pa.uint64()])
def test_random_integer_ids_exactly(tmp_path, id_type, monkeypatch):
    monkeypatch.setattr(dedup, "ID_BATCH_ROWS", 1500)
    rng = np.random.default_rng(1)
    files = [pa.array(rng.integers(0, 3000, n), id_type) for n in (4000, 2500, 1, 3333)]
    count, found = run(tmp_path, files)
    expected = reference(files)
    assert found == expected and count == len(expected)
    assert count > 5000, "many duplicates, within and across files"


@pytest.mark.parametrize("id_type", [pa.string(), pa.large_string()])
def test_random_string_ids_with_nulls_exactly(tmp_path, id_type):
    rng = np.random.default_rng(2)
    files = []
    for n in (3000, 1700, 2600):
        values = [f"doc-{x}" if x % 7 else None for x in rng.integers(0, 2500, n)]
        files.append(pa.array(values, id_type))
    count, found = run(tmp_path, files)
    expected = reference(files)
    assert found == expected and count == len(expected)
    assert sum(f.null_count for f in files) > 500 and count > 3000


def test_string_keys_that_collide_are_still_told_apart(tmp_path, monkeypatch):
    """Exactness never rests on the hash: with a key that collides for most ids, the answer is the same."""
    monkeypatch.setattr(dedup, "STRING_KEY", "octet_length(id) % 2")
    rng = np.random.default_rng(5)
    files = [pa.array([f"d{x}" for x in rng.integers(0, 900, n)]) for n in (700, 800)]
    count, found = run(tmp_path, files)
    assert found == reference(files) and count == len(found) > 500


def test_the_first_row_wins_and_nulls_are_never_duplicates(tmp_path):
    files = [pa.array([5, 7, 5, None]), pa.array([7, 5, None, 9, None]), pa.array([9])]
    count, found = run(tmp_path, files)
    assert found == [
        (ordinal(0, 2), ordinal(0, 0)),
        (ordinal(1, 0), ordinal(0, 1)),
        (ordinal(1, 1), ordinal(0, 0)),
        (ordinal(2, 0), ordinal(1, 3)),
    ]
    assert count == 4


def test_integers_that_hash_alike_are_not_duplicates(tmp_path):
    """hash(-1) == hash(-2) and hash(2**61 - 1) == hash(0) in CPython; ids are compared, never hashed."""
    ids = [-1, -2, 0, 2**61 - 1, 2**63 - 1, -(2**63), 2**61 - 1]
    count, found = run(tmp_path, [pa.array(ids, pa.int64())])
    assert found == [(ordinal(0, 6), ordinal(0, 3))] and count == 1


def test_uint64_ids_near_two_to_the_64(tmp_path):
    ids = [2**64 - 1, 2**64 - 2, 2**63, 2**63 - 1, 0, 1, 2**64 - 1, 2**63]
    count, found = run(tmp_path, [pa.array(ids, pa.uint64())])
    assert found == [(ordinal(0, 6), ordinal(0, 0)), (ordinal(0, 7), ordinal(0, 2))] and count == 2


def test_string_ids_that_are_not_utf8_are_compared_as_bytes(tmp_path):
    """Parquet does not check UTF-8; such an id is still an id, not a failed pre-pass."""
    raw = pa.array([b"\xff\xfe", b"ok", b"\xff", b"\xff\xfe"], pa.binary()).view(pa.string())
    count, found = run(tmp_path, [raw])
    assert found == [(ordinal(0, 3), ordinal(0, 0))] and count == 1


@pytest.mark.parametrize("ids", [pa.array(range(5000)), pa.array([None, None], pa.string())], ids=["unique", "nulls"])
def test_no_duplicates_still_writes_a_readable_file(tmp_path, ids):
    count, found = run(tmp_path, [ids])
    assert count == 0 and found == []
    ordinals, firsts = duplicates_between(tmp_path / "out" / "duplicates.parquet", 0, 2**63 - 1)
    assert ordinals.dtype == firsts.dtype == np.int64 and len(ordinals) == len(firsts) == 0


def test_no_batches_at_all(tmp_path):
    out = tmp_path / "duplicates.parquet"
    assert find_duplicates([], pa.string(), out, tmp_path / "work") == 0
    assert pq.read_table(out).num_rows == 0


def test_duplicates_between_reads_exactly_a_range_and_only_its_row_groups(tmp_path):
    rng = np.random.default_rng(3)
    files = [pa.array(rng.integers(0, 20_000, n)) for n in (150_000, 90_000, 10)]
    corpus = write_corpus(tmp_path, files, row_group_size=50_000)
    out = tmp_path / "out" / "duplicates.parquet"
    count = find_duplicates(id_batches(corpus, "id"), corpus.id_type, out, tmp_path / "work")
    expected = reference(files)
    assert count == len(expected) > 200_000

    metadata = pq.read_metadata(out)
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert max(sizes) <= dedup.RESULT_ROW_GROUP and sum(sizes) == count and len(sizes) >= 4

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # as Store.arrow_fs() gives: fs and a path
    places = np.array([o for o, _ in expected])
    ranges = [(0, 2**63 - 1), (ordinal(0, 0), ordinal(1, 0)), (ordinal(1, 0), ordinal(2, 0)),
              (ordinal(0, 70_000), ordinal(1, 20_000)), (ordinal(2, 0), ordinal(2, 5)), (ordinal(2, 5), ordinal(3, 0)),
              (ordinal(0, 10), ordinal(0, 10))]
    ranges += [tuple(sorted(rng.choice(places, 2))) for _ in range(10)]
    for lo, hi in ranges:
        ordinals, firsts = duplicates_between("out/duplicates.parquet", int(lo), int(hi), filesystem=fs)
        subset = [(o, f) for o, f in expected if lo <= o < hi]
        assert list(zip(ordinals.tolist(), firsts.tolist(), strict=True)) == subset

    # sorted by ordinal, with statistics: a narrow range touches one or two row groups, not the file
    fragment = next(ds.dataset(out, format="parquet").get_fragments())
    narrow = (pc.field("ordinal") >= ordinal(1, 20_000)) & (pc.field("ordinal") < ordinal(1, 20_100))
    assert 1 <= len(fragment.split_by_row_group(narrow)) <= 2


def _find_in_a_fresh_process(corpus: Corpus, folder: str, memory_limit_mb: int) -> tuple[int, int]:
    """The count, and this process's peak RSS in KiB: the pre-pass's alone."""
    count = find_duplicates(id_batches(corpus, "id"), corpus.id_type, Path(folder) / "dups.parquet",
                            Path(folder) / "work", memory_limit_mb=memory_limit_mb)
    status = Path("/proc/self/status").read_text().splitlines()
    return count, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def test_a_larger_corpus_within_a_small_memory_limit_exactly(tmp_path):
    rng = np.random.default_rng(4)
    files = [pa.array(rng.integers(0, 4_000_000, 2_500_000)) for _ in range(2)]
    corpus = write_corpus(tmp_path, files, row_group_size=500_000)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        count, peak_kib = pool.submit(_find_in_a_fresh_process, corpus, str(tmp_path), 64).result(timeout=300)

    ids = np.concatenate([f.to_numpy() for f in files])
    places = np.concatenate([ordinal(i, 0) + np.arange(len(f), dtype=np.int64) for i, f in enumerate(files)])
    _, first_index, inverse = np.unique(ids, return_index=True, return_inverse=True)
    firsts = places[first_index][inverse]
    duplicate = places != firsts
    table = pq.read_table(tmp_path / "dups.parquet")
    assert count == duplicate.sum() == table.num_rows > 1_000_000
    assert np.array_equal(table.column("ordinal").to_numpy(), places[duplicate])
    assert np.array_equal(table.column("first").to_numpy(), firsts[duplicate])
    # measured (DuckDB 2.0.1): ~270 MiB at 64 MB (~95 of it the interpreter, numpy, pyarrow and duckdb loaded),
    # ~430 at 256 MB, ~490 without a limit
    assert peak_kib / 1024 < 360, f"peak RSS {peak_kib / 1024:.0f} MiB: the memory limit is not honoured"


def test_seen_ids_finds_every_duplicate_across_and_within_batches():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 20_000, 60_000)
    seen = SeenIds()
    got = np.concatenate([seen.add(keys[i:i + 777]) for i in range(0, len(keys), 777)])
    first = set()
    expected = []
    for x in keys.tolist():
        expected.append(x in first)
        first.add(x)
    assert got.tolist() == expected
    assert len(seen) == len(first)


def test_seen_ids_memory_is_eight_bytes_an_id():
    seen = SeenIds()
    for start in range(0, 1_000_000, 10_000):
        seen.add(np.arange(start, start + 10_000, dtype=np.int64))
    assert len(seen) == 1_000_000
    assert sum(r.nbytes for r in seen._runs) == 8 * 1_000_000
    assert len(seen._runs) <= 20, "runs merge: lookups stay a few binary searches"
