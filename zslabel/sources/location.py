"""Where an input URI points, before its kind is chosen (``sources.plan_inputs``): its one
spelling, whether its glob characters are a pattern, whether a ``::`` chain's archive opens,
and whether it names a local folder. Facts asked of the storage only; which kind reads the
input is the registry's (``sources.KINDS``).
"""

from __future__ import annotations

from typing import NamedTuple

from .. import io_policy, storage
from ..errors import InputError


class Location(NamedTuple):
    """An input as :func:`locate` found it.

    Attributes:
        uri: its one spelling: a local path absolute (a ``file:`` URI percent-decoded, RFC
            8089), anything else as given.
        kind_name: the part its kind is told by (``storage.kind_name``).
        pattern: whether its glob characters are a pattern (the name does not exist as written).
        local_folder: whether it names an existing local folder.
    """

    uri: str
    kind_name: str
    pattern: bool
    local_folder: bool


def locate(uri: str, storage_options: dict | None, io: io_policy.IOPolicy, *, probe: bool = True) -> Location:
    """The input at ``uri`` located (see :class:`Location`).

    Args:
        storage_options: the fsspec options of the input's filesystem. io: the job's I/O policy;
            the one storage call (whether a name with glob characters exists) is made within it.
        probe: False when the kind is given (``--input-format``): neither ``pattern`` nor
            ``local_folder`` is asked (both False).

    Raises:
        InputError: a ``::`` chain whose archive cannot be opened (:func:`check_chain`).
    """
    check_chain(uri, storage_options, io)  # a chain is spelled as given (``storage.local_spelling``)
    # Local paths absolute, so that every row's path is (tar members and Parquet rows are named
    # after their file, "shard.tar#key.jpg"): a report or relabel from another folder finds them.
    spelled = storage.local_spelling(uri) or uri
    if storage.has_glob(uri) and uri.endswith("/") and not spelled.endswith("/"):
        spelled += "/"  # a pattern ending in "/" names folders (folder.plan_listing): keep it
    if not probe:
        return Location(spelled, storage.kind_name(spelled), False, False)
    # Asked within io's timeouts (``storage.is_pattern``): a name that exists as written is
    # never a pattern.
    return Location(spelled, storage.kind_name(spelled), storage.is_pattern(spelled, storage_options, io=io),
                    storage.is_local_folder(spelled))


def check_chain(uri: str, storage_options: dict | None, io: io_policy.IOPolicy) -> None:
    """Refuse a ``::`` chain (``zip://*.jpg::/d/imgs.zip``) whose archive cannot be opened, in
    one line: fsspec opens it with the filesystem, so a missing or damaged archive, or an
    HTTP server without range requests, was a traceback from wherever the chain was first used.

    Nothing for a URI that is no chain (``storage.is_chain``).

    Raises:
        InputError: a pattern after the link holding the path (fsspec opens that name as
            written: it never matches), or the archive cannot be opened.
    """
    if not storage.is_chain(uri):
        return
    link, tail = storage.chain_parts(uri)
    if tail and storage.has_glob(tail):
        raise InputError(f"cannot read {uri}: a pattern after '::' is not expanded; name one archive "
                         f"per run and put the pattern before it ({link}::ARCHIVE)")
    try:
        storage.url_to_fs(uri, storage_options, io=io)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - each archive type and backend fails its own way
        hint = (f"; fetch the archive whole with a cache link: {link}::simplecache::{tail}"
                if "range requests" in str(exc) else "")
        raise InputError(f"cannot open {uri}: {' '.join(io_policy.describe_error(exc, io).split())}{hint}") from exc
