"""Geometry: resize sizes, the JPEG draft target, centre crop, and the windowed resize that is
bit-identical to Pillow's for extreme upscaled aspect ratios (step 5 of ``zslabel.decode``)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .spec import PreprocessSpec

# An upscaling shortest-edge resize larger than this many crops is computed for the crop window
# only (exactly), so a 1000 x 1 banner never becomes a 224000 x 224 intermediate.
_WINDOWED_MIN_RATIO = 4

# JPEG fast path: DCT-scale only down to this multiple of the resize target, then let Pillow
# box-reduce to within this gap before the final filter.
_FAST_DRAFT_MARGIN = 2
_FAST_REDUCING_GAP = 3.0


def _draft_target(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int] | None:
    """Smallest (width, height) the JPEG may be DCT-scaled to; None when not worth it."""
    w, h = size
    if spec.resize_mode == "exact":
        assert spec.size_hw is not None  # PreprocessSpec: "exact" has size_hw
        side = max(spec.size_hw)  # orientation may swap the axes later
        tw = th = side
    else:
        tw, th = _resize_dims(w, h, spec)
    tw, th = tw * _FAST_DRAFT_MARGIN, th * _FAST_DRAFT_MARGIN
    if w < 2 * tw or h < 2 * th:
        return None
    return tw, th


def _resize_dims(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after the processor's resize of a w x h image.

    Formula from transformers ``image_transforms.get_resize_output_image_size`` with
    ``default_to_square=False``: short side -> S, long side -> ``int(S * long / short)``.
    """
    if spec.resize_mode == "exact":
        assert spec.size_hw is not None  # PreprocessSpec: "exact" has size_hw
        return spec.size_hw[1], spec.size_hw[0]
    s = spec.shortest_edge
    assert s is not None  # PreprocessSpec: "shortest_edge" has shortest_edge
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
    assert spec.crop_hw is not None  # only called for a spec with a crop (_resize_crop)
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
    # (shortest_edge is never None in mode "shortest_edge"; the test is for the type checker.)
    if (not spec.fast and crop is not None and spec.resize_mode == "shortest_edge" and spec.shortest_edge is not None
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
