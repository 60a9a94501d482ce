"""bulkembed: embed whole Parquet corpora with GGUF embedding models (producer → queue → worker → store)."""

__version__ = "0.1.0"
