"""`bulkembed bench`: bulkembed against the raw decode ceiling and the real peers, by what each part measures:
inprocess (one resident model), engines (N engine processes), peers (llama-embedding, transformers)."""

from bulkembed.bench.cli import DEFAULT_MODES, MODES, add_bench_parser, cmd_bench, main
from bulkembed.bench.report import format_report

__all__ = ["DEFAULT_MODES", "MODES", "add_bench_parser", "cmd_bench", "format_report", "main"]
