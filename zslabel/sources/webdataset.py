"""Input kind ``webdataset``: tar shards (``shards-{000..099}.tar``, a glob, or a folder of
shards), read streaming in one Ray task per shard, so labeling starts before all are read.

Members are grouped into samples by key (the member path up to the first dot of its base
name, the WebDataset rule). Each image member is a row; its sample's ``.json``/``.txt``/``.cls``
members (``.cls``: WebDataset's class label) are carried in the ``json``/``txt``/``cls``
columns. Member names lose a leading ``./`` or ``/`` (``tar -C dir -cf x.tar .`` writes
``./0000.png``); ``..`` stays (nothing is extracted, so it is only a name); undecodable bytes
become ``%XX``. A name repeated in one tar is two rows.

Member types (``tarfile``): regular files as above; an image-named hard or symbolic link is a
row holding its target member's bytes (symbolic links relative to their folder, chains
followed), or a ``read_error`` row when the target is not a regular member of the same tar;
links with other names, directories and special files (devices, FIFOs) are counted skips.
Sidecars of one key that are not next to its image (WebDataset only groups adjacent members)
still join a later image of that key. A sidecar's kind is its last suffix, as an image's is.
An image carries, of each kind, the first sidecar of its own stem (``22.05.json`` for
``22.05.png``: both are in key ``22``, webdataset#237), else the key's (``a.txt``), else another
(``a.caption.txt``), never one of another image's stem (``22.06.txt``); a sidecar no image
carries (a second ``a.txt``) is a counted skip (``sidecar_repeated``). A member
above ``MAX_MEMBER_BYTES`` is a ``too_many_pixels`` row, never read into memory. Tars are read
with ``ignore_zeros``, so the members of concatenated tars (``cat a.tar b.tar``) after the first
end-of-archive marker are read too; damaged member headers are skipped and the shard gets a
``read_error`` row saying so.

Counts (``listed == rows + skipped``): every member is listed except a sidecar that is part of
its image's row; skips are counted by reason (``common.SKIP_REASONS``). An unreadable shard is
one ``read_error`` row (listed); a bug while handling one member is that member's
``internal_error`` row.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import posixpath
import tarfile
from collections.abc import Callable, Generator, Iterator
from typing import IO, Any

import pyarrow as pa

from .. import io_policy, storage
from ..errors import INTERNAL_ERROR, READ_ERROR, TOO_MANY_PIXELS, InputError, error_string
from .blocks import EMIT_BYTES, EMIT_ROWS, STREAM_BLOCK_SIZE, schema_with, streaming_plan
from .common import (
    FILE_INDEX_STRIDE,
    IMAGE_EXTENSIONS,
    InputKind,
    InputOptions,
    InputPlan,
    count_skip,
    extension,
    internal_error_detail,
    is_hidden,
    member_name,
    shard_skip_reason,
)

logger = logging.getLogger(__name__)

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")  # all that tarfile streams
SIDECARS = ("json", "txt", "cls")
# The largest encoded image a row can hold: one Arrow binary value has 32-bit offsets. Nothing
# decodable within the default --max-pixels is that large (16-bit RGBA at 178,956,970 pixels
# is 1.43 GB), so a bigger member is a too_many_pixels row; its bytes are never read.
MAX_MEMBER_BYTES = 2**31 - 1
# A sidecar's text goes into a string cell of every batch: a larger one is a counted skip.
MAX_SIDECAR_BYTES = 16 * 2**20
# Link chains longer than this (or looping) name no member.
MAX_LINK_HOPS = 40
# tarfile's read size in stream mode (its default, 10 KiB, makes skipping a large member
# hundreds of thousands of small reads).
TAR_BUFSIZE = 1 << 20
# gzip, bzip2, xz: read as a stream through the standard library's decompressing file, which
# reads every member (gzip) or stream (bzip2, xz) of a file as one, as `gzip -dc` does: a shard
# appended to another (`cat a.tar.gz b.tar.gz`), bgzip/pigz's independent members, pbzip2's
# streams. tarfile's own stream mode (``r|gz``) stops after the first one: the images after it
# were silently not listed (libarchive#145). zstd: refused (no decompressor in this Python).
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DECOMPRESSORS: dict[bytes, Callable[[Any], io.BufferedIOBase]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    b"BZh": lambda f: bz2.BZ2File(f),
    b"\xfd7zXZ\x00": lambda f: lzma.LZMAFile(f),
}
CARRIED = ["key", *SIDECARS]
_SCHEMA = schema_with(CARRIED)
def _shards(uri: str, options: InputOptions) -> tuple[list[str], list[tuple[str, str]]]:
    """(shard URIs, [(other file in a searched folder, skip reason)]): braces expanded, patterns
    globbed, folders searched; an existing name as is."""
    so = options.storage_options
    shards: list[str] = []
    others: list[tuple[str, str]] = []
    literal = ("{" in uri or storage.has_glob(uri)) and _exists(uri, so)
    for pattern in [uri] if literal else storage.expand_braces(uri):
        if not literal and storage.is_pattern(pattern, so):
            fs, fs_path = storage.url_to_fs(pattern, so)
            shards.extend(map(storage.uri_maker(pattern, fs), sorted(fs.glob(fs_path))))
        elif storage.kind_name(pattern).lower().endswith(SUFFIXES):
            shards.append(pattern)  # named explicitly: a missing one becomes a read_error row
        else:  # a folder of shards
            fs, fs_path = storage.url_to_fs(pattern, so)
            root = fs_path.rstrip("/")
            to_uri = storage.uri_maker(pattern, fs)
            for p in sorted(fs.find(root)):
                skip = shard_skip_reason(p[len(root):].lstrip("/"))
                if p.lower().endswith(SUFFIXES) and skip is None:
                    shards.append(to_uri(p))
                elif not p.endswith("/"):
                    others.append((to_uri(p), skip or "not_a_shard"))
    if not shards:
        raise InputError(f"no tar shards match {uri}")
    # A shard the pattern names twice ({000..009,005}, overlapping globs) would be read twice
    # and its members counted once: read once.
    once, seen = [], set()
    for shard in shards:
        key = storage.comparable_path(shard)
        if key not in seen:
            seen.add(key)
            once.append(shard)
    if len(once) < len(shards):
        logger.warning("%s names %d shard(s) more than once; each is read once", uri, len(shards) - len(once))
    return once, others


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
    """The rows of one shard, batched for emission; input_index = shard * STRIDE + ordinal.

    An ordinal is taken in member order; a link member's row takes its ordinal when the member
    is met (:meth:`reserve`) and is added once its target's bytes are known, so input_index
    still follows the tar's order.
    """

    def __init__(self, uri: str, file_index: int):
        self.uri, self.base = uri, file_index * FILE_INDEX_STRIDE
        self.pending: list[dict] = []
        self.ordinal = self.size = 0

    def reserve(self) -> int:
        self.ordinal += 1
        return self.ordinal - 1

    def add(self, path: str, data: bytes | None, error: str | None, key=None, sidecars=None,
            ordinal: int | None = None) -> None:
        sidecars = sidecars or {}
        self.pending.append({"path": path, "input_index": self.base + (self.reserve() if ordinal is None else ordinal),
                             "data": data, "read_error": error, "key": key,
                             **{ext: sidecars.get(ext) for ext in SIDECARS}})
        self.size += len(data or b"")

    def full(self) -> bool:
        return len(self.pending) >= EMIT_ROWS or self.size >= EMIT_BYTES

    def take(self) -> pa.Table:
        table = pa.Table.from_pylist(self.pending, schema=_SCHEMA)
        self.pending, self.size = [], 0
        return table


class _Link:
    """An image member that is a hard or symbolic link: its row waits for the target's bytes."""

    def __init__(self, target: str, symbolic: bool):
        self.target, self.symbolic = target, symbolic
        self.ordinal = -1
        self.key: str | None = None
        self.sidecars: dict[str, str] = {}


