"""`python -m bulkembed.bench`: how the bench runs on a GPU machine. Its in-process modes run llama.cpp in this
process, so llama.cpp's libraries load before numpy: the other order crashed model loads on a CUDA image
(docs/notes.md 25). It imports pyarrow only to read a --corpus."""

import sys

try:
    import llama_cpp  # noqa: F401
except ImportError:
    pass

from bulkembed.bench.cli import main  # noqa: E402

sys.exit(main())
