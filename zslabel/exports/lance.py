"""``--format lance``: the run's rows as a Lance dataset, optionally with a vector index on the
image embeddings (near-duplicate checks, "find more like this").

Needs ``pylance`` (``pip install 'zslabel[lance]'``; ``scripts/setup.sh`` installs it).

Every row of the run is written, error rows included, with every column of the output contract
as it is (``path``, ``input_index``, ``labels``, ``scores``, ``error``, ``width``, ``height``,
``abstained``, hierarchy columns, carried columns) and ``embedding`` as a
``fixed_size_list<float16|float32>[D]`` vector column (null on error rows). Rows stream from the
run's Parquet files in record batches of ``BATCH_ROWS`` through a ``pyarrow.RecordBatchReader``
into ``lance.write_dataset``: memory stays bounded by a few batches whatever the row count
(``benchmarks/export_lance.py`` measures it on 1,000,000 rows).

``--index`` builds a vector index on ``embedding`` (cosine distance; the embeddings are
L2-normalised) after the write. Parameters for N non-null vectors of dimension D
(:func:`index_params`), chosen so small tables work too:

- ``num_partitions`` = round(sqrt(N)), at most N // 256 (Lance trains no more partitions than
  that), at least 1: ~1,000 partitions of ~1,000 vectors for a million rows, 1 for a sample.
- N < 10,000: ``IVF_FLAT`` (full vectors in each partition: exact distances, and at this size
  a search reads little anyway).
- N >= 10,000: ``IVF_PQ`` with ``num_sub_vectors`` = D / 16 (16 dimensions per 1-byte code:
  32 bytes per 512-d vector) where 16 divides D, else D / 8, else D / 4, else 1. PQ distances
  are approximate: pass ``refine_factor`` (e.g. 10) to a query to re-rank by exact distance.

Query it with Lance (LanceDB opens the same table)::

    ds = lance.dataset("TABLE.lance")
    ds.to_table(nearest={"column": "embedding", "q": vector, "k": 10, "refine_factor": 10})

Lance writes the table itself: a local path, or an object-store URI through Lance's own
credential chain (``--storage-options`` applies to reading the run, not to Lance).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import time

import pyarrow as pa

from ..errors import ConfigError, OutputError, ZslabelError
from ..output import EMBEDDING, ERROR, PATH
from ..storage import is_local
from ..store import output_filesystem
from .common import BATCH_ROWS, ExportResult, check_free, embedding_dim, open_run

log = logging.getLogger(__name__)

NAME = "lance"
INDEX_TYPES = ("auto", "IVF_FLAT", "IVF_PQ")
# Below this many vectors an IVF_FLAT index (exact) is used; PQ pays off on larger tables.
PQ_MIN_VECTORS = 10_000
# Rows per Lance row group / file: Lance's defaults, named here so the benchmark can report them.
MAX_ROWS_PER_GROUP = 1024
MAX_ROWS_PER_FILE = 1024 * 1024


def _lance():
    """The ``lance`` module, or a ConfigError telling how to install it."""
    try:
        import lance
    except ImportError as exc:
        raise ConfigError("--format lance needs pylance: pip install 'zslabel[lance]' "
                          f"(or pip install pylance); import failed: {exc}") from exc
    return lance


def index_params(vectors: int, dim: int, index_type: str = "auto", num_partitions: int | None = None,
                 num_sub_vectors: int | None = None) -> dict:
    """Vector index parameters for ``vectors`` non-null vectors of dimension ``dim`` (module
    docstring); explicit values win.

    Returns:
        Keyword arguments for ``LanceDataset.create_index`` (``index_type``, ``metric``,
        ``num_partitions`` and, for IVF_PQ, ``num_sub_vectors``).

    Raises:
        ConfigError: an unknown index type, ``num_sub_vectors`` not dividing ``dim``, or a
            non-positive count.
    """
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"--index-type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}")
    if index_type == "auto":
        index_type = "IVF_PQ" if vectors >= PQ_MIN_VECTORS else "IVF_FLAT"
    if num_partitions is None:
        num_partitions = max(1, min(round(math.sqrt(vectors)), vectors // 256))
    if num_partitions < 1:
        raise ConfigError(f"--num-partitions must be at least 1, not {num_partitions}")
    params = {"index_type": index_type, "metric": "cosine", "num_partitions": int(num_partitions)}
    if index_type == "IVF_PQ":
        if num_sub_vectors is None:
            num_sub_vectors = next((dim // w for w in (16, 8, 4) if dim % w == 0), 1)
        if num_sub_vectors < 1 or dim % num_sub_vectors:
            raise ConfigError(f"--num-sub-vectors must divide the embedding dimension {dim}, not {num_sub_vectors}")
        params["num_sub_vectors"] = int(num_sub_vectors)
    return params


def lance_names(schema: pa.Schema) -> tuple[pa.Schema, dict[str, str]]:
    """``schema`` with each top-level column name Lance refuses renamed, and the renames.

    Lance takes ``.`` in a name as a path into a struct and refuses a top-level field holding
    one (lance#816): a carried column from a JSONL key ``a.b`` failed the export after the
    whole run. Each ``.`` becomes ``_`` (then ``_2``, ``_3``... until the name is free).
    """
    taken = set(schema.names)
    renamed: dict[str, str] = {}
    fields = []
    for f in schema:
        if "." in f.name:
            base = new = f.name.replace(".", "_")
            n = 1
            while new in taken:
                n += 1
                new = f"{base}_{n}"
            taken.add(new)
            renamed[f.name] = new
            f = f.with_name(new)
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata), renamed


def _without_source(exc: BaseException) -> str:
    """Lance's message without the Rust source location it ends with (``, /.../object_store.rs:1576:42``):
    a path on the machine that built the wheel, which tells the user nothing."""
    return re.sub(r",\s*\S+\.rs:\d+:\d+\s*$", "", str(exc).strip())


def _is_lance_or_empty(fs, path: str) -> bool:
    """Whether ``--overwrite`` may write a new version at ``path``: a Lance dataset (its
    ``_versions`` folder) or an empty folder. Lance's ``mode="overwrite"`` writes into whatever
    folder it is given, beside the files already there."""
    if not fs.isdir(path):
        return False
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    return not names or "_versions" in names


def export_lance(source: str, output: str, *, index: bool = False, index_type: str = "auto",
                 num_partitions: int | None = None, num_sub_vectors: int | None = None,
                 overwrite: bool = False, storage_options: dict | None = None,
                 batch_rows: int = BATCH_ROWS) -> ExportResult:
    """Write every row of a finished run to a Lance dataset at ``output``; with ``index``, build a
    cosine vector index on ``embedding``.

    Args:
        source: output folder of ``zslabel label``/``relabel``.
        output: the Lance dataset to create (``TABLE.lance``).
        index, index_type, num_partitions, num_sub_vectors: see :func:`index_params`.
        overwrite: replace an existing dataset at ``output`` (Lance's ``mode="overwrite"``: a new
            version; readers of the old one are not disturbed).
        batch_rows: rows per record batch read from the run (the unit of memory).

    Returns:
        Counts; ``notes`` name the index and its parameters.

    Raises:
        ConfigError: pylance not installed; ``index`` without an ``embedding`` column (the
            message says to rerun with ``--store-embeddings``); bad index parameters.
        InputError: not a finished run, or unreadable files.
        OutputError: ``output`` exists and ``overwrite`` is False; ``output`` is something
            other than a Lance dataset or an empty folder (even with ``overwrite``).
    """
    started = time.perf_counter()
    lance = _lance()
    run = open_run(source, storage_options, required=(PATH, ERROR))
    dim = embedding_dim(run.schema)
    if index and dim is None:
        raise ConfigError(f"--index needs image embeddings, and {source} has no '{EMBEDDING}' column: rerun the "
                          "labeling with --store-embeddings (zslabel label INPUT ... --store-embeddings --output "
                          f"{source} --overwrite), then export again")
    if index and dim is not None:
        index_params(max(1, run.rows or 1), dim, index_type, num_partitions, num_sub_vectors)  # fail before writing
    check_free(output, overwrite, storage_options, "Lance dataset", replaceable=_is_lance_or_empty)
    # The Parquet files' metadata (fingerprint, run id) describes the run's files, not the table.
    schema, renamed = lance_names(run.schema.remove_metadata())
    counts = {"rows": 0, "errors": 0, "vectors": 0}
    failed: list[ZslabelError] = []

    def batches():
        try:
            for batch in run.batches(batch_size=batch_rows):
                counts["rows"] += batch.num_rows
                counts["errors"] += batch.num_rows - batch.column(ERROR).null_count
                if dim:
                    counts["vectors"] += batch.num_rows - batch.column(EMBEDDING).null_count
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        except ZslabelError as exc:
            failed.append(exc)  # Lance re-raises it wrapped in its own error, traceback in the text
            raise

    fs, path = output_filesystem(output, storage_options)
    created = is_local(fs) and not fs.exists(path)
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    try:
        dataset = lance.write_dataset(reader, output, schema=schema, mode="overwrite" if overwrite else "create",
                                      max_rows_per_group=MAX_ROWS_PER_GROUP, max_rows_per_file=MAX_ROWS_PER_FILE)
    except Exception as exc:  # noqa: BLE001 - Lance raises OSError/ValueError/RuntimeError by cause
        if created:
            # nothing was committed (no version): leave no folder that a rerun would call occupied
            shutil.rmtree(path, ignore_errors=True)
        if failed:
            raise failed[0] from None
        raise OutputError(f"cannot write Lance dataset {output}: {type(exc).__name__}: {_without_source(exc)}") from exc
    notes = [f"{counts['errors']} error rows included (null labels/embedding)"] if counts["errors"] else []
    if renamed:
        notes.append("columns renamed for Lance: " + ", ".join(f"{a!r} -> {b!r}" for a, b in renamed.items()))
    if dim:
        notes.append(f"embedding: {dim}-d vectors, {counts['vectors']} non-null")
    if index and dim is not None:
        if not counts["vectors"]:
            raise ConfigError(f"--index: {source} has an '{EMBEDDING}' column but every row is an error row; "
                              "nothing to index (the table was written without an index)")
        params = index_params(counts["vectors"], dim, index_type, num_partitions, num_sub_vectors)
        t0 = time.perf_counter()
        quiet = logging.getLogger("pylance")  # it logs its Rust timing at INFO, which the CLI shows
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            dataset.create_index(EMBEDDING, replace=True, **params)
        finally:
            quiet.setLevel(level)
        notes.append("index " + ", ".join(f"{k}={v}" for k, v in params.items())
                     + f" built in {time.perf_counter() - t0:.1f} s")
    return ExportResult(NAME, [output], counts["rows"], counts["rows"], {}, notes, time.perf_counter() - started)


# --- command line -------------------------------------------------------------------------------

def add_arguments(group: argparse._ArgumentGroup) -> None:
    """This format's flags (their dests are checked against ``--format`` by the CLI)."""
    group.add_argument("--index", action="store_true", default=None,
                       help="build a cosine vector index on 'embedding' (needs a --store-embeddings run)")
    group.add_argument("--index-type", choices=INDEX_TYPES,
                       help="auto (default: IVF_FLAT below 10,000 vectors, else IVF_PQ), IVF_FLAT or IVF_PQ")
    group.add_argument("--num-partitions", type=int, help="IVF partitions (default sqrt(N), at most N/256)")
    group.add_argument("--num-sub-vectors", type=int, help="IVF_PQ sub-vectors, must divide the dimension "
                       "(default D/16)")


def run(args: argparse.Namespace) -> ExportResult:
    """``zslabel export --format lance`` from parsed flags."""
    return export_lance(args.source, args.output, index=bool(args.index), index_type=args.index_type or "auto",
                        num_partitions=args.num_partitions, num_sub_vectors=args.num_sub_vectors,
                        overwrite=args.overwrite, storage_options=args.storage_options or {})
