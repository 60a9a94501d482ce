import os

import boto3
import numpy as np
import pytest

from bulkembed.contract.schema import content_hash
from bulkembed.producer.corpus import open_corpus
from bulkembed.producer.dedup import SeenIds
from bulkembed.producer.reuse import ROW_KEY, row_keys
from tests.conftest import write_corpus


def test_content_hash_is_blake2b_128_of_the_utf8_prefixed_text():
    # Pinned: outputs written today must match rows of later versions (the README documents this hash).
    assert content_hash("Passage: hello").hex() == "0da09e676dd1956bfb1b3159349002f3"
    assert content_hash("Passage: héllo") != content_hash("Passage: hello")
    assert len(content_hash("")) == 16


def test_row_keys_tell_ids_and_id_types_and_contents_apart():
    h, g = content_hash("a"), content_hash("b")
    keys = row_keys([1, "1", 1, 2], [h, h, g, h])
    assert keys.dtype == ROW_KEY and len(set(keys.tolist())) == 4
    assert np.array_equal(row_keys([1], [h]), keys[:1]), "the same row gives the same key"
    assert len(row_keys([], [])) == 0


def test_reuse_index_finds_exactly_the_keys_added_at_16_bytes_a_row():
    rng = np.random.default_rng(0)
    keys = np.frombuffer(rng.bytes(16 * 200_000), ROW_KEY)
    index = SeenIds()
    for start in range(0, len(keys), 7_000):
        index.add(keys[start:start + 7_000])
    assert index.nbytes == 16 * len(keys)
    others = np.frombuffer(rng.bytes(16 * 50_000), ROW_KEY)
    assert index.contains(keys[::3]).all()
    assert not index.contains(others).any()
    # Keys whose bytes differ after a zero byte, or only in trailing zeros, stay apart.
    zeros = np.array([b"a\x00b" + bytes(13), b"a\x00c" + bytes(13)], ROW_KEY)
    index.add(zeros[:1])
    assert index.contains(zeros).tolist() == [True, False]


def test_a_batch_of_only_duplicates_does_not_break_later_batches():
    seen = SeenIds()
    assert not seen.add(np.array([1, 2, 3])).any()
    assert seen.add(np.array([2])).all()
    assert seen.add(np.array([4, 2])).tolist() == [False, True]


def test_a_local_file_replaced_by_one_of_the_same_size_is_a_new_input(tmp_path):
    path = write_corpus(tmp_path / "c.parquet", ["a", "b"], ["one", "two"])
    before = open_corpus(str(path), "id", "text").fingerprint
    size = path.stat().st_size
    write_corpus(path, ["a", "b"], ["uno", "two"])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert path.stat().st_size == size
    assert open_corpus(str(path), "id", "text").fingerprint != before
    assert open_corpus(str(path), "id", "text").fingerprint == open_corpus(str(path), "id", "text").fingerprint


def test_an_s3_object_replaced_by_one_of_the_same_size_is_a_new_input(tmp_path, bucket):
    s3 = boto3.client("s3")
    first = write_corpus(tmp_path / "1.parquet", ["a", "b"], ["one", "two"]).read_bytes()
    second = write_corpus(tmp_path / "2.parquet", ["a", "b"], ["uno", "two"]).read_bytes()
    assert len(first) == len(second) and first != second
    s3.put_object(Bucket=bucket, Key="in/part.parquet", Body=first)
    uri = f"s3://{bucket}/in"
    before = open_corpus(uri, "id", "text").fingerprint
    assert open_corpus(uri, "id", "text").fingerprint == before
    s3.put_object(Bucket=bucket, Key="in/part.parquet", Body=second)
    assert open_corpus(uri, "id", "text").fingerprint != before


@pytest.mark.parametrize("text", ["Passage: hello", "Query: 日本語"])
def test_content_hash_matches_hashlib(text):
    import hashlib

    assert content_hash(text) == hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
