"""What goes into and comes out of a decode: ``PreprocessSpec`` (the checkpoint's image
processor as geometry, filter, limits and background; its fingerprint dict), ``DecodedImage``,
and the internal failure that carries an error code out of the steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Bump when a change in zslabel.decode can change pixels for the same bytes and spec (part of the fingerprint).
DECODE_VERSION = 2  # 2: deep-grey mapping, unused BMP/ICO/TGA alpha, PNG metadata retry

# Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS; that is our default too,
# so a 10000 x 10000 photo decodes and a 30000 x 30000 header does not.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
                   "mks2013": 6, "mks2021": 7}


class _DecodeFailure(Exception):
    """Internal: carries an error code and detail out of the helpers to ``decode_image``."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


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
        assert self.size_hw is not None  # __post_init__: without a crop the mode is "exact", which has size_hw
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
        spec: dict[str, Any]  # the constructor's keyword arguments, checked by __post_init__
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
