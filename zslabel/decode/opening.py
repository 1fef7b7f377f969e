"""Opening image bytes: the format allow-list, sniffing, Pillow's open and load with the pixel
limit, 12-bit JPEG and other unsupported containers, truncation, and the PNG metadata retry's
chunk stripping (steps 1 and 2 of ``zslabel.decode``)."""

from __future__ import annotations

import io
import re
import struct
import zlib

from PIL import Image, UnidentifiedImageError, features

from zslabel.errors import TOO_MANY_PIXELS, TRUNCATED, UNIDENTIFIED_IMAGE, UNSUPPORTED_FORMAT

from .resize import _draft_target
from .spec import PreprocessSpec, _DecodeFailure

# The Pillow formats zslabel decodes (``Image.open(formats=...)``); README "Formats" lists them.
# MPO is opened through the JPEG plugin. AVIF needs Pillow's libavif; HEIF and JXL are opened
# only where a plugin (pillow-heif, a JPEG XL plugin) registered them.
DECODED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "CUR", "TGA", "PPM",
                   "JPEG2000", "QOI", "AVIF", "HEIF", "JXL")


def _register_float64_tiff() -> None:
    """Let Pillow open 64-bit float greyscale TIFFs (GDAL/numpy exports of elevation, science).

    Pillow has the unpackers (``F;64F``, ``F;64BF``: float64 -> its 32-bit "F" mode) but no
    TIFF layout entry for them, so such files were ``cannot identify``. Adds the two layouts
    (MinIsBlack, little and big endian) only where Pillow has none; changes nothing else.
    """
    from PIL import TiffImagePlugin

    for prefix, rawmode in ((TiffImagePlugin.II, "F;64F"), (TiffImagePlugin.MM, "F;64BF")):
        TiffImagePlugin.OPEN_INFO.setdefault((prefix, 1, (3,), 1, (64,), ()), ("F", rawmode))


_register_float64_tiff()

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                b"mif1", b"msf1", b"mif2", b"miaf"}
_AVIF_BRANDS = {b"avif", b"avis"}


def _ftyp_brands(data: bytes) -> list[bytes] | None:
    """Major + compatible brands of an ISO-BMFF ``ftyp`` box at the start, or None."""
    if len(data) < 12 or data[4:8] != b"ftyp":
        return None
    size = struct.unpack(">I", data[:4])[0]
    end = min(len(data), size if size >= 16 else 16)
    brands = [data[8:12]] + [data[i:i + 4] for i in range(16, end - 3, 4)]
    return brands


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None if not recognised.

    Returns one of ``"jpeg", "png", "gif", "webp", "bmp", "tiff", "heif", "avif", "jxl",
    "jxr", "jp2", "psd", "qoi", "ico", "pnm", "dds", "svg"``. Only the bytes count, never a
    file name. ISO-BMFF files are ``"avif"`` when an ``avif``/``avis`` brand is present,
    else ``"heif"`` for any HEIF brand (``heic``, ``heix``, ``mif1``, ...).
    """
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    brands = _ftyp_brands(bytes(data[:256]))
    if brands is not None:
        if _AVIF_BRANDS.intersection(brands):
            return "avif"
        if _HEIF_BRANDS.intersection(brands):
            return "heif"
        return None
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "jxl"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if head[:3] == b"II\xbc":
        return "jxr"
    if head[:4] == b"8BPS":
        return "psd"
    if head[:4] == b"qoif":
        return "qoi"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ico"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head[:4] == b"DDS ":
        return "dds"
    text = bytes(data[:1024]).lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in text:
        return "svg"
    return None


def _has_decoder(fmt: str | None) -> bool:
    """Whether this process can decode ``fmt`` (only asked for formats Pillow may lack)."""
    Image.init()
    if fmt == "avif":
        return "AVIF" in Image.OPEN and bool(features.check("avif"))
    if fmt == "heif":
        return "HEIF" in Image.OPEN  # registered by pillow-heif when installed
    if fmt == "jxl":
        return "JXL" in Image.OPEN  # registered by a JPEG XL plugin when installed
    if fmt in ("jxr", "svg"):
        return False
    return True


def _looks_truncated(data: bytes, fmt: str | None) -> bool:
    """Whether a recognised container visibly ends early (missing end marker or short box)."""
    tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
    if fmt in ("jpeg", "jp2"):  # JPEG's EOI; a JPEG 2000 codestream's EOC (also inside a .jp2's jp2c box)
        return not tail.endswith(b"\xff\xd9")
    if fmt == "qoi":  # the QOI end marker, seven zero bytes and 0x01
        return not bytes(data[-8:]) == b"\x00" * 7 + b"\x01"
    if fmt == "png":
        return b"IEND" not in tail
    if fmt == "gif":
        return not tail.endswith(b";")
    if fmt == "webp":
        return len(data) < 12 or len(data) < 8 + struct.unpack("<I", bytes(data[4:8]))[0]
    if fmt in ("heif", "avif"):
        pos = 0
        while pos + 8 <= len(data):
            size = struct.unpack(">I", bytes(data[pos:pos + 4]))[0]
            if size == 1:
                if pos + 16 > len(data):
                    return True
                size = struct.unpack(">Q", bytes(data[pos + 8:pos + 16]))[0]
            elif size == 0:
                return False  # box runs to the end of the file
            if size < 8:
                return False
            pos += size
        return pos != len(data)
    return False


def _is_truncated(exc: BaseException, data: bytes, fmt: str | None) -> bool:
    """Whether a failure means the data ends early: a visibly cut container, or a decoder
    that ran out of data. Pillow's "Truncated <X> chunk" (a malformed PNG chunk) in a
    container that ends properly is a broken chunk, not a cut file."""
    if fmt is not None and _looks_truncated(data, fmt):
        return True
    text = str(exc).lower()
    if re.search(r"truncated \w+ chunk", text):
        return False
    return isinstance(exc, EOFError) or "truncat" in text or "premature end" in text


def _allowed_formats() -> list[str]:
    """``DECODED_FORMATS`` that this process's Pillow can open (MPO comes with JPEG)."""
    Image.init()
    return [f for f in DECODED_FORMATS if f in Image.OPEN]


