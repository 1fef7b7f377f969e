"""Decoding within bounds (issue 23): only the listed formats reach Pillow's decoders, 12-bit
JPEG is ``unsupported_format``, a per-image time limit, and ``reference_pixels`` reproducing
``transformers.image_utils.load_image`` exactly (alpha, palette transparency, deep samples)."""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from zslabel.decode import DECODED_FORMATS, PreprocessSpec, decode_image
from zslabel.errors import error_code

CLIP32 = PreprocessSpec("shortest_edge", shortest_edge=32, crop_hw=(32, 32), resample=3)
REF32 = dataclasses.replace(CLIP32, reference_pixels=True)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# An EPS whose PostScript never ends (a loop): with Ghostscript installed, Pillow's EPS plugin
# would render it with no time limit when loading. It must never get that far.
HOSTILE_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\n"
               b"{ 1 pop } loop\nshowpage\n%%EOF\n")


def test_formats_outside_the_list_are_unsupported_without_running_their_plugin():
    t0 = time.perf_counter()
    res = decode_image(HOSTILE_EPS, CLIP32, timeout=30)
    assert time.perf_counter() - t0 < 2
    assert res.error.startswith("unsupported_format: EPS is not among the formats zslabel decodes"), res.error
    # binary EPS (DOS EPS header) too, and other Pillow formats zslabel does not list
    dos_eps = b"\xc5\xd0\xd3\xc6" + b"\x1e\x00\x00\x00" + b"\x00" * 22 + HOSTILE_EPS
    assert error_code(decode_image(dos_eps, CLIP32).error) == "unsupported_format"
    for fmt, img in [("PCX", photo(16, 16)), ("SGI", photo(16, 16)), ("DDS", photo(16, 16).convert("RGBA")),
                     ("ICNS", photo(16, 16)), ("PSD", None)]:
        if img is None:
            continue
        res = decode_image(encode(img, fmt), CLIP32)
        assert res.error.startswith(f"unsupported_format: {fmt}"), (fmt, res.error)
    # listed formats decode
    for fmt, kw in [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}),
                    ("ICO", {}), ("TGA", {}), ("PPM", {}), ("QOI", {}), ("JPEG2000", {})]:
        assert fmt in DECODED_FORMATS
        res = decode_image(encode(photo(40, 30), fmt, **kw), CLIP32)
        assert res.error is None, (fmt, res.error)


