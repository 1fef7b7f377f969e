"""Input kind ``webdataset``: tar shards (``shards-{000..099}.tar``, a glob, or a folder of
shards), read streaming in one Ray task per shard, so labeling starts before all are read.

Members are grouped into samples by key (the member path up to the first dot of its base
name, the WebDataset rule). Each image member is a row; its sample's ``.json``/``.txt``
members are carried in the ``json``/``txt`` columns. Member names lose a leading ``./`` or
``/`` (``tar -C dir -cf x.tar .`` writes ``./0000.png``); ``..`` stays (nothing is extracted,
so it is only a name); undecodable bytes become ``%XX``. A name repeated in one tar is two rows.

Counts (``listed == rows + skipped``): every image member is listed; hidden and non-image,
non-sidecar members are listed and skipped; a sidecar is part of its image's row and not listed
on its own, unless its sample has no image, in which case it is listed and skipped. An
unreadable shard is one ``read_error`` row (listed); a bug while handling one member is that
member's ``internal_error`` row.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator

import pyarrow as pa

from .. import storage
from ..errors import INTERNAL_ERROR, READ_ERROR, InputError, error_string
from .blocks import EMIT_BYTES, EMIT_ROWS, STREAM_BLOCK_SIZE, schema_with, streaming_plan
from .common import (FILE_INDEX_STRIDE, IMAGE_EXTENSIONS, MAX_EXAMPLES, InputKind, InputOptions, InputPlan,
                     error_row_detail, extension, internal_error_detail, is_hidden, member_name)

logger = logging.getLogger(__name__)

SUFFIXES = (".tar", ".tar.gz", ".tgz")
SIDECARS = ("json", "txt")
CARRIED = ["key", *SIDECARS]
_SCHEMA = schema_with(CARRIED)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a{00..02}b`` -> a00b a01b a02b; ``{x,y}`` -> x y.

    Numeric ranges keep the zero padding of their wider bound. Several groups expand as a
    product, left to right. A brace group with neither ``..`` nor ``,`` is kept literally.
    """
    match = None
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        if _RANGE.match(body) or "," in body:
            match = m
            break
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = max(len(lo), len(hi)) if (lo.lstrip("-").startswith("0") or
                                         hi.lstrip("-").startswith("0")) else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    out: list[str] = []
    for opt in options:
        out.extend(expand_braces(head + opt + tail))
    return out


def _shards(uri: str, options: InputOptions) -> list[str]:
    """Shard URIs: braces expanded, patterns globbed, folders searched; an existing name as is."""
    so = options.storage_options
    shards: list[str] = []
    literal = ("{" in uri or storage.has_glob(uri)) and _exists(uri, so)
    for pattern in [uri] if literal else expand_braces(uri):
        if not literal and storage.is_pattern(pattern, so):
            fs, fs_path = storage.url_to_fs(pattern, so)
            shards.extend(map(storage.uri_maker(pattern, fs), sorted(fs.glob(fs_path))))
        elif pattern.lower().endswith(SUFFIXES):
            shards.append(pattern)  # named explicitly: a missing one becomes a read_error row
        else:  # a folder of shards
            fs, fs_path = storage.url_to_fs(pattern, so)
            root = fs_path.rstrip("/")
            shards.extend(map(storage.uri_maker(pattern, fs), (
                p for p in sorted(fs.find(root))
                if p.lower().endswith(SUFFIXES) and not is_hidden(p[len(root):].lstrip("/")))))
    if not shards:
        raise InputError(f"no tar shards match {uri}")
    return shards


def _exists(uri: str, storage_options: dict) -> bool:
    fs, path = storage.url_to_fs(uri, storage_options)
    return fs.exists(path)


def split_key(member: str) -> tuple[str, str]:
    """WebDataset rule: key = member path up to the first dot of the basename; and the extension."""
    folder, _, base = member.rpartition("/")
    stem = base.split(".", 1)[0]
    return (folder + "/" + stem) if folder else stem, extension(base).lstrip(".")


def sidecar_text(data: bytes) -> str:
    """A sidecar's text (UTF-8; undecodable bytes replaced, a caption is not worth a row)."""
    return data.decode("utf-8", errors="replace")


