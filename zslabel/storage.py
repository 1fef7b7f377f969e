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

Bounded time per input (:class:`IOPolicy`, ``fetch.fetch_many``). Every filesystem made here gets
connect and read timeouts (``IOPolicy.timeout``, default 30 s) in the form its library takes
(:func:`io_storage_options`), unless the user's storage options set them: aiohttp's
``ClientTimeout(connect, sock_connect, sock_read)`` for HTTP(S) and GCS (aiohttp's default is
300 s in all per request, which a server that never answers spends in full), botocore's
``connect_timeout``/``read_timeout`` and retry count for S3, adlfs's
``connection_timeout``/``read_timeout`` for Azure. ``zslabel.fetch.fetch_many`` reads the inputs of a
batch concurrently (one coroutine per input on fsspec's event loop for the async filesystems
every remote backend is; threads for the others), retries transient failures (HTTP 408, 425,
429, 500, 502, 503, 504, connection resets) with exponential backoff and jitter (honouring a
short ``Retry-After``), never retries a timeout (a silent server costs one timeout, not
``retries + 1`` of them), and cuts any single attempt after ``ATTEMPT_LIMIT_FACTOR`` timeouts
in all (a server that trickles a byte now and then never trips a read timeout).

Local stamps (:func:`local_stamp`): a digest of the names, sizes and mtimes of a local input or
checkpoint, so a ``--resume`` of a finished run can tell, without reading any file, that nothing
changed (``store.OutputStore.finished_unchanged``).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import posixpath
import random
import re
import stat
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import fsspec

from .errors import InputError, ZslabelError
from .patterns import expand_braces, has_glob, kind_name

log = logging.getLogger(__name__)

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
      a tar streamed over HTTP may take hours; ``fetch.fetch_many`` bounds single inputs.
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
    """``(filesystem, path inside it)`` for a local path or fsspec URI (a ``file:`` URI read as
    :func:`file_uri_path` reads it), with the connect/read
    timeouts of ``io`` (default: ``IOPolicy()``, 30 s) unless ``storage_options`` sets them
    (:func:`io_storage_options`).

    Raises:
        ``error``: the protocol is unknown or its package (s3fs, gcsfs, ...) is not installed.
    """
    # A local file: URI names its RFC 8089 path here as everywhere (--output file:///a%20b is "/a b").
    uri = file_uri_path(uri) or _lower_scheme(uri)
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


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _lower_scheme(uri: str) -> str:
    """``uri`` with its scheme in lower case (``HTTP://h/x`` -> ``http://h/x``): schemes are
    case-insensitive (RFC 3986 3.1), fsspec's protocol names are lower case."""
    m = _SCHEME.match(uri)
    return uri if m is None or m.group(1).islower() else m.group(1).lower() + uri[m.end(1):]


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of a filesystem (``("s3", "s3a")``, ``("file", "local")``, ...)."""
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (paths are plain OS paths)."""
    return bool({"file", "local"} & set(protocols(fs)))


def local_path(value: str) -> str | None:
    """The local path ``value`` names: a plain path as written, a ``file:`` URI (any case) as
    :func:`file_uri_path` reads it; None for a URI of another filesystem (``s3://``,
    ``https://``, a ``file:`` URI of another host). ``~`` is not expanded here."""
    if value[:5].lower() == "file:":
        return file_uri_path(value)
    return None if "://" in value else value


def file_uri_path(uri: str) -> str | None:
    """The local path a ``file:`` URI names, or None when ``uri`` is no local file URI.

    Two readings, in order: the name as written after ``file://`` (fsspec's reading, which
    keeps ``%``, ``#`` and spaces: ``file:///a b #1.jpg``), when that file exists; else RFC 8089:
    ``file:///a/b%20c.jpg``, ``file:/a/b%20c.jpg`` and ``file://localhost/a/b%20c.jpg`` all name
    ``/a/b c.jpg``, the path percent-decoded as bytes (``urllib.parse.unquote_to_bytes``) that
    are the OS name, so ``%E9`` finds a Latin-1 ``\xe9`` and ``%C3%A9`` finds ``é``; a
    ``#fragment`` or ``?query`` is then not part of the name. One ``lstat`` when the name as
    written exists. None for another host (``file://server/share/x``): fsspec reports that one.
    """
    if uri[:5].lower() != "file:":
        return None
    parts = urlsplit(uri)
    if parts.netloc.lower() not in ("", "localhost"):
        return None
    written = uri[5:]
    if written.startswith("//"):
        written = written[2:]
        if written.lower().startswith("localhost/"):
            written = written[len("localhost"):]
    if os.path.lexists(written):
        return written
    return os.fsdecode(unquote_to_bytes(parts.path))