class _Sample:
    """Members sharing one key: image members and sidecar texts, until the key changes."""

    def __init__(self, key: str | None = None):
        self.key = key
        self.images: list[tuple[str, bytes | _Link | str]] = []  # str: the row's error
        self.sidecars: list[tuple[str, str, str]] = []  # (kind, member name, text), in member order

    def add_sidecar(self, ext: str, name: str, text: str) -> None:
        self.sidecars.append((ext, name, text))

    def adopt(self, held: _Sample) -> None:
        """Take the sidecars of an earlier sample of this key that had no image (members of
        one key not next to each other: WebDataset only groups adjacent members)."""
        self.sidecars = held.sidecars + self.sidecars

    def carried(self, repeated: Callable[[str], None]) -> dict[str, dict[str, str]]:
        """Each image member's sidecars, ``{image name: {kind: text}}``; a sidecar no image
        carries is passed to ``repeated``.

        For each kind, an image carries the first sidecar of its own stem (``22.05.json`` for
        ``22.05.png``: dots in base names put both in key ``22``, webdataset#237), else the
        sample's own (``a.txt``), else another of that kind (``a.caption.txt``), never one of
        another image's stem (``22.06.txt`` is not ``22.05.png``'s caption).
        """
        # By stem, first index per kind: linear in members (a video's frames "x.000001.jpg" all
        # share key "x": comparing every image with every sidecar was quadratic).
        first: dict[str, dict[str, int]] = {}
        for i, (kind, sidecar, _) in enumerate(self.sidecars):
            first.setdefault(_stem(sidecar), {}).setdefault(kind, i)
        stems = {_stem(name) for name, _ in self.images}
        others: dict[str, int] = {}  # of stems that are no image's and not the key's
        for stem, kinds in first.items():
            if stem not in stems and stem != self.key:
                for kind, i in kinds.items():
                    others[kind] = min(i, others.get(kind, i))
        keys = first.get(self.key or "", {})
        used: set[int] = set()
        out: dict[str, dict[str, str]] = {}
        for name, _ in self.images:
            chosen = {**others, **keys, **first.get(_stem(name), {})}  # later ranks first
            used.update(chosen.values())
            out[name] = {kind: self.sidecars[i][2] for kind, i in chosen.items()}
        for i, (_, sidecar, _) in enumerate(self.sidecars):
            if i not in used:
                repeated(sidecar)
        return out

    def flush(self, rows: _Rows, links: list[tuple[str, _Link]], held: dict[str, _Sample],
              repeated: Callable[[str], None]) -> None:
        """Rows for the images (links wait in ``links``); a sample of sidecars only is kept in
        ``held`` in case an image of its key comes later in the shard."""
        if not self.images and not self.sidecars:
            return
        assert self.key is not None  # only read_tar's first sample has none, and it stays empty
        if not self.images:
            if self.key in held:
                held[self.key].sidecars += self.sidecars
            else:
                held[self.key] = self
            return
        carried = self.carried(repeated)
        for name, data in self.images:
            try:
                key = storage.display_name(self.key)
                path = f"{rows.uri}#{storage.display_name(name)}"
                sidecars = carried[name]
                if isinstance(data, _Link):
                    data.ordinal, data.key, data.sidecars = rows.reserve(), key, sidecars
                    links.append((path, data))
                elif isinstance(data, str):
                    rows.add(path, None, data, key, sidecars)
                else:
                    rows.add(path, data, None, key, sidecars)
            except Exception as exc:  # noqa: BLE001 - a bug costs this member, not the shard
                path = f"{rows.uri}#{name.encode('utf-8', 'backslashreplace').decode('utf-8')}"
                rows.add(path, None, error_string(INTERNAL_ERROR, internal_error_detail(path, exc, logger)))


