"""The producer: read a Parquet corpus, count tokens exactly, cut token-budgeted shards, queue them."""
