"""Read a Parquet corpus (a file, a folder, or an s3:// prefix) in bounded record batches, cut into planning units.

A unit is a run of consecutive row groups (Parquet's own unit of reading), across files: planners take units
independently, so a job plans as fast as there are planner processes, and a resubmitted job skips the units
already planned."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bulkembed.contract.errors import InputError
from bulkembed.contract.store import open_store, unreadable_as

log = logging.getLogger(__name__)

BATCH_ROWS = 8192


@dataclass(frozen=True)
class Corpus:
    fs: pafs.FileSystem
    files: list[tuple[str, int, str]]  # (path in fs, size, version: S3 ETag or local mtime in ns)
    id_type: pa.DataType  # every file's, or the one their ids are cast to where files differ in width
    row_groups: tuple[tuple[int, ...], ...] = ()  # rows of each row group, per file
    mixed_ids: bool = False  # a file's id type is not id_type (string and large_string, int32 and int64, string_view)

    @property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed, resized or replaced, so a replaced input is a new job."""
        return hashlib.sha256(repr(self.files).encode()).hexdigest()[:16]


def input_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of an input (S3 or local) and the input's path in it."""
    if uri.startswith("s3://"):
        return open_store(uri).arrow_fs()
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _list_files(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, int, str]]]:
    fs, base = input_fs(uri)
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            found = [info]
        elif info.type != pafs.FileType.Directory:
            raise InputError(f"input {uri} does not exist")
        else:
            listed = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                      if f.type == pafs.FileType.File and not _hidden(f.path[len(base):])]
            found = [f for f in listed if f.base_name.endswith(".parquet")]
            if others := [f.path for f in listed if not f.base_name.endswith(".parquet")]:  # said, not dropped silently
                log.warning("%s: %d files not named .parquet are not read (%s%s); rename those that are Parquet",
                            uri, len(others), ", ".join(others[:3]), ", …" if len(others) > 3 else "")
    except OSError as exc:  # pyarrow's: the S3 endpoint unreachable, access denied
        raise InputError(f"cannot list the input {uri}: {exc}") from None
    if not found:
        raise InputError(f"no .parquet files under {uri}")
    versions = _s3_etags(uri) if uri.startswith("s3://") else {f.path: str(f.mtime_ns) for f in found}
    return fs, sorted((f.path, f.size, versions.get(f.path, "")) for f in found)


def _hidden(relative: str) -> bool:
    """A file or folder whose name starts with "_" or "." is not the corpus's, as Spark and pyarrow have it: among
    them bulkembed's own (an OUT inside the input folder: its `_manifest/shards.parquet`)."""
    return any(part[:1] in ("_", ".") for part in relative.split("/") if part)


def _s3_etags(uri: str) -> dict[str, str]:
    """ETags by "bucket/key" (pyarrow's file info has no ETag): a replaced object has a new one, whatever
    its size. Multipart ETags are not content MD5s, but they still change with every upload."""
    store = open_store(uri)
    etags = {}
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix):
        for obj in page.get("Contents", []):
            etags[f"{store.bucket}/{obj['Key']}"] = obj["ETag"].strip('"')
    return etags


