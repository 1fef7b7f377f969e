"""Time limits and retries for reading inputs: how long one read may take, what is worth another
try, and how a failed storage call is described. No filesystem and no Ray here.

Bounded time per input (:class:`IOPolicy`, ``fetch.fetch_many``). Every filesystem that
``zslabel.storage`` makes gets connect and read timeouts (``IOPolicy.timeout``, default 30 s)
in the form its library takes (``storage.io_storage_options``). ``zslabel.sources.fetch.fetch_many``
retries transient failures (:func:`is_transient`: HTTP 408, 425, 429, 500, 502, 503, 504,
connection resets) with exponential backoff and jitter (honouring a short ``Retry-After``,
:func:`retry_after`), never retries a timeout (a silent server costs one timeout, not
``retries + 1`` of them), and cuts any single attempt after ``ATTEMPT_LIMIT_FACTOR`` timeouts in
all (a server that trickles a byte now and then never trips a read timeout).
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

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
        return f"{type(exc).__name__}: {exc}{_hint(exc)}"
    limit = f"--io-timeout {io.timeout:g} s" if io is not None else "--io-timeout"
    text = str(timeout) or "timed out"
    return f"{type(timeout).__name__}: {text} (no answer within {limit})"


def _hint(exc: BaseException) -> str:
    """What to do about a storage error whose message alone does not say (``""`` for others)."""
    if isinstance(exc, ValueError) and "Cannot seek streaming HTTP file" in str(exc):
        # fsspec reads an HTTP file by ranges only when the server gives its size and no
        # Content-Encoding (fsspec/filesystem_spec#1319): Parquet and Arrow files need seeks.
        return (" (the server sends this file compressed (Content-Encoding) or without its size, so it "
                "cannot be read by ranges: serve it as is, or download it and read the copy)")
    return ""
