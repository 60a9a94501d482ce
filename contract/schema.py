"""Arrow schemas of the three files a job writes: shard inputs, embeddings, rejected rows."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa

from bulkembed.contract.job import Dtype, JobSpec, Pooling
from bulkembed.contract.store import Store

METADATA_PREFIX = "bulkembed."
CONTENT_HASH_TYPE = pa.binary(16)


def content_hash(prefixed_text: str) -> bytes:
    """Every output row's `content_hash`: BLAKE2b with a 16-byte digest (hashlib.blake2b(..., digest_size=16),
    no key, no salt) of the UTF-8 bytes of the exact text embedded, prefix included, before truncation or
    chunking (every chunk of a document carries its document's hash). Stable across versions: --reuse
    matches rows by it."""
    return hashlib.blake2b(prefixed_text.encode("utf-8"), digest_size=16).digest()


SHARD_SOURCE = METADATA_PREFIX + "source"  # the corpus file of an input planned when a shard read one file only


def shard_input_schema(id_type: pa.DataType) -> pa.Schema:
    """A shard's input: the id as the corpus typed it, the text with its prefix, which of its tokens this row embeds
    (bulkembed.contract.job.Span: all of them unless it was truncated or chunked), and where the row comes from
    (`row`, the row's number in its corpus file `source`), for a quarantine record to name. The text and the source
    are dictionary-encoded: a long document's chunks are rows of one text, held once (shard_texts), and a shard's
    rows come from a few files."""
    return pa.schema([
        ("id", id_type), ("text", SHARD_TEXT_TYPE), ("n_tokens", pa.int32()), ("chunk", pa.int32()),
        ("start", pa.int32()), ("stop", pa.int32()), ("truncated", pa.bool_()),
        ("content_hash", CONTENT_HASH_TYPE), ("row", pa.int64()), ("source", SHARD_TEXT_TYPE),
    ])


SHARD_TEXT_TYPE = pa.dictionary(pa.int32(), pa.string())


def shard_text_column(texts: list[str]) -> pa.DictionaryArray:
    """Each distinct text once: the 128 chunks of a 520k-token document in one shard were 128 copies of it."""
    index: dict[str, int] = {}
    indices = [index.setdefault(text, len(index)) for text in texts]
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(list(index), pa.string()))


def shard_texts(column: pa.ChunkedArray) -> list[str]:
    """A shard input's texts, rows of one text sharing one str (tokenized once by the worker, sent to the engine
    once); inputs planned before the dictionary are plain strings."""
    if not pa.types.is_dictionary(column.type):
        return column.to_pylist()
    texts: list[str] = []
    for chunk in column.chunks:
        distinct = chunk.dictionary.to_pylist()
        texts += [distinct[i] for i in chunk.indices.to_pylist()]
    return texts


def row_sources(shard_input: pa.Table, input_key: str) -> tuple[list[str], list[int]]:
    """The corpus file and row number of each of a shard input's rows; for an input planned before they were
    recorded, the input itself and the rows' places in it."""
    if "source" in shard_input.schema.names:
        return shard_texts(shard_input.column("source")), shard_input.column("row").to_pylist()
    source = (shard_input.schema.metadata or {}).get(SHARD_SOURCE.encode(), b"").decode()
    if source and "row" in shard_input.schema.names:  # planned when a shard read one file only
        return [source] * shard_input.num_rows, shard_input.column("row").to_pylist()
    return [input_key] * shard_input.num_rows, list(range(shard_input.num_rows))


def vector_type(dims: int, job: JobSpec) -> pa.DataType:
    """One fixed-size vector per row; with pooling none, a list of them (one per token)."""
    value = pa.float16() if job.dtype is Dtype.FLOAT16 else pa.float32()
    vector = pa.list_(value, dims)
    return pa.list_(vector) if job.pooling is Pooling.NONE else vector


def embedding_schema(id_type: pa.DataType, dims: int, job: JobSpec, decoded_by: dict | None = None,
                     rejected: dict[int, str] | None = None) -> pa.Schema:
    """`decoded_by`: what the worker's vectors depend on beyond the job (worker.engine.Engine.decoded_by), kept as
    JSON (read_decoded_by). `rejected`: a shard output's rows set aside (shard input row → reason), kept as JSON by
    reason (read_rejected); none for files that are not one shard's output."""
    metadata = {
        "job_id": job.job_id,  # whose file it is: a late write of a job replaced by --force is told from the new one's
        "model_file": job.model.file_name,
        "model_sha256": job.model.sha256,
        "task": job.task.value if job.task else "",
        "role": job.role.value,
        "prefix": job.prefix,
        "pooling": job.pooling.value,
        "normalized": str(job.normalize).lower(),
        "dims": str(dims),
        "dtype": job.dtype.value,
        "max_tokens": str(job.max_tokens),
        "overlength": job.overlength.value,
        "decoded_by": json.dumps(decoded_by or {}, sort_keys=True),
    }
    if rejected is not None:
        by_reason: dict[str, list[int]] = {}
        for row in sorted(rejected):
            by_reason.setdefault(rejected[row], []).append(row)
        metadata["rejected"] = json.dumps(by_reason, sort_keys=True)
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            pa.field("embedding", vector_type(dims, job), nullable=False),
            pa.field("n_tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
            pa.field("chunk", pa.int32(), nullable=False),
            pa.field("content_hash", CONTENT_HASH_TYPE, nullable=False),
        ],
        metadata={METADATA_PREFIX + k: v for k, v in metadata.items()},
    )


