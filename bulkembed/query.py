"""Query vectors that match the index: texts embedded one call at a time as a bulk job would embed them.

`Embedder` loads the model once, in an engine process (worker.engines.EngineProcess: the same engine, padding and
pooling the bulk job runs), and embeds each call's texts as rows of a shard: the same prefix table
(contract.job.choose_prefix), the same framing and truncation (worker.rows.query_rows), the same Matryoshka cut and
normalization (worker.rows.finish_vectors). Every decode is padded to one kernel regime (worker.packing), so a query
embedded alone gets the vector the bulk job gave the same text among thousands. `Embedder.for_index` takes all of
that from a finished output: its manifest's job spec and its files' decoded_by. No Redis here.

    from bulkembed import Embedder
    with Embedder.for_index("s3://bucket/embeddings") as embedder:   # or Embedder("model.gguf", task=...)
        vectors = embedder.embed(["what is mean pooling?"], role="query")
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from bulkembed.contract import keys
from bulkembed.contract.errors import InputError, TextError
from bulkembed.contract.job import Dtype, JobSpec, Pooling, Role, Task, choose_prefix
from bulkembed.contract.manifest import manifest_shards, read_manifest
from bulkembed.contract.model import (
    check_dims,
    choose_max_tokens,
    choose_pooling,
    file_sha256,
    is_hub_spec,
    model_info,
    resolve_path,
)
from bulkembed.contract.schema import read_decoded_by, stored_schema
from bulkembed.contract.settings import ProducerSettings, at_least
from bulkembed.contract.store import open_store
from bulkembed.worker.engine import FLASH_ATTN_WORDS, EngineOptions
from bulkembed.worker.engines import EngineProcess
from bulkembed.worker.rows import as_written, finish_vectors
from bulkembed.worker.shard import NOT_FINITE, NOT_FINITE_FLOAT16

log = logging.getLogger(__name__)


class Index(NamedTuple):
    """What a query needs of a finished output: its job spec (its manifest) and how its files were decoded (their
    decoded_by; {} when they predate it, None when it holds no vectors: every row rejected)."""

    out: str
    job: JobSpec
    decoded_by: dict | None


def _check_text(row: int, text: object) -> None:
    """A text llama.cpp's tokenizer can take: a str that encodes as UTF-8 (a command-line argument of undecodable
    bytes arrives as lone surrogates)."""
    if not isinstance(text, str):
        raise TextError(row, f"a {type(text).__name__}, not a str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TextError(row, f"not valid Unicode ({exc.reason} at character {exc.start}: bytes that were not "
                             f"UTF-8?)") from None


class Embedder:
    """One model, resident in an engine process, for many small calls. Options mean what `bulkembed run`'s do."""

    def __init__(self, model: str | Path, *, task: Task | str | None = None, prefix: str | None = None,
                 pooling: Pooling | str | None = None, dims: int | None = None, normalize: bool = True,
                 max_tokens: int | None = None, dtype: Dtype | str = Dtype.FLOAT32,
                 options: EngineOptions | None = None):
        self.path = resolve_path(str(model))
        info = model_info(self.path)
        self.pooling = choose_pooling(info, Pooling(pooling) if pooling else None, self.path.name)
        if self.pooling is Pooling.NONE:
            raise InputError("pooling none gives a matrix per text: embed queries with a pooled model or pooling")
        self.task = Task(task) if task else None
        self.prefix = prefix
        choose_prefix(self.task, Role.QUERY, prefix, self.path.name)  # no task and no prefix: refused now
        self.dims = check_dims(dims, info, self.path.name)
        self.normalize = normalize
        self.dtype = Dtype(dtype)
        self.max_tokens = choose_max_tokens(max_tokens, info, ProducerSettings().max_ubatch, self.path.name)
        self.engine = EngineProcess(self.path, options or engine_options())
        self.closed = False

    @classmethod
    def for_index(cls, index: Index | str | Path, model: str | Path | None = None, *, prefix: str | None = None,
                  options: EngineOptions | None = None) -> Embedder:
        """Embed as the job that wrote `index` (a finished bulk output, local or s3://, or what read_index read of
        it) embedded its rows: its model
        (by default the one it named, checked by sha256), prefix rule, pooling, dims, normalization and max tokens
        from its manifest, and its decoding (padding, flash attention, --isolate) from its files. `prefix`: the
        queries' own, where the job had a custom one (the job's is used for every role otherwise). `options`: the
        rest (threads, GPU layers), and the decoding too where the output's files do not record theirs (written
        before bulkembed recorded it)."""
        out, job, decoded_by = index if isinstance(index, Index) else read_index(str(index))
        if job.pooling is Pooling.NONE:
            raise InputError(f"{out} holds a matrix per text (pooling none): embed queries with a pooled model")
        if model is None and not is_hub_spec(job.model.spec) and not Path(job.model.spec).exists():
            raise InputError(f"{out} was embedded with the model {job.model.spec}, which is not here: pass that file "
                             f"({job.model.file_name}, sha256 {job.model.sha256[:12]}) with --model")
        path = resolve_path(str(model or job.model.spec))
        if file_sha256(path) != job.model.sha256:
            raise InputError(f"{path} is not the model {out} was embedded with ({job.model.file_name}, sha256 "
                             f"{job.model.sha256[:12]})")
        options = options or engine_options()
        if decoded_by:
            options = options.like(decoded_by)
        elif decoded_by is not None:  # an output of no vectors has nothing to agree with
            log.warning("%s does not record how its files were decoded (written before bulkembed did): embedding "
                        "with padding %d, flash attention %s, %s", out, options.min_decode,
                        FLASH_ATTN_WORDS[options.flash_attn], "isolated" if options.isolate else "packed")
        table_prefix = job.task is not None and job.prefix == choose_prefix(job.task, job.role, None, path.name)
        if table_prefix and prefix is not None:
            raise InputError(f"{out} took its prefixes from v4's table for task {job.task.value}; queries get "
                             f"theirs from it too, so --prefix does not apply")
        embedder = cls(path, task=job.task, prefix=None if table_prefix else (job.prefix if prefix is None else prefix),
                       pooling=job.pooling, dims=job.dims, normalize=job.normalize, max_tokens=job.max_tokens,
                       dtype=job.dtype, options=options)
        here = embedder.engine.facts.decoded_by
        if differs := [f"{key} {decoded_by[key]} there, {here[key]} here" for key in ("device", "llama_cpp")
                       if key in (decoded_by or {}) and decoded_by[key] != here[key]]:
            log.warning("%s was embedded on another device or build (%s): vectors differ in their last digits",
                        out, "; ".join(differs))
        return embedder

    def embed(self, texts: Iterable[str], role: Role | str = Role.QUERY) -> np.ndarray:
        """(len(texts), dims), float32 (float16 for dtype float16, as an index of it holds): each text's vector as a
        bulk job with this role would write it. `texts`: a list, or any iterable of str (a generator, a numpy array
        of strings, a pandas Series), read once. A text that cannot be embedded raises TextError naming it."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("embed takes a list of texts, not one string")
        if self.closed:  # its engine process is gone: say why, rather than that it died
            raise ValueError("this Embedder is closed; make another (or embed inside its `with` block)")
        prefix = choose_prefix(self.task, Role(role), self.prefix, self.path.name)
        texts = list(texts)  # a generator is read once
        for row, text in enumerate(texts):
            _check_text(row, text)
        if not texts:
            return as_written(np.zeros((0, self.dims)), self.dtype)
        embedded = self.engine.embed_queries(texts, prefix, self.pooling, self.max_tokens)
        if embedded.rejected:
            row, reason = next(iter(embedded.rejected.items()))
            raise TextError(row, f"could not be embedded: {reason}")
        vectors = finish_vectors(embedded.vectors, self.dims, self.normalize, self.dtype)
        if not (finite := np.isfinite(vectors).all(axis=1)).all():  # the bulk job quarantines such a row
            raise TextError(int(np.argmin(finite)),
                            NOT_FINITE + (NOT_FINITE_FLOAT16 if self.dtype is Dtype.FLOAT16 else ""))
        return vectors

    def close(self) -> None:
        self.closed = True
        self.engine.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_index(out: str) -> Index:
    """The job spec of a finished output and how most of its rows were decoded (a warning where they were decoded in
    more ways than one: a fleet of mixed workers, rows reused from a job with other settings)."""
    store = open_store(out)
    manifest = read_manifest(store)
    if manifest is None:
        raise InputError(f"--index {out}: no {keys.MANIFEST_KEY} there; a finished job's output is needed")
    job = JobSpec.model_validate(manifest["job"])
    if "decodings" not in manifest:  # written before the manifest counted them: one embedded file, one reused one
        embedded = manifest_shards(store, manifest).column("key").to_pylist()[:1]
        for key in embedded + [f["key"] for f in manifest.get("reused_files", [])[:1]]:
            if decoded_by := read_decoded_by(stored_schema(store, key)):
                return Index(out, job, decoded_by)
        return Index(out, job, {})
    decodings = manifest["decodings"]  # most rows first
    if len(decodings) > 1:
        log.warning("%s was embedded in %d ways (workers with other settings, devices or builds): queries are embedded "
                    "as %d of its %d rows were; the others differ in their last digits", out, len(decodings),
                    decodings[0]["rows"], sum(d["rows"] for d in decodings))
    if not decodings:
        return Index(out, job, None)
    main = decodings[0]
    return Index(out, job, read_decoded_by(stored_schema(store, main["example"])) if main["digest"] else {})


def embed(texts: Iterable[str], model: str | Path, role: Role | str = Role.QUERY, **options) -> np.ndarray:
    """Load `model`, embed `texts`, unload: for one call. Keep an `Embedder` for many."""
    with Embedder(model, **options) as embedder:
        return embedder.embed(texts, role)


# ---- `bulkembed embed` ------------------------------------------------------------------------------------------

def add_embed_parser(commands) -> None:
    from bulkembed.contract.model import DEFAULT_MODEL

    parser = commands.add_parser("embed", help="embed texts as a bulk job would (queries): arguments or stdin lines "
                                 "→ JSON lines or .npy")
    parser.add_argument("texts", nargs="*", help="texts to embed; none: one text per line of standard input")
    parser.add_argument("--index", metavar="OUT", default=None,
                        help="a finished bulk output (folder or s3://): embed as its job did, so a text gets its "
                             "row's vector (model, prefix rule, pooling, dims, normalization, max tokens, padding, "
                             "flash attention, --isolate); options that would change that are refused beside it")
    parser.add_argument("--model", default=None, help=f"a local .gguf path or REPO:QUANT (default: the index's "
                        f"model, else {DEFAULT_MODEL})")
    parser.add_argument("--role", choices=[r.value for r in Role], default=Role.QUERY.value,
                        help="query (default) or passage; picks the prefix from v4's table")
    parser.add_argument("--task", choices=[t.value for t in Task], default=None,
                        help="v4 task; read from the model file name when it says it")
    parser.add_argument("--prefix", default=None, help="your own prefix instead of v4's table ('' for none)")
    parser.add_argument("--pooling", choices=[p.value for p in Pooling if p is not Pooling.NONE], default=None,
                        help="default: what the model declares (mean where it declares nothing)")
    parser.add_argument("--dims", type=at_least(1), default=None, help="Matryoshka dimensions, re-normalized")
    parser.add_argument("--no-normalize", action="store_true", help="raw pooled vectors, not L2-normalized")
    parser.add_argument("--max-tokens", type=at_least(1), default=None,
                        help="longer texts are truncated, as in the job")
    parser.add_argument("--out", type=Path, default=None,
                        help="a .npy file (float32, or float16 for an --index of float16; one row per text) or a "
                             ".jsonl file; default: JSON lines on stdout")
    parser.add_argument("--batch", type=at_least(1), default=256, help="texts per engine call")
    parser.add_argument("--threads", type=at_least(0), default=None,
                        help="CPU threads for llama.cpp; 0 = every core (default: BULKEMBED_THREADS, 0)")
    parser.add_argument("--gpu-layers", type=at_least(-1), default=None,
                        help="layers on the GPU; -1 = all (default: BULKEMBED_GPU_LAYERS, -1)")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default=None,
                        help="as the bulk job ran (it changes the last digits of a vector; default: "
                             "BULKEMBED_FLASH_ATTN, auto)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="as the bulk job ran (default: BULKEMBED_ISOLATE); isolated texts get the bits of their "
                             "rows on any backend")
    parser.set_defaults(func=cmd_embed)


def stdin_lines(stream: BinaryIO) -> list[str]:
    """One text a line, UTF-8; a line's end is LF or CRLF (a file from Windows embeds as the same texts)."""
    texts = []
    for number, line in enumerate(stream, 1):
        try:
            texts.append(line.decode("utf-8").removesuffix("\n").removesuffix("\r"))
        except UnicodeDecodeError as exc:
            raise InputError(f"standard input, line {number}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return texts


def engine_options(threads: int | None = None, gpu_layers: int | None = None, flash_attn: str | None = None,
                   isolate: bool | None = None) -> EngineOptions:
    """The engine options queries are embedded with (`bulkembed embed`, Embedder): those given, the rest from
    BULKEMBED_* as a worker of this environment takes them (a pinned BULKEMBED_UBATCH too: it decides where a long
    text is cut), so a query runs as its index did."""
    from bulkembed.contract.settings import WorkerSettings

    settings = WorkerSettings()
    return EngineOptions.from_settings(
        settings, ubatch=settings.ubatch, isolate=isolate,
        gpu_layers=settings.gpu_layers if gpu_layers is None else gpu_layers,
        threads=settings.threads if threads is None else threads, flash_attn=flash_attn or settings.flash_attn)


def embed_options(args) -> EngineOptions:
    """The engine options of `bulkembed embed`: its own options, the rest from BULKEMBED_*."""
    return engine_options(args.threads, args.gpu_layers, args.flash_attn, args.isolate)


def cmd_embed(args) -> int:
    import json
    import sys

    from bulkembed.contract.model import DEFAULT_MODEL

    texts = args.texts or ([] if sys.stdin is None or sys.stdin.isatty() else stdin_lines(sys.stdin.buffer))
    if not texts:
        raise InputError("no texts: pass them as arguments or one a line on standard input")
    if args.out is not None and args.out.suffix not in (".npy", ".jsonl"):
        raise InputError(f"--out {args.out}: a .npy or .jsonl file")
    if args.out is not None and not args.out.parent.is_dir():  # found out now, not after embedding
        raise InputError(f"--out {args.out}: no folder {args.out.parent}")
    if args.out is not None and args.out.is_dir():
        raise InputError(f"--out {args.out} is a folder")
    options = embed_options(args)
    if args.index:
        vector_options = {"--task": args.task, "--pooling": args.pooling, "--dims": args.dims,
                          "--no-normalize": args.no_normalize or None, "--max-tokens": args.max_tokens}
        index = read_index(args.index)
        if index.decoded_by:  # the files record their decoding; older ones leave it to these options
            vector_options |= {"--flash-attn": args.flash_attn, "--isolate": args.isolate}
        if given := [name for name, value in vector_options.items() if value is not None]:
            raise InputError(f"--index takes {', '.join(given)} from the index's job; leave them out")
        embedder = Embedder.for_index(index, args.model, prefix=args.prefix, options=options)
    else:
        embedder = Embedder(args.model or DEFAULT_MODEL, task=args.task, prefix=args.prefix, pooling=args.pooling,
                            dims=args.dims, normalize=not args.no_normalize, max_tokens=args.max_tokens,
                            options=options)
    with embedder:
        batches = []
        for start in range(0, len(texts), args.batch):
            try:
                batches.append(embedder.embed(texts[start:start + args.batch], args.role))
            except TextError as exc:  # numbered in its batch: named as the user gave it, before anything is written
                where = "standard input, line" if not args.texts else "text"
                raise InputError(f"{where} {start + exc.row + 1}: {exc.reason}") from None
        vectors = np.concatenate(batches)
    if args.out is not None and args.out.suffix == ".npy":
        np.save(args.out, vectors)
        return 0
    lines = (json.dumps({"text": text, "embedding": vector.tolist()}) + "\n" for text, vector in zip(texts, vectors,
                                                                                                    strict=True))
    if args.out is None:
        sys.stdout.writelines(lines)
    else:
        args.out.write_text("".join(lines))
    return 0