def _stem(name: str) -> str:
    """A member name without its last suffix: ``22.05.png`` -> ``22.05``, ``a/b.txt`` -> ``a/b``."""
    folder, _, base = name.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{folder}/{stem}" if folder else stem


def _skip(uri: str, name: str, counts: dict, reason: str) -> None:
    count_skip(counts, reason, f"{uri}#{storage.display_name(name)}")


class _HeaderLog:
    """What tarfile met where it looked for member headers, to tell a clean end of the archive
    from damage. ``tarfile`` (read with ``ignore_zeros``, so that members after a first
    end-of-archive marker, as in concatenated tars, are read too) skips a damaged header block
    by block and ends quietly at a cut-off header; this log, fed by :meth:`tarinfo_class`, is
    how the reader notices and reports it."""

    def __init__(self) -> None:
        self.damage: list[tuple[int, str]] = []  # (first byte offset of a region, what tarfile said)
        self.last_bad = -1  # offset of the last damaged block: contiguous blocks are one region
        self.ended_cleanly = False  # an end-of-archive (zero) block after the last member

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        """A ``TarInfo`` subclass (``tarfile.open(tarinfo=...)``, public API) that logs here."""
        log = self

        class LoggedTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar):
                try:
                    info = super().fromtarfile(tar)
                except tarfile.EOFHeaderError:
                    log.ended_cleanly = True
                    raise
                except tarfile.EmptyHeaderError:
                    raise
                except tarfile.HeaderError as exc:
                    if log.last_bad != tar.offset - tarfile.BLOCKSIZE:
                        log.damage.append((tar.offset, f"{type(exc).__name__}: {exc}"))
                    log.last_bad = tar.offset
                    raise
                log.ended_cleanly = False
                return info

        return LoggedTarInfo

    def problem(self, members: int) -> str | None:
        """None for a sound archive, else what was wrong (for the shard's ``read_error`` row)."""
        if self.damage:
            where = ", ".join(f"byte {offset}" for offset, _ in self.damage[:3])
            if not members:  # nothing to speak of as "the rest"
                return (f"not a tar archive (or damaged from its start): no member header could be read "
                        f"({len(self.damage)} unreadable region(s) at {where}: {self.damage[0][1]})")
            return (f"tar damaged: {len(self.damage)} unreadable member header region(s) at {where} "
                    f"({self.damage[0][1]}); members there are lost, the rest were read")
        if members and not self.ended_cleanly:
            return "tar ends without its end-of-archive blocks: the shard was cut short"
        return None


