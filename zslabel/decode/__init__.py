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

Modules: ``spec`` (``PreprocessSpec``, ``DecodedImage``), ``opening`` (steps 1-2: formats, Pillow's
open and load, limits), ``pixels`` (steps 3-4: orientation, colour), ``resize`` (step 5:
geometry), and this one (the entry point, the time limit, the PNG metadata retry).

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

import logging
import threading
import warnings

from PIL import Image

from zslabel.errors import (
    DECODE_TIMEOUT,
    IMAGE_TOO_SMALL,
    INTERNAL_ERROR,
    TOO_MANY_PIXELS,
    TRUNCATED,
    UNIDENTIFIED_IMAGE,
    error_string,
)

from .opening import DECODED_FORMATS, _load, _open, _png_without_droppable_chunks, sniff_format
from .opening import _has_decoder as _has_decoder
from .pixels import _nodata_value as _nodata_value
from .pixels import _orient, _orientation, _reference_rgb, _to_rgb
from .resize import _center_crop as _center_crop
from .resize import _draft_target as _draft_target
from .resize import _resize_crop
from .resize import _resize_dims as _resize_dims
from .resize import _windowed_resize_crop as _windowed_resize_crop
from .spec import DECODE_VERSION as DECODE_VERSION
from .spec import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS
from .spec import DecodedImage, PreprocessSpec, _DecodeFailure

# The ``import X as X`` above are explicit re-exports: names that callers and tests import from
# ``zslabel.decode`` (the module this package was), the constants and the steps tests call directly.
__all__ = ["DECODED_FORMATS", "PreprocessSpec", "DecodedImage", "decode_image", "sniff_format"]

logger = logging.getLogger(__name__)

# Default per-image decode time limit in seconds (``--decode-timeout``): a 178-megapixel PNG
# (the pixel limit) decodes in ~3 s on one core; 60 s leaves room for a loaded machine.
DEFAULT_DECODE_TIMEOUT = 60.0

# The entry point lives here, not in a submodule, and finds its steps (``_open``, ``_to_rgb``,
# ...) through this module's namespace: patching ``zslabel.decode._to_rgb`` (the tests' fault
# injection) reaches it.

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
    """``_open`` + ``_load`` -> (loaded image, header size); a PNG that fails is retried
    without its droppable chunks.

    Metadata must not cost the pixels: a PNG whose text or ICC chunks exceed Pillow's
    ``MAX_TEXT_CHUNK`` / ``MAX_TEXT_MEMORY`` (a 1.2 MB print ICC profile), whose metadata
    chunks are malformed (unknown compression method, an empty sRGB chunk), or whose
    ancillary chunks have a bad CRC (libpng and browsers drop those with a warning) is
    decoded from a copy without them (``_png_without_droppable_chunks``), keeping at first the
    text chunks an EXIF orientation is read from. Pillow's limits are never changed; the
    dropped chunks are never inflated. When the copies fail too, the first failure is reported
    (or a copy's ``too_many_pixels``: pixel limits stay).
    """
    try:
        return _open_load_once(data, spec)
    except _DecodeFailure as first:
        if first.code not in (UNIDENTIFIED_IMAGE, TRUNCATED) or sniff_format(data) != "png":
            raise
        # First a copy that keeps the text chunks an orientation is read from (XMP, an EXIF
        # profile), then, when one of those is what fails, a copy without any.
        copies: list[bytes] = []
        for copy in (_png_without_droppable_chunks(data, keep_orientation_text=True),
                     _png_without_droppable_chunks(data)):
            if copy is not None and copy not in copies:
                copies.append(copy)
        for stripped in copies:
            try:
                result = _open_load_once(stripped, spec)
            except _DecodeFailure as second:
                if second.code == TOO_MANY_PIXELS:  # found once the metadata is out of the way: the real answer
                    raise second from None
                continue
            logger.debug("PNG decoded without (some of) its metadata chunks after: %s", first)
            return result
        raise first from None


def _open_load_once(data: bytes, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    im = _open(data, spec)
    header_size = im.size  # before a fast-path JPEG draft shrinks im.size
    _load(im, data, spec)
    return im, header_size