def rejected_schema(id_type: pa.DataType) -> pa.Schema:
    """Quarantine: which row (source file, row number), its id if it had one, and why."""
    return pa.schema(
        [("id", id_type), ("reason", pa.string()), ("source", pa.string()), ("row", pa.int64())]
    )


def quarantine_table(shard_input: pa.Table, input_key: str, reasons: dict[int, str]) -> pa.Table:
    """A shard's rows set aside (shard input row → reason), named as the producer names its quarantined rows:
    corpus file and row number."""
    rows = sorted(reasons)
    sources, at = row_sources(shard_input, input_key)
    return pa.table({"id": shard_input.column("id").take(rows), "reason": [reasons[r] for r in rows],
                     "source": [sources[r] for r in rows], "row": pa.array([at[r] for r in rows], pa.int64())},
                    schema=rejected_schema(shard_input.schema.field("id").type))


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    raw = schema.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX):]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(METADATA_PREFIX)
    }


def stored_schema(store: Store, key: str) -> pa.Schema:
    """An Arrow IPC file's schema, read from its footer without fetching the whole file."""
    fs, base = store.arrow_fs()
    with fs.open_input_file(f"{base}/{key}") as f:
        return pa.ipc.open_file(f).schema


def read_decoded_by(schema: pa.Schema) -> dict:
    """What the worker recorded of how it decoded (embedding_schema's decoded_by); {} for files written before."""
    return json.loads(read_metadata(schema).get("decoded_by") or "{}")


def other_writer(schema: pa.Schema, job: JobSpec) -> str | None:
    """The id of the job that wrote a file of `job`'s OUT, where that is another job (a late write of one that submit
    --force replaced); None where it is `job`, or the file is older than the record."""
    owner = read_metadata(schema).get("job_id")
    return owner if owner is not None and owner != job.job_id else None


def read_rejected(schema: pa.Schema) -> dict[int, str] | None:
    """A shard output's rows set aside (embedding_schema's rejected); None for a file written before outputs
    carried them."""
    raw = read_metadata(schema).get("rejected")
    if raw is None:
        return None
    return {row: reason for reason, rows in json.loads(raw).items() for row in rows}


def decoding_digest(decoded_by: dict) -> str:
    """A short name for a decoded_by, for the manifest to count the files decoded alike ("" for none recorded)."""
    return hashlib.sha256(json.dumps(decoded_by, sort_keys=True).encode()).hexdigest()[:12] if decoded_by else ""


def to_ipc_bytes(table: pa.Table, compression: str | None = None) -> bytes:
    """A complete Arrow IPC file in memory: objects are only ever written whole. `compression` ("zstd", "lz4")
    compresses its buffers; readers need nothing to know it."""
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()