def comparable_path(path: str, *, normalise_remote: bool = False) -> str:
    """One spelling of a path or URI, to compare two as strings (``--dedupe`` keys, matching
    ground truth to rows): a local path (or a ``file:`` URI, :func:`file_uri_path`) absolute
    with ``//``, ``.`` and ``..`` collapsed (``os.path.normpath``; a symlink is not resolved);
    a remote URI as written, or with ``normalise_remote`` its path collapsed the same way
    (``s3://b/x/../y.jpg`` -> ``s3://b/y.jpg``). As written, two spellings of an object key
    are two objects (S3 keeps ``a//b`` and ``a/b`` apart)."""
    local = local_path(path)
    if local is not None:
        return os.path.normpath(os.path.abspath(local))
    if not normalise_remote:
        return path
    proto, rest = path.split("://", 1)
    return f"{proto}://{posixpath.normpath(rest)}"


def local_spelling(value: str | None, *, existing_only: bool = False) -> str | None:
    """One spelling of a user's local location, for fingerprints: absolute, with ``~`` and a
    ``file:`` URI resolved (``photos`` here and ``../x/photos`` there name one folder); a URI of
    another filesystem as written. ``existing_only``: a value that names no local path stays as
    written (a hub model id such as ``openai/clip-vit-base-patch32``)."""
    local = local_path(value) if value else None
    if local is None:
        return value
    path = os.path.expanduser(local)
    if existing_only and not os.path.exists(path):
        return value
    return comparable_path(path)


