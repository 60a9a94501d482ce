"""Several engines per worker: N engine processes on one queue, the ubatch probe and its cache."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as ds
import pytest

from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.model import file_sha256
from bulkembed.contract.store import open_store
from bulkembed.worker import probe
from bulkembed.worker.engine import Engine, EngineOptions
from bulkembed.worker.engines import EnginePool, EngineSetup
from bulkembed.worker.hold import ENGINE_STARTS
from bulkembed.worker.selftest import MIN_COSINE
from tests.conftest import REPO, cosines, free_port, mixed_texts, write_corpus
from tests.faults_support import RECEIVED, Holds, alive, check_exactly_once, wait_until
from tests.worker.test_metrics import scrape


def engine_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"pool process (\d+) ready", log)]


def engine_process_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"in engine process (\d+)", log)]


def shards_by_process(log: str) -> dict[int, int]:
    """Shards each process embedded, from the `[pid] ... job J shard S: N rows` lines."""
    counts: dict[int, int] = {}
    for pid in re.findall(r"\[(\d+)\] bulkembed\.worker\.shard: job \w+ shard \d+: \d+ rows", log):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def status(env: dict[str, str], job_id: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bulkembed.cli", "status", job_id, "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def test_engines_share_a_queue_and_one_killed_loses_nothing(cli_env, workers, tmp_path, tiny_model,
                                                            reference_embedder):
    """Two engines take shards side by side; one is killed (-9) mid-job: Celery replaces it, its shard comes
    back, the job completes with every row once and exact; one metrics endpoint counts every engine."""
    port = free_port()
    env = cli_env | {"BULKEMBED_METRICS_PORT": str(port), "BULKEMBED_PROBE_CACHE": str(tmp_path / "probe.json")}
    workers.env = env
    worker = workers.start(tiny_model, "--engines", "2", "--ubatch", "probe")
    wait_until(lambda: len(engine_pids(worker.log.read_text())) >= 2, 60, "two engines")
    ids = [f"d{i}" for i in range(1500)]
    texts = mixed_texts(len(ids), seed=11)
    corpus = write_corpus(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    submit = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model",
                               str(tiny_model), "--out", str(out), "--shard-tokens", "1500", "--wait"], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = submit.stdout.readline().strip()
    # Killed as soon as two shards are done (planning may still be going on: waiting for it let a loaded machine finish
    # every shard first); the manifest says afterwards how many there were.
    progress = wait_until(lambda: (s := status(env, job_id)) and s["shards_done"] >= 2 and s, 120, "two shards done")
    victim = engine_pids(worker.log.read_text())[0]
    os.kill(victim, signal.SIGKILL)
    assert submit.wait(300) == 0, submit.stderr.read()[-3000:]

    manifest = check_exactly_once(str(out), ids)
    assert progress["shards_done"] < manifest["shard_count"], "killed while shards were left"
    table = ds.dataset(str(out), format="arrow").to_table().sort_by("id")
    sample = np.random.default_rng(0).choice(table.num_rows, 150, replace=False)
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)[sample])
    by_id = dict(zip(ids, texts, strict=True))
    want = reference_embedder(["Passage: " + by_id[table.column("id")[int(i)].as_py()] for i in sample])
    assert cosines(got, want).min() >= 0.9999

    # Celery replaces the killed pool process; the new one is ready once it has loaded the model, which on a loaded
    # machine can be after the other engine has finished the job.
    wait_until(lambda: len(engine_pids(worker.log.read_text())) >= 3, 120, "the killed engine replaced")
    log = worker.log.read_text()
    assert len([p for p, n in shards_by_process(log).items() if n > 0]) >= 2, "both engines embedded shards"
    samples = scrape(port)
    label = f'model="{tiny_model.name}"'
    # The killed engine may have written a shard without counting it (its redelivery then finds it written), or
    # counted one it did not finish (and another engine redoes it): one shard's tokens either way, at most.
    largest = max(manifest_shards(open_store(str(out))).column("tokens").to_pylist())
    assert abs(samples[f"bulkembed_tokens_total{{{label}}}"] - manifest["tokens"]) <= largest
    assert samples[f"bulkembed_engines{{{label}}}"] == 2
    cached = json.loads((tmp_path / "probe.json").read_text())
    assert samples[f"bulkembed_ubatch{{{label}}}"] == next(iter(cached.values()))["ubatch"]


def test_an_engine_process_killed_takes_its_pool_process_and_loses_nothing(cli_env, workers, tmp_path, tiny_model):
    """A pool process's engine (its llama process) is killed -9 mid-job, as the OOM killer would: the pool process
    exits with it, Celery hands the shard back and starts both anew, and the job completes with every row once."""
    worker = workers.start(tiny_model, "--engines", "1")
    ids = [f"d{i}" for i in range(1500)]
    corpus = write_corpus(tmp_path / "c.parquet", ids, mixed_texts(len(ids), seed=12))
    out = tmp_path / "out"
    submit = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model",
                               str(tiny_model), "--out", str(out), "--shard-tokens", "1500", "--wait"], env=cli_env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = submit.stdout.readline().strip()
    progress = wait_until(lambda: (s := status(cli_env, job_id)) and s["shards_done"] >= 2 and s["totals"] and s, 120,
                          "two shards done")
    victim = engine_process_pids(worker.log.read_text())[0]
    os.kill(victim, signal.SIGKILL)
    assert progress["shards_done"] < progress["totals"]["shards"], "killed while shards were left"
    assert submit.wait(300) == 0, submit.stderr.read()[-3000:]

    check_exactly_once(str(out), ids)
    log = worker.log.read_text()
    # Found dead mid-shard ("died (killed by signal 9)") or at the next shard's start ("died before this shard").
    assert re.search(rf"llama\.cpp process {victim} died .*; this pool process exits", log), log[-3000:]
    assert len(engine_process_pids(log)) >= 2, "a new pool process started a new engine"


def test_a_replacement_engine_may_load_for_longer_than_celerys_default(cli_env, workers, tmp_path, tiny_model,
                                                                         run_cli):
    """Celery kills a new pool process that is not up within worker_proc_alive_timeout (4 s by default), and a real
    model loads for longer. The pool process that replaces a killed one is held before its engine starts for 8 s,
    as a slow load would: it is left to finish, and the worker embeds again."""
    holds = Holds(tmp_path / "held")
    (holds.folder / ENGINE_STARTS).touch()
    workers.env = cli_env | holds.env
    holds.auto_release()  # shards go on; engine starts stay held until released here
    try:
        worker = workers.start(tiny_model, "--engines", "1", wait=False)
        starts = holds.folder.glob
        for marker in wait_until(lambda: list(starts("engine-start-*.held")), 60, "the first engine start"):
            marker.unlink()
        (first,) = wait_until(lambda: engine_pids(worker.log.read_text()), 60, "the first engine ready")
        os.kill(first, signal.SIGKILL)
        (marker,) = wait_until(lambda: list(starts("engine-start-*.held")), 60, "the replacement's engine start")
        replacement = int(marker.stem.rsplit("-", 1)[1])
        time.sleep(8)  # twice Celery's default: the replacement must outlive it
        assert alive(replacement) and list(starts("engine-start-*.held")) == [marker], "it was left to load"
        marker.unlink()
        wait_until(lambda: replacement in engine_pids(worker.log.read_text()), 60, "the replacement ready")
        ids = [f"d{i}" for i in range(50)]
        corpus = write_corpus(tmp_path / "c.parquet", ids, mixed_texts(len(ids), seed=3))
        done = run_cli("submit", corpus, "--model", tiny_model, "--out", tmp_path / "out", "--wait")
        assert done.returncode == 0, done.stderr[-3000:]
        check_exactly_once(str(tmp_path / "out"), ids)
    finally:
        holds.stop()


def test_an_engine_that_cannot_start_hands_its_shards_back(cli_env, workers, tmp_path, tiny_model):
    """A pool process whose engine cannot start (as a GPU out of memory would; here its model file is gone when it
    loads) still takes shards: each goes back to the queue, neither acknowledged unwritten nor failed. Once the engine
    can start, the job completes with every row once. Before, the first shard was acknowledged and lost: the job
    never finished."""
    served = tmp_path / "served" / tiny_model.name  # the worker's copy (same name and bytes: same queue, same sha)
    served.parent.mkdir()
    shutil.copy(tiny_model, served)
    holds = Holds(tmp_path / "held")
    (holds.folder / ENGINE_STARTS).touch()
    workers.env = cli_env | holds.env
    holds.auto_release()  # shards go on; the first engine start stays held until the model is gone
    try:
        worker = workers.start(served, "--engines", "1", wait=False)
        (marker,) = wait_until(lambda: list(holds.folder.glob("engine-start-*.held")), 60, "the engine start")
        away = served.rename(served.with_suffix(".away"))
        (holds.folder / ENGINE_STARTS).unlink()
        marker.unlink()
        wait_until(lambda: " ready." in worker.log.read_text(), 60, "the worker up")
        ids = [f"d{i}" for i in range(60)]
        corpus = write_corpus(tmp_path / "c.parquet", ids, mixed_texts(len(ids), seed=5))
        out = tmp_path / "out"
        submit = subprocess.Popen([sys.executable, "-m", "bulkembed.cli", "submit", str(corpus), "--model",
                                   str(tiny_model), "--out", str(out), "--shard-tokens", "800", "--wait"],
                                  env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        job_id = submit.stdout.readline().strip()
        wait_until(lambda: len(RECEIVED.findall(worker.log.read_text())) >= 3, 120, "shards taken")
        progress = status(cli_env, job_id)
        assert progress["shards_done"] == 0 and progress["failed"] == 0, progress
        away.rename(served)
        assert submit.wait(240) == 0, submit.stderr.read()[-3000:]
        check_exactly_once(str(out), ids)
        log = worker.log.read_text()
        assert "the engine did not start" in log and re.search(r"the engine cannot start \(\w+", log), log[-3000:]
    finally:
        holds.stop()


def test_probe_picks_a_measured_ubatch_and_restarts_use_the_cache(tiny_model, tmp_path):
    cache = tmp_path / "probe.json"
    setup = EngineSetup(EngineOptions(threads=1), engines=2, ubatch="probe", probe_cache=str(cache))
    sha = file_sha256(tiny_model)
    with EnginePool(tiny_model, sha, setup) as pool:
        first = pool.start()
    assert first.engines == 2 and not first.probe.cached
    assert set(first.probe.tok_per_s) == set(probe.CANDIDATES) and min(first.probe.tok_per_s.values()) > 0
    assert first.options.ubatch == first.probe.ubatch == probe.pick(first.probe.tok_per_s)
    assert first.self_test_cosine >= MIN_COSINE, "the self-test ran at the chosen ubatch"

    with EnginePool(tiny_model, sha, setup) as pool:
        again = pool.start()
    assert again.probe.cached and again.options.ubatch == first.options.ubatch
    assert again.probe.tok_per_s == first.probe.tok_per_s

    one = EngineSetup(EngineOptions(threads=1), engines=1, ubatch="probe", probe_cache=str(cache))
    with EnginePool(tiny_model, sha, one) as pool:
        assert not pool.start(self_test=False).probe.cached, "the cache is per number of engines"
    assert len(json.loads(cache.read_text())) == 2
    isolated = EngineSetup(EngineOptions(threads=1, isolate=True), engines=1, ubatch="probe", probe_cache=str(cache))
    with EnginePool(tiny_model, sha, isolated) as pool:
        assert not pool.start(self_test=False).probe.cached, "and per layout"
    assert len(json.loads(cache.read_text())) == 3


def test_an_isolated_probe_times_full_decodes_of_each_candidate(tiny_model):
    """One document a decode: each candidate is timed on documents of its own size (192-token ones would time every
    candidate on the same 256-token decodes)."""
    engine = Engine(tiny_model, EngineOptions(threads=1, isolate=True))
    try:
        for ub in probe.CANDIDATES:
            docs = probe.probe_documents(engine, ub, 2)
            assert {len(d) for d in docs} == {ub} and len(docs) == 2
    finally:
        engine.close()


def test_auto_ubatch_on_cpu_is_fixed_and_pinned_ubatch_is_kept(tiny_model, tmp_path):
    sha = file_sha256(tiny_model)
    for requested, expected in (("auto", probe.CPU_UBATCH), (64, 64)):
        setup = EngineSetup(EngineOptions(threads=1), engines=1, ubatch=requested, probe_cache=str(tmp_path / "p"))
        with EnginePool(tiny_model, sha, setup) as pool:
            plan = pool.start(self_test=False)
        assert plan.options.ubatch == expected and plan.probe is None
    assert not (tmp_path / "p").exists(), "nothing was measured on the CPU without --ubatch probe"


def test_isolated_auto_ubatch_on_a_gpu_is_fixed_not_measured(tiny_model, tmp_path):
    """Isolated, the cap decides where long documents are cut: a probe, whose pick moves with the engine count and the
    device's load, would move their vectors. No GPU here: the engines' facts are made to say they offload (a stand-in,
    labelled so); what is checked is the pool's decision, and that packing on a GPU still measures."""
    sha = file_sha256(tiny_model)
    for isolate in (True, False):
        setup = EngineSetup(EngineOptions(threads=1, isolate=isolate), engines=1, ubatch="auto",
                            probe_cache=str(tmp_path / "p"))
        with EnginePool(tiny_model, sha, setup) as pool:
            pool.facts = dataclasses.replace(pool.facts, gpu_offload=True)
            plan = pool.start(self_test=False)
        if isolate:
            assert plan.probe is None and plan.options.ubatch == max(probe.CANDIDATES)
        else:
            assert plan.probe is not None and plan.options.ubatch == plan.probe.ubatch
    assert probe.auto_ubatch(True, True, [256, 512]) == 512, "within what the model takes"
    assert probe.auto_ubatch(False, True, probe.CANDIDATES) == probe.CPU_UBATCH