def open_corpus(uri: str, id_column: str, text_column: str) -> Corpus:
    """List the input and check every file's schema before anything is queued."""
    if id_column == text_column:
        raise InputError(f"--id-column and --text-column both name {id_column!r}: the id and the text are two columns")
    fs, files = _list_files(uri)
    id_type, file_id_types = None, set()
    total_rows = 0
    row_groups = []
    for path, *_ in files:
        try:
            metadata = pq.read_metadata(fs.open_input_file(path))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {path} as Parquet: {exc}") from exc
        schema = metadata.schema.to_arrow_schema()
        total_rows += metadata.num_rows
        row_groups.append(tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)))
        if metadata.num_rows == 0:
            log.warning("%s has no rows", path)
        for column in (id_column, text_column):
            if column not in schema.names:
                raise InputError(f"{path} has no column {column!r} (columns: {', '.join(schema.names)})")
            if schema.names.count(column) > 1:
                raise InputError(f"{path} has {schema.names.count(column)} columns named {column!r}: which one is "
                                 f"meant cannot be told")
        text_type = schema.field(text_column).type
        # null: a column of no texts at all, as pandas writes one of None; its rows are quarantined, "null text".
        if not (is_text(text_type) or pa.types.is_null(text_type)):
            raise InputError(f"{path}: text column {text_column!r} is {text_type}, not a string")
        this_id = schema.field(id_column).type
        if pa.types.is_null(this_id):  # no ids at all, as pandas writes a column of None: read as the others' type,
            file_id_types.add(this_id)  # its rows quarantined, "null id"
            continue
        if not (pa.types.is_integer(this_id) or is_text(this_id)):
            raise InputError(f"{path}: id column {id_column!r} is {this_id}; use an integer or string id")
        common = plain(this_id) if id_type is None else common_id_type(id_type, plain(this_id))
        if common is None:
            raise InputError(f"{path}: id column is {this_id} but earlier files have {id_type}")
        file_id_types.add(this_id)
        id_type = common
    if total_rows == 0:
        raise InputError(f"input {uri} has no rows")
    if id_type is None:
        raise InputError(f"input {uri}: its id column {id_column!r} is null in every file (no row has an id); "
                         f"name the id column with --id-column")
    return Corpus(fs=fs, files=files, id_type=id_type, row_groups=tuple(row_groups),
                  mixed_ids=file_id_types != {id_type})


def is_text(column_type: pa.DataType) -> bool:
    """Strings however Arrow holds them: string, large_string, string_view (as Polars writes them), or a dictionary
    of them (a pandas categorical)."""
    value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    return pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or pa.types.is_string_view(value_type)


def plain(column_type: pa.DataType) -> pa.DataType:
    """The type a column is read as: strings held as views or a dictionary as plain strings (every output's ids)."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return pa.string() if pa.types.is_string_view(column_type) else column_type


def common_id_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type two files' ids are read as: strings of either offset width as string, integers as int64 (uint64 where
    both are unsigned; an id that does not fit fails its unit, named); None for strings beside integers."""
    if a == b:
        return a
    if all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in (a, b)):
        return pa.string()
    if all(pa.types.is_integer(t) for t in (a, b)):
        return pa.uint64() if all(pa.types.is_unsigned_integer(t) for t in (a, b)) else pa.int64()
    return None


def decode_texts(column: pa.Array) -> tuple[list[str | None], dict[int, str]]:
    """The texts of a batch, and the rows whose bytes are not valid UTF-8 (Parquet does not check)."""
    try:
        column.validate(full=True)
        return column.to_pylist(), {}
    except pa.ArrowInvalid:
        pass
    texts: list[str | None] = []
    bad: dict[int, str] = {}
    for row, raw in enumerate(column.cast(pa.binary()).to_pylist()):
        try:
            texts.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            texts.append(None)
            bad[row] = f"invalid UTF-8 at byte {exc.start}"
    return texts, bad


