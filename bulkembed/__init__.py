"""bulkembed: embed whole Parquet corpora with GGUF embedding models (producer → queue → worker → store).

llama.cpp runs only in llama processes of its own (contract.llama_process), never beside pyarrow; importing this
package loads neither.
"""

__version__ = "0.1.0"

__all__ = ["Embedder", "embed"]


def __getattr__(name: str):
    """`bulkembed.Embedder` and `bulkembed.embed` (bulkembed.query), imported on first use."""
    if name in __all__:
        from bulkembed import query

        return getattr(query, name)
    raise AttributeError(f"module 'bulkembed' has no attribute {name!r}")