def _open_tar(uri: str, storage_options: dict, log: _HeaderLog):
    """``(file, TarFile)`` reading ``uri`` member by member, in order.

    An uncompressed tar in a seekable file (local, object stores) is opened ``r:``: tarfile
    seeks past the data of members it does not read (a 3 GiB member over the size limit costs
    no download). Compressed tars (told by their magic bytes: ``r:*`` would not tell them apart
    with ``ignore_zeros``; decompressed by ``_DECOMPRESSORS``) and HTTP(S) are read as a stream
    (``r|``). HTTP(S) is read with one
    plain GET (fsspec ``block_size=0``): a server that ignores ``Range`` answers each of
    fsspec's block requests with the whole file, and fsspec then refuses every block after the
    first, which lost the rest of the shard."""
    fs, fs_path = storage.url_to_fs(uri, storage_options)
    http = bool({"http", "https"} & set(storage.protocols(fs)))
    f = storage.open_input(fs, fs_path, "rb", block_size=0 if http else STREAM_BLOCK_SIZE)
    try:
        head = f.read(6)
        if head.startswith(_ZSTD_MAGIC):  # Python's tarfile reads gzip, bz2 and xz only
            raise InputError("zstd-compressed data, which this Python's tarfile cannot read: decompress "
                             "the shard (zstd -d) or write it with gzip")
        decompress = next((d for magic, d in _DECOMPRESSORS.items() if head.startswith(magic)), None)
        seekable = not http and f.seekable()
        if seekable:
            f.seek(0)
        if seekable and decompress is None:
            tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True, tarinfo=log.tarinfo_class())
        else:
            stream: Any = f if seekable else io.BufferedReader(_Prefixed(head, f), TAR_BUFSIZE)  # a file object
            if decompress is not None:
                stream = _ReadAvailable(decompress(stream))
            tar = tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFSIZE, ignore_zeros=True,
                               tarinfo=log.tarinfo_class())
    except BaseException:
        f.close()
        raise
    return f, tar