def _other_pillow_format(data: bytes) -> str | None:
    """The Pillow format outside ``DECODED_FORMATS`` whose magic-byte check claims ``data``
    (e.g. ``"EPS"``), or None. Only the plugins' ``accept`` functions run (prefix tests), never
    their openers, so nothing of the file is parsed, let alone rendered."""
    Image.init()
    prefix = bytes(data[:16])
    for fmt in Image.ID:
        if fmt in DECODED_FORMATS:
            continue
        _, accept = Image.OPEN.get(fmt, (None, None))
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's check failing on odd bytes claims nothing
            continue
    return None


# JPEG start-of-frame markers (SOF0-SOF15 except DHT C4, JPG C8, DAC CC): they carry the precision.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_precision(data: bytes) -> int | None:
    """Sample precision in bits from a JPEG's frame header (8 for ordinary JPEGs, 12 or 16 for
    extended/lossless ones), or None when no frame header is found. Walks the marker segments
    by their lengths: cost independent of the image size."""
    view = memoryview(data)
    pos, n = 2, len(view)
    while pos + 4 < n:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            pos += 2
            continue
        if marker in _JPEG_SOF:
            return int(view[pos + 4])
        if marker in (0xD9, 0xDA):  # EOI, or start of scan before any frame header
            return None
        pos += 2 + (view[pos + 2] << 8 | view[pos + 3])
    return None