def test_an_engine_started_alone_takes_the_auto_cap_a_worker_would(tiny_model, monkeypatch):
    """`embed` and Embedder start one engine, without a pool: where `auto` is fixed (isolated, on a GPU) they cut a
    long text where a worker does. No GPU here: llama.cpp is made to say it offloads (a stand-in, labelled so; this
    CPU build ignores the layers it is then asked to offload)."""
    import llama_cpp

    from bulkembed.contract.settings import WorkerSettings
    from bulkembed.worker import engines

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    settings = WorkerSettings()
    try:
        for isolate, ubatch, expected in ((True, "auto", 2048), (False, "auto", 512), (True, 256, 256)):
            options = EngineOptions.from_settings(settings, ubatch=ubatch, gpu_layers=-1, threads=1, flash_attn="auto",
                                                  isolate=isolate)
            facts = engines._start_engine(str(tiny_model), options)
            assert facts.gpu_offload and facts.decoded_by["ubatch"] == expected, (isolate, ubatch, facts.decoded_by)
            engines.engine().close()
        from_index = options.like({**facts.decoded_by, "layout": "isolated", "ubatch": 512})
        facts = engines._start_engine(str(tiny_model), from_index)
        assert facts.decoded_by["ubatch"] == 512, "an index's recorded cap is kept"
        engines.engine().close()
    finally:
        engines._ENGINE = None


