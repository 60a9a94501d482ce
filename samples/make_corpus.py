"""Write samples/corpus.parquet: a small mixed-length corpus for `bulkembed run` (deterministic)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SENTENCES = [
    "A beautiful sunset over the beach turns the sea orange and pink.",
    "Embedding models map text to vectors so that similar meanings land close together.",
    "The L4 GPU offers 24 GB of memory and is cheap to rent in most clouds.",
    "Mean pooling averages the hidden states of every token in a document.",
    "Quantization trades a little accuracy for much smaller and faster models.",
    "Redis keeps the queue of shards; Celery workers take one shard at a time.",
    "Parquet stores columns together, which makes reading a single text column fast.",
    "A causal language model only lets each token attend to the tokens before it.",
    "Matryoshka embeddings can be truncated to fewer dimensions and stay useful.",
    "The river flooded the valley after three days of heavy rain in early spring.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The treaty was signed in the city hall in front of two hundred guests.",
    "def add(a, b):\n    return a + b",
    "SELECT id, title FROM papers WHERE year > 2020 ORDER BY citations DESC;",
    "Un beau coucher de soleil sur la plage.",
    "海滩上美丽的日落。",
    "浜辺に沈む美しい夕日。",
    "Ein wunderschöner Sonnenuntergang am Strand.",
    "The committee will publish its final report at the end of the quarter.",
    "Bread rises because yeast produces carbon dioxide while it ferments sugar.",
]


def main() -> None:
    ids, texts = [], []
    for i in range(120):
        n = 1 + (i * 7) % 12  # 1 to 12 sentences: short and long documents mixed
        texts.append(" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(n)))
        ids.append(f"doc-{i:04d}")
    table = pa.table({"id": ids, "text": texts})
    pq.write_table(table, Path(__file__).with_name("corpus.parquet"))


if __name__ == "__main__":
    main()
