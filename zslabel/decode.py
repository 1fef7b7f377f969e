"""Image bytes -> uint8 RGB pixels at model resolution, or a per-image error code.

Pure Pillow/numpy (no Ray, no torch, no transformers), so CPU decode tasks stay light and the
code is testable on its own. ``decode_image`` never raises: every failure becomes
``DecodedImage.error = "<code>: <detail>"`` (codes from ``zslabel.errors``):

- ``unidentified_image``: not an image Pillow can read (empty, text, bad header CRC, corrupt
  data; any exception Pillow raises while opening or loading).
- ``internal_error``: an exception past Pillow's opening and loading (a bug here); the
  traceback is logged at WARNING.
- ``truncated``: a recognised image whose data ends early (decoder ran out of data, or the
  container's end marker / declared size is missing: JPEG EOI, PNG IEND, GIF trailer, RIFF and
  ISO-BMFF box sizes).
- ``unsupported_format``: a container recognised from its magic bytes for which this process
  has no decoder: HEIF/HEIC (unless pillow-heif registered one), JPEG XL, JPEG XR, SVG; AVIF
  only when Pillow lacks libavif. Decided from the bytes, before Pillow tries its plugins.
- ``too_many_pixels``: header ``width * height`` above ``PreprocessSpec.max_pixels`` (default
  2 * 89,478,485 = Pillow's own error limit, so a 10000 x 10000 photo decodes), decided from
  the header before any pixel buffer exists. Pillow's DecompressionBombError is mapped, and
  bypassed when ``max_pixels`` is higher; its warning is kept out of the logs (main thread).
  ``Image.MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES`` are never changed.
  (The one change to Pillow's state: two TIFF layouts for 64-bit float greys,
  ``_register_float64_tiff``.)
- ``image_too_small``: shorter side (after EXIF orientation) below ``PreprocessSpec.min_side``
  (default 1, so 1x1 and 1000x1 images are labeled).
- ``decode_timeout``: with ``decode_image(..., timeout=S)``, decoding took longer than S seconds.

Formats. Pillow is asked only for ``DECODED_FORMATS`` (``Image.open(fp, formats=...)``): JPEG
(and MPO), PNG (and APNG), GIF, WebP, BMP/DIB, TIFF, ICO/CUR, TGA, PBM/PGM/PPM/PFM, JPEG 2000,
QOI, plus AVIF (Pillow's own libavif), HEIF and JPEG XL where a plugin registered them. Bytes
that another Pillow plugin would claim (EPS/PostScript, whose loading runs Ghostscript with no
time limit; PSD, FITS, DDS, PCX, ICNS, ...) are ``unsupported_format`` naming that format,
decided from the plugins' own magic-byte checks without running them. A JPEG whose frame header
declares a sample precision other than 8 bits (12-bit JPEG from medical and raw workflows) is
``unsupported_format`` too: Pillow's JPEG plugin refuses it in the header.

Time. ``decode_image(..., timeout=S)`` decodes in a daemon thread and waits at most S seconds;
past that the row is ``decode_timeout`` and the thread is abandoned (it ends when Pillow
returns; its CPU and memory stay in use until then). A thread, not ``signal.alarm``: a Ray task
body is not guaranteed to run in the main thread (threaded actors, ``max_concurrency``), SIGALRM
is one process-wide timer, a Python signal handler only runs between bytecodes of the main
thread (never inside a long C call), and an exception raised at an arbitrary point inside Pillow
can leave its state half-changed. A worker thread cannot be killed either, but the caller's wait
is bounded wherever the decoder releases the GIL, which Pillow's codecs and resampling do.

Reference pixels. ``PreprocessSpec.reference_pixels`` replaces step 4 by Pillow's plain
``convert("RGB")`` after the EXIF transpose: exactly ``transformers.image_utils.load_image``.
It differs from the default rules for images with transparency (``load_image`` drops alpha, so
what hides under alpha 0 shows) and for 16/32-bit samples (Pillow's conversion clips at 255
instead of keeping the tonal range, so a 16-bit photo is mostly white).

Steps for one image, one helper each:

1. ``_open``: format from the bytes (never the file name), header only, pixel limit.
2. ``_load``: first frame only (animated GIF/APNG/WebP, multi-page TIFF, MPO: frame 0). A PNG
   that fails either step is retried once without its metadata chunks
   (``_open_and_load``): metadata never costs the pixels; ICC profiles are never applied.
3. ``_orientation``: EXIF Orientation, all 8 values (applied by ``_orient`` after step 4, with
   ``ImageOps.exif_transpose``'s transposes); missing, invalid or unreadable EXIF means upright.
4. ``_to_rgb``: any Pillow mode -> RGB (or L, expanded to RGB after resizing: bit-identical and
   3x cheaper). Transparency (alpha band, ``transparency`` info, RGBA palette) is composited
   onto ``PreprocessSpec.background`` (white by default, as transformers' ``convert_to_rgb``),
   so colours under alpha 0 never change a result; an all-zero alpha in BMP/ICO/TGA is unused
   padding (opaque). Deep greys keep their tonal range: 16-bit by their declared range,
   32-bit integer and float by their values (unit, 8-bit or min-max; rules in ``_to_rgb``).
5. ``_resize_crop``: exactly the transformers PIL image processor (``CLIPImageProcessorPil``,
   ``SiglipImageProcessorPil``): shortest-edge resize with the long side ``int(S * long /
   short)`` or an exact (H, W) resize with the checkpoint's filter, then a centre crop that
   zero-pads when the image is smaller than the crop. For an opaque image the output is
   bit-identical to that processor's output before rescale/normalise, as fed by the
   zero-shot pipeline. Upscaled extreme aspect ratios (a 1000 x 1 banner would be a
   224000 x 224 intermediate) compute only the crop window, with Pillow's own coefficients
   and fixed-point arithmetic, still bit-identical (``_windowed_resize_crop``).

``PreprocessSpec.fast`` lets large JPEGs decode DCT-downscaled (``Image.draft``, to at least
2x the resize target) and Pillow box-reduce (``reducing_gap``) before the final filter: about
1.5-3x faster on 12-megapixel JPEGs (entropy decoding is not reduced) and a 4-16x smaller
decoded buffer; no longer bit-identical (measured mean abs diff ~0.2 grey levels, max 2-3).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from zslabel.errors import (DECODE_TIMEOUT, IMAGE_TOO_SMALL, INTERNAL_ERROR, TOO_MANY_PIXELS, TRUNCATED,
                            UNIDENTIFIED_IMAGE, UNSUPPORTED_FORMAT, error_string)

__all__ = ["DECODED_FORMATS", "PreprocessSpec", "DecodedImage", "decode_image", "sniff_format"]

logger = logging.getLogger(__name__)

# Bump when a change here can change pixels for the same bytes and spec (part of the fingerprint).
DECODE_VERSION = 2  # 2: deep-grey mapping, unused BMP/ICO/TGA alpha, PNG metadata retry

# The Pillow formats zslabel decodes (``Image.open(formats=...)``); README "Formats" lists them.
# MPO is opened through the JPEG plugin. AVIF needs Pillow's libavif; HEIF and JXL are opened
# only where a plugin (pillow-heif, a JPEG XL plugin) registered them.
DECODED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "CUR", "TGA", "PPM",
                   "JPEG2000", "QOI", "AVIF", "HEIF", "JXL")

# Default per-image decode time limit in seconds (``--decode-timeout``): a 178-megapixel PNG
# (the pixel limit) decodes in ~3 s on one core; 60 s leaves room for a loaded machine.
DEFAULT_DECODE_TIMEOUT = 60.0

# Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS; that is our default too,
# so a 10000 x 10000 photo decodes and a 30000 x 30000 header does not.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# An upscaling shortest-edge resize larger than this many crops is computed for the crop window
# only (exactly), so a 1000 x 1 banner never becomes a 224000 x 224 intermediate.
_WINDOWED_MIN_RATIO = 4

# JPEG fast path: DCT-scale only down to this multiple of the resize target, then let Pillow
# box-reduce to within this gap before the final filter.
_FAST_DRAFT_MARGIN = 2
_FAST_REDUCING_GAP = 3.0

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

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
                   "mks2013": 6, "mks2021": 7}


class _DecodeFailure(Exception):
    """Internal: carries an error code and detail out of the helpers to ``decode_image``."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


