"""S3 failures: transient ones (after boto3's own retries) become TransientError from every store
call, permanent ones stay what they are."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from bulkembed.contract import keys
from bulkembed.contract.errors import TransientError
from bulkembed.contract.store import LocalStore, at_once, is_transient, open_store
from tests.conftest import s3_env
from tests.faults_support import FaultPlan, FaultyS3Proxy


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc, transient", [
    (client_error(500, "InternalError"), True),
    (client_error(503, "SlowDown"), True),
    (client_error(429, "TooManyRequests"), True),
    (client_error(400, "RequestTimeout"), True),
    (client_error(400, "ThrottlingException"), True),
    (client_error(409, "ConditionalRequestConflict"), True),  # the other write may yet fail: not "written"
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionClosedError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (client_error(403, "AccessDenied"), False),
    (client_error(404, "NoSuchBucket"), False),
    (NoCredentialsError(), False),
    (ParamValidationError(report="bad"), False),
    # pyarrow's S3 filesystem (planners read the input with it), its retries spent; the first two as seen through
    # tests.faults_support.FaultyS3Proxy.
    (OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."), True),
    (OSError("When getting information for key 'in/c.parquet' in bucket 'b': AWS Error NETWORK_CONNECTION during "
             "HeadObject operation: curlCode: 52, Server returned nothing"), True),
    (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: "), True),
    (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), False),
    (OSError("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation"), False),
    (FileNotFoundError("in/c.parquet"), False),
])
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_boto3_retry_variables_are_honoured(s3_server, bucket, monkeypatch):
    assert open_store(f"s3://{bucket}/o").client.meta.config.retries["total_max_attempts"] == 9
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert open_store(f"s3://{bucket}/o").client.meta.config.retries["total_max_attempts"] == 2


def arrow_credentials(store) -> dict:
    """What pyarrow's S3 filesystem of `store` was built with (it pickles its options)."""
    options = store.arrow_fs()[0].__reduce__()[1][0]
    return {k: options[k] for k in ("access_key", "secret_key", "session_token", "anonymous")}


def test_expiring_credentials_are_left_to_pyarrow_to_renew(s3_server, monkeypatch, tmp_path):
    """IRSA (a web identity token), EKS Pod Identity, an assumed role: credentials that expire, typically within the
    hour. Frozen into pyarrow's filesystem, which a planner keeps for a whole job, they would fail its input reads an
    hour on; left out, pyarrow's own provider chain (the AWS C++ SDK's) finds and renews them. Static keys are passed
    on as they are. pyarrow follows boto3's AWS_MAX_ATTEMPTS too (test_outage)."""
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    static = arrow_credentials(open_store("s3://b/p"))
    assert static == {"access_key": "testing", "secret_key": "testing", "session_token": "", "anonymous": False}
    (tmp_path / "token").write_text("a-web-identity-token")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/bulkembed")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "regional")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")  # nothing there: freezing them would fail
    store = open_store("s3://b/p")
    assert type(store._session.get_credentials()).__name__ == "DeferredRefreshableCredentials"
    assert arrow_credentials(store) == {"access_key": None, "secret_key": None, "session_token": None,
                                        "anonymous": False}


def every_call(store) -> dict:
    return {"exists": lambda: store.exists("k"), "get": lambda: store.get("k"), "put": lambda: store.put("k", b"1"),
            "put_if_absent": lambda: store.put_if_absent("k", b"1"), "delete": lambda: store.delete("k"),
            "list": lambda: store.list()}