class _ReadAvailable:
    """A decompressing file whose ``read(n)`` gives what one read of the compressed data yields
    (``read1``). tarfile asks for a megabyte at a time; a decompressing file's ``read`` fills it
    or raises, so a shard cut short lost every member before the cut with it (``EOFError``),
    where each ``read1`` hands those members over and the cut then ends the member it falls in."""

    def __init__(self, f: io.BufferedIOBase):
        self._f = f

    def read(self, size: int = -1) -> bytes:
        return self._f.read1(size)


class _Prefixed(io.RawIOBase):
    """A stream that cannot seek back, with the bytes already read from its start (to tell
    its compression) put back in front."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._f.read(len(view))
        view[:len(data)] = data
        return len(data)


def _link_target(info: tarfile.TarInfo, name: str) -> str | None:
    """The member name a link points to, or None when it points outside the tar.

    A hard link names its target as stored (``./a.jpg`` -> ``a.jpg``); a symbolic link is
    relative to the link's folder, and one that is absolute or climbs out (``../x``) names no
    member."""
    if info.islnk():
        return member_name(info.linkname)
    if info.linkname.startswith("/"):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
    return None if target.startswith("../") or target == ".." else member_name(target)


def _resolve(target: str, symlinks: dict[str, str | None], regular: set[str]) -> str | None:
    """Follow symbolic links to a regular member's name (at most ``MAX_LINK_HOPS``); None when
    the chain ends outside the tar, at no member, or loops."""
    for _ in range(MAX_LINK_HOPS):
        if target in regular:
            return target
        next_target = symlinks.get(target)
        if next_target is None:  # not a symbolic link, or one pointing outside the tar
            return None
        target = next_target
    return None


def _read_targets(uri: str, storage_options: dict, wanted: set[str], max_member_bytes: int
                  ) -> dict[str, bytes | str]:
    """Second pass over a shard: the bytes of the members in ``wanted`` (or an error string for
    one too large). Only shards holding links pay it; the stream cannot seek back."""
    found: dict[str, bytes | str] = {}
    f, tar = _open_tar(uri, storage_options, _HeaderLog())
    with f, tar:
        for info in tar:
            name = member_name(info.name)
            if info.isfile() and name in wanted:
                found[name] = (_too_large(info.size, max_member_bytes) if info.size > max_member_bytes
                               else tar.extractfile(info).read())
    return found


def _too_large(size: int, limit: int) -> str:
    return error_string(TOO_MANY_PIXELS, f"tar member of {size:,} bytes, above the {limit:,}-byte limit "
                                         "for one encoded image; it was not read")


def read_tar(uri: str, file_index: int, storage_options: dict, counts: dict, *,
             max_member_bytes: int = MAX_MEMBER_BYTES) -> Generator[pa.Table, None, None]:
    """Stream one tar shard: batches of image rows (``_SCHEMA``); fills ``counts``
    (``common.new_counts``). Runs without Ray (tests call it directly).

    Every member ends as exactly one of: a row, a counted skip with a reason, or part of an
    image's row (a sidecar). Image members that are hard or symbolic links get their target's
    bytes (a second pass over the shard, only when there are links); a link to nothing in the
    tar is that row's ``read_error``. A member above ``max_member_bytes`` (default
    ``MAX_MEMBER_BYTES``, the largest Arrow binary value) is a ``too_many_pixels`` row and is
    never read into memory.

    Never raises for a bad shard or member: an unreadable shard ends with one ``read_error``
    row for the shard URI, after the rows read before the failure; damaged member headers
    in the middle (skipped, the members after them read) or a shard cut short also add one
    ``read_error`` row for the shard URI; an image member cut short is its own ``read_error``
    row first (listed, so it has a row).
    """
    rows = _Rows(uri, file_index)
    sample = _Sample()
    links: list[tuple[str, _Link]] = []   # image members that are links, waiting for bytes
    held: dict[str, _Sample] = {}         # samples of sidecars only, by key
    emitted: set[str] = set()             # keys that had image rows
    regular: set[str] = set()             # names of regular members, for link targets
    symlinks: dict[str, str | None] = {}  # symbolic link name -> target name (None: outside)
    log = _HeaderLog()
    members = 0

    def repeated(name: str) -> None:  # a second .json (say) of one sample: counted, not carried
        _skip(uri, name, counts, "sidecar_repeated")

    failure: str | None = None
    try:
        f, tar = _open_tar(uri, storage_options, log)
        with f, tar:
            for info in tar:
                members += 1
                name = member_name(info.name)
                key, ext = split_key(name)
                # By the last suffix, as images are: "22.05.json" is the sidecar of "22.05.png"
                # (dots in base names, webdataset#237), and "a.caption.txt" a txt sidecar.
                sidecar = ext in SIDECARS
                if info.isfile():
                    regular.add(name)
                elif info.issym():
                    symlinks[name] = _link_target(info, name)
                # Skips first: macOS "._x.jpg" members sit between a sample's members and
                # must not split the sample.
                if info.isdir():
                    _skip(uri, name, counts, "tar_directory")
                    continue
                if not (info.isfile() or info.islnk() or info.issym()):
                    _skip(uri, name, counts, "tar_special")
                    continue
                is_image = f".{ext}" in IMAGE_EXTENSIONS
                if is_hidden(name) or not (is_image or sidecar):
                    _skip(uri, name, counts, "hidden" if is_hidden(name) else "not_an_image")
                    continue
                if not info.isfile() and not is_image:
                    _skip(uri, name, counts, "tar_link_not_image")
                    continue
                if key != sample.key:
                    sample.flush(rows, links, held, repeated)
                    if sample.images:
                        assert sample.key is not None  # a sample with members has their key
                        emitted.add(sample.key)
                    sample = _Sample(key)
                    if key in held:
                        sample.adopt(held.pop(key))
                if sidecar and not is_image:
                    if info.size > MAX_SIDECAR_BYTES:
                        _skip(uri, name, counts, "sidecar_too_large")
                    else:
                        sample.add_sidecar(ext, name, sidecar_text(tar.extractfile(info).read()))
                    continue
                # Listed and given its entry (bytes, link or error) together: a member whose
                # bytes end early (a shard cut inside it) is this row's read_error, then the
                # shard's failure; counted before the read, it had no row (an accounting failure).
                cut: Exception | None = None
                entry: bytes | str | _Link
                if not info.isfile():
                    target = _link_target(info, name)
                    entry = _Link(target, info.issym()) if target is not None else error_string(
                        READ_ERROR, f"tar link {name} -> {info.linkname} points outside the tar")
                elif info.size > max_member_bytes:
                    entry = _too_large(info.size, max_member_bytes)
                else:
                    try:
                        entry = tar.extractfile(info).read()
                    except Exception as exc:  # noqa: BLE001 - re-raised below, after the row exists
                        cut = exc
                        entry = error_string(READ_ERROR, f"tar member cut short: {io_policy.describe_error(exc)}")
                counts["listed"] += 1
                sample.images.append((name, entry))
                if cut is not None:
                    raise cut
                if rows.full():
                    yield rows.take()
        failure = log.problem(members)
    except Exception as exc:  # noqa: BLE001 - a bad shard is one error row, not a failed job
        logger.warning("cannot read tar %s: %s", uri, io_policy.describe_error(exc))
        failure = f"tar {io_policy.describe_error(exc)}"
    sample.flush(rows, links, held, repeated)
    if sample.images:
        assert sample.key is not None  # a sample with members has their key
        emitted.add(sample.key)
    for key, orphan in held.items():
        for _, name, _ in orphan.sidecars:
            _skip(uri, name, counts, "sidecar_not_adjacent" if key in emitted else "sidecar_without_image")
    if links:
        yield from _link_rows(uri, storage_options, rows, links, symlinks, regular, max_member_bytes,
                              failure)
    if failure is not None:
        counts["listed"] += 1
        rows.add(uri, None, error_string(READ_ERROR, failure))
    if rows.pending:
        yield rows.take()


def _link_rows(uri: str, storage_options: dict, rows: _Rows, links: list[tuple[str, _Link]],
               symlinks: dict[str, str | None], regular: set[str], max_member_bytes: int,
               failure: str | None) -> Iterator[pa.Table]:
    """Rows of the link members, in their reserved places: the target's bytes, or an error."""
    targets = {path: _resolve(link.target, symlinks, regular) for path, link in links}
    found: dict[str, bytes | str] = {}
    wanted = {t for t in targets.values() if t is not None}
    second: str | None = None
    if wanted:
        try:
            found = _read_targets(uri, storage_options, wanted, max_member_bytes)
        except Exception as exc:  # noqa: BLE001 - costs the link rows, not the shard
            second = f"tar {io_policy.describe_error(exc)} (second pass for link targets)"
    for path, link in links:
        target = targets[path]
        data = found.get(target) if target is not None else None
        if isinstance(data, bytes):
            rows.add(path, data, None, link.key, link.sidecars, ordinal=link.ordinal)
            if rows.full():
                yield rows.take()
            continue
        if isinstance(data, str):
            error = data
        elif target is None:
            error = error_string(READ_ERROR, f"tar {'symbolic' if link.symbolic else 'hard'} link to "
                                             f"{link.target}: no such regular member in the tar")
        else:
            error = error_string(READ_ERROR, f"link target {target} not read: {second or failure or 'not found'}")
        rows.add(path, None, error, link.key, link.sidecars, ordinal=link.ordinal)


