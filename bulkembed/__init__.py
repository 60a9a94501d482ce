"""bulkembed: embed whole Parquet corpora with GGUF embedding models (producer → queue → worker → store)."""

try:
    # llama.cpp's libraries load before anything imports numpy: the other order crashed model loads in a CUDA
    # image (NOTES.md 25). Loading them starts no GPU context, so Celery may still fork engines afterwards.
    import llama_cpp  # noqa: F401
except ImportError:  # the package is usable for planning-only tools without it
    pass

__version__ = "0.1.0"
