"""Reading a small text file the user names (``--labels-file``, a templates file, ``--config``,
a ``--storage-options`` file): from a local path, a pipe or any fsspec URI, decompressed by its
suffix, decoded by the one rule of ``textfiles``. Above both ``storage`` and ``textfiles``, so
that the input listing (which decodes manifests by the same rule) needs no reader of its own.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

from .errors import ConfigError, ZslabelError
from .storage import compression_of
from .textfiles import decode_text


def read_text(uri: str, storage_options: dict[str, Any] | None = None, *, what: str = "file",
              error: type[ZslabelError] = ConfigError) -> str:
    """Read and decode a text file from a local path or fsspec URI (by ``textfiles.decode_text``'s rule).

    Args:
        uri: local path or fsspec URI; compression is inferred from the suffix (``.gz`` ...).
        storage_options: fsspec options for remote filesystems.
        what: what the file is, for the error message ("labels file", "manifest", ...).
        error: the ZslabelError subclass raised when the file cannot be read.

    Raises:
        ``error``: the file does not exist or cannot be read (message names ``what`` and ``uri``).
        TextDecodeError: the file is not UTF-8 / BOM-marked UTF-16.
    """
    try:
        if "://" not in uri and os.path.exists(uri) and not os.path.isfile(uri) and not os.path.isdir(uri):
            # A pipe (--labels-file <(grep ... classes.txt)): read as a stream; fsspec seeks.
            with open(uri, "rb") as fh:
                data = fh.read()
        else:
            with fsspec.open(uri, "rb", compression=compression_of(uri, error), **(storage_options or {})) as fh:
                data = fh.read()
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {uri}: {exc}") from exc
    return decode_text(data, uri)
