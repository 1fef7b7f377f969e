"""Ray blocks for every input kind, built in one place.

Two shapes: a table planned on the driver (folder, glob, manifests) read block by block by read tasks,
and a list of container files (tars, Parquet) read by one task per file with a kind's streaming
reader, whose counts a small actor collects.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import INTERNAL_ERROR, error_string
from .common import CORE_SCHEMA, FILE_INDEX_STRIDE, InputPlan, internal_error_detail, new_counts

logger = logging.getLogger(__name__)

# Rows per Ray block for driver-planned kinds: enough blocks for parallel decode on a large
# cluster (a block is the unit of a task), few enough that 10^8 paths do not mean 10^6 objects.
MIN_ROWS_PER_BLOCK = 64
MAX_ROWS_PER_BLOCK = 65_536
TARGET_BLOCKS = 2_000
MAX_CHUNKS = 64
# On a small cluster, blocks of MIN_ROWS_PER_BLOCK small images are ~50 ms tasks, and the gaps
# between one decode slot's tasks (Ray Data's scheduling loop) left it idle ~45% of the time:
# 100,000 64x64 JPEGs on 2 cores took 221 s with 64-row blocks and 142 s with 1,024-row blocks
# (benchmarks/README.md, "blocks sized by the cluster's CPUs"). BLOCKS_PER_CPU
# blocks per cluster CPU balance the tail; MAX_ROWS_PER_CPU_BLOCK bounds a task's length and what
# a retry redoes: with 4,096 the last tenth of a 100,000-image run went at 0.71 of the first
# tenth's rate (one long last task), with 1,024 at 1.57.
BLOCKS_PER_CPU = 8
MAX_ROWS_PER_CPU_BLOCK = 1024

# Streaming readers emit a batch at this many rows or bytes, whichever first, so a file's
# images flow downstream while the rest of the file is still being read.
EMIT_ROWS = 64
EMIT_BYTES = 64 * 1024 * 1024
# Read-ahead for streaming a remote tar/Parquet file sequentially.
STREAM_BLOCK_SIZE = 8 * 1024 * 1024

# A streaming reader: (file URI, file_index, storage_options, counts, **kind kwargs) -> tables
# with CORE_SCHEMA + the carried string columns. It fills counts (common.new_counts: listed,
# skipped, reasons, examples; common.count_skip counts one skip).
Reader = Callable[..., Iterator[pa.Table]]


def schema_with(carried: list[str]) -> pa.Schema:
    """The core schema followed by the carried string columns."""
    return pa.schema(list(CORE_SCHEMA) + [(c, pa.string()) for c in carried])


def core_table(paths: pa.Array, carried: dict[str, pa.Array] | None = None) -> pa.Table:
    """A driver-planned table: ``paths`` (N,) strings to fetch, input_index 0..N-1, carried."""
    n = len(paths)
    cols = {
        "path": paths.cast(pa.string()),
        "input_index": pa.array(np.arange(n, dtype=np.int64)),
        "data": pa.nulls(n, pa.binary()),
        "read_error": pa.nulls(n, pa.string()),
    }
    for name, arr in (carried or {}).items():
        cols[name] = arr.cast(pa.string())
    return pa.table(cols)


def error_table(paths: list[str], indices: list[int], error: str, carried: list[str]) -> pa.Table:
    """Rows that carry only an error: no bytes, null carried columns."""
    n = len(paths)
    cols = [pa.array(paths, pa.string()), pa.array(indices, pa.int64()), pa.nulls(n, pa.binary()),
            pa.array([error] * n, pa.string())] + [pa.nulls(n, pa.string()) for _ in carried]
    return pa.Table.from_arrays(cols, schema=schema_with(carried))


def rows_per_block(n: int, cluster_cpus: float | None = None) -> int:
    """Rows per block for ``n`` planned rows: at most ``TARGET_BLOCKS`` blocks and, given the
    CPUs the cluster has (or may scale to), about ``BLOCKS_PER_CPU`` blocks per CPU (blocks of
    at most ``MAX_ROWS_PER_CPU_BLOCK`` rows on that count); always ``MIN_ROWS_PER_BLOCK`` to
    ``MAX_ROWS_PER_BLOCK`` rows."""
    rows = -(-n // TARGET_BLOCKS)
    if cluster_cpus:
        rows = max(rows, min(MAX_ROWS_PER_CPU_BLOCK, -(-n // math.ceil(BLOCKS_PER_CPU * cluster_cpus))))
    return max(MIN_ROWS_PER_BLOCK, min(MAX_ROWS_PER_BLOCK, rows))


def dataset_from_table(table: pa.Table, task_options: dict | None = None, cluster_cpus: float | None = None):
    """A lazy Ray Dataset over a driver-built table, in blocks of ``rows_per_block`` rows
    (``cluster_cpus``: see there; None sizes blocks by the row count alone).

    The table goes to the object store in at most ``MAX_CHUNKS`` pieces (a few ``ray.put``), and
    each block is sliced from its piece by a read task when the dataset executes
    (``_planned_blocks_class``): ``ray.data.from_arrow`` with one table per block costs ~3 ms of driver
    time per block (6 s for 2,000 blocks), while one block per table would leave a single task
    to decode everything. A worker fetches only the piece its block lies in.

    ``task_options`` (Ray remote arguments: ``num_cpus``, ``scheduling_strategy``,
    ``max_retries``) should be the next map stage's: Ray Data then fuses the read into that
    stage's tasks, one task per block. As separate stages each block took two CPU slots in
    turn, which halved the rate of a decode-bound run on 2 cores (benchmarks/README.md).
    """
    import ray
    import ray.data

    n = table.num_rows
    step = rows_per_block(n, cluster_cpus)
    n_blocks = max(1, -(-n // step))
    blocks_per_chunk = -(-n_blocks // MAX_CHUNKS)
    chunk_rows = blocks_per_chunk * step
    chunks = [ray.put(table.slice(i, chunk_rows)) for i in range(0, max(n, 1), chunk_rows)]
    options = dict(task_options or {})
    return ray.data.read_datasource(
        _planned_blocks_class()(chunks, blocks_per_chunk, step, n, table.schema), override_num_blocks=n_blocks,
        num_cpus=options.pop("num_cpus", None), ray_remote_args=options)


@functools.cache
def _planned_blocks_class():
    """``PlannedBlocks``, a Ray Data ``Datasource`` whose read tasks slice blocks of ``rows``
    rows out of the planned table's pieces in the object store, one read task per block.
    Built on first use so that importing this module does not import Ray."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class PlannedBlocks(Datasource):
        def __init__(self, chunks: list, blocks_per_chunk: int, rows: int, n: int, schema: pa.Schema):
            self._chunks, self._per_chunk, self._rows, self._n, self._schema = chunks, blocks_per_chunk, rows, n, schema

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list:
            tasks = []
            for b in range(max(1, -(-self._n // self._rows))):
                read = functools.partial(_read_block, self._chunks[b // self._per_chunk],
                                         (b % self._per_chunk) * self._rows, self._rows)
                meta = BlockMetadata(num_rows=max(0, min(self._rows, self._n - b * self._rows)), size_bytes=None,
                                     exec_stats=None, input_files=None)
                tasks.append(ReadTask(read, meta, schema=self._schema))
            return tasks

    return PlannedBlocks


def _read_block(chunk_ref, offset: int, rows: int) -> list[pa.Table]:
    """Ray read task: one block, sliced from its piece of the planned table."""
    import ray

    return [ray.get(chunk_ref).slice(offset, rows)]


class _Tally:
    """Per-file counts reported by read tasks: {file_uri: counts (``common.new_counts``)}."""

    def __init__(self) -> None:
        self.per_file: dict[str, dict] = {}

    def put(self, uri: str, counts: dict) -> None:
        self.per_file[uri] = counts

    def get(self) -> dict[str, dict]:
        return self.per_file


class TallyCounts:
    """The driver's side of a :class:`_Tally` actor: called, the per-file counts so far;
    :meth:`close` keeps the last counts and kills the actor. Its handle is held by the
    dataset's task arguments, which Ray Data keeps after the run: without the kill every tar or
    Parquet run of a process left one idle actor process behind (119 after the test suite,
    each a few % of a core)."""

    def __init__(self, actor: Any) -> None:
        self._actor: Any = actor
        self._last: dict[str, dict] = {}

    def __call__(self) -> dict[str, dict]:
        import ray

        if self._actor is not None:
            self._last = ray.get(self._actor.get.remote())
        return self._last

    def close(self) -> None:
        import ray

        if self._actor is None:
            return
        try:
            self()
        finally:
            ray.kill(self._actor)
            self._actor = None


def planned_dataset(table: pa.Table, options) -> dict[str, Any]:
    """The ``InputPlan`` keyword that reads a driver-planned table: ``_open`` (for
    ``InputPlan.to_dataset``: :func:`dataset_from_table`, by default with the options'
    ``task_options``/``cluster_cpus``), or ``_local`` when ``options.use_ray`` is False
    (``InputPlan.read_locally``)."""
    if not options.use_ray:
        return {"_local": lambda: [table]}

    def open_dataset(task_options: dict | None, cluster_cpus: float | None) -> tuple[Any, None]:
        return dataset_from_table(table, options.task_options if task_options is None else task_options,
                                  options.cluster_cpus if cluster_cpus is None else cluster_cpus), None

    return {"_open": open_dataset}


def streaming_plan(kind: str, files: list[str], reader: Reader, storage_options: dict,
                   carried: list[str], planned: dict | None = None, use_ray: bool = True,
                   **reader_kwargs: Any) -> InputPlan:
    """A plan reading ``files`` with one Ray task per file, streaming batches as it goes (the
    dataset and the actor collecting the counts are made by ``InputPlan.to_dataset``; ``use_ray``
    False: ``InputPlan.read_locally`` runs the reader here).

    ``planned``: what planning itself listed and skipped (``common.new_counts``; files beside
    the shards), added to the read tasks' counts by ``InputPlan.finalize``.

    ``ray.data.range`` rather than ``from_items``: no driver-side ``ray.put`` per file (10,000
    shards would be 10,000 puts); the URIs travel once, in the reading UDF's arguments.
    """
    planned = planned or new_counts()
    if not use_ray:
        per_file: dict[str, dict] = {}

        def local() -> list[pa.Table]:
            tables = []
            for file_index, uri in enumerate(files):
                counts = new_counts()
                tables += list(read_file(reader, uri, file_index, storage_options, counts, carried,
                                         **reader_kwargs))
                per_file[uri] = counts
            return tables

        return InputPlan(kind=kind, listed=None, skipped=planned["skipped"],
                         skipped_examples=list(planned["examples"]), skipped_by_reason=dict(planned["reasons"]),
                         duplicates_removed=0, planning_seconds=0.0, carried_columns=carried,
                         planned_files=list(files), _tally=lambda: per_file, _planned_counts=planned,
                         _local=local)

    def open_dataset(task_options: dict | None, cluster_cpus: float | None) -> tuple[Any, TallyCounts]:
        # One task per file whatever the cluster: task options and CPUs do not shape it.
        import ray
        import ray.data

        # An actor handle; Ray's annotations type its methods as _Tally's own (no ``.remote``).
        tally: Any = ray.remote(num_cpus=0)(_Tally).remote()
        dataset = ray.data.range(len(files), override_num_blocks=len(files)).map_batches(
            # Ray annotates the UDF as one-argument; the others come from fn_kwargs.
            _read_files, batch_size=1, batch_format="pyarrow",  # type: ignore[arg-type]
            fn_kwargs={"files": files, "reader": reader, "storage_options": storage_options,
                       "carried": carried, "tally": tally, "reader_kwargs": reader_kwargs})
        return dataset, TallyCounts(tally)

    return InputPlan(kind=kind, listed=None, skipped=planned["skipped"],
                     skipped_examples=list(planned["examples"]), skipped_by_reason=dict(planned["reasons"]),
                     duplicates_removed=0, planning_seconds=0.0, carried_columns=carried,
                     planned_files=list(files), _planned_counts=planned, _open=open_dataset)


def _read_files(batch: pa.Table, files: list[str], reader: Reader, storage_options: dict,
                carried: list[str], tally, reader_kwargs: dict) -> Iterator[pa.Table]:
    """Ray UDF: file numbers in (column ``id``), batches of their rows out."""
    import ray

    for file_index in batch.column("id").to_pylist():
        uri = files[file_index]
        counts = new_counts()
        yield from read_file(reader, uri, file_index, storage_options, counts, carried,
                             **reader_kwargs)
        ray.get(tally.put.remote(uri, counts))


def read_file(reader: Reader, uri: str, file_index: int, storage_options: dict, counts: dict,
              carried: list[str], **reader_kwargs: Any) -> Iterator[pa.Table]:
    """Run one streaming reader; a bug that escapes it costs one ``internal_error`` row.

    Readers turn storage failures into ``read_error`` rows and guard each member/row
    themselves; this is the last net, so no exception from reading one file fails the job.
    The row stands for the rest of the file; it takes the last index of the file's range,
    which no member row reaches.
    """
    try:
        yield from reader(uri, file_index, storage_options, counts, **reader_kwargs)
    except Exception as exc:  # noqa: BLE001 - the safety net: one file, not the job
        detail = internal_error_detail(uri, exc, logger)
        counts["listed"] += 1
        yield error_table([uri], [(file_index + 1) * FILE_INDEX_STRIDE - 1],
                          error_string(INTERNAL_ERROR, detail), carried)