def _open(data: bytes, spec: PreprocessSpec) -> Image.Image:
    """Open ``data`` lazily (header only) with the ``DECODED_FORMATS`` plugins only, and
    enforce the pixel limit.

    Raises:
        _DecodeFailure: unidentified_image, truncated, unsupported_format or too_many_pixels.
    """
    fmt = sniff_format(data)
    if fmt is not None and not _has_decoder(fmt):
        raise _DecodeFailure(UNSUPPORTED_FORMAT, f"{fmt} (no decoder installed)")
    im: Image.Image
    try:
        try:
            im = Image.open(io.BytesIO(data), formats=_allowed_formats())
        except Image.DecompressionBombError as exc:
            # Our own limit (below) replaces Pillow's module-wide one.
            im = _open_without_bomb_check(data, spec, exc)
    except _DecodeFailure:
        raise
    except UnidentifiedImageError as exc:
        if fmt == "jpeg":
            bits = _jpeg_precision(data)
            if bits is not None and bits != 8:
                raise _DecodeFailure(UNSUPPORTED_FORMAT, f"{bits}-bit JPEG (Pillow decodes 8-bit JPEG only)") from exc
        other = _other_pillow_format(data)
        if other is not None:
            raise _DecodeFailure(UNSUPPORTED_FORMAT, f"{other} is not among the formats zslabel decodes "
                                 f"({len(data)} bytes)") from exc
        if fmt is not None and _looks_truncated(data, fmt):
            raise _DecodeFailure(TRUNCATED, f"{fmt} data ends early ({len(data)} bytes)") from exc
        what = f"{fmt} data Pillow cannot read" if fmt else "not a recognised image"
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, f"{what} ({len(data)} bytes)") from exc
    except Exception as exc:  # noqa: BLE001 - plugins raise OSError/SyntaxError/ValueError/struct.error
        _raise_if_bomb(exc)
        if _is_truncated(exc, data, fmt):
            raise _DecodeFailure(TRUNCATED, f"{fmt or 'image'}: {exc}") from exc
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, f"{type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w * h > spec.max_pixels:
        raise _DecodeFailure(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {spec.max_pixels}")
    return im


def _raise_if_bomb(exc: BaseException) -> None:
    """Pillow's ``DecompressionBombError`` met anywhere but ``Image.open``'s own header check (an
    ICO or ICNS frame that is an embedded PNG of 100000 x 100000 declared pixels, checked when the
    frame is opened at load) is ``too_many_pixels``, like every other pixel-limit refusal."""
    if isinstance(exc, Image.DecompressionBombError):
        raise _DecodeFailure(TOO_MANY_PIXELS, f"an embedded frame: {exc}") from exc


def _open_without_bomb_check(data: bytes, spec: PreprocessSpec, exc: Exception) -> Image.Image:
    """Open an image Pillow refused as a decompression bomb, when our own limit allows it.

    ``Image.open`` checks the module-wide ``MAX_IMAGE_PIXELS`` after the plugin parsed the
    header; calling the plugins the same way ``Image.open`` does skips only that check.
    """
    prefix = bytes(data[:16])
    for fmt in _allowed_formats():
        factory, accept = Image.OPEN[fmt]
        if accept and not accept(prefix):
            continue
        try:
            im = factory(io.BytesIO(data), "")  # the file name Image.open passes for a file object
        except (SyntaxError, IndexError, TypeError, struct.error, OSError):
            continue
        w, h = im.size
        if w * h > spec.max_pixels:
            raise _DecodeFailure(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {spec.max_pixels}")
        return im
    raise _DecodeFailure(TOO_MANY_PIXELS, f"{exc} (limit {spec.max_pixels})")


def _load(im: Image.Image, data: bytes, spec: PreprocessSpec) -> None:
    """Decode the current (first) frame's pixels, with the JPEG draft in fast mode.

    Raises:
        _DecodeFailure: truncated or unidentified_image.
    """
    if spec.fast and im.format == "JPEG":
        target = _draft_target(im.size, spec)
        if target is not None:
            im.draft("RGB", target)
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError/ValueError/SyntaxError/...
        _raise_if_bomb(exc)
        fmt = sniff_format(data)
        if _is_truncated(exc, data, fmt):
            raise _DecodeFailure(TRUNCATED, f"{im.format or fmt}: {exc}") from exc
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, f"{im.format} data is corrupt: {type(exc).__name__}: {exc}") from exc


# The ancillary PNG chunks that change what is labeled (transparency, EXIF orientation, APNG
# frames): kept on retry when their CRC is good. Every other ancillary chunk (text, iCCP, sRGB,
# gAMA, cHRM, pHYs, sBIT, bKGD, tIME, private ones) is metadata Pillow does not apply to the
# pixels, and is dropped on retry.
_PNG_PIXEL_CHUNKS = (b"tRNS", b"eXIf", b"acTL", b"fcTL", b"fdAT")
# Text chunks whose keyword Pillow's ``getexif`` reads an orientation from (XMP's
# tiff:Orientation; ImageMagick's EXIF profile): a first retry keeps them, so that dropping an
# oversized comment or ICC profile does not also drop the image's rotation.
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_ORIENTATION_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type exif", b"Raw profile type APP1")


def _png_without_droppable_chunks(data: bytes, keep_orientation_text: bool = False) -> bytes | None:
    """A copy of a PNG with only its critical chunks and the good ``_PNG_PIXEL_CHUNKS`` (and,
    with ``keep_orientation_text``, the good text chunks named in ``_PNG_ORIENTATION_KEYWORDS``).

    Critical chunks (upper-case first letter: IHDR, PLTE, IDAT, IEND) are kept, bad CRC or
    not, so a damaged critical chunk still fails; only an IHDR that is not the first chunk
    (the spec allows exactly one, first) is dropped. Bytes after the last whole chunk (a
    truncated file) are kept as they are. Returns None when nothing would be dropped.
    """
    data = bytes(data)
    out, pos, dropped = [data[:8]], 8, False
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        ancillary = bool(kind[0] & 0x20)
        crc_ok = zlib.crc32(data[pos + 4:end - 4]) & 0xFFFFFFFF == struct.unpack(">I", data[end - 4:end])[0]
        kept = kind in _PNG_PIXEL_CHUNKS or (
            keep_orientation_text and kind in _PNG_TEXT_CHUNKS
            and data[pos + 8:end - 4].split(b"\0", 1)[0] in _PNG_ORIENTATION_KEYWORDS)
        if (ancillary and (not kept or not crc_ok)) or (kind == b"IHDR" and pos != 8):
            dropped = True
        else:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    out.append(data[pos:])
    return b"".join(out) if dropped else None
