"""Re-index only what changed: copy PREV_OUT's vectors for rows whose id and content are unchanged.

A row is matched by its key: 16 bytes of BLAKE2b over its id and its content hash (the prefixed text's,
bulkembed.contract.schema.content_hash). Keys live in sorted numpy runs (SeenIds, 16 bytes a row), never
in a Python dict. Matching reads only PREV_OUT's `id` and `content_hash` columns; copying reads each of
its embedding files once more, whole, and keeps the matched rows with one Arrow filter (no per-row
Python on vectors). Each copy is written once: its key is fixed by the PREV_OUT file it comes from, and
it is committed with the same put-if-absent as a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bulkembed.contract import keys
from bulkembed.contract.errors import InputError, JobGone, ShardError, TransientError
from bulkembed.contract.job import JobSpec, Pooling, ReuseSource
from bulkembed.contract.manifest import manifest_shards
from bulkembed.contract.registry import ReusedFile
from bulkembed.contract.schema import (
    decoding_digest,
    embedding_schema,
    from_ipc_bytes,
    other_writer,
    read_decoded_by,
    read_metadata,
    stored_schema,
    to_ipc_bytes,
)
from bulkembed.contract.store import REQUESTS_AT_ONCE, Store, at_once, open_store, unreadable_as
from bulkembed.producer.dedup import SeenIds

log = logging.getLogger(__name__)

ROW_KEY = np.dtype("S16")


class IncompatibleReuse(InputError):
    """PREV_OUT was embedded with another model or other vector options."""


def row_keys(ids: Iterable[Any], content_hashes: Iterable[bytes]) -> np.ndarray:
    """One 16-byte key per row. repr keeps 1 and "1" apart; the two sides' id types are checked equal."""
    pairs = zip(ids, content_hashes, strict=True)
    digests = (hashlib.blake2b(repr(i).encode() + h, digest_size=16).digest() for i, h in pairs)
    return np.frombuffer(b"".join(digests), ROW_KEY)