def decode_ids(column: pa.Array) -> tuple[list, dict[int, str]]:
    """The ids of a batch, and the rows whose string id is not valid UTF-8 (quarantined without one)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.to_pylist(), {}
    ids, bad = decode_texts(column)
    return ids, {row: f"id of invalid UTF-8 ({reason[len('invalid UTF-8 '):]})" for row, reason in bad.items()}


def cast_ids(ids: pa.Array, id_type: pa.DataType | None, source: str) -> pa.Array:
    """A file's ids as the job reads them (`id_type`, where the files' types differ in width); InputError naming the
    file where one does not fit (uint64 beside int64)."""
    if id_type is None or ids.type == id_type:
        return ids
    try:
        return ids.cast(id_type)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source}: an id does not fit {id_type}, the type the input's files share ({exc})") from None


@dataclass(frozen=True)
class Piece:
    """Row groups [first_group, stop_group) of the corpus's file-th file (`path`): rows [first_row, first_row +
    rows)."""

    file: int
    path: str
    first_group: int
    stop_group: int
    first_row: int
    rows: int


@dataclass(frozen=True)
class Unit:
    """Whole row groups of consecutive corpus files, in corpus order (one file's, for jobs planned before units
    spanned files). A planner needs nothing else of the corpus to plan it."""

    index: int  # place in the job's list of units, which names its shards
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(piece.rows for piece in self.pieces)

    def wire(self) -> list:
        """As a planning task carries it (JSON): of_wire reads it back. A unit of one piece goes as units of one file
        always went (index, then the piece's fields), which planners of an older bulkembed read too."""
        if len(self.pieces) == 1:
            return [self.index, *astuple(self.pieces[0])]
        return [self.index, [list(astuple(piece)) for piece in self.pieces]]

    @classmethod
    def of_wire(cls, fields: list) -> Unit:
        if len(fields) == 7:  # one piece: index, then its fields
            return cls(fields[0], (Piece(*fields[1:]),))
        return cls(fields[0], tuple(Piece(*piece) for piece in fields[1]))


def plan_units(corpus: Corpus, unit_rows: int, span_files: bool = True) -> list[Unit]:
    """Whole row groups, gathered in corpus order until a unit holds `unit_rows` rows (one row group may hold more);
    with `span_files`, across files, so a corpus of many small files is cut into full shards rather than a few
    part-filled ones per file. The same corpus and arguments give the same units, so a resubmitted job finds its
    units again."""
    units: list[Unit] = []
    pieces: list[Piece] = []
    gathered = 0  # rows of `pieces`

    def close_unit() -> None:
        nonlocal gathered
        if pieces:
            units.append(Unit(len(units), tuple(pieces)))
            pieces.clear()
            gathered = 0

    for file, groups in enumerate(corpus.row_groups):
        first_group, first_row, rows = 0, 0, 0
        for group, group_rows in enumerate(groups):
            rows += group_rows
            full = gathered + rows >= unit_rows
            if full or group == len(groups) - 1:
                if rows:
                    pieces.append(Piece(file, corpus.files[file][0], first_group, group + 1, first_row, rows))
                    gathered += rows
                if full or not span_files:
                    close_unit()
                first_group, first_row, rows = group + 1, first_row + rows, 0
    close_unit()
    return units


def source_name(fs: pafs.FileSystem, path: str) -> str:
    """A corpus file as the user names it (quarantine records): s3://bucket/key, or its local path."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def read_batches(fs: pafs.FileSystem, unit: Unit, id_column: str, text_column: str,
                 id_type: pa.DataType | None = None) -> Iterator[tuple[Piece, str, int, pa.RecordBatch]]:
    """(piece, its source file, row number in that file of the batch's first row, batch with columns id and text)
    of one unit, a bounded batch at a time."""
    for piece in unit.pieces:
        source = source_name(fs, piece.path)
        row = piece.first_row
        for batch in file_batches(fs, piece.path, BATCH_ROWS, [id_column, text_column],
                                  range(piece.first_group, piece.stop_group)):
            ids = cast_ids(batch.column(0), id_type, source)  # the job's, where files differ
            texts = batch.column(1)
            texts = texts if texts.type == plain(texts.type) else texts.cast(plain(texts.type))
            yield piece, source, row, pa.RecordBatch.from_arrays([ids, texts], names=["id", "text"])
            row += batch.num_rows


def file_batches(fs: pafs.FileSystem, path: str, batch_size: int, columns: list[str],
                 row_groups: range | None = None) -> Iterator[pa.RecordBatch]:
    """The columns of a Parquet file (of some of its row groups), a batch at a time. A file damaged past its footer
    (a page that does not decode) is an InputError naming it; S3's transient errors stay transient, to be retried."""
    with unreadable_as(lambda exc: InputError(f"cannot read {source_name(fs, path)}: {exc}")):
        parquet = pq.ParquetFile(fs.open_input_file(path))
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups)
