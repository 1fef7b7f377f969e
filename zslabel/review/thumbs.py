"""Thumbnails of the rows a report shows, read from wherever the rows say, made in parallel.

Where the bytes come from (the same readers the labeling run used, not another copy):

- rows of tar shards and Parquet image-bytes files (kinds read in tasks): the run manifest's
  ``input_files`` names the file, ``input_index // FILE_INDEX_STRIDE`` its position; the file is
  streamed once with ``sources.webdataset.read_tar`` / ``sources.parquet.read_parquet``, and the
  wanted rows are picked by ``input_index`` (reading stops once all are found);
- every other row (local files, ``s3://`` and other fsspec URIs, manifest entries):
  ``sources.fetch_bytes(path)``.

Pixels come from ``decode.decode_image`` (EXIF orientation, alpha on white, deep greys, every
rule of the labeling decode), scaled so the longer side is ``THUMB_PX`` when the row knows the
image's size, else the centre square; saved as JPEG. Anything that fails (file gone, bytes no
longer an image, a row that was an error) gets the shared placeholder: a thumbnail never fails
the report. Work runs in a ``ThreadPoolExecutor`` of ``workers`` threads (Pillow decodes and
storage reads release the GIL), one task per container file or per direct image, so at most
``workers`` images' bytes are in memory at once (plus the wanted members of one container each).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..decode import PreprocessSpec, decode_image
from ..sources import FILE_INDEX_STRIDE, fetch_bytes
from ..sources import parquet as parquet_source
from ..sources import webdataset as webdataset_source
from ..sources.common import new_counts
from .collect import Row

log = logging.getLogger(__name__)

THUMB_PX = 160
JPEG_QUALITY = 80
THUMB_DIR = "thumbs"
PLACEHOLDER = f"{THUMB_DIR}/placeholder.png"


@dataclass
class Thumb:
    """A row's picture in the report: ``src`` relative to the report folder; ``note`` says why
    it is the placeholder (None when it is the image)."""

    src: str
    note: str | None = None


def thumb_spec(width: int | None, height: int | None) -> PreprocessSpec:
    """Decode geometry: longer side ``THUMB_PX``, aspect kept, when the size is known; else the
    centre ``THUMB_PX`` square. Never upscales beyond ``THUMB_PX``; JPEG draft decoding on."""
    if width and height and width > 0 and height > 0:
        scale = THUMB_PX / max(width, height)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        return PreprocessSpec(resize_mode="exact", size_hw=(h, w), resample=2, fast=True)
    return PreprocessSpec(resize_mode="shortest_edge", shortest_edge=THUMB_PX, crop_hw=(THUMB_PX, THUMB_PX),
                          resample=2, fast=True)


def write_placeholder(report_dir: str) -> None:
    """The grey square every unreadable image shows (a real PNG, so the page's images all decode)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (THUMB_PX, THUMB_PX), (226, 226, 226))
    draw = ImageDraw.Draw(im)
    draw.line([(0, 0), (THUMB_PX - 1, THUMB_PX - 1)], fill=(190, 190, 190), width=2)
    draw.line([(0, THUMB_PX - 1), (THUMB_PX - 1, 0)], fill=(190, 190, 190), width=2)
    draw.text((THUMB_PX // 2 - 28, THUMB_PX // 2 - 6), "no image", fill=(90, 90, 90))
    os.makedirs(os.path.join(report_dir, THUMB_DIR), exist_ok=True)
    im.save(os.path.join(report_dir, PLACEHOLDER), optimize=True)


def thumb_name(path: str) -> str:
    """File name of a path's thumbnail: a hash (names hold any character; same path, same file)."""
    return f"{THUMB_DIR}/{hashlib.sha1(path.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}.jpg"


def _save(data: bytes | None, row: Row, report_dir: str, key: str) -> Thumb:
    if data is None:
        return Thumb(PLACEHOLDER, "image could not be read")
    decoded = decode_image(data, thumb_spec(row.width, row.height))
    if decoded.error is not None:
        return Thumb(PLACEHOLDER, decoded.error)
    assert decoded.pixels is not None  # DecodedImage: no pixels only with an error
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(decoded.pixels).save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    name = thumb_name(key)
    with open(os.path.join(report_dir, name), "wb") as fh:
        fh.write(buf.getvalue())
    return Thumb(name)


class ImageReader:
    """Finds the bytes of output rows (module docstring); built from the run manifest."""

    def __init__(self, manifest: dict | None, storage_options: dict | None = None):
        manifest = manifest or {}
        self.storage_options = dict(storage_options or {})
        self.input_files: list[str] = list(manifest.get("input_files") or [])
        self.image_column = (manifest.get("config") or {}).get("image_column")

    def container_of(self, row: Row) -> str | None:
        """The tar or Parquet input file holding ``row``'s bytes, or None (read ``row.path``)."""
        if not self.input_files or row.input_index is None:
            return None
        number = row.input_index // FILE_INDEX_STRIDE
        if not 0 <= number < len(self.input_files):
            return None
        uri = self.input_files[number]
        name = uri.lower()
        if name.endswith(webdataset_source.SUFFIXES) or name.endswith(parquet_source.SUFFIXES):
            return uri
        return None

    def read_container(self, uri: str, rows: list[Row]) -> dict[int, bytes | None]:
        """``{input_index: bytes or None}`` for ``rows`` of one tar shard or Parquet file."""
        indexes: list[int] = []
        for r in rows:
            assert r.input_index is not None  # container_of chose this container by the row's input_index
            indexes.append(r.input_index)
        file_index = indexes[0] // FILE_INDEX_STRIDE
        wanted = set(indexes)
        found: dict[int, bytes | None] = {}
        counts = new_counts()  # the readers count skipped members by reason
        if uri.lower().endswith(webdataset_source.SUFFIXES):
            tables = webdataset_source.read_tar(uri, file_index, self.storage_options, counts)
        else:
            tables = parquet_source.read_parquet(uri, file_index, self.storage_options, counts,
                                                 image_column=self._image_column(uri), carried_columns=[],
                                                 find_own_column=self.image_column is None)
        try:
            for table in tables:
                sel = table.filter(pc.is_in(table.column("input_index"), pa.array(sorted(wanted), pa.int64())))
                for idx, data, path, error in zip(*(sel.column(c).to_pylist()
                                                    for c in ("input_index", "data", "path", "read_error"))):
                    if data is None and error is None:  # a Hugging Face Image row naming its file
                        data, _ = fetch_bytes(path, self.storage_options)
                    found[idx] = data
                if len(found) >= len(wanted):
                    break
        finally:
            tables.close()  # stop streaming the rest of the file
        return found

    def _image_column(self, uri: str) -> str:
        schema = parquet_source.file_schema(uri, self.storage_options)
        column = parquet_source.find_image_column(schema, self.image_column, uri)
        assert column is not None  # required=True (the default): raises instead of returning None
        return column


def make_thumbnails(rows: list[Row], reader: ImageReader, report_dir: str, *, workers: int = 8,
                    on_done: Callable[[int, int], None] | None = None) -> dict[int, Thumb]:
    """Thumbnails of ``rows`` (deduplicated by path) into ``report_dir/thumbs``.

    ``on_done(images, placeholders)`` is called as tasks finish (progress).

    Returns:
        ``{row ref: Thumb}`` for every row; error rows and unreadable images get the placeholder.
    """
    write_placeholder(report_dir)
    out: dict[int, Thumb] = {}
    # One thumbnail per image: rows naming one file share it; in a tar or Parquet file two rows
    # may share a path (a repeated member name, a shared url) and are two images.
    by_path: dict[str, list[Row]] = {}
    where: dict[str, str | None] = {}
    key_of: dict[int, str] = {}
    for r in rows:
        if r.error is not None:
            out[r.ref] = Thumb(PLACEHOLDER, r.error.split(":", 1)[0])
            continue
        uri = reader.container_of(r)
        key = r.path if uri is None else f"{r.path}\0{r.input_index}"
        by_path.setdefault(key, []).append(r)
        where[key] = uri
        key_of[r.ref] = key
    containers: dict[str, list[Row]] = {}
    direct: list[Row] = []
    for key, same in by_path.items():
        uri = where[key]
        (containers.setdefault(uri, []) if uri else direct).append(same[0])

    def one(row: Row) -> dict[str, Thumb]:
        try:
            data, err = fetch_bytes(row.path, reader.storage_options)
            return {row.path: _save(data, row, report_dir, row.path) if err is None else Thumb(PLACEHOLDER, err)}
        except Exception as exc:  # noqa: BLE001 - one picture never fails the report
            log.debug("thumbnail of %s failed: %s", row.path, exc, exc_info=True)
            return {row.path: Thumb(PLACEHOLDER, f"{type(exc).__name__}: {exc}")}

    def container(uri: str, members: list[Row]) -> dict[str, Thumb]:
        try:
            found = reader.read_container(uri, members)
        except Exception as exc:  # noqa: BLE001 - an unreadable shard: placeholders for its rows
            log.debug("reading %s failed: %s", uri, exc, exc_info=True)
            found = {}
        done = {}
        for r in members:
            try:
                data = found.get(r.input_index) if r.input_index is not None else None
                done[key_of[r.ref]] = _save(data, r, report_dir, key_of[r.ref])
            except Exception as exc:  # noqa: BLE001
                done[key_of[r.ref]] = Thumb(PLACEHOLDER, f"{type(exc).__name__}: {exc}")
        return done

    if on_done and len(out):
        on_done(len(out), len(out))  # error rows: placeholders at once
    by_thumb: dict[str, Thumb] = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zslabel-thumb") as pool:
        # per task: the output rows it pictures (rows sharing a path share the thumbnail)
        futures = {pool.submit(one, r): len(by_path[r.path]) for r in direct}
        futures.update({pool.submit(container, uri, members): sum(len(by_path[key_of[r.ref]]) for r in members)
                        for uri, members in containers.items()})
        for fut in cf.as_completed(futures):
            done = fut.result()
            by_thumb.update(done)
            if on_done:
                on_done(futures[fut], sum(len(by_path[p]) for p, t in done.items() if t.note is not None))
    for path, same in by_path.items():
        for r in same:
            out[r.ref] = by_thumb.get(path, Thumb(PLACEHOLDER, "image could not be read"))
    return out