def test_every_call_is_transient_while_the_endpoint_is_dark(s3_server, bucket, monkeypatch):
    """Through a proxy that resets every connection (what the issue saw: ConnectionClosedError from
    head_object escaped as permanent), each store call fails with TransientError."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with FaultyS3Proxy(s3_server, FaultPlan(every=10**9)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        store = open_store(f"s3://{bucket}/o")
        store.put("k", b"0")  # a kept-alive connection, cut below
        proxy.go_dark()
        for name, call in every_call(store).items():
            started = time.monotonic()
            with pytest.raises(TransientError, match="S3 "):
                call()
            assert time.monotonic() - started < 30, name
        assert proxy.refused >= 6
        proxy.light()
        assert store.get("k") == b"0", "back once the endpoint is"


def test_nothing_listening_is_transient(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: refused
    store = open_store("s3://nowhere/o")
    for call in every_call(store).values():
        with pytest.raises(TransientError, match="EndpointConnectionError"):
            call()


def test_permanent_errors_are_not_transient(s3_server, monkeypatch):
    store = open_store("s3://no-such-bucket-here/o")
    with pytest.raises(ClientError) as caught:
        store.get("k")
    assert not isinstance(caught.value, TransientError) and caught.value.response["Error"]["Code"] == "NoSuchBucket"


def test_stores_in_one_process_share_one_s3_client_until_its_settings_change(s3_server, bucket, monkeypatch):
    from bulkembed.contract.store import S3Store

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    first, second = S3Store(f"s3://{bucket}/a"), S3Store(f"s3://{bucket}/b")
    assert first.client is second.client, "one client (and connection pool) per worker process"
    second.put("k", b"v")
    assert first.client is S3Store(f"s3://{bucket}/a").client and second.get("k") == b"v"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server + "/")  # another endpoint setting: another client
    assert S3Store(f"s3://{bucket}/a").client is not first.client


def test_delete_many_takes_a_thousand_keys_a_request(s3_server, bucket, monkeypatch):
    from bulkembed.contract.store import S3Store

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    store = S3Store(f"s3://{bucket}/many")
    names = [f"{n:06d}.arrow" for n in range(2500)]
    for name in names:
        store.put(name, b"x")
    requests = []
    store.client.meta.events.register("before-call.s3.DeleteObjects", lambda **_: requests.append(1))
    store.delete_many(names + ["absent.arrow"])
    assert store.list() == [] and len(requests) == 3


def test_force_forgets_shards_past_a_million(tmp_path):
    """Unit numbers grow past six digits, and jobs planned before units named shards by number alone; --force must
    find all their files (and only the job's)."""
    from bulkembed.producer.submit import forget_outputs

    store = LocalStore(tmp_path)
    job_files = ["000007.arrow", "1000000.arrow", "_shards/1234567.arrow", "reused-1000001.arrow", "_manifest.json",
                 keys.shard_output(keys.shard_number(1_234_567, 3)), keys.shard_input(keys.shard_number(2, 999_999)),
                 "_manifest/shards.parquet", "_plan/duplicates.parquet", "_plan/reused-keys/000001.arrow",
                 "_rejected/unit-000003-0000.arrow"]
    for key in [*job_files, "notes.txt", "12345.arrow", "000001-1.arrow"]:
        store.put(key, b"x")
    assert forget_outputs(store) == len(job_files)
    assert [key for key, _ in store.list()] == ["000001-1.arrow", "12345.arrow", "notes.txt"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_put_file_streams_a_large_file_into_a_new_folder(where, tmp_path, s3_server, bucket, monkeypatch):
    """A file bigger than boto3's multipart threshold (8 MB) lands whole, under a prefix that did not exist."""
    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    store = open_store(str(tmp_path / "out") if where == "local" else f"s3://{bucket}/put-file")
    data = bytes(range(256)) * (40 * 1024 + 3)  # ~10 MB
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store.put_file("_plan/new/big.bin", source)
    store.put_file("_plan/new/big.bin", source)  # replaces
    assert store.get("_plan/new/big.bin") == data and store.list("_plan/") == [("_plan/new/big.bin", len(data))]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_list_takes_any_prefix_as_s3_does(where, tmp_path, s3_server, bucket, monkeypatch):
    """A unit's written shards are one listing of "UNIT-": a prefix that is no folder."""
    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    store = open_store(str(tmp_path / "out") if where == "local" else f"s3://{bucket}/list-prefix")
    for key in ["000001-000000.arrow", "000001-000001.arrow", "000011-000000.arrow", "000002-000000.arrow",
                "_shards/000001-000000.arrow", "000001-x/inner.arrow"]:
        store.put(key, b"xy")
    assert [k for k, _ in store.list(keys.unit_outputs(1))] == ["000001-000000.arrow", "000001-000001.arrow",
                                                                "000001-x/inner.arrow"]
    assert [k for k, _ in store.list("_shards/")] == ["_shards/000001-000000.arrow"]
    assert store.list("000001-000001.arrow") == [("000001-000001.arrow", 2)] and store.list("nothing") == []
    assert len(store.list()) == 6


def test_at_once_answers_in_order_with_requests_in_parallel_and_a_bounded_lookahead():
    """A long pass (a listing a unit of a 10^9-row job) runs several requests at once, gives the answers in order,
    reads its items only a few ahead of what was consumed, and raises a request's error where its answer would be."""
    running, most, read = 0, 0, []
    lock = threading.Lock()

    def items() -> Iterator[int]:
        for item in range(40):
            read.append(item)
            yield item

    def request(item: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        if item == 30:
            raise ValueError("item 30")
        return item * 10

    answers = at_once(request, items(), threads=4)
    assert [next(answers) for _ in range(3)] == [0, 10, 20]
    assert len(read) <= 3 + 2 * 4 + 1, "items are read only a few ahead of the answers consumed"
    assert [next(answers) for _ in range(27)] == [10 * i for i in range(3, 30)]
    with pytest.raises(ValueError, match="item 30"):
        next(answers)
    assert most > 1, "requests ran one at a time"


def test_at_once_cancels_the_requests_not_started_when_one_fails():
    """During an outage each request takes boto3's whole retry budget: once one has failed, those queued behind it
    are not sent."""
    ran: list[int] = []

    def request(item: int) -> int:
        ran.append(item)
        if item == 0:
            raise ValueError("the store failed")
        time.sleep(1.0)  # long beside the main thread's few steps to the failure
        return item

    with pytest.raises(ValueError):
        list(at_once(request, range(40), threads=4))
    assert len(ran) <= 6, f"{len(ran)} requests ran: those queued behind the failure were sent too"


def test_local_delete_leaves_no_empty_folders_as_s3_has_none(tmp_path):
    store = LocalStore(tmp_path / "out")
    for key in ("_shards/000000.arrow", "_shards/000001.arrow", "_plan/a/b.json", "_plan/c.json", "kept.arrow"):
        store.put(key, b"x")
    store.delete_many(["_shards/000000.arrow", "_shards/000001.arrow", "_plan/a/b.json"])
    assert sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")) == \
        ["_plan", "_plan/c.json", "kept.arrow"]
    store.delete("_plan/c.json")
    store.delete("kept.arrow")
    assert store.root.is_dir() and not any(store.root.iterdir()), "the root stays, empty"
    store.put("_shards/000002.arrow", b"y")  # a pruned folder is made again
    assert store.get("_shards/000002.arrow") == b"y"


def test_aws_region_names_the_region_as_the_docs_say(s3_server, bucket, monkeypatch):
    """The docs, compose and the ConfigMap set AWS_REGION, which boto3 alone does not read (only AWS_DEFAULT_REGION):
    a bucket outside us-east-1 was then read by pyarrow in us-east-1, which AWS refuses."""
    from bulkembed.contract.store import S3Store

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    store = S3Store(f"s3://{bucket}/regional")
    store.put("k", b"v")
    assert store.client.meta.region_name == "eu-west-3" and store.arrow_fs()[0].region == "eu-west-3"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")  # both: AWS_REGION wins, as in the AWS CLI
    assert S3Store(f"s3://{bucket}/regional").client.meta.region_name == "eu-west-3"


def test_a_put_whose_new_folder_is_pruned_while_it_is_made_makes_it_again(tmp_path, monkeypatch):
    """A delete_many that empties `_plan/a/` removes it while a put is making `_plan/a/b/`: the put makes it again."""
    store = LocalStore(tmp_path / "out")
    leaf, real_mkdir, calls = store.root / "_plan" / "a" / "b", os.mkdir, []

    def pruned_meanwhile(path, *args, **kwargs):
        if Path(path) == leaf:
            calls.append(path)
            if len(calls) <= 2:  # 1: its parent is missing (pathlib makes it); 2: the parent pruned again meanwhile
                raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", pruned_meanwhile)
    store.put("_plan/a/b/k.json", b"v")
    assert store.get("_plan/a/b/k.json") == b"v" and len(calls) == 3


def test_a_full_disk_is_one_line_and_leaves_no_part_written(tmp_path, monkeypatch):
    """A local OUT on a full disk: a traceback ending in ENOSPC, and the part written stayed in OUT as a hidden
    .tmp- file, even after the job resumed. No disk can be filled here without root: the fsync says it is full."""
    import errno

    from bulkembed.contract.errors import StoreRefused

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    local = LocalStore(tmp_path / "out")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreRefused, match=r"no space left in .*out \(writing b\.arrow\): free some, and the same"):
        local.put("a/b.arrow", b"vectors")
    with pytest.raises(StoreRefused):
        local.put_if_absent("a/c.arrow", b"vectors")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
