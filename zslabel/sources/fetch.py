"""Reading inputs' bytes: bounded, retried and concurrent; the decode tasks' only way to storage.

Every read has a byte limit (``IOPolicy.max_bytes``, 1 GiB): a local file by its size, unread,
and only when it is a regular file (a FIFO, a device such as ``/dev/zero``, or a socket named
like an image is refused unread: opening a FIFO blocks until a writer appears); an object or
a remote file with one ranged GET of ``max_bytes + 1`` bytes; an HTTP(S) body in chunks, given
up past the limit. :func:`start_fetch` reads the inputs of a batch concurrently (coroutines on
fsspec's event loop for the async filesystems, threads for the others), retries transient
failures with backoff and cuts each attempt after ``IOPolicy.attempt_limit`` seconds (see
``zslabel.storage`` for the time limits). A ``file:`` URI is read as the local path it names
(``storage.file_uri_path``, RFC 8089). Nothing here raises for one input: a failure is the row's
``read_error``. No Ray here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import stat
import time
from collections.abc import Sequence

import fsspec

from ..errors import READ_ERROR, error_string
from ..io_policy import (
    ATTEMPT_LIMIT_FACTOR,
    DEFAULT_MAX_INPUT_BYTES,
    MAX_RETRY_AFTER,
    IOPolicy,
    is_transient,
    retry_after,
)
from ..storage import NotARegularFile, file_kind, file_uri_path, is_local, open_path, protocols, url_to_fs

log = logging.getLogger(__name__)

# Inputs of one batch fetched at once (coroutines for async filesystems, else threads).
FETCH_CONCURRENCY = 32


def _read_error(exc: BaseException, io: IOPolicy, attempts: int) -> str:
    """``read_error: <Type>: <message>[ (after N attempts)]``; a bare timeout says which limit."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        text = f"gave up after {io.attempt_limit:g} s in all (--io-timeout {io.timeout:g} x {ATTEMPT_LIMIT_FACTOR})"
    elif isinstance(exc, TimeoutError):
        text += f" (--io-timeout {io.timeout:g} s)"
    tail = f" (after {attempts} attempts)" if attempts > 1 else ""
    return error_string(READ_ERROR, f"{type(exc).__name__}: {text}{tail}")


class InputTooLarge(OSError):
    """An input longer than ``IOPolicy.max_bytes`` (an HTTP(S) response, an object, a file)."""


def _beyond(max_bytes: int) -> InputTooLarge:
    return InputTooLarge(f"more than {max_bytes:,} bytes: too large for an image, not read further")


def _is_empty_range_error(exc: BaseException) -> bool:
    # S3 answers a Range request on a zero-byte object with 416 InvalidRange (s3fs raises it as
    # OSError EINVAL "The requested range is not satisfiable").
    text = str(exc)
    return "InvalidRange" in text or "range is not satisfiable" in text or getattr(exc, "status", None) == 416


async def _cat_capped_async(fs, path: str, max_bytes: int) -> bytes:
    """``fs._cat_file`` of at most ``max_bytes + 1`` bytes (one ranged GET, the request count of a
    whole read; s3fs's whole read even adds a HEAD); more than ``max_bytes`` raises."""
    try:
        data = await fs._cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:
        if not _is_empty_range_error(exc):
            raise
        data = await fs._cat_file(path)
    if len(data) > max_bytes:
        raise _beyond(max_bytes)
    return data