def plan_files(files: list[str], options: InputOptions) -> InputPlan:
    """Plan the given tar shard URIs (no listing)."""
    options.check_columns_used("webdataset", files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)")
    plan = streaming_plan("webdataset", files, read_tar, options.storage_options, CARRIED, use_ray=options.use_ray)
    plan.rows_at_most = _rows_at_most(files, options)
    return plan


# Up to this many shards, their sizes are asked for (one request each on object stores) to
# bound the rows of a small job; more shards make a job the live cluster's actor pool suits anyway.
SIZE_BOUND_SHARDS = 16


def _rows_at_most(files: list[str], options: InputOptions) -> int | None:
    """The most rows a few uncompressed tar shards can give: one member per 512 bytes at most
    (every member has a 512-byte header; POSIX.1-1988 ustar), and one error row per shard. None for more than
    ``SIZE_BOUND_SHARDS`` shards, HTTP(S) ones, a compressed one (told by its magic bytes, as
    the reader tells it, whatever its name: its size bounds nothing), one that is no regular
    file (a FIFO would block the planning) or cannot be read."""
    if len(files) > SIZE_BOUND_SHARDS:
        return None
    total = 0
    for uri in files:
        try:
            fs, path = storage.url_to_fs(uri, options.storage_options, io=options.io)
            if {"http", "https"} & set(storage.protocols(fs)):
                return None
            info = fs.info(path)
            if info.get("type") != "file":  # a FIFO or device named like a shard: never opened here
                return None
            with fs.open(path, "rb") as f:
                head = f.read(6)
            if head.startswith(_ZSTD_MAGIC) or any(head.startswith(m) for m in _DECOMPRESSORS):
                return None
            total += int(info["size"])
        except Exception:  # noqa: BLE001 - the read task reports an unreadable shard; this is a hint
            return None
    return total // 512 + len(files)  # + each shard's own read_error row (empty, cut short)


def plan_webdataset(uri: str, options: InputOptions) -> InputPlan:
    """Plan tar shards named by ``uri``; raises InputError when no shard matches. Other files
    in a folder of shards are counted as skipped."""
    shards, others = _shards(uri, options)
    plan = plan_files(shards, options)
    for other, reason in others:
        plan.add_planned_skip(reason, other)
    return plan


KIND = InputKind(
    name="webdataset",
    summary="tar shards (brace ranges shards-{000..099}.tar, globs, a folder of shards); "
            "one Ray task streams each shard; .json/.txt/.cls sidecars are carried",
    detect=lambda uri, pattern: uri.lower().endswith(SUFFIXES),
    plan=plan_webdataset, plan_files=plan_files, file_suffixes=SUFFIXES)
