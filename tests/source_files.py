"""Small real inputs for the zslabel.sources tests (files, tars) and plan helpers."""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

from conftest import photo


def jpeg(seed: int = 0, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    photo(*size, seed=seed).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def rows_of(plan) -> list[dict]:
    """All rows of the plan's dataset in input order; then the plan's Ray actor that counts the
    read tasks' rows (tars, Parquet) is released, its counts kept for ``plan.finalize()``."""
    rows = sorted(plan.dataset.take_all(), key=lambda r: r["input_index"])
    plan.release()
    return rows


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def list_requests(log: list[dict]) -> list[dict]:
    """The ListObjectsV2 calls in a moto request log."""
    return [r for r in log if "list-type=2" in r["url"]]


def check_plan(plan, rows: list[dict]) -> None:
    """The accounting every finalized plan must keep: each listed entry is a row, a counted
    skip (with a known reason) or a counted duplicate, and each row has its own input_index."""
    from zslabel.sources import SKIP_REASONS

    plan.finalize()
    assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed
    assert plan.expected_rows() == len(rows)
    assert sum(plan.skipped_by_reason.values()) == plan.skipped
    assert set(plan.skipped_by_reason) <= set(SKIP_REASONS)
    assert len({r["input_index"] for r in rows}) == len(rows)


def silently_short_parquet(path: Path, images: list[bytes]) -> Path:
    """A Parquet file (``jpg``, ``caption``; one row group per row, zstd) whose first row group's
    ``caption`` data page header has one byte overwritten: pyarrow's ``iter_batches`` then ends
    that group without a batch and without raising (found by the damaged-Parquet property
    test), while ``read_table`` raises."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "caption": [str(i) for i in range(len(images))]}),
                   path, row_group_size=1, compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset + 1] = 1
    path.write_bytes(bytes(raw))
    return path


@contextmanager
def serving(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering with ``handler`` in a thread, for the
    block: yields its base URL (``http://127.0.0.1:PORT``); stopped however the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