def cat_capped(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """``fs.cat_file(path)``, but never more than ``max_bytes`` bytes read (see
    :func:`_cat_capped_async`); a file on the local disk is refused by its size, unread.

    Raises:
        InputTooLarge: the file holds more than ``max_bytes`` bytes. Others: as ``cat_file``.
    """
    if "file" in protocols(fs):
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise InputTooLarge(f"{size:,} bytes > {max_bytes:,}: too large for an image, not read")
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:
        if not _is_empty_range_error(exc):
            raise
        data = fs.cat_file(path)
    if len(data) > max_bytes:
        raise _beyond(max_bytes)
    return data


def read_local_capped(path: str, max_bytes: int) -> bytes:
    """A plain local file's bytes; one larger than ``max_bytes`` is refused by its size, unread.

    Only regular files are read: a named pipe, a device (``/dev/zero``, ``/dev/urandom``) or a
    socket named like an image (or a symlink to one) is refused unread. Opening a FIFO for
    reading blocks until a writer appears, so the file is opened non-blocking and checked with
    ``fstat`` on the open descriptor (no race between the check and the read).

    Raises:
        InputTooLarge: more than ``max_bytes`` bytes (by size, or read from a file that grew).
        NotARegularFile: a FIFO, device or socket. OSError (FileNotFoundError, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"a {file_kind(st.st_mode)}, not a regular file: not read")
        if st.st_size > max_bytes:
            raise InputTooLarge(f"{st.st_size:,} bytes > {max_bytes:,}: too large for an image, not read")
        chunks, size = [], 0
        while size <= max_bytes:  # a file that grew since: still bounded
            chunk = os.read(fd, min(max_bytes + 1 - size, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise _beyond(max_bytes)
    return b"".join(chunks)


def request_url(url: str):
    """``url`` as it is sent (a ``yarl.URL``): what a URL may not hold (spaces, non-ASCII,
    quotes, ``<>{}|^``) percent-encoded as UTF-8, and everything else as written: reserved
    characters, and ``%XX`` escapes (``%2F`` is not ``/``, ``%3B`` not ``;``, ``%25`` not
    ``%``: RFC 3986 2.2, 2.4), so a row is the resource its URL names.

    fsspec's ``encode_url`` (yarl, ``encoded=False``) re-quoted escapes in paths (``%3B %26 %3D
    %2C %40`` went out as ``; & = , @``, ``/p%.png`` as ``/p%25.png``): a server that tells
    them apart gave the row another resource's pixels (aio-libs/yarl#223, aiohttp#4307).
    """
    from urllib.parse import quote

    import yarl

    return yarl.URL(quote(url, safe="!#$%&'()*+,/:;=?@[]~"), encoded=True)


async def _http_cat_capped(fs, url: str, max_bytes: int) -> bytes:
    """fsspec ``HTTPFileSystem._cat_file`` (same session and request options; the URL as
    :func:`request_url` sends it), but the status is checked before the body is read, and the
    body is read in chunks and given up past ``max_bytes`` (fsspec reads any body whole, even
    an endless one)."""
    session = await fs.set_session()
    async with session.get(request_url(url), **fs.kwargs) as r:
        fs._raise_not_found_for_status(r, url)
        declared = r.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise InputTooLarge(f"Content-Length {int(declared):,} bytes > {max_bytes:,}")
        chunks, size = [], 0
        async for chunk in r.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise InputTooLarge(f"more than {max_bytes:,} bytes and still sending (a stream, not an image?)")
            chunks.append(chunk)
        return b"".join(chunks)


def _is_http(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"http", "https"} & set(protocols(fs))) and hasattr(fs, "encode_url")


async def _fetch_one_async(fs: fsspec.AbstractFileSystem, path: str, io: IOPolicy) -> tuple[bytes | None, str | None]:
    retry = 0
    http = _is_http(fs)
    while True:
        try:
            read = (_http_cat_capped if http else _cat_capped_async)(fs, path, io.max_bytes)
            # wait_for really cancels the request (the coroutine is abandoned at its next await).
            return await asyncio.wait_for(read, io.attempt_limit), None
        except Exception as exc:  # noqa: BLE001 - every storage failure becomes a row error
            if retry < io.retries and is_transient(exc):
                wait = io.delay(retry, retry_after(exc))
                log.debug("retrying %s in %.2f s after %s", path, wait, exc)
                await asyncio.sleep(wait)
                retry += 1
                continue
            return None, _read_error(exc, io, retry + 1)


async def _fetch_group_async(fs, paths: list[str], io: IOPolicy) -> list[tuple[bytes | None, str | None]]:
    sem = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(path):
        async with sem:
            return await _fetch_one_async(fs, path, io)

    return await asyncio.gather(*(one(p) for p in paths))


def _fetch_one_sync(fs: fsspec.AbstractFileSystem, path: str, io: IOPolicy) -> tuple[bytes | None, str | None]:
    """For filesystems without an async implementation: the library's own timeouts bound a try."""
    retry = 0
    while True:
        try:
            try:
                return cat_capped(fs, path, io.max_bytes), None
            except FileNotFoundError:
                other = open_path(fs, path)  # %XX escapes, NFC/NFD: only on a miss
                if other == path:
                    raise
                return cat_capped(fs, other, io.max_bytes), None
        except Exception as exc:  # noqa: BLE001 - every storage failure becomes a row error
            if retry < io.retries and is_transient(exc):
                time.sleep(io.delay(retry, retry_after(exc)))
                retry += 1
                continue
            return None, _read_error(exc, io, retry + 1)