@pytest.mark.parametrize(("free_mib", "expected"), [(None, 1), (2000, 1), (20000, 3), (11000, 2)])
def test_engines_that_fit_the_gpu(free_mib, expected):
    assert probe.engines_that_fit(3000, free_mib) == expected


@pytest.fixture
def two_gpus(tmp_path, monkeypatch) -> None:
    """An emulation (no GPU here): an nvidia-smi on the PATH that answers as on a host of two GPUs, and honours -i."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("""#!/bin/sh
name="NVIDIA L4
NVIDIA H100 80GB HBM3"; free="22000
70000"
case "$*" in *"-i 1"*) name="NVIDIA H100 80GB HBM3"; free=70000;; *"-i 0"*) name="NVIDIA L4"; free=22000;; esac
case "$*" in *memory.free*) echo "$free";; *) echo "$name";; esac
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")


def test_the_gpu_asked_about_is_the_one_cuda_will_use(two_gpus, monkeypatch):
    """nvidia-smi ignores CUDA_VISIBLE_DEVICES: a worker pinned to GPU 1 sized its engines from GPU 0's memory and
    keyed its ubatch probe by GPU 0's name; one given no GPU still counted one."""
    assert (probe.device_name(), probe.gpu_free_mib()) == ("NVIDIA L4", 22000.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert (probe.device_name(), probe.gpu_free_mib()) == ("NVIDIA H100 80GB HBM3", 70000.0)
    for none in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", none)
        assert probe.gpu_free_mib() is None and not probe.device_name().startswith("NVIDIA")


def test_auto_engines_on_a_build_that_cannot_offload_is_one(two_gpus, tiny_model):
    """A CPU build (install.sh's default) on a GPU host: `--engines auto` means 1 on the CPU, not as many model
    copies as the GPU would hold."""
    setup = EngineSetup(EngineOptions(threads=1), engines="auto", ubatch=64)
    with EnginePool(tiny_model, file_sha256(tiny_model), setup) as pool:
        plan = pool.start(self_test=False)
        assert not plan.gpu_offload and plan.engines == 1 and len(pool.processes) == 1


def test_engines_made_before_one_fails_to_start_are_closed(tiny_model, monkeypatch):
    from bulkembed.worker import engines

    made, real = [], engines.LlamaProcess

    def third_fails():
        if len(made) == 2:
            raise OSError("cannot start another process")
        made.append(real())
        return made[-1]

    monkeypatch.setattr(engines, "LlamaProcess", third_fails)
    with pytest.raises(OSError, match="another process"), \
            EnginePool(tiny_model, file_sha256(tiny_model), EngineSetup(EngineOptions(threads=1), engines=3)):
        pass
    assert len(made) == 2 and not any(process.alive for process in made), "none left behind"


def test_pick_prefers_the_smaller_ubatch_when_speeds_are_close():
    assert probe.pick({256: 90.0, 512: 99.0, 1024: 100.0}) == 512
    assert probe.pick({256: 50.0, 512: 80.0, 1024: 100.0}) == 1024


def test_run_with_two_engines_writes_what_one_engine_writes(run_cli, tiny_model, tmp_path):
    ids = [f"d{i}" for i in range(600)]
    corpus = write_corpus(tmp_path / "c.parquet", ids, mixed_texts(len(ids), seed=4))
    tables = []
    for engines in ("1", "2"):
        out = tmp_path / f"out{engines}"
        done = run_cli("run", corpus, "--model", tiny_model, "--out", out, "--engines", engines, "--threads", "1",
                       "--shard-tokens", "2000")
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"on {engines} engine(s)" in done.stderr
        check_exactly_once(str(out), ids)
        tables.append(ds.dataset(str(out), format="arrow").to_table().sort_by("id"))
    one, two = (np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables)
    assert tables[0].column("id").equals(tables[1].column("id"))
    assert cosines(one, two).min() >= 0.9999
