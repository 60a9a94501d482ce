import numpy as np

from bulkembed.producer.planner import Document, ShardPlanner, length_class


def plan(lengths: list[int], budget: int) -> list[list[Document]]:
    planner = ShardPlanner(budget)
    shards = []
    for i, n in enumerate(lengths):
        ready = planner.add(Document(i, "x", n))
        if ready:
            shards.append(ready)
    shards.extend(planner.finish())
    return shards


def test_every_document_once_within_budget_and_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.lognormal(4, 1.2, 5000).astype(int) + 1]
    shards = plan(lengths, 4096)
    ids = sorted(d.id for s in shards for d in s)
    assert ids == list(range(len(lengths)))
    for shard in shards:
        tokens = sum(d.n_tokens for d in shard)
        assert tokens <= 4096 or len(shard) == 1, "over budget only for a single oversized document"
        assert len({length_class(d.n_tokens) for d in shard}) == 1, "one length class per shard"


def test_length_class():
    assert [length_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 512, 513)] == [0, 1, 2, 2, 3, 3, 4, 9, 10]


def test_memory_is_bounded_by_classes_times_budget():
    planner = ShardPlanner(1000)
    held = 0
    for i in range(100_000):
        planner.add(Document(i, "x", 1 + i % 300))
        held = max(held, sum(b.tokens for b in planner._buckets.values()))
    assert held <= 10 * 1000
