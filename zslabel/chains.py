"""fsspec ``::`` chains (``zip://*.jpg::/d/imgs.zip``, ``simplecache::s3://b/x.tar``): which
names are chains, and the link of one that holds the path. fsspec reads every ``::`` as a link
separator, so a name holding ``::`` (a local ``run::1``, an S3 key ``a::b.jpg``) would open
another file (fsspec/filesystem_spec#1782); only a name whose first link is a filesystem that
reads through another is a chain (``storage.is_chain``), and ``storage`` keeps the others whole.
"""

from __future__ import annotations

import os

import fsspec


def chain_parts(uri: str) -> tuple[str, str]:
    """``(link, tail)`` of a ``::`` chain: the link whose filesystem holds the path, and the
    ``::``-joined links after it (``""`` for none), as fsspec reads a chain (a cache such as
    ``simplecache`` with no path of its own takes its target's; an archive such as ``zip`` or
    ``tar`` holds the path and reads the file the rest of the chain names). A local archive in
    the tail is made absolute: rows are read by Ray workers, whose working folder is not the
    driver's. Only for a chain (``storage.is_chain``: callers ask first)."""
    from fsspec.implementations.chained import ChainedFileSystem

    known = set(fsspec.available_protocols())
    links = uri.split("::")
    for i, link in enumerate(links[:-1]):
        if link in known:  # "simplecache::s3://..." as fsspec reads it: "simplecache://"
            link += "://"
        proto = fsspec.core.split_protocol(link)[0] or "file"
        try:
            cls = fsspec.get_filesystem_class(proto)
        except (ValueError, ImportError):  # url_to_fs has already refused such a chain
            cls = None
        if cls is not None and issubclass(cls, ChainedFileSystem) and not cls._strip_protocol(link):
            continue
        tail = [os.path.abspath(t) if "://" not in t and t not in known else t for t in links[i + 1:]]
        return link, "::".join(tail)
    return links[-1], ""
