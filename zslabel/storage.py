"""URIs and filesystems: the one place that turns a user's location into an fsspec filesystem.

Used by input planning (``zslabel.sources``), the output writer, ground-truth reading and remote
checkpoints, so a location means the same thing everywhere: a plain local path or any fsspec URI
(``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``, chained ``simplecache::s3://...``). No Ray here.

Names that are not valid UTF-8. A Linux file name is bytes; Python hands undecodable bytes over
as lone surrogates (``b'caf\\xe9.png'`` -> ``'caf\\udce9.png'``), which Arrow and Parquet cannot
store. :func:`display_name` writes each such byte as ``%XX`` (``caf%E9.png``) and leaves every
other character, ``%`` included, as it is, so ordinary names are unchanged. Reading a local
path that does not exist retries it with the ``%XX`` escapes of bytes >= 0x80 turned back into
bytes (:func:`open_path`): the ``path`` column, or a manifest line copied from it, finds
the file; the same retry tries the name's other Unicode normalisation (NFC/NFD). The one
ambiguity: when both ``caf%E9.png`` (literally) and ``caf\\xe9.png`` exist, both rows say
``caf%E9.png`` and the literal file is the one read.

Bounded time per input: every filesystem made here gets the connect and read timeouts of an
``io_policy.IOPolicy`` (default 30 s) in the form its library takes, unless the user's storage
options set them (:func:`io_storage_options`: aiohttp's default is 300 s per request).

Name patterns, as text: glob metacharacters (:func:`has_glob`), brace ranges by bash's rules
(:func:`expand_braces`), the part of a chain or an HTTP(S) URL a kind is told by (:func:`kind_name`).
Local stamps (:func:`local_stamp`): a digest of the names, sizes and mtimes of a local input or
checkpoint, for the ``--resume`` short-cut (``store.OutputStore.finished_unchanged``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import stat
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import fsspec
from fsspec.archive import AbstractArchiveFileSystem
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.local import make_path_posix
from fsspec.implementations.reference import ReferenceFileSystem

from .chains import chain_parts
from .errors import InputError, ZslabelError
from .io_policy import IOPolicy

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\udc80-\udcff]")
_HIGH_ESCAPE = re.compile(r"%([89A-Fa-f][0-9A-Fa-f])")


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
    if is_chain(uri):
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
    if "::" in uri and not is_chain(uri):  # a name holding "::" (fsspec would split it)
        m = _SCHEME.match(uri)
        if m is None:
            return fsspec.filesystem("file"), make_path_posix(uri).rstrip("/") or "/"
        try:
            cls = fsspec.get_filesystem_class(m.group(1))
        except (ImportError, ValueError) as exc:
            raise error(f"cannot open {uri}: {exc}") from exc
        fs = fsspec.filesystem(m.group(1), **io_storage_options(uri, storage_options, io or IOPolicy()))
        _once_on_s3(fs)
        return fs, cls._strip_protocol(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **io_storage_options(uri, storage_options, io or IOPolicy()))
    except ImportError as exc:
        raise error(f"cannot open {uri}: {exc}") from exc
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise error(f"cannot open {uri}: {exc}") from exc
        raise
    _once_on_s3(getattr(fs, "fs", fs) if is_chain(uri) else fs)  # a chain: the cache's target
    return fs, path


def _once_on_s3(fs: fsspec.AbstractFileSystem) -> None:
    if "s3" in protocols(fs):
        # s3fs retries every call and body read itself (``retries`` = 5, nested: up to 25 tries of
        # a stalled read; a stalled manifest took 40 s at --io-timeout 1 --io-retries 0, ~3,000 s
        # at the defaults). botocore (``config_kwargs.retries``) and zslabel's own layer retry
        # already, so s3fs tries once. Filesystems are cached per options: this is every S3 one.
        fs.retries = 1


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_chain(uri: str) -> bool:
    """Whether ``uri`` is a ``::`` chain: its first link (``zip://a.jpg``, ``simplecache``) names
    a filesystem that reads through another (an archive, a ``ChainedFileSystem`` cache, a
    reference). A name holding ``::`` is none: fsspec split ``s3://b/a::b.jpg`` into a chain to
    a local ``b.jpg`` (fsspec#1782), and ``chains.chain_parts`` would too."""
    if "::" not in uri:
        return False
    first = uri.split("::", 1)[0]
    try:
        cls = fsspec.get_filesystem_class(((fsspec.core.split_protocol(first)[0] if "://" in first else first)
                                           or "").lower())
    except (ValueError, ImportError):  # a local name, or a protocol fsspec does not know
        return False
    return issubclass(cls, (AbstractArchiveFileSystem, ChainedFileSystem, ReferenceFileSystem))


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

    Local files stay plain paths; other filesystems get the protocol the user wrote: in a ``::``
    chain the link holding the path's (:func:`chain_parts`), the links after it kept
    (``zip://a.jpg::/d/imgs.zip``; a cache in front, ``simplecache::``, dropped). HTTP(S) paths
    are full URLs already. Undecodable name bytes become ``%XX`` (:func:`display_name`).
    """
    if is_local(fs):
        return display_name
    link, tail = chain_parts(uri) if is_chain(uri) else (uri, "")
    proto = fsspec.core.split_protocol(link)[0] or protocols(fs)[0]
    prefix = f"{proto}://"
    suffix = f"::{tail}" if tail else ""
    return lambda p: display_name(p if "://" in p else prefix + p) + suffix


def name_part(path: str, fs: fsspec.AbstractFileSystem) -> str:
    """The part of a filesystem path that names the file: for HTTP(S) the URL path without its
    query and fragment (``/img.jpg`` of ``https://h/img.jpg?sig=..``), else ``path`` itself."""
    if {"http", "https"} & set(protocols(fs)):
        return urlsplit(path).path
    return path


# Codecs fsspec registers only when a package imports: without one it infers no compression, and
# the compressed bytes were read as the text itself ("not valid UTF-8 ... iconv").
_OPTIONAL_CODECS = {".zst": ("zstd", "zstandard"), ".lz4": ("lz4", "lz4")}


def compression_of(path: str, error: type[ZslabelError] = InputError) -> str | None:
    """fsspec's compression name for a file, from its :func:`kind_name` (``list.csv.gz?sig=..``
    is gzip), None for none.

    Raises:
        ``error``: a compression whose codec is not installed (``.zst`` without ``zstandard``).
    """
    from fsspec.utils import infer_compression

    name = kind_name(path)
    found = infer_compression(name)
    suffix = os.path.splitext(name)[1].lower()
    if found is None and suffix in _OPTIONAL_CODECS:
        codec, package = _OPTIONAL_CODECS[suffix]
        raise error(f"cannot read {path}: it is {codec}-compressed ({suffix}) and no {codec} decompressor is "
                    f"installed: pip install {package}, or decompress the file first")
    return found


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
    # Links to folders are followed by the rule the folder input lists them by
    # (``sources.folder``): a new image behind a link must change the stamp. A link into a
    # tree already walked, or to an ancestor of one (a loop), is not followed.
    trees = [os.path.realpath(path)]

    def inside(real: str, tree: str) -> bool:
        return real == tree or real.startswith(tree.rstrip(os.sep) + os.sep)

    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            # realpath per folder, not per file: folders are few.
            real = os.path.realpath(full)
            if real == skip_real:
                continue
            if os.path.islink(full):
                if any(inside(real, tree) or inside(tree, real) for tree in trees):
                    continue
                trees.append(real)
            keep.append(d)
        dirnames[:] = keep
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            # fsencode: names that are not UTF-8 (surrogate-escaped here) hash as their bytes.
            h.update(os.fsencode(f"{os.path.relpath(full, path)}\0{st.st_size}:{st.st_mtime_ns}\n"))


# --------------------------------------------------------------------------------------------
# Name patterns, as text

_GLOB_CHARS = re.compile(r"[*?\[]")
_HTTP = re.compile(r"(?i)^https?://")


def is_http_url(uri: str) -> bool:
    """Whether ``uri`` is an ``http(s)://`` URL (any case), whose ``?`` starts its query."""
    return bool(_HTTP.match(uri))


def kind_name(uri: str) -> str:
    """The part of ``uri`` its kind is told by (``.tar``, ``.parquet``, ``.csv``): of a ``::``
    chain, the link holding the path (``tar://a.jpg::x.tar`` names an image, not a tar); an
    HTTP(S) URL without its query and fragment (a presigned ``shard.tar?X-Amz-Signature=..``, a
    hub file's ``?download=true``); anything else as it is."""
    if is_chain(uri):
        uri = chain_parts(uri)[0]
    if not is_http_url(uri):
        return uri
    return urlsplit(uri)._replace(query="", fragment="").geturl()


def has_glob(uri: str) -> bool:
    """True when the path part of ``uri`` holds a glob metacharacter (``*``, ``?``, ``[``); an
    HTTP(S) URL's query is no part of it (its ``?`` starts the query)."""
    if is_http_url(uri):
        return bool(_GLOB_CHARS.search(urlsplit(uri).path))
    return bool(_GLOB_CHARS.search(uri.split("://", 1)[-1]))


def glob_start(path: str) -> int | None:
    """Index of the first glob metacharacter in ``path``, or None."""
    match = _GLOB_CHARS.search(path)
    return match.start() if match else None


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTERS = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")
# What is left of a range that was not expanded ("{a..5}", "{1..}", "{000..004.tar").
_UNEXPANDED_RANGE = re.compile(r"\{[^{}]*\.\.")
# More names than any shard list has: a typo such as {0..99999999} is refused, not expanded.
MAX_BRACE_NAMES = 1_000_000


def _padded(bound: str) -> bool:
    """Whether a range bound asks for zero padding, as in bash: ``01``, ``-05`` (not ``0``)."""
    digits = bound[1:] if bound.startswith("-") else bound
    return len(digits) > 1 and digits.startswith("0")


def _sequence(body: str) -> list[str] | None:
    """The names of a bash sequence expression ``N..M[..STEP]`` (integers, or single ASCII
    letters), or None when ``body`` is none. The step's sign is ignored (the direction goes from
    ``N`` to ``M``) and a step of 0 is 1; integers keep the zero padding of a bound written
    with a leading zero (the width of the wider bound, sign included), as bash pads."""
    rng = _RANGE.match(body)
    letters = None if rng else _LETTERS.match(body)
    match = rng or letters
    if match is None:
        return None
    lo, hi, step_text = match.groups()
    step = abs(int(step_text)) if step_text else 1
    step = step or 1
    if letters:
        a, b = ord(lo), ord(hi)
        if (abs(b - a) // step + 1) > MAX_BRACE_NAMES:
            raise InputError(f"the brace range {{{body}}} names more than {MAX_BRACE_NAMES:,} names")
        return [chr(i) for i in range(a, b + (1 if b >= a else -1), step if b >= a else -step)]
    a, b = int(lo), int(hi)
    if abs(b - a) // step + 1 > MAX_BRACE_NAMES:
        raise InputError(f"the brace range {{{body}}} names more than {MAX_BRACE_NAMES:,} names")
    width = max(len(lo), len(hi)) if _padded(lo) or _padded(hi) else 0
    return [f"{i:0{width}d}" for i in range(a, b + (1 if b >= a else -1), step if b >= a else -step)]


def _top_level_split(body: str) -> list[str]:
    """``body`` split at the commas outside nested braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _first_group(pattern: str) -> tuple[int, int, list[str]] | None:
    """``(start, end, alternatives)`` of the leftmost brace group bash would expand in
    ``pattern`` (``pattern[start:end]`` is the group, braces included), or None. As bash scans:
    a ``{`` whose group is not expandable (no comma outside nested braces, no sequence, never
    closed) is text, and the scan goes on after it."""
    for start, ch in enumerate(pattern):
        if ch != "{":
            continue
        depth = 0
        for end in range(start, len(pattern)):
            if pattern[end] == "{":
                depth += 1
            elif pattern[end] == "}":
                depth -= 1
                if depth == 0:
                    break
        else:
            continue  # never closed: text
        body = pattern[start + 1:end]
        alternatives = _top_level_split(body)
        if len(alternatives) > 1:
            return start, end + 1, alternatives
        seq = _sequence(body)
        if seq is not None:
            return start, end + 1, seq
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as bash does (and WebDataset's ``braceexpand``), left to right,
    several groups as a product:

    - lists ``{x,y}`` -> x y (nested ``{a,{b,c}}`` -> a b c; ``x{a,}`` -> xa x);
    - integer ranges ``a{00..02}b`` -> a00b a01b a02b, descending ``{3..1}`` -> 3 2 1, with a
      step ``{000..004..2}`` -> 000 002 004 (its sign ignored, 0 read as 1); a bound written
      with a leading zero (``01``, ``-05``, not ``0``) pads every name to the wider bound's
      width, sign included;
    - letter ranges ``{a..c}`` -> a b c, ``{a..e..2}`` -> a c e (single ASCII letters).

    A group with neither ``..`` nor a comma (``{literal}``) and a ``{`` never closed are kept
    as written, as bash keeps them.

    Raises:
        InputError: a group that looks like a range but is none (``{a..5}``, ``{1..}``,
            ``{aa..c}``, ``{000..004.tar``): bash would keep it as text, which names no file;
            or a pattern naming more than ``MAX_BRACE_NAMES`` names.
    """
    out: list[str] = []
    todo = [pattern]
    while todo:
        one = todo.pop()
        group = _first_group(one)
        if group is None:
            unexpanded = _UNEXPANDED_RANGE.search(one)
            if unexpanded:
                close = one.find("}", unexpanded.start())
                bad = one[unexpanded.start():close + 1] if close >= 0 else one[unexpanded.start():] + " (never closed)"
                raise InputError(
                    f"cannot expand the brace group {bad} in {pattern}: a range is {{N..M}} or "
                    "{N..M..STEP} of integers (zero padding kept: {000..099}) or of single letters ({a..f}), "
                    "a list is {x,y,z}, and every { needs its }")
            out.append(one)
            if len(out) > MAX_BRACE_NAMES:
                raise InputError(f"{pattern} names more than {MAX_BRACE_NAMES:,} names")
            continue
        start, end, alternatives = group
        head, tail = one[:start], one[end:]
        # Reversed onto the stack, so that names come out in order.
        todo.extend(head + alt + tail for alt in reversed(alternatives))
    return out
