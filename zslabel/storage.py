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
the file; the same retry tries the name's other Unicode normalisation (NFC/NFD). The one ambiguity: when both ``caf%E9.png`` (literally) and ``caf\\xe9.png`` exist,
both rows say ``caf%E9.png`` and the literal file is the one read.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import fsspec

from .errors import InputError, ZslabelError

_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\udc80-\udcff]")
_HIGH_ESCAPE = re.compile(r"%([89A-Fa-f][0-9A-Fa-f])")


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None, *,
              error: type[ZslabelError] = InputError) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or fsspec URI.

    Raises:
        ``error``: the protocol is unknown or its package (s3fs, gcsfs, ...) is not installed.
    """
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        raise error(f"cannot open {uri}: {exc}") from exc
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise error(f"cannot open {uri}: {exc}") from exc
        raise


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


def is_pattern(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``uri`` should be globbed: it holds metacharacters and does not exist as named.

    An existing folder or file called ``photos [2021]`` is that folder or file; only a name that
    does not exist is a pattern. One ``exists`` call, made only when metacharacters are present.
    """
    if not has_glob(uri):
        return False
    fs, path = url_to_fs(uri, storage_options)
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