# --------------------------------------------------------------------------------------------
# Spec


def _field(obj, key):
    """``obj[key]`` for dicts, ``obj.key`` for transformers' SizeDict; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _resample_value(resample) -> int:
    """A PIL resampling filter as its int, from an int, a PIL enum, or a torchvision mode."""
    if resample is None:
        return int(Image.Resampling.BILINEAR)  # transformers' own default when unset
    if isinstance(resample, (int, np.integer)):
        return int(resample)
    value = getattr(resample, "value", None)
    if isinstance(value, (int, np.integer)):
        return int(value)
    name = str(getattr(resample, "name", value if value is not None else resample)).lower()
    for key, code in _RESAMPLE_NAMES.items():
        if key in name:
            return code
    raise ValueError(f"unsupported resample {resample!r}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded image is brought to model resolution; mirrors the checkpoint's image processor.

    Attributes:
        resize_mode: ``"shortest_edge"`` (CLIP: shorter side to ``shortest_edge``, aspect kept,
            long side ``int(shortest_edge * long / short)``) or ``"exact"`` (SigLIP: to
            ``size_hw``).
        shortest_edge: target of the shorter side in pixels, for ``"shortest_edge"``.
        size_hw: (height, width) in pixels, for ``"exact"``.
        crop_hw: centre crop (height, width) after the resize, zero-padded if larger than the
            resized image (as transformers), or None. Required for ``"shortest_edge"``, since
            every output must have the fixed size ``output_hw``.
        crop_offset: where the centre crop starts when the margin is odd: ``"floor"``
            (transformers' ``center_crop``: ``(size - crop) // 2``) or ``"round"`` (torchvision's
            ``CenterCrop``, used by open_clip: ``int(round((size - crop) / 2))``, Python's
            round-half-to-even; padding, where the crop is larger, ``(crop - size) // 2`` before).
            The two differ by one pixel row/column for margins of 3, 7, 11, ...
        resample: ``PIL.Image.Resampling`` value (NEAREST=0, LANCZOS=1, BILINEAR=2, BICUBIC=3,
            BOX=4, HAMMING=5; MKS2013/MKS2021 where Pillow has them).
        max_pixels: header ``width * height`` above this is ``too_many_pixels``.
        min_side: shorter side (pixels) below this is ``image_too_small``.
        background: RGB that transparent pixels are composited onto.
        fast: allow JPEG draft + box pre-reduction (not bit-identical; see module docstring).
        reference_pixels: colour conversion exactly as ``transformers.image_utils.load_image``
            (Pillow's ``convert("RGB")``: alpha dropped, deep samples clipped) instead of
            compositing alpha on ``background`` and keeping deep tonal ranges.
        convert_rgb: the processor's ``do_convert_rgb`` (CLIP and SigLIP: True). Only used with
            ``reference_pixels``: transformers' ``convert_to_rgb`` then composites, onto white,
            an image that still has a colour-key ``transparency`` after ``convert("RGB")``
            (a palette or grey PNG with a tRNS chunk), so the reference does too.

    Raises:
        ValueError: on construction, for an inconsistent or out-of-range field.
    """

    resize_mode: str
    shortest_edge: int | None = None
    size_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None
    crop_offset: str = "floor"
    resample: int = int(Image.Resampling.BICUBIC)
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1
    background: tuple[int, int, int] = (255, 255, 255)
    fast: bool = False
    reference_pixels: bool = False
    convert_rgb: bool = True

    def __post_init__(self):
        # Normalise sequences (e.g. lists from YAML/JSON) so the spec stays hashable.
        for name in ("size_hw", "crop_hw", "background"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        object.__setattr__(self, "resample", _resample_value(self.resample))
        if self.resize_mode == "shortest_edge":
            if not self.shortest_edge or self.shortest_edge < 1:
                raise ValueError("resize_mode 'shortest_edge' needs shortest_edge >= 1")
            if self.crop_hw is None:
                raise ValueError("resize_mode 'shortest_edge' needs crop_hw: outputs must have one fixed size")
        elif self.resize_mode == "exact":
            if self.size_hw is None or len(self.size_hw) != 2 or min(self.size_hw) < 1:
                raise ValueError("resize_mode 'exact' needs size_hw=(height, width) >= 1")
        else:
            raise ValueError(f"resize_mode must be 'shortest_edge' or 'exact', got {self.resize_mode!r}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {self.crop_offset!r}")
        if self.crop_hw is not None and (len(self.crop_hw) != 2 or min(self.crop_hw) < 1):
            raise ValueError(f"crop_hw must be (height, width) >= 1, got {self.crop_hw}")
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample must be a PIL.Image.Resampling value, got {self.resample}")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(f"background must be three ints 0..255, got {self.background}")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError("max_pixels and min_side must be >= 1")

    @property
    def output_hw(self) -> tuple[int, int]:
        """The fixed (height, width) of every decoded image's pixels."""
        if self.crop_hw is not None:
            return self.crop_hw
        return self.size_hw

    @classmethod
    def from_image_processor(cls, proc, **overrides) -> "PreprocessSpec":
        """Read a transformers image processor (PIL or torchvision backend) into a spec.

        Reads ``proc.size`` (``{"shortest_edge": S}`` or ``{"height": H, "width": W}``, dict or
        SizeDict), ``proc.do_resize``, ``proc.do_center_crop``, ``proc.crop_size`` and
        ``proc.resample``. ``overrides`` replace fields afterwards (e.g. ``max_pixels``, ``fast``).
        Decoded pixels are bit-identical to the PIL backend (``*ImageProcessorPil``); the
        torchvision backend resizes tensors with its own antialiasing, so it is close, not equal.

        Raises:
            ValueError: for processors whose output size is not fixed or not supported here
                (``do_resize`` false, ``longest_edge`` / ``max_height`` sizes, shortest-edge
                resize without centre crop).
        """
        if getattr(proc, "do_resize", True) is False:
            raise ValueError("image processors with do_resize=False are not supported: "
                             "outputs must have one fixed size")
        size = getattr(proc, "size", None)
        if isinstance(size, int):
            size = ({"height": size, "width": size} if getattr(proc, "default_to_square", True)
                    else {"shortest_edge": size})
        unsupported = [k for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
                       if _field(size, k)]
        if unsupported:
            raise ValueError(f"unsupported image-processor size {size!r} (keys {unsupported}); "
                             "only {'shortest_edge': S} or {'height': H, 'width': W} are supported")
        crop = None
        if getattr(proc, "do_center_crop", False):
            crop_size = getattr(proc, "crop_size", None)
            ch, cw = _field(crop_size, "height"), _field(crop_size, "width")
            if not ch or not cw:
                raise ValueError(f"unsupported crop_size {crop_size!r}: need height and width")
            crop = (int(ch), int(cw))
        resample = _resample_value(getattr(proc, "resample", None))
        if _field(size, "shortest_edge"):
            if crop is None:
                raise ValueError("a shortest_edge resize without centre crop has no fixed output size")
            spec = dict(resize_mode="shortest_edge", shortest_edge=int(_field(size, "shortest_edge")))
        elif _field(size, "height") and _field(size, "width"):
            spec = dict(resize_mode="exact", size_hw=(int(_field(size, "height")), int(_field(size, "width"))))
        else:
            raise ValueError(f"unsupported image-processor size {size!r}; "
                             "need {'shortest_edge': S} or {'height': H, 'width': W}")
        spec.update(crop_hw=crop, resample=resample, convert_rgb=bool(getattr(proc, "do_convert_rgb", True)))
        spec.update(overrides)
        return cls(**spec)

    def fingerprint_dict(self) -> dict:
        """JSON-able dict of everything that can change a decoded result (pixels or error)."""
        d = dataclasses.asdict(self)
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        if d["crop_offset"] == "floor":
            # Left out at its default, so runs recorded before the field existed keep their fingerprint.
            del d["crop_offset"]
        if not self.reference_pixels:
            # Only when set: fingerprints of runs made before the option existed stay valid.
            del d["reference_pixels"], d["convert_rgb"]
        d["decode_version"] = DECODE_VERSION
        d["pillow"] = Image.__version__
        return d


@dataclass
class DecodedImage:
    """One decode result.

    Attributes:
        pixels: (H, W, 3) uint8 RGB at ``spec.output_hw``, C-contiguous; None when ``error``.
        width, height: image size in pixels after EXIF orientation; None if never decoded.
        error: None, or ``"<code>: <detail>"`` (``zslabel.errors.error_string``).
    """

    pixels: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


# --------------------------------------------------------------------------------------------
# Open / sniff

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
    if fmt == "jpeg":
        return not tail.endswith(b"\xff\xd9")
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
    data = memoryview(data)
    pos, n = 2, len(data)
    while pos + 4 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            pos += 2
            continue
        if marker in _JPEG_SOF:
            return int(data[pos + 4])
        if marker in (0xD9, 0xDA):  # EOI, or start of scan before any frame header
            return None
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
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
        if _is_truncated(exc, data, fmt):
            raise _DecodeFailure(TRUNCATED, f"{fmt or 'image'}: {exc}") from exc
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, f"{type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w * h > spec.max_pixels:
        raise _DecodeFailure(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {spec.max_pixels}")
    return im


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
            im = factory(io.BytesIO(data), None)
        except (SyntaxError, IndexError, TypeError, struct.error, OSError):
            continue
        w, h = im.size
        if w * h > spec.max_pixels:
            raise _DecodeFailure(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {spec.max_pixels}")
        return im
    raise _DecodeFailure(TOO_MANY_PIXELS, f"{exc} (limit {spec.max_pixels})")


# --------------------------------------------------------------------------------------------
# Load, orientation, colour


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
        fmt = sniff_format(data)
        if _is_truncated(exc, data, fmt):
            raise _DecodeFailure(TRUNCATED, f"{im.format or fmt}: {exc}") from exc
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, f"{im.format} data is corrupt: {type(exc).__name__}: {exc}") from exc


def _draft_target(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int] | None:
    """Smallest (width, height) the JPEG may be DCT-scaled to; None when not worth it."""
    w, h = size
    if spec.resize_mode == "exact":
        side = max(spec.size_hw)  # orientation may swap the axes later
        tw = th = side
    else:
        tw, th = _resize_dims(w, h, spec)
    tw, th = tw * _FAST_DRAFT_MARGIN, th * _FAST_DRAFT_MARGIN
    if w < 2 * tw or h < 2 * th:
        return None
    return tw, th


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - malformed EXIF means upright
        return 1


# EXIF Orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orient(im: Image.Image, orientation: int) -> Image.Image:
    """The upright image for an EXIF Orientation (1..8) read from the source (``_orientation``).

    Applied after ``_to_rgb`` (colour conversion is per pixel, so the order does not change a
    pixel), which therefore still sees the source's container tags (TIFF no-data, sample format).
    """
    return im if orientation == 1 else im.transpose(_UPRIGHT[orientation])


def _composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite onto an opaque background, as transformers' ``convert_to_rgb`` does."""
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _gray_to_l(arr: np.ndarray, lo: float, hi: float) -> Image.Image:
    """Linear map of greys lo..hi to 0..255 (rounded, clipped; NaN and -inf -> 0, +inf -> 255)."""
    out = np.asarray(arr, dtype=np.float64)
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.rint((out - (lo if hi > lo else 0.0)) * scale)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


_DEEP_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_GDAL_NODATA_TAG = 42113  # TIFF tag GDAL writes for the "no data" sample value (ASCII)


def _nodata_value(im: Image.Image) -> float | None:
    """The GDAL_NODATA value of a TIFF (elevation/scientific exports), or None."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        value = tags.get(_GDAL_NODATA_TAG)
        return None if value is None else float(str(value).strip("\x00 "))
    except (ValueError, TypeError):
        return None


def _is_uint32_tiff(im: Image.Image) -> bool:
    """Whether a TIFF declares unsigned 32-bit samples (BitsPerSample 32, SampleFormat 1/absent)."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return False

    def first(tag, default):
        value = tags.get(tag, default)
        return value[0] if isinstance(value, tuple) and value else value

    return first(258, None) == 32 and first(339, 1) == 1


def _deep_gray_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L, keeping the tonal range (rules in ``_to_rgb``)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PPM"):
        return _gray_to_l(arr, 0.0, 65535.0)  # the file declares 16 bits (PPM: scaled to 16 bits)
    if im.mode == "I" and _is_uint32_tiff(im):
        arr = arr.view(np.uint32)  # Pillow reads unsigned 32-bit samples into signed int32
    valid = np.isfinite(arr) if im.mode == "F" else np.ones(arr.shape, bool)
    nodata = _nodata_value(im)
    if nodata is not None:
        valid &= arr != nodata
    values = arr[valid]
    if values.size == 0:
        return Image.new("L", im.size, 0)
    lo, hi = float(values.min()), float(values.max())
    if im.mode == "F" and 0.0 <= lo and hi <= 1.0:
        out = _gray_to_l(arr, 0.0, 1.0)  # normalised float
    elif 0.0 <= lo and hi <= 255.0 and (im.mode != "F" or np.array_equal(values, np.rint(values))):
        out = _gray_to_l(arr, 0.0, 255.0)  # 8-bit data in a deep container: as Pillow converts it
    else:
        out = _gray_to_l(arr, lo, hi)  # measurements (elevation, counts): min-max over valid values
    if nodata is not None and not valid.all():
        held = np.asarray(out).copy()
        held[arr == nodata] = 0  # NaN/inf were mapped by _gray_to_l
        out = Image.fromarray(held, "L")
    return out


_ALPHA_OFTEN_UNUSED = ("BMP", "DIB", "ICO", "CUR", "TGA")


def _to_rgb(im: Image.Image, background: tuple[int, int, int], fmt: str | None = None) -> Image.Image:
    """Any Pillow mode -> an "RGB" or "L" image (L is expanded to RGB after resizing).

    Transparency (alpha band, ``transparency`` info, RGBA palette) is composited onto
    ``background``. Deep greys keep their tonal range:

    - "I;16*" (16-bit PNG/TIFF/PGM): the declared range, 0..65535 -> 0..255 (x / 257).
    - "I" (32-bit integer) and "F" (float), over the valid samples (finite, and not the TIFF's
      GDAL_NODATA value): "F" within [0, 1] is x * 255; whole numbers within [0, 255] are kept
      (8-bit data in a deep container, as Pillow converts it); anything else (elevation in
      metres, counts, negatives) is min-max scaled, min -> 0 and max -> 255 (a constant image
      keeps its value, clipped). NaN, -inf and no-data samples -> 0, +inf -> 255.

    An RGBA image from a container whose alpha is often unused padding (BMP/DIB, ICO/CUR,
    TGA) and whose alpha bytes are all 0 is opaque, as Windows viewers and
    ``transformers.image_utils.load_image`` (plain ``convert("RGB")``) show it; ``fmt`` is the
    container (``Image.format`` before orientation). Everything else uses Pillow's conversion
    (P, CMYK incl. Adobe JPEGs, YCbCr, ...), which is also what
    ``transformers.image_utils.load_image`` does.
    """
    mode = im.mode
    if mode == "RGBA" and fmt in _ALPHA_OFTEN_UNUSED and im.getextrema()[3] == (0, 0):
        return im.convert("RGB")
    if mode in _DEEP_GRAY_MODES:
        gray = _deep_gray_to_l(im)
        key = im.info.get("transparency")
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            alpha = Image.fromarray(np.where(np.asarray(im) == key, 0, 255).astype(np.uint8), "L")
            return _composite(Image.merge("LA", (gray, alpha)), background)
        return gray
    if mode == "La":
        im = im.convert("LA")  # Pillow converts premultiplied La only to LA
    if im.has_transparency_data:
        return _composite(im, background)
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")


def _reference_rgb(im: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """What the zero-shot pipeline makes of ``im`` before resizing: ``load_image``'s
    ``convert("RGB")`` (alpha dropped, deep samples clipped by Pillow), then, for processors
    with ``do_convert_rgb``, transformers' ``convert_to_rgb``, which composites onto white an
    RGB image still carrying a colour key (``info["transparency"]``, which Pillow's conversion
    keeps for palette and grey images with a tRNS chunk)."""
    rgb = im.convert("RGB")
    if spec.convert_rgb and rgb.info.get("transparency") is not None:
        return _composite(rgb, (255, 255, 255))
    return rgb


# --------------------------------------------------------------------------------------------
# Resize / crop


def _resize_dims(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after the processor's resize of a w x h image.

    Formula from transformers ``image_transforms.get_resize_output_image_size`` with
    ``default_to_square=False``: short side -> S, long side -> ``int(S * long / short)``.
    """
    if spec.resize_mode == "exact":
        return spec.size_hw[1], spec.size_hw[0]
    s = spec.shortest_edge
    if w <= h:
        return s, int(s * h / w)
    return int(s * w / h), s


def _crop_start(size: int, crop: int, offset: str) -> int:
    """First index of a centre crop of ``crop`` out of ``size`` (``PreprocessSpec.crop_offset``)."""
    return (size - crop) // 2 if offset == "floor" else int(round((size - crop) / 2.0))


def _center_crop(arr: np.ndarray, crop_hw: tuple[int, int], offset: str = "floor") -> np.ndarray:
    """transformers ``image_transforms.center_crop`` (``offset="floor"``) or torchvision's
    ``CenterCrop`` (``"round"``) on an (H, W, C) array, zero padding included."""
    h, w = arr.shape[:2]
    ch, cw = crop_hw
    if offset == "round":
        if ch > h or cw > w:
            # torchvision pads (crop - size) // 2 before, the rest after, then crops at round().
            pt, pl = max(ch - h, 0) // 2, max(cw - w, 0) // 2
            padded = np.zeros((max(ch, h), max(cw, w)) + arr.shape[2:], dtype=arr.dtype)
            padded[pt:pt + h, pl:pl + w] = arr
            arr, (h, w) = padded, padded.shape[:2]
        top, left = _crop_start(h, ch, offset), _crop_start(w, cw, offset)
        return arr[top:top + ch, left:left + cw]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


# Pillow's separable filters (src/libImaging/Resample.c): (function, support). Written with the
# same double-precision operations in the same order, so the coefficients are bit-identical.
_F054, _F046 = float(np.float32(0.54)), float(np.float32(0.46))  # C float literals 0.54f, 0.46f


def _f_box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _f_bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _f_hamming(x: float) -> float:
    x = -x if x < 0.0 else x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F054 + _F046 * math.cos(x))


def _f_bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _f_lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


_FILTERS = {4: (_f_box, 0.5), 2: (_f_bilinear, 1.0), 5: (_f_hamming, 1.0),
            3: (_f_bicubic, 2.0), 1: (_f_lanczos, 3.0)}
_PRECISION_BITS = 32 - 8 - 2


def _window_coeffs(in_size: int, out_size: int, start: int, count: int, resample: int):
    """Pillow's 8-bit resampling coefficients for output pixels [start, start + count).

    Mirrors ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c for the
    full-image box (in0 = 0, in1 = in_size as a C float). Returns ``(xmin, k)``: (count,) int64
    first source index and (count, ksize) int64 fixed-point weights (zero past each window).
    """
    func, support = _FILTERS[resample]
    scale = filterscale = float(np.float32(in_size)) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    xmins = np.zeros(count, dtype=np.int64)
    kk = np.zeros((count, ksize), dtype=np.int64)
    one = 1 << _PRECISION_BITS
    for i in range(count):
        center = 0.0 + (start + i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [func((x + xmin - center + 0.5) * inv) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        if ww != 0.0:
            ws = [w / ww for w in ws]
        xmins[i] = xmin
        kk[i, :xmax] = [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in ws]
    return xmins, kk


def _window_pass(arr: np.ndarray, axis: int, in_size: int, out_size: int, start: int,
                 count: int, resample: int, offset: int = 0) -> np.ndarray:
    """One Pillow 8-bit resampling pass along ``axis``, computing only outputs [start, start+count).

    ``arr``: (H, W) or (H, W, C) uint8 holding source indices [offset, offset + arr.shape[axis])
    of a source axis of length ``in_size`` being resized to ``out_size``. Returns the same
    layout with ``count`` along ``axis``; bit-identical to that slice of Pillow's full pass
    (same coefficients, int32 accumulation from 1 << 21, ``clip8``).
    """
    xmins, kk = _window_coeffs(in_size, out_size, start, count, resample)
    ksize = kk.shape[1]
    idx = xmins[:, None] - offset + np.arange(ksize)[None, :]
    used = kk != 0
    if np.any(used & ((idx < 0) | (idx >= arr.shape[axis]))):
        raise ValueError("source window does not cover the filter support")
    idx = np.where(used, idx, 0).clip(0, arr.shape[axis] - 1)
    taken = np.take(arr, idx, axis=axis).astype(np.int64)  # axis -> (count, ksize)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = count, ksize
    acc = (taken * kk.reshape(shape)).sum(axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _source_span(in_size: int, out_size: int, start: int, count: int, resample: int) -> tuple[int, int]:
    """Source index range [first, last) that outputs [start, start + count) read."""
    xmins, kk = _window_coeffs(in_size, out_size, start, count, resample)
    lens = kk.shape[1] - np.argmax(kk[:, ::-1] != 0, axis=1)
    return int(xmins.min()), int((xmins + lens).max())


def _windowed_resize_crop(im: Image.Image, spec: PreprocessSpec, rw: int, rh: int) -> np.ndarray:
    """Centre crop of the shortest-edge resize to (rw, rh), without the full-size intermediate.

    Only for upscaling (shorter side < ``shortest_edge``), where every Pillow version runs the
    horizontal pass first and then the vertical one. The long-axis pass is computed for the
    crop window only (``_window_pass``), the other pass by Pillow itself on a slice whose
    rows/columns it treats independently. Bit-identical to ``im.resize((rw, rh))`` followed by
    ``_center_crop`` (including its zero padding where the crop exceeds the resized image).
    """
    ch, cw = min(spec.crop_hw[0], rh), min(spec.crop_hw[1], rw)
    top, left = _crop_start(rh, ch, spec.crop_offset), _crop_start(rw, cw, spec.crop_offset)
    w, h = im.size
    r = spec.resample
    if rw > rh:
        # Wide: horizontal pass (long axis) on the crop's columns only, then Pillow's vertical
        # pass, which treats every column independently.
        cols = _window_pass(np.asarray(im), 1, w, rw, left, cw, r)
        narrow = Image.fromarray(cols, im.mode)
        arr = np.asarray(narrow.resize((cw, rh), r) if rh != h else narrow)[top:top + ch]
    else:
        # Tall: Pillow's horizontal pass on the source rows the crop needs (rows are
        # independent), then the vertical pass (long axis) for the crop's rows only.
        first, last = _source_span(h, rh, top, ch, r)
        band = im.crop((0, first, w, last))
        band = band.resize((rw, last - first), r) if rw != w else band
        arr = _window_pass(np.asarray(band), 0, h, rh, top, ch, r, offset=first)[:, left:left + cw]
    if (ch, cw) != spec.crop_hw:
        arr = _center_crop(arr, spec.crop_hw, spec.crop_offset)
    return arr


def _resize_crop(im: Image.Image, spec: PreprocessSpec, orig_size: tuple[int, int]) -> np.ndarray:
    """Resize + centre crop an "RGB"/"L" image to (H, W, 3) uint8 at ``spec.output_hw``.

    ``orig_size`` is the upright (width, height) before any fast-path draft, so the geometry
    is always that of the full image.
    """
    rw, rh = _resize_dims(*orig_size, spec)
    crop = spec.crop_hw
    if (not spec.fast and crop is not None and spec.resize_mode == "shortest_edge"
            and min(orig_size) < spec.shortest_edge and im.size == orig_size
            and rw * rh > _WINDOWED_MIN_RATIO * crop[0] * crop[1] and spec.resample in _FILTERS):
        arr = _windowed_resize_crop(im, spec, rw, rh)
    else:
        if (rw, rh) != im.size:
            im = im.resize((rw, rh), spec.resample,
                           reducing_gap=_FAST_REDUCING_GAP if spec.fast else None)
        arr = np.asarray(im)
        if crop is not None:
            arr = _center_crop(arr, crop, spec.crop_offset)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Entry point


# Decodes abandoned after their time limit whose threads are still running, in this process.
_abandoned: list[threading.Thread] = []


def decode_image(data: bytes, spec: PreprocessSpec, timeout: float | None = None) -> DecodedImage:
    """Decode image bytes into model-resolution RGB pixels; never raises.

    Args:
        data: the file's bytes (a format of ``DECODED_FORMATS``; sniffed from content).
        spec: target geometry, filter, limits and background.
        timeout: seconds the caller waits at most (None: no limit, decoded in this thread).
            With a limit, decoding runs in a daemon thread that is abandoned when late
            (module docstring, "Time").

    Returns:
        ``DecodedImage`` with ``pixels`` (H, W, 3) uint8 at ``spec.output_hw`` and the upright
        ``width``/``height``; or ``pixels=None`` and ``error="<code>: <detail>"`` with code in
        unidentified_image, truncated, unsupported_format, too_many_pixels, image_too_small,
        decode_timeout, internal_error (an exception outside Pillow's open/load: a bug,
        traceback logged).
    """
    if threading.current_thread() is not threading.main_thread():
        # warnings.catch_warnings swaps process-wide state (not thread-safe before Python
        # 3.14), so decoder threads leave Pillow's warnings to the default filters.
        return _decode(data, spec) if timeout is None else _decode_within(data, spec, timeout)
    with warnings.catch_warnings(record=True) as caught:
        # Pillow warns per image (corrupt EXIF, bomb size, palette transparency); in a batch
        # job those belong in debug logs, not on every worker's stderr. The filters are
        # process-wide, so they also catch the warnings of a decode thread we wait for.
        warnings.simplefilter("always")
        result = _decode(data, spec) if timeout is None else _decode_within(data, spec, timeout)
    for w in caught:
        logger.debug("Pillow warning while decoding: %s", w.message)
    return result


def _decode_within(data: bytes, spec: PreprocessSpec, timeout: float) -> DecodedImage:
    """``_decode`` in a daemon thread, waited for at most ``timeout`` seconds."""
    box: list[DecodedImage] = []
    thread = threading.Thread(target=lambda: box.append(_decode(data, spec)), name="zslabel-decode", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        _abandoned[:] = [t for t in _abandoned if t.is_alive()] + [thread]
        logger.warning("abandoned decoding an image (%d bytes) after %g s; %d abandoned decode(s) still "
                       "running in this process", len(data), timeout, len(_abandoned))
        return DecodedImage(None, None, None, error_string(
            DECODE_TIMEOUT, f"decoding took longer than {timeout:g} s (--decode-timeout)"))
    if not box:  # _decode never raises an Exception; a BaseException (SystemExit, ...) ended the thread
        return DecodedImage(None, None, None, error_string(INTERNAL_ERROR, "decode thread ended without a result"))
    return box[0]


def _decode(data: bytes, spec: PreprocessSpec) -> DecodedImage:
    """``decode_image`` without the warnings handling."""
    width = height = None
    try:
        im, header_size = _open_and_load(data, spec)
        fmt = im.format
        # A fast-path JPEG draft shrinks im.size; geometry always follows the full image.
        full_w, full_h = header_size if im.size != header_size and im.format == "JPEG" else im.size
        orientation = _orientation(im)
        width, height = (full_h, full_w) if orientation >= 5 else (full_w, full_h)
        if min(width, height) < spec.min_side:
            raise _DecodeFailure(IMAGE_TOO_SMALL, f"{width}x{height}, shorter side below {spec.min_side}")
        rgb = _reference_rgb(im, spec) if spec.reference_pixels else _to_rgb(im, spec.background, fmt)
        rgb = _orient(rgb, orientation)
        pixels = _resize_crop(rgb, spec, (width, height))
        return DecodedImage(pixels, width, height, None)
    except _DecodeFailure as f:
        return DecodedImage(None, width, height, error_string(f.code, f.detail))
    except MemoryError as exc:
        return DecodedImage(None, width, height, error_string(UNIDENTIFIED_IMAGE, f"out of memory: {exc}"))
    except Exception as exc:  # noqa: BLE001 - per-image errors never escape
        # Pillow's own failures on bad bytes were classified in _open/_load; what arrives here
        # is a bug in this module (or an unforeseen Pillow path): the row says so, the log
        # keeps the traceback.
        logger.warning("internal error while decoding an image (%d bytes)", len(data), exc_info=True)
        return DecodedImage(None, width, height, error_string(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))


def _open_and_load(data: bytes, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    """``_open`` + ``_load`` -> (loaded image, header size); a PNG that fails is retried once without its droppable chunks.

    Metadata must not cost the pixels: a PNG whose text or ICC chunks exceed Pillow's
    ``MAX_TEXT_CHUNK`` / ``MAX_TEXT_MEMORY`` (a 1.2 MB print ICC profile), whose metadata
    chunks are malformed (unknown compression method, an empty sRGB chunk), or whose
    ancillary chunks have a bad CRC (libpng and browsers drop those with a warning) is
    decoded from a copy without them (``_png_without_droppable_chunks``). Pillow's limits are never changed; the dropped
    chunks are never inflated. When the copy fails too, the first failure is reported
    (or the copy's ``too_many_pixels``: pixel limits stay).
    """
    try:
        return _open_load_once(data, spec)
    except _DecodeFailure as first:
        if first.code not in (UNIDENTIFIED_IMAGE, TRUNCATED) or sniff_format(data) != "png":
            raise
        stripped = _png_without_droppable_chunks(data)
        if stripped is None:
            raise
        try:
            result = _open_load_once(stripped, spec)
        except _DecodeFailure as second:
            # A pixel limit found once the metadata is out of the way is the real answer.
            raise (second if second.code == TOO_MANY_PIXELS else first) from None
        logger.debug("PNG decoded without its metadata chunks after: %s", first)
        return result


def _open_load_once(data: bytes, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    im = _open(data, spec)
    header_size = im.size  # before a fast-path JPEG draft shrinks im.size
    _load(im, data, spec)
    return im, header_size


# The ancillary PNG chunks that change what is labeled (transparency, EXIF orientation, APNG
# frames): kept on retry when their CRC is good. Every other ancillary chunk (text, iCCP, sRGB,
# gAMA, cHRM, pHYs, sBIT, bKGD, tIME, private ones) is metadata Pillow does not apply to the
# pixels, and is dropped on retry.
_PNG_PIXEL_CHUNKS = (b"tRNS", b"eXIf", b"acTL", b"fcTL", b"fdAT")


def _png_without_droppable_chunks(data: bytes) -> bytes | None:
    """A copy of a PNG with only its critical chunks and the good ``_PNG_PIXEL_CHUNKS``.

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
        if (ancillary and (kind not in _PNG_PIXEL_CHUNKS or not crc_ok)) or (kind == b"IHDR" and pos != 8):
            dropped = True
        else:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    out.append(data[pos:])
    return b"".join(out) if dropped else None