def canonical_location(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A folder of ``fs`` in one spelling, to tell whether two locations are one (an output and
    its source, an output inside an input): local by real path (``os.path.realpath``: links,
    ``a//b``, ``a/./b`` and ``a/x/../b`` name one folder); another filesystem's path with those
    collapsed (``posixpath.normpath``) and no trailing ``/``."""
    if is_local(fs):
        return os.path.realpath(path)
    return posixpath.normpath(path) if path.strip("/") else path


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


def compression_of(path: str) -> str | None:
    """fsspec's compression name for a file, from its :func:`kind_name` (``list.csv.gz?sig=..``
    is gzip), None for none."""
    from fsspec.utils import infer_compression

    return infer_compression(kind_name(path))


def literal_brackets(fs: fsspec.AbstractFileSystem, pattern: str) -> str:
    """``pattern`` (a glob of ``fs``) with the brackets of each leading folder that exists under
    its own name escaped (``[`` -> ``[[]``, ``]`` -> ``[]]``), so that ``photos [2021]/*.jpg``
    globs inside the folder ``photos [2021]`` instead of reading ``[2021]`` as a character
    class (and finding nothing); a bracket in a name that does not exist stays a class. Stops
    at the first folder with ``*`` or ``?``; one ``exists`` call per folder name with brackets.
    """
    parts = pattern.split("/")
    escaped: list[str] = []
    for i, part in enumerate(parts[:-1]):
        if "*" in part or "?" in part:
            break
        if "[" in part or "]" in part:
            try:
                literal = fs.exists("/".join(parts[: i + 1]))
            except Exception:  # noqa: BLE001 - cannot tell: keep the pattern meaning
                literal = False
            if not literal:
                break
            part = re.sub(r"[\[\]]", lambda m: f"[{m.group(0)}]", part)
        escaped.append(part)
    return "/".join(escaped + parts[len(escaped):])


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


def is_local_folder(uri: str) -> bool:
    """True when ``uri`` is a local path (or ``file:`` URI) naming an existing folder; no call
    to any remote store (a manifest on S3 is planned without a listing)."""
    local = local_path(uri)
    return local is not None and os.path.isdir(local)


def display_name(path: str) -> str:
    """``path`` with each undecodable byte (a lone surrogate from the OS) written as ``%XX``."""
    if path.isascii():
        return path
    return _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", path)


class NotARegularFile(OSError):
    """A local input that is a named pipe, a device, a socket or a directory: never read."""


def file_kind(mode: int) -> str:
    """A readable name of a file type that is not a regular file (``os.stat``'s ``st_mode``)."""
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def open_input(fs: fsspec.AbstractFileSystem, path: str, mode: str = "rb", **kwargs):
    """``fs.open`` of an input file (a tar shard, a Parquet file, a manifest) at ``path`` (as
    :func:`open_path` finds it), only if it is a regular file when local: opening a named pipe
    blocks until a writer appears, and ``/dev/zero`` never ends (one such file named like a
    shard hung a job for good).

    Raises:
        NotARegularFile: a local FIFO, device, socket or directory (by ``os.stat``, following
            links; nothing is opened). Whatever ``fs.open`` raises.
    """
    path = open_path(fs, path)
    if is_local(fs):
        try:
            st = os.stat(path)
        except OSError:
            pass  # fs.open says what is wrong, as before
        else:
            if not stat.S_ISREG(st.st_mode):
                raise NotARegularFile(f"a {file_kind(st.st_mode)}, not a regular file: not read")
    return fs.open(path, mode, **kwargs)


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


def _local_path(uri: str | None) -> Path | None:
    """``uri`` as a local path (plain, or a ``file:`` URI read as :func:`local_path` reads
    it, ``~`` expanded), None for anything else."""
    local = local_path(uri) if uri else None
    return Path(local).expanduser() if local else None


def local_stamp(uri: str | None, exclude: str | None = None) -> str | None:
    """A cheap digest of a local file or folder (every file's relative name, size and mtime in
    ns; sha256, 16 hex digits), or of every file and folder a local pattern matches (a glob, or
    tar shards' brace ranges ``shards-{000..009}.tar``: each match's path and digest); None for
    anything not local (hub ids, remote URIs) or a pattern that matches nothing.

    Used to tell, without reading file contents, that an input or a checkpoint folder is
    unchanged since a finished run: a finished run's ``--resume`` then returns without Ray.
    A pattern is matched as the input kinds match it (fsspec's glob, brackets of existing
    folder names taken literally): its digest covers at least the files the job lists.

    ``exclude``: a local folder left out of the digest (the job's output, when it lies inside
    the input folder: its files change with every run), matched by real path.
    """
    path = _local_path(uri)
    if path is None:
        return None
    skip = _local_path(exclude)
    skip_real = os.path.realpath(skip) if skip is not None else None
    h = hashlib.sha256()
    if path.exists():
        _stamp_into(h, path, skip_real)
        return h.hexdigest()[:16]
    matches = _pattern_matches(str(path))
    if not matches:
        return None
    for match in matches:
        real = os.path.realpath(match)
        if skip_real is not None and (real == skip_real or real.startswith(skip_real.rstrip(os.sep) + os.sep)):
            continue  # the output, or a file in it (``/data/**`` with the output in /data)
        h.update(os.fsencode(f"{match}\0"))
        _stamp_into(h, Path(match), skip_real)
    return h.hexdigest()[:16]


def _pattern_matches(pattern: str) -> list[str]:
    """Local paths a glob or brace pattern names, sorted (none for a plain path)."""
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    found: set[str] = set()
    try:
        names = expand_braces(pattern)
    except InputError:  # a brace group that names nothing: the planner refuses it
        return []
    for one in names:
        if has_glob(one):
            found.update(fs.glob(literal_brackets(fs, one)))
        elif os.path.lexists(one):
            found.add(one)
    return sorted(found)


def _stamp_into(h, path: Path, skip_real: str | None) -> None:
    """Add a file's size and mtime, or each file of a folder (relative name, size, mtime), to ``h``."""
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return
    for dirpath, dirnames, filenames in os.walk(path):
        if skip_real is not None:
            # realpath per folder, not per file: folders are few.
            dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) != skip_real]
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            # fsencode: names that are not UTF-8 (surrogate-escaped here) hash as their bytes.
            h.update(os.fsencode(f"{os.path.relpath(full, path)}\0{st.st_size}:{st.st_mtime_ns}\n"))
