"""URIs and filesystems: the one place that turns a user's location into an fsspec filesystem.

Used by input planning (``zslabel.sources``), the output writer, ground-truth reading and remote
checkpoints, so a location means the same thing everywhere: a plain local path or any fsspec URI
(``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``, chained ``simplecache::s3://...``).
No Ray here.

Names that are not valid UTF-8. A Linux file name is bytes; Python hands undecodable bytes over
as lone surrogates (``b'caf\\xe9.png'`` -> ``'caf\\udce9.png'``), which Arrow and Parquet cannot
store. :func:`display_name` writes each such byte as ``%XX`` (``caf%E9.png``) and leaves every
other character, ``%`` included, as it is, so ordinary names are unchanged. Reading a local
path that does not exist retries it with the ``%XX`` escapes of bytes >= 0x80 turned back into
bytes (:func:`open_path`): the ``path`` column, or a manifest line copied from it, finds
the file; the same retry tries the name's other Unicode normalisation (NFC/NFD). The one
ambiguity: when both ``caf%E9.png`` (literally) and ``caf\\xe9.png`` exist, both rows say
``caf%E9.png`` and the literal file is the one read.

Bounded time per input (:class:`IOPolicy`, :func:`fetch_many`). Every filesystem made here gets
connect and read timeouts (``IOPolicy.timeout``, default 30 s) in the form its library takes
(:func:`io_storage_options`), unless the user's storage options set them: aiohttp's
``ClientTimeout(connect, sock_connect, sock_read)`` for HTTP(S) and GCS (aiohttp's default is
300 s in all per request, which a server that never answers spends in full), botocore's
``connect_timeout``/``read_timeout`` and retry count for S3, adlfs's
``connection_timeout``/``read_timeout`` for Azure. :func:`fetch_many` reads the inputs of a
batch concurrently (one coroutine per input on fsspec's event loop for the async filesystems
every remote backend is; threads for the others), retries transient failures (HTTP 408, 425,
429, 500, 502, 503, 504, connection resets) with exponential backoff and jitter (honouring a
short ``Retry-After``), never retries a timeout (a silent server costs one timeout, not
``retries + 1`` of them), and cuts any single attempt after ``ATTEMPT_LIMIT_FACTOR`` timeouts
in all (a server that trickles a byte now and then never trips a read timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import os
import random
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec

from .errors import READ_ERROR, InputError, ZslabelError, error_string

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\udc80-\udcff]")
_HIGH_ESCAPE = re.compile(r"%([89A-Fa-f][0-9A-Fa-f])")


# --------------------------------------------------------------------------------------------
# Time limits and retries


DEFAULT_IO_TIMEOUT = 30.0   # seconds: connect, and each wait for the next bytes
DEFAULT_IO_RETRIES = 3      # extra attempts after a transient failure
# Largest HTTP(S) response read as one input. The pixel limit's largest image, 178,956,970
# pixels, is 716 MB as uncompressed 8-bit RGBA; beyond 1 GiB it is not an image but a stream
# (an IP camera's endless MJPEG "image" URL, common in web crawls) or a mistake.
DEFAULT_MAX_INPUT_BYTES = 1 << 30
# One attempt at one input ends after this many timeouts in all, whatever the server does: the
# read timeout bounds a silent server, this bounds one that trickles a byte every few seconds
# (aiohttp's sock_read restarts at every byte; botocore's read_timeout is per socket read).
ATTEMPT_LIMIT_FACTOR = 10
# Backoff before retry n (0-based): uniform in [d/2, d], d = min(backoff * 2**n, MAX_BACKOFF).
MAX_BACKOFF = 10.0
# A server's Retry-After is honoured up to this many seconds (beyond it, our own backoff):
# an image is not worth holding a decode slot for minutes.
MAX_RETRY_AFTER = 30.0
# Inputs of one batch fetched at once (coroutines for async filesystems, else threads).
FETCH_CONCURRENCY = 32
# HTTP statuses worth another try: request timeout, too early, too many requests, and the
# server-side errors that mean "not now" (RFC 9110 15.6; AWS/GCS document 500/503 as retryable).
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class IOPolicy:
    """How long reading one input may take, and how often a transient failure is retried.

    Attributes:
        timeout: seconds (> 0) to connect, and to wait for the next bytes of a response
            (``--io-timeout``). One attempt at one input also ends after
            ``ATTEMPT_LIMIT_FACTOR * timeout`` seconds in all (:attr:`attempt_limit`).
        retries: extra attempts (>= 0) after a transient failure (``--io-retries``); for S3 it
            is also botocore's retry count. Timeouts are not retried.
        backoff: seconds before the first retry; doubles per retry, capped at ``MAX_BACKOFF``,
            with jitter (uniform in [d/2, d]) so that many tasks do not retry in step.
        max_bytes: an HTTP(S) response longer than this (declared or as read) is a
            ``read_error`` as soon as that is known, never read to its end.
    """

    timeout: float = DEFAULT_IO_TIMEOUT
    retries: int = DEFAULT_IO_RETRIES
    backoff: float = 0.5
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES

    def __post_init__(self):
        if not self.timeout > 0 or self.retries < 0 or self.backoff < 0 or self.max_bytes < 1:
            raise ValueError(f"IOPolicy needs timeout > 0, retries >= 0, backoff >= 0, max_bytes >= 1 (got {self})")

    @property
    def attempt_limit(self) -> float:
        """Seconds one attempt at one input may take in all."""
        return self.timeout * ATTEMPT_LIMIT_FACTOR

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); a server's ``Retry-After``
        (seconds) is used when it is at most ``MAX_RETRY_AFTER``."""
        if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER:
            return retry_after
        d = min(self.backoff * 2 ** retry, MAX_BACKOFF)
        return d / 2 + random.random() * d / 2


