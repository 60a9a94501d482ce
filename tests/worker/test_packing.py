import numpy as np
import pytest

from bulkembed.worker.packing import (
    DECODE_MULTIPLE,
    MAX_SEQUENCES,
    MIN_DECODE_TOKENS,
    ContextShape,
    choose_shape,
    plan_decodes,
)


def check_plan(lengths: list[int], shape: ContextShape) -> int:
    covered = [np.zeros(n, int) for n in lengths]
    in_flight: dict[int, int] = {}  # seq -> doc
    reserved = 0
    steps = 0
    for pieces in plan_decodes(lengths, shape):
        steps += 1
        assert 0 < sum(p.stop - p.start for p in pieces) <= shape.n_ubatch
        assert len({p.seq for p in pieces}) == len(pieces), "one piece per sequence per decode"
        for p in pieces:
            assert 0 <= p.seq < shape.n_seq_max
            if p.start == 0:
                assert p.seq not in in_flight, "a slot is reused only after its document finished"
                in_flight[p.seq] = p.doc
                reserved += lengths[p.doc]
            else:
                assert in_flight[p.seq] == p.doc
                assert covered[p.doc][p.start - 1] == 1, "pieces continue where the last one stopped"
            covered[p.doc][p.start:p.stop] += 1
            assert p.last == (p.stop == lengths[p.doc])
        assert reserved <= shape.n_ctx, "the KV cache holds every document in flight"
        for p in pieces:
            if p.last:
                del in_flight[p.seq]
                reserved -= lengths[p.doc]
    assert all((c == 1).all() for c in covered), "every token exactly once"
    assert not in_flight
    return steps


@pytest.mark.parametrize("seed", range(5))
def test_every_token_once_and_ubatches_full(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in np.where(rng.random(300) < 0.1, rng.integers(200, 2000, 300),
                                        rng.integers(1, 80, 300))]
    shape = choose_shape(lengths, 128)
    steps = check_plan(lengths, shape)
    # Packing keeps ubatches full: at most one partly filled decode per long-document tail, roughly.
    assert steps <= -(-sum(lengths) // shape.n_ubatch) * 1.1 + 2


@pytest.mark.parametrize("seed", range(3))
def test_at_most_one_document_is_in_flight_between_decodes(seed):
    """What keeps a split document's KV cells in position order within n_ctx (packing's docstring): the document
    carried into the next decode is alone, and that decode's first."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 900, 400)]
    shape = choose_shape(lengths, 128, min_decode=MIN_DECODE_TOKENS)
    carried = None
    for pieces in plan_decodes(lengths, shape):
        if carried is not None:
            assert pieces[0].doc == carried
        unfinished = [p.doc for p in pieces if not p.last]
        assert len(unfinished) <= 1
        carried = unfinished[0] if unfinished else None


def test_padded_decodes_are_a_multiple_of_16_tokens_from_64():
    shape = choose_shape([5, 300], 512, min_decode=MIN_DECODE_TOKENS)
    for n in (1, 63, 64, 65, 80, 300, 305, 512):
        padded = n + shape.padding(n)
        assert padded % DECODE_MULTIPLE == 0 and padded <= shape.n_ubatch
        assert padded == MIN_DECODE_TOKENS if n <= MIN_DECODE_TOKENS else padded - n < DECODE_MULTIPLE
    assert choose_shape([5, 300], 512).padding(5) == 0, "a shape without min_decode never pads"
    odd = choose_shape([300] * 10, 500, min_decode=MIN_DECODE_TOKENS)
    assert odd.n_ubatch == 496 and odd.padding(496) == 0, "a cap of 500 gives full decodes of a multiple of 16"
    assert choose_shape([300] * 10, 500).n_ubatch == 500, "unpadded, the cap stands"
    seventy = choose_shape([5, 300], 512, min_decode=70)
    assert seventy.min_decode == 80 and seventy.padding(5) == 75 and seventy.padding(300) == 4


def test_choose_shape():
    shape = choose_shape([10, 20, 900], 512)
    assert shape.n_ubatch == 512 and shape.n_seq_max == MAX_SEQUENCES
    assert shape.n_ctx >= 900 + 512 and shape.n_ctx % 256 == 0
    small = choose_shape([3, 4], 512)
    assert small.n_ubatch == 32, "a tiny shard does not get a big ubatch"
    odd = choose_shape([5] * 100, 500)
    assert odd.n_ubatch == 500 and 500 % odd.n_seq_max == 0


def test_more_documents_than_sequences():
    lengths = [1] * 1000
    shape = ContextShape(n_ctx=512, n_ubatch=256, n_seq_max=8)
    assert check_plan(lengths, shape) == 125


def test_rejects_documents_that_do_not_fit():
    with pytest.raises(ValueError):
        list(plan_decodes([600], ContextShape(n_ctx=512, n_ubatch=64, n_seq_max=64)))
    with pytest.raises(ValueError):
        list(plan_decodes([0, 4], ContextShape(n_ctx=512, n_ubatch=64, n_seq_max=64)))


@pytest.mark.parametrize("seed", range(3))
def test_non_causal_documents_stay_whole(seed):
    """A non-causal model's document is one piece in one decode, and the ubatch holds the longest one."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in np.where(rng.random(200) < 0.1, rng.integers(100, 500, 200),
                                        rng.integers(1, 60, 200))]
    shape = choose_shape(lengths, 64, causal=False)
    assert not shape.causal and shape.n_ubatch >= max(lengths) and shape.n_ubatch % shape.n_seq_max == 0
    assert shape.n_batch == 0
    check_plan(lengths, shape)
    for pieces in plan_decodes(lengths, shape):
        assert all(p.start == 0 and p.last for p in pieces), "never split"


def test_non_causal_shape_refuses_a_document_over_its_decode():
    with pytest.raises(ValueError, match="may not be split"):
        list(plan_decodes([100], ContextShape(n_ctx=512, n_ubatch=64, n_seq_max=64, causal=False)))
    assert choose_shape([5, 6], 512, causal=False).n_ubatch == 32, "short shards still get a small ubatch"
    assert choose_shape([5, 6], 512, n_batch=1024, causal=False).n_batch == 0, "never a decode over the ubatch"
