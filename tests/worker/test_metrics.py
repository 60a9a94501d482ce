import json
import urllib.request

from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.store import open_store
from tests.conftest import Workers, free_port, mixed_texts, write_corpus


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_worker_metrics_match_the_manifest(cli_env, tmp_path, run_cli, tiny_model):
    port = free_port()
    pool = Workers(cli_env | {"BULKEMBED_METRICS_PORT": str(port)}, tmp_path)
    try:
        pool.start(tiny_model)
        corpus = write_corpus(tmp_path / "c.parquet", [f"d{i}" for i in range(300)], mixed_texts(300, seed=9))
        done = run_cli("submit", corpus, "--model", tiny_model, "--out", tmp_path / "out", "--shard-tokens", "2000",
                       "--wait")
        assert done.returncode == 0, done.stderr[-2000:]
        samples = scrape(port)
    finally:
        pool.stop_all()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    shards = manifest_shards(open_store(str(tmp_path / "out"))).num_rows
    label = f'model="{tiny_model.name}"'
    assert samples[f"bulkembed_tokens_total{{{label}}}"] == manifest["tokens"]
    assert samples[f"bulkembed_rows_total{{{label}}}"] == manifest["rows"] == 300
    assert samples[f'bulkembed_shards_total{{{label},outcome="done"}}'] == shards
    assert samples[f"bulkembed_queue_wait_seconds_count{{{label}}}"] == shards
    assert samples[f"bulkembed_model_load_seconds{{{label}}}"] > 0
    assert samples[f"bulkembed_tokens_per_second{{{label}}}"] > 0
    assert samples[f"bulkembed_embed_seconds_total{{{label}}}"] > 0