def _merged(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` overlaid with ``user``; nested dicts merged one level deep (user wins)."""
    out = dict(defaults)
    for k, v in user.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def io_storage_options(uri: str, storage_options: dict[str, Any] | None, io: IOPolicy) -> dict[str, Any]:
    """``storage_options`` plus the timeouts (and, for S3, retries) of ``io`` in the form the
    filesystem of ``uri`` takes; the user's own settings win, key by key.

    - ``http``/``https`` (fsspec ``HTTPFileSystem``): ``client_kwargs.timeout`` =
      ``aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)``. No total here:
      a tar streamed over HTTP may take hours; :func:`fetch_many` bounds single inputs.
    - ``s3``/``s3a`` (s3fs): ``config_kwargs`` ``connect_timeout``, ``read_timeout`` and
      ``retries={"max_attempts": retries, "mode": "standard"}`` (botocore retries throttling,
      5xx and connection errors itself). s3fs's own retry loop (5 tries, not configurable per
      instance) still applies to timeouts; :attr:`IOPolicy.attempt_limit` caps it per input.
    - ``gs``/``gcs`` (gcsfs): ``session_kwargs.timeout`` (the same aiohttp ``ClientTimeout``);
      gcsfs retries 429/5xx itself (6 tries, not configurable).
    - ``az``/``abfs``/``abfss`` (adlfs >= 2023.10): ``connection_timeout``, ``read_timeout``.
    - anything else (local files, memory, ...): unchanged.

    A ``::`` chain (``simplecache::s3://...``): fsspec hands the remote (last) link only the
    options keyed by its protocol (``{"s3": {...}}``), so the timeouts are added there.
    """
    so = dict(storage_options or {})
    if "::" in uri:
        last = uri.rsplit("::", 1)[1]
        proto = (fsspec.core.split_protocol(last)[0] or "file").lower()
        inner = io_storage_options(last, so.get(proto), io)
        if inner:
            so[proto] = inner
        return so
    proto = (fsspec.core.split_protocol(uri)[0] or "file").lower()
    t = float(io.timeout)
    if proto in ("http", "https", "gs", "gcs"):
        import aiohttp

        # connect (DNS lookup + connecting, or waiting for a pooled connection) as well as
        # sock_connect: aiohttp's sock_connect does not cover a DNS lookup that hangs
        # (aio-libs/aiohttp#9447; getaddrinfo itself cannot be timed out, urllib3#1334).
        timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        key = "client_kwargs" if proto.startswith("http") else "session_kwargs"
        return _merged({key: {"timeout": timeout}}, so)
    if proto in ("s3", "s3a"):
        return _merged({"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                          "retries": {"max_attempts": io.retries, "mode": "standard"}}}, so)
    if proto in ("az", "abfs", "abfss", "adl"):
        return _merged({"connection_timeout": int(max(1, round(t))), "read_timeout": int(max(1, round(t)))}, so)
    return so


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None, *,
              error: type[ZslabelError] = InputError,
              io: IOPolicy | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or fsspec URI, with the connect/read
    timeouts of ``io`` (default: ``IOPolicy()``, 30 s) unless ``storage_options`` sets them
    (:func:`io_storage_options`).

    Raises:
        ``error``: the protocol is unknown or its package (s3fs, gcsfs, ...) is not installed.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **io_storage_options(uri, storage_options, io or IOPolicy()))
    except ImportError as exc:
        raise error(f"cannot open {uri}: {exc}") from exc
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise error(f"cannot open {uri}: {exc}") from exc
        raise
    remote = getattr(fs, "fs", fs) if "::" in uri else fs  # a chain: the cache's target
    if "s3" in protocols(remote):
        # s3fs wraps every call, and every body read, in retry loops of its own (class attribute
        # ``retries`` = 5, nested: up to 25 tries of a stalled read, each after botocore's own
        # ``max_attempts``): a stalled manifest took 40 s at --io-timeout 1 --io-retries 0 and
        # ~3,000 s at the defaults. botocore already retries throttling, 5xx and connection
        # errors (``config_kwargs.retries`` above) and zslabel's own layer retries image reads,
        # so s3fs tries once. Filesystems are cached per options: this is every S3 filesystem.
        remote.retries = 1
    return fs, path


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of a filesystem (``("s3", "s3a")``, ``("file", "local")``, ...)."""
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (paths are plain OS paths)."""
    return bool({"file", "local"} & set(protocols(fs)))


def uri_maker(uri: str, fs: fsspec.AbstractFileSystem) -> Callable[[str], str]:
    """A function turning a path of ``fs`` (as ``fs.find``/``fs.glob`` return it) into a full URI.

    Local files stay plain paths; other filesystems get the protocol the user wrote (the last
    link of a ``::`` chain, since that is where the path lives). HTTP(S) paths are full URLs
    already and are kept as they are. Undecodable name bytes become ``%XX`` (:func:`display_name`).
    """
    if is_local(fs):
        return display_name
    proto = fsspec.core.split_protocol(uri.split("::")[-1])[0] or protocols(fs)[0]
    prefix = f"{proto}://"
    return lambda p: display_name(p if "://" in p else prefix + p)


def name_part(path: str, fs: fsspec.AbstractFileSystem) -> str:
    """The part of a filesystem path that names the file: for HTTP(S) the URL path without its
    query and fragment (``/img.jpg`` of ``https://h/img.jpg?sig=..``), else ``path`` itself."""
    if {"http", "https"} & set(protocols(fs)):
        return urlsplit(path).path
    return path


def has_glob(uri: str) -> bool:
    """True when the path part of ``uri`` holds a glob metacharacter (``*``, ``?``, ``[``)."""
    return bool(_GLOB_CHARS.search(uri.split("://", 1)[-1]))


def glob_start(path: str) -> int | None:
    """Index of the first glob metacharacter in ``path``, or None."""
    match = _GLOB_CHARS.search(path)
    return match.start() if match else None


def is_pattern(uri: str, storage_options: dict[str, Any] | None = None, io: IOPolicy | None = None) -> bool:
    """True when ``uri`` should be globbed: it holds metacharacters and does not exist as named.

    An existing folder or file called ``photos [2021]`` is that folder or file; only a name that
    does not exist is a pattern. One ``exists`` call, made only when metacharacters are present,
    within the timeouts of ``io`` (default ``IOPolicy()``; see :func:`url_to_fs`).
    """
    if not has_glob(uri):
        return False
    fs, path = url_to_fs(uri, storage_options, io=io)
    try:
        return not fs.exists(path)
    except Exception:  # noqa: BLE001 - a backend that cannot answer: keep the pattern meaning
        return True


def display_name(path: str) -> str:
    """``path`` with each undecodable byte (a lone surrogate from the OS) written as ``%XX``."""
    if path.isascii():
        return path
    return _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", path)


def open_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The local file a ``path`` value stands for when ``path`` itself does not exist.

    Tried in order: the file its ``%XX`` escapes name (:func:`real_local_path`), then the
    name in Unicode NFC and NFD form (macOS writes names decomposed, most tools and manifests
    composed: ``café`` can be either). Returns ``path`` unchanged when it exists, is not
    local, or no other form exists (so errors name the path the user sees).
    """
    if path.isascii() and "%" not in path or not is_local(fs) or os.path.lexists(path):
        return path
    for other in (real_local_path(path), unicodedata.normalize("NFC", path), unicodedata.normalize("NFD", path)):
        if other is not None and other != path and os.path.lexists(other):
            return other
    return path


def real_local_path(path: str) -> str | None:
    """The OS path a :func:`display_name` stands for when it differs from ``path``, else None.

    ``%XX`` escapes of bytes 0x80-0xFF become those bytes (as surrogates, the way Python spells
    undecodable bytes of an OS path); None when ``path`` holds no such escape.
    """
    if "%" not in path:
        return None
    raw = _HIGH_ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), path)
    if raw == path:
        return None
    # Escapes that form valid UTF-8 stand for those characters, as in a URL.
    return os.fsdecode(os.fsencode(raw))


# --------------------------------------------------------------------------------------------
# Fetching the bytes of many inputs, each within bounded time


def is_transient(exc: BaseException) -> bool:
    """Whether a failed read is worth another try: an HTTP status in ``TRANSIENT_STATUS``, or
    a connection reset / closed by the server mid-request. Timeouts are not (a server that did
    not answer within the timeout will rarely answer the next time, and each try costs a whole
    timeout), nor are refused connections, unknown hosts, 403/404 or anything else."""
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError and aiohttp's timeouts included
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError (fsspec HTTP raise_for_status)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
        return False
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return True
    # A reset mid-request is a ClientOSError; a refused connect (a subclass) is not transient.
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)


def retry_after(exc: BaseException) -> float | None:
    """Seconds from an HTTP error's ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    headers = getattr(exc, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def timeout_cause(exc: BaseException) -> TimeoutError | None:
    """The timeout behind a storage failure, or None: the innermost ``TimeoutError`` (aiohttp's
    and asyncio's are) among ``exc`` and the exceptions it was raised from.

    Why the chain: fsspec's HTTP ``info`` (run by every ``open``) turns a server that answers
    neither HEAD nor GET in time into ``FileNotFoundError(url) from <the timeout>``, which read
    as it is calls a stalled server a missing file; and fsspec's ``sync`` raises a bare
    ``FSTimeoutError`` from aiohttp's ``ServerTimeoutError``, which says what timed out. An
    exception raised while handling a timeout counts too (``__context__``): s3fs's ``S3File``
    reads ``args[0]`` of every ``OSError`` and so turns fsspec's ``FSTimeoutError`` (no args)
    into an ``IndexError``."""
    found: TimeoutError | None = None
    cause: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if cause is None:
            break
        if isinstance(cause, TimeoutError):
            found = cause
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return found


def describe_error(exc: BaseException, io: IOPolicy | None = None) -> str:
    """``"<Type>: <message>"`` for a failed storage call; a timeout (see :func:`timeout_cause`)
    is described as itself, naming ``--io-timeout`` (with ``io``'s value when given), so that
    the user knows which setting bounded the wait."""
    timeout = timeout_cause(exc)
    if timeout is None:
        return f"{type(exc).__name__}: {exc}"
    limit = f"--io-timeout {io.timeout:g} s" if io is not None else "--io-timeout"
    text = str(timeout) or "timed out"
    return f"{type(timeout).__name__}: {text} (no answer within {limit})"


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

    Raises:
        InputTooLarge, OSError (FileNotFoundError, ...).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InputTooLarge(f"{size:,} bytes > {max_bytes:,}: too large for an image, not read")
        return f.read(max_bytes + 1)  # a file that grew since: still bounded


async def _http_cat_capped(fs, url: str, max_bytes: int) -> bytes:
    """fsspec ``HTTPFileSystem._cat_file`` (same session, URL encoding and request options),
    but the status is checked before the body is read, and the body is read in chunks and
    given up past ``max_bytes`` (fsspec reads any body whole, even an endless one)."""
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **fs.kwargs) as r:
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
    in the other Unicode normalisation finds its file (:func:`open_path`); a file larger than
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
        return None, error_string(READ_ERROR, f"{type(exc).__name__}: {exc}")


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
    others in a thread pool. Each input is retried on a transient failure (:func:`is_transient`)
    up to ``io.retries`` times with backoff; one attempt is cut after ``io.attempt_limit``
    seconds. So a batch of N inputs from a server that never answers costs about one
    ``io.timeout`` in all (not N of them, and not 300 s each).

    Args:
        paths: plain local paths or fsspec URIs (the ``path`` column).
        storage_options: fsspec options (credentials, endpoints); with ``io``'s timeouts added
            where they set none (:func:`io_storage_options`).
        io: time limits and retries; default ``IOPolicy()``.
    """
    io = io or IOPolicy()
    pending = PendingFetch(len(paths), io)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    for i, path in enumerate(paths):
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


# Exception class names (anywhere in the MRO) by what they mean; names, so that no optional
# backend (botocore, google-auth, azure-core) has to be importable here.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                   "CredentialUnavailableError", "ClientAuthenticationError", "RefreshError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ServerTimeoutError", "ServiceRequestError", "ConnectionError", "TimeoutError", "gaierror"}
_CREDENTIAL_FIX = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --storage-options "
          "'{\"key\": \"...\", \"secret\": \"...\"}'; for a public bucket pass --storage-options '{\"anon\": true}'",
    "gs": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS; for a public "
          "bucket pass --storage-options '{\"token\": \"anon\"}'",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or "
          "AZURE_STORAGE_CONNECTION_STRING, or pass them in --storage-options",
}


def remote_access_message(uri: str, exc: BaseException) -> str:
    """One line saying why a remote input cannot be read and how to fix it.

    By the exception: no credentials found, credentials refused (403, ``PermissionError``),
    the store not reachable (connection refused, unknown host, timeout), or anything else
    (its type and message).
    """
    names = {c.__name__ for c in type(exc).__mro__}
    proto = uri.split("://", 1)[0].split("::")[-1].lower() if "://" in uri else "file"
    key = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}.get(proto, proto)
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    endpoint = "the endpoint (--storage-options client_kwargs.endpoint_url for S3-compatible stores) and "
    if names & _NO_CREDENTIALS:
        fix = _CREDENTIAL_FIX.get(key, "pass them in --storage-options")
        return f"cannot read {uri}: no credentials for {key}:// ({detail}); {fix}"
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, PermissionError) or status in (401, 403) or "AccessDenied" in str(exc):
        return (f"cannot read {uri}: access denied ({detail}); check that the credentials in use (environment, "
                f"profile or --storage-options) are valid and may list and read it")
    if names & _UNREACHABLE:
        return (f"cannot reach {uri} ({detail}); check {endpoint if key == 's3' else ''}the network, "
                "or raise --io-timeout for a slow store")
    return f"cannot read {uri} ({detail}); check the URI and --storage-options"
