"""Colour: EXIF orientation, any Pillow mode to RGB (alpha composited, deep greys keeping their
tonal range), and the reference-pixels conversion (steps 3 and 4 of ``zslabel.decode``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import UNIDENTIFIED_IMAGE
from .spec import PreprocessSpec, _DecodeFailure


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1..8) as ``ImageOps.exif_transpose`` reads it, which transformers'
    ``load_image`` applies: the tag's value looked up as a dict key, so a SHORT 6 or a RATIONAL
    12/2 (equal to 6) rotates, while an ASCII "6" or a RATIONAL 13/2 (other types than the
    standard's SHORT) leaves the image as stored (nomacs#1646, Pillow#6799)."""
    try:
        value = im.getexif().get(0x0112, 1)
        return _BY_VALUE.get(value, 1)
    except Exception:  # noqa: BLE001 - malformed (or unhashable) EXIF means upright
        return 1


# EXIF Orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_BY_VALUE = {k: k for k in _UPRIGHT}


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
    # getextrema: one (min, max) per band, so an RGBA image's last is the alpha band's.
    if mode == "RGBA" and fmt in _ALPHA_OFTEN_UNUSED and im.getextrema()[-1] == (0, 0):
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
    if mode == "P" and im.palette is None:
        # A palette image without its palette (a PNG without PLTE: libpng refuses it, "Missing
        # PLTE before IDAT"): its colours are unknown, and Pillow's transparency check asserts
        # (Pillow#7796); the reference mode's convert("RGB") makes it black.
        raise _DecodeFailure(UNIDENTIFIED_IMAGE, "a palette image without its palette (a PNG without a PLTE "
                                                 "chunk): its colours are unknown")
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
