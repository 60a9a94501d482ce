"""bulkembed: embed whole Parquet corpora with GGUF embedding models (producer → queue → worker → store).

llama.cpp runs only in llama processes of its own (contract.llama_process), never beside pyarrow; importing this
package loads neither.
"""

__version__ = "0.1.0"