def read_local(path: str, storage_options: dict | None = None,
               max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> tuple[bytes | None, str | None]:
    """Read a plain local path (no ``://``); a name with ``%XX`` escapes of undecodable bytes or
    in the other Unicode normalisation finds its file (``storage.open_path``); a file larger than
    ``max_bytes`` is a ``read_error``, unread (:func:`read_local_capped`). Never raises."""
    try:
        try:
            return read_local_capped(path, max_bytes), None
        except FileNotFoundError:
            fs, fs_path = url_to_fs(path, storage_options)
            other = open_path(fs, fs_path)
            if other == fs_path:
                raise
            return read_local_capped(other, max_bytes), None
    except Exception as exc:  # noqa: BLE001 - every storage failure becomes a row error
        return None, error_string(READ_ERROR, _row_name_error(path, exc) or f"{type(exc).__name__}: {exc}")


def _row_name_error(path: str, exc: BaseException) -> str | None:
    """What a missing local ``path`` is when it is an output row's name of a tar member or a
    Parquet row (``SHARD#MEMBER``, ``FILE#ROW``, copied into a manifest to retry error rows):
    no file has that name, and a bare ``FileNotFoundError`` did not say why. None otherwise."""
    if not isinstance(exc, FileNotFoundError) or "#" not in path:
        return None
    cuts = [i for i, c in enumerate(path) if c == "#"]
    container = next((path[:i] for i in cuts if os.path.isfile(path[:i])), None)
    if container is None:
        return None
    return ("FileNotFoundError: NAME#MEMBER names a member of a tar or a row of a Parquet file, as output rows do; "
            "no manifest can: rerun the job with --resume --retry-errors, or list the file itself: "
            f"{os.path.basename(container)}")


_THREADS: concurrent.futures.ThreadPoolExecutor | None = None


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _THREADS
    if _THREADS is None:
        _THREADS = concurrent.futures.ThreadPoolExecutor(FETCH_CONCURRENCY, thread_name_prefix="zslabel-fetch")
    return _THREADS


class PendingFetch:
    """The bytes of a list of inputs being read in the background (:func:`start_fetch`)."""

    def __init__(self, n: int, io: IOPolicy):
        self._results: list[tuple[bytes | None, str | None] | None] = [None] * n
        self._async: list[tuple[list[int], concurrent.futures.Future]] = []
        self._threaded: list[tuple[int, concurrent.futures.Future]] = []
        self._local: list[tuple[int, str, dict | None]] = []
        self._io = io

    def result(self) -> list[tuple[bytes | None, str | None]]:
        """One ``(bytes, None)`` or ``(None, "read_error: ...")`` per input, in input order.

        Local files are read here, in the calling thread (one ``open`` each: faster than any
        hand-off). Never raises for one input.
        """
        for i, path, so in self._local:
            self._results[i] = read_local(path, so, self._io.max_bytes)
        self._local = []
        # Each coroutine bounds itself (wait_for per attempt); this is a guard against a stalled
        # event loop, long enough never to fire before them.
        guard = (self._io.retries + 1) * (self._io.attempt_limit + MAX_RETRY_AFTER) + 60
        for idx, fut in self._async:
            try:
                outs = fut.result(timeout=guard)
            except Exception as exc:  # noqa: BLE001 - the whole group failed: each row says why
                fut.cancel()
                outs = [(None, _read_error(exc, self._io, 1))] * len(idx)
            for i, out in zip(idx, outs):
                self._results[i] = out
        self._async = []
        for i, fut in self._threaded:
            self._results[i] = fut.result()
        self._threaded = []
        return list(self._results)  # type: ignore[arg-type]


def start_fetch(paths: Sequence[str], storage_options: dict | None = None,
                io: IOPolicy | None = None) -> PendingFetch:
    """Start reading the whole content of each of ``paths``; ``.result()`` waits for them.

    Remote inputs are read concurrently, at most ``FETCH_CONCURRENCY`` at once per filesystem:
    for async filesystems (HTTP(S), S3, GCS, Azure) as coroutines on fsspec's event loop, for
    others in a thread pool. Each input is retried on a transient failure (``io_policy.is_transient``)
    up to ``io.retries`` times with backoff; one attempt is cut after ``io.attempt_limit``
    seconds. So a batch of N inputs from a server that never answers costs about one
    ``io.timeout`` in all (not N of them, and not 300 s each).

    Args:
        paths: plain local paths, ``file:`` URIs or fsspec URIs (the ``path`` column).
        storage_options: fsspec options (credentials, endpoints); with ``io``'s timeouts added
            where they set none (``storage.io_storage_options``).
        io: time limits and retries; default ``IOPolicy()``.
    """
    io = io or IOPolicy()
    pending = PendingFetch(len(paths), io)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    for i, path in enumerate(paths):
        path = file_uri_path(path) or path  # file:///a%20b.jpg is /a b.jpg (RFC 8089)
        if "://" not in path:
            pending._local.append((i, path, storage_options))
            continue
        try:
            fs, fs_path = url_to_fs(path, storage_options, io=io)
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown protocol: this row's error
            pending._results[i] = (None, error_string(READ_ERROR, f"{type(exc).__name__}: {exc}"))
            continue
        if is_local(fs):
            pending._local.append((i, fs_path, storage_options))
            continue
        _, idx, fs_paths = groups.setdefault(id(fs), (fs, [], []))
        idx.append(i)
        fs_paths.append(fs_path)
    for fs, idx, fs_paths in groups.values():
        loop = getattr(fs, "loop", None) if getattr(fs, "async_impl", False) else None
        if loop is not None and not getattr(fs, "asynchronous", False):
            fut = asyncio.run_coroutine_threadsafe(_fetch_group_async(fs, fs_paths, io), loop)
            pending._async.append((idx, fut))
        else:
            for i, p in zip(idx, fs_paths):
                pending._threaded.append((i, _threads().submit(_fetch_one_sync, fs, p, io)))
    return pending


def fetch_many(paths: Sequence[str], storage_options: dict | None = None,
               io: IOPolicy | None = None) -> list[tuple[bytes | None, str | None]]:
    """:func:`start_fetch` and wait: one ``(bytes, None)`` or ``(None, "read_error: ...")`` per
    path, in order. Never raises for one input."""
    return start_fetch(paths, storage_options, io).result()