def key_column(row_keys: np.ndarray) -> pa.Array:
    """Row keys as Arrow's 16-byte binary, from their bytes: numpy hands an S16 key ending in NUL bytes out as shorter
    Python bytes (one key in 256 ends in one)."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(row_keys), [None, pa.py_buffer(row_keys.tobytes())])


@dataclass
class PreviousOutput:
    """A finished job's output, checked to have been embedded as the new job would embed it."""

    store: Store
    source: ReuseSource
    files: list[str]  # its embedding files, as its manifest lists them
    index: SeenIds | None = None  # keys of its rows, once loaded
    sha256: dict[str, str | None] = field(default_factory=dict)  # a file's, as its manifest records it

    def load_index(self) -> SeenIds:
        """Read the id and content_hash columns of every file (from a folder or S3) into sorted runs."""
        if self.index is None:
            index = SeenIds()
            # Throttling, 5xx, the network (transient) are raised as they are: the unit is tried again later.
            with unreadable_as(lambda exc: unreadable(self.source.uri, "its files", exc)):
                batches = self._dataset().to_batches(columns=["id", "content_hash"]) if self.files else []
                for batch in batches:
                    index.add(row_keys(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
            self.index = index
            log.info("reuse: %d distinct rows in %s (%d bytes of keys)", len(self.index), self.source.uri,
                     self.index.nbytes)
        return self.index

    def _dataset(self) -> ds.Dataset:
        fs, base = self.store.arrow_fs()
        return ds.dataset([f"{base}/{key}" for key in self.files], filesystem=fs, format="arrow")


def open_previous(uri: str, job: JobSpec, id_type: pa.DataType | None) -> PreviousOutput:
    """PREV_OUT as its manifest describes it; InputError when it is not a finished output embedded with the
    new job's model and vector options, read from its manifest and its files' schema (and ids of `id_type`, unless
    None: a planner opening what submit checked)."""
    store = open_store(uri)
    if store.uri == open_store(job.out).uri:
        raise InputError(f"--reuse {uri} is the job's own --out; write the new output elsewhere")
    if not store.exists(keys.MANIFEST_KEY):
        raise InputError(f"--reuse {uri}: no {keys.MANIFEST_KEY} there; reuse needs the output of a finished job")
    raw = store.get(keys.MANIFEST_KEY)
    manifest = json.loads(raw)
    previous = JobSpec.model_validate(manifest["job"])
    ours, theirs = job.vector_options(), previous.vector_options()
    differences = [f"{name} {theirs[name]!r} there, {ours[name]!r} here" for name in ours if ours[name] != theirs[name]]
    shards = manifest_shards(store, manifest)
    sha256 = dict(zip(shards.column("key").to_pylist(), shards.column("sha256").to_pylist(), strict=True))
    sha256 |= {f["key"]: f.get("sha256") for f in manifest.get("reused_files", [])}
    files = list(sha256)
    if files and not differences:  # compatible by its manifest: are its files all there, and as it says?
        present = {key for key, _ in store.list()}  # one listing: a file lost since is found now, not while planning
        if missing := [key for key in files if key not in present]:
            raise InputError(f"--reuse {uri}: {len(missing)} of the {len(files)} files its manifest lists are gone "
                             f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); reuse another output, "
                             f"or run without --reuse")
        differences = _schema_differences(store, files[0], job, id_type)
    if differences:
        raise IncompatibleReuse(f"--reuse {uri} was not embedded as this job embeds: {'; '.join(differences)}. "
                                f"Its vectors cannot be reused; pass --ignore-incompatible-reuse to embed every "
                                f"row instead")
    source = ReuseSource(uri=store.uri, job_id=manifest["job_id"], manifest_sha256=hashlib.sha256(raw).hexdigest())
    return PreviousOutput(store=store, source=source, files=files, sha256=sha256)


def unreadable(uri: str, what: str, exc: Exception) -> InputError:
    """PREV_OUT's files, or one of them, gone or damaged since its job finished."""
    return InputError(f"--reuse {uri}: cannot read {what} ({type(exc).__name__}: {exc}): changed since its job "
                      f"finished? Reuse another output, or run without --reuse")


def _schema_differences(store: Store, key: str, job: JobSpec, id_type: pa.DataType) -> list[str]:
    with unreadable_as(lambda exc: unreadable(store.uri, key, exc)):
        schema = stored_schema(store, key)
    found = []
    if "content_hash" not in schema.names:
        found.append(f"{key} has no content_hash column (written before bulkembed recorded one)")
    if id_type is not None and schema.field("id").type != id_type:
        found.append(f"ids are {schema.field('id').type} there, {id_type} here")
    if read_metadata(schema).get("model_sha256") != job.model.sha256:
        found.append(f"{key} says model sha256 {read_metadata(schema).get('model_sha256')!r}")
    return found


def copy_reused(previous: PreviousOutput, reused: SeenIds, store: Store, job: JobSpec,
                sources: set[str] | None = None, still_ours: Callable[[], bool] = lambda: True) -> list[ReusedFile]:
    """Copy the rows whose keys are in `reused` into OUT, one file per PREV_OUT file that has some (of `sources`
    only, where given: copies OUT lost), several files at once. A file found already written (a resumed job) is
    checked and kept. `still_ours` is asked before each file is written: copying takes minutes, and a job forgotten
    meanwhile by submit --force no longer owns OUT (JobGone)."""
    def copy(index: int, source: str) -> ReusedFile | None:
        try:
            found = previous.store.get(source)
            if (recorded := previous.sha256.get(source)) and hashlib.sha256(found).hexdigest() != recorded:
                # Damaged inside its data: it may still parse, its vectors wrong (norms of 0.66 seen).
                raise ValueError(f"its sha256 is not the {recorded[:12]}… its manifest records")
            table = from_ipc_bytes(found)
        except TransientError:
            raise
        except Exception as exc:  # gone (OSError, S3's NoSuchKey), not Arrow or altered since the matches were made
            raise unreadable(previous.source.uri, source, exc) from None
        mask = reused.contains(row_keys(table.column("id").to_pylist(), table.column("content_hash").to_pylist()))
        if not mask.any():
            return None
        taken = table.filter(pa.array(mask))
        id_type = table.schema.field("id").type  # the new corpus's: open_previous checked they agree
        # The vectors keep the record of how they were decoded (they were, by the earlier job's workers).
        decoded_by = read_decoded_by(table.schema)
        taken = pa.Table.from_arrays(taken.columns, schema=embedding_schema(id_type, job.dims, job, decoded_by))
        key = keys.reused_output(index)
        data = to_ipc_bytes(taken)
        if not still_ours():
            raise JobGone.of(job.job_id, f"{key} not copied")
        if not store.put_if_absent(key, data):
            found = store.get(key)
            copied = from_ipc_bytes(found)
            if other_writer(copied.schema, job):  # a late copy of a job that submit --force replaced
                if not still_ours():
                    raise JobGone.of(job.job_id, f"{key} not copied")
                store.put(key, data)
            elif copied.num_rows != taken.num_rows:
                raise ShardError(f"job {job.job_id}: {key} exists with other rows than {source} gives; "
                                 f"start over with --force")
            else:
                data = found
        return ReusedFile(key=key, source=source, rows=taken.num_rows,
                          tokens=int(pc.sum(taken.column("n_tokens")).as_py()),
                          truncated=int(pc.sum(pc.and_(taken.column("truncated"),
                                                       pc.equal(taken.column("chunk"), 0))).as_py()),
                          sha256=hashlib.sha256(data).hexdigest(), decoding=decoding_digest(decoded_by))

    chosen = [(index, source) for index, source in enumerate(previous.files) if sources is None or source in sources]
    # A file of token vectors (--pooling none) is up to ~0.5 GB, held three times over while copied: one at a time.
    threads = 1 if job.pooling is Pooling.NONE else REQUESTS_AT_ONCE
    copied = [file for file in at_once(lambda pair: copy(*pair), chosen, threads) if file is not None]
    log.info("job %s: %d rows reused from %s in %d files", job.job_id, sum(f.rows for f in copied),
             previous.source.uri, len(copied))
    return copied