def fits_image() -> bytes:
    """A real 4 x 4 8-bit FITS image (astronomy): header cards, then data, 2880-byte blocks."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    4", "NAXIS2  =                    4", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(range(16)).ljust(2880, b"\0")


def test_parser_loops_and_bombs_of_unlisted_plugins_are_never_reached():
    # CVE-2026-59203 (Pillow 12.0-12.2): a negative %%BeginBinary byte count made the EPS parser
    # seek back to the same line forever, inside Image.open, without Ghostscript.
    looping_eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%BeginBinary: -36\n"
                   + b"\0" * 64 + b"\n%%EndBinary\n")
    t0 = time.perf_counter()
    res = decode_image(looping_eps, CLIP32, timeout=30)
    assert time.perf_counter() - t0 < 2 and res.error.startswith("unsupported_format: EPS"), res.error
    # CVE-2026-40192 (Pillow 10.3-12.1): FITS read GZIP-compressed data without a limit. A plain
    # FITS image opens in Pillow, but not in zslabel.
    data = fits_image()
    assert Image.open(io.BytesIO(data)).format == "FITS"
    assert decode_image(data, CLIP32).error.startswith("unsupported_format: FITS is not among the formats")


def _with_precision(data: bytes, bits: int) -> bytes:
    """A JPEG whose frame header declares ``bits`` of sample precision (SOF1, extended)."""
    i = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[i + 1], out[i + 4] = 0xC1, bits
    return bytes(out)


def test_12_bit_jpeg_is_unsupported_format_not_unidentified():
    data = encode(photo(40, 30), "JPEG", quality=90)
    assert decode_image(data, CLIP32).error is None
    res = decode_image(_with_precision(data, 12), CLIP32)
    assert res.error == "unsupported_format: 12-bit JPEG (Pillow decodes 8-bit JPEG only)"
    assert error_code(decode_image(_with_precision(data, 16), CLIP32).error) == "unsupported_format"
    # a JPEG that is merely corrupt stays what it was
    assert error_code(decode_image(data[:2] + b"\x00" * 40, CLIP32).error) in ("unidentified_image", "truncated")


def test_decode_time_limit_abandons_a_slow_image():
    rng = np.random.default_rng(0)
    big = encode(Image.fromarray(rng.integers(0, 256, (3000, 3000, 3), dtype=np.uint8)), "PNG", compress_level=1)
    t0 = time.perf_counter()
    full = decode_image(big, CLIP32)
    full_s = time.perf_counter() - t0
    assert full.error is None
    t0 = time.perf_counter()
    late = decode_image(big, CLIP32, timeout=0.02)
    late_s = time.perf_counter() - t0
    assert late.error == "decode_timeout: decoding took longer than 0.02 s (--decode-timeout)"
    assert late.pixels is None and late_s < max(0.5, full_s / 2), (late_s, full_s)
    # a generous limit changes nothing
    ok = decode_image(big, CLIP32, timeout=120)
    assert ok.error is None and np.array_equal(ok.pixels, full.pixels)


def _alpha_images():
    rng = np.random.default_rng(3)
    rgb = np.asarray(photo(48, 40, 5))
    alpha = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    alpha[:, :10] = 0  # fully transparent band: its colours show in load_image
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = Image.merge("LA", (rgba.convert("L"), Image.fromarray(alpha)))
    pal = photo(48, 40, 6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    return {"rgba.png": encode(rgba), "la.png": encode(la), "palette_trns.png": encode(pal, transparency=3),
            "rgba.webp": encode(rgba, "WEBP", lossless=True), "rgba.tif": encode(rgba, "TIFF")}


def _deep_images():
    y, x = np.mgrid[0:40, 0:48]
    i16 = (x * 1300 + y * 40).astype(np.uint16)
    i32 = (x * 90000 - 1000).astype(np.int32)
    f32 = (x / 47.0 * 3.0 - 1.0).astype(np.float32)
    return {"gray16.png": encode(Image.fromarray(i16)), "gray16.tif": encode(Image.fromarray(i16), "TIFF"),
            "int32.tif": encode(Image.fromarray(i32), "TIFF"), "float32.tif": encode(Image.fromarray(f32), "TIFF")}


def _exif_rotated():
    img = photo(48, 40, 7).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((48, 40)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"rotated_rgba.png": encode(img, exif=exif)}


@pytest.mark.parametrize("name,data", list({**_alpha_images(), **_deep_images(), **_exif_rotated()}.items()))
def test_reference_pixels_are_load_image_through_the_processor(name, data, tiny_clip, tmp_path):
    """The pixels the zero-shot pipeline feeds the model for a file, before rescale/normalise."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    path = tmp_path / name
    path.write_bytes(data)
    proc = AutoImageProcessor.from_pretrained(tiny_clip)
    spec = PreprocessSpec.from_image_processor(proc, reference_pixels=True)
    expected = proc(images=[load_image(str(path))], do_rescale=False, do_normalize=False,
                    return_tensors="np")["pixel_values"][0]
    expected = np.moveaxis(np.asarray(expected), 0, -1).astype(np.uint8)
    got = decode_image(data, spec)
    assert got.error is None, got.error
    assert np.array_equal(got.pixels, expected), name
    # ... and the default rules differ for these images (that is what the flag is for), except a
    # colour key (palette tRNS): the processor's convert_to_rgb composites it onto white too.
    default = decode_image(data, dataclasses.replace(spec, reference_pixels=False))
    assert np.array_equal(default.pixels, expected) == (name == "palette_trns.png"), name


def test_reference_pixels_enter_the_fingerprint_only_when_set():
    assert "reference_pixels" not in CLIP32.fingerprint_dict()  # earlier runs' fingerprints unchanged
    assert REF32.fingerprint_dict()["reference_pixels"] is True