class _Rows:
    """The rows of one shard, batched for emission; input_index = shard * STRIDE + ordinal."""

    def __init__(self, uri: str, file_index: int):
        self.uri, self.base = uri, file_index * FILE_INDEX_STRIDE
        self.pending: list[dict] = []
        self.ordinal = self.size = 0

    def add(self, path: str, data: bytes | None, error: str | None, key=None, sidecars=None) -> None:
        sidecars = sidecars or {}
        self.pending.append({"path": path, "input_index": self.base + self.ordinal, "data": data,
                             "read_error": error, "key": key, "json": sidecars.get("json"),
                             "txt": sidecars.get("txt")})
        self.ordinal += 1
        self.size += len(data or b"")

    def full(self) -> bool:
        return len(self.pending) >= EMIT_ROWS or self.size >= EMIT_BYTES

    def take(self) -> pa.Table:
        table = pa.Table.from_pylist(self.pending, schema=_SCHEMA)
        self.pending, self.size = [], 0
        return table


class _Sample:
    """Members sharing one key: image members and sidecar texts, until the key changes."""

    def __init__(self, key: str | None = None):
        self.key = key
        self.images: list[tuple[str, bytes]] = []
        self.sidecars: dict[str, str] = {}
        self.sidecar_names: list[str] = []

    def flush(self, rows: _Rows, counts: dict) -> None:
        if not self.images:  # sidecars of no image: listed and skipped, never silently lost
            for name in self.sidecar_names:
                _skip(rows.uri, name, counts)
        for name, data in self.images:
            try:
                rows.add(f"{rows.uri}#{storage.display_name(name)}", data, None,
                         storage.display_name(self.key), self.sidecars)
            except Exception as exc:  # noqa: BLE001 - a bug costs this member, not the shard
                path = f"{rows.uri}#{name.encode('utf-8', 'backslashreplace').decode('utf-8')}"
                rows.add(path, None, error_string(INTERNAL_ERROR, internal_error_detail(path, exc, logger)))


def _skip(uri: str, name: str, counts: dict) -> None:
    counts["listed"] += 1
    counts["skipped"] += 1
    if len(counts["examples"]) < MAX_EXAMPLES:
        counts["examples"].append(f"{uri}#{storage.display_name(name)}")


def read_tar(uri: str, file_index: int, storage_options: dict, counts: dict) -> Iterator[pa.Table]:
    """Stream one tar shard: batches of image rows (``_SCHEMA``); fills ``counts``.

    Never raises for a bad shard or member: an unreadable shard ends with one ``read_error``
    row for the shard URI, after the rows read before the failure.
    """
    rows = _Rows(uri, file_index)
    sample = _Sample()
    try:
        fs, fs_path = storage.url_to_fs(uri, storage_options)
        with fs.open(storage.open_path(fs, fs_path), "rb", block_size=STREAM_BLOCK_SIZE) as f, \
                tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = member_name(info.name)
                key, ext = split_key(name)
                # Skips first: macOS "._x.jpg" members sit between a sample's members and
                # must not split the sample.
                if is_hidden(name) or not (f".{ext}" in IMAGE_EXTENSIONS or ext in SIDECARS):
                    _skip(uri, name, counts)
                    continue
                if key != sample.key:
                    sample.flush(rows, counts)
                    sample = _Sample(key)
                data = tar.extractfile(info).read()
                if ext in SIDECARS:
                    sample.sidecar_names.append(name)
                    sample.sidecars.setdefault(ext, sidecar_text(data))
                else:
                    counts["listed"] += 1
                    sample.images.append((name, data))
                if rows.full():
                    yield rows.take()
        sample.flush(rows, counts)
    except Exception as exc:  # noqa: BLE001 - a bad shard is one error row, not a failed job
        logger.warning("cannot read tar %s: %s", uri, error_row_detail(exc))
        sample.flush(rows, counts)
        counts["listed"] += 1
        rows.add(uri, None, error_string(READ_ERROR, f"tar {error_row_detail(exc)}"))
    if rows.pending:
        yield rows.take()


def plan_files(files: list[str], options: InputOptions) -> InputPlan:
    """Plan the given tar shard URIs (no listing)."""
    return streaming_plan("webdataset", files, read_tar, options.storage_options, CARRIED)


def plan_webdataset(uri: str, options: InputOptions) -> InputPlan:
    """Plan tar shards named by ``uri``; raises InputError when no shard matches."""
    return plan_files(_shards(uri, options), options)


KIND = InputKind(
    name="webdataset",
    summary="tar shards (brace ranges shards-{000..099}.tar, globs, a folder of shards); "
            "one Ray task streams each shard; .json/.txt sidecars are carried",
    detect=lambda uri, pattern: uri.lower().endswith(SUFFIXES),
    plan=plan_webdataset, plan_files=plan_files, file_suffixes=SUFFIXES)
