"""decode_image over the shared awkward-input cases (/work/shared/cases/make_cases.py) and over
extra cases of each kind written here, with a CLIP-like spec (shortest edge 224, crop 224x224,
bicubic).

Each case is judged as the labeling run would be: "ok" labeled, "<code>" that error code,
"ok|<code>" either, "same_as" pairs decode to identical pixels (max abs diff <= 1), "skipped"
is a listing concern and not decoded here.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zslabel.decode import PreprocessSpec, _has_decoder, decode_image
from zslabel.errors import error_code

MAKE_CASES = Path("/work/shared/cases/make_cases.py")
SPEC = PreprocessSpec("shortest_edge", shortest_edge=224, crop_hw=(224, 224), resample=3)


def judge(root: Path) -> tuple[int, list[str]]:
    """Decode every case under root/images per root/expected.json; return (checked, failures)."""
    expected = json.loads((root / "expected.json").read_text())
    results, failures = {}, []
    for name, exp in sorted(expected.items()):
        if exp["expect"] == "skipped":
            continue
        res = decode_image((root / "images" / name).read_bytes(), SPEC)
        results[name] = res
        got = error_code(res.error) or "ok"
        allowed = set(exp["expect"].split("|"))
        if got not in allowed:
            failures.append(f"{name}: expected {exp['expect']}, got {res.error or 'ok'}")
        elif got == "ok" and res.pixels.shape != (224, 224, 3):
            failures.append(f"{name}: pixels {res.pixels.shape}")
    for name, exp in expected.items():
        other = exp.get("same_as")
        if not other or name not in results:
            continue
        a, b = results[name].pixels, results[other].pixels
        if a is None or b is None:
            failures.append(f"{name} same_as {other}: one of them failed")
            continue
        diff = int(np.abs(a.astype(int) - b.astype(int)).max())
        if diff > 1:
            failures.append(f"{name} same_as {other}: max abs diff {diff}")
    return len(results), failures


@pytest.fixture(scope="module")
def shared_cases(tmp_path_factory) -> Path:
    if not MAKE_CASES.exists():
        pytest.skip(f"{MAKE_CASES} not present")
    out = tmp_path_factory.mktemp("shared_cases")
    subprocess.run([sys.executable, str(MAKE_CASES), str(out)], check=True, capture_output=True)
    return out


def test_shared_cases(shared_cases):
    checked, failures = judge(shared_cases)
    assert checked >= 35
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------
# Extra cases, one group per kind


def _enc(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / max(w - 1, 1) * 255, y / max(h - 1, 1) * 255,
                    128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _jpeg_with_size(data: bytes, w: int, h: int) -> bytes:
    """Patch a baseline JPEG's SOF0 to claim w x h (the data stays that of the small image)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]


def _composite_white(rgba: np.ndarray) -> Image.Image:
    """RGBA -> RGB over white, rounding as Pillow's alpha_composite does for opaque backgrounds."""
    img = Image.fromarray(rgba, "RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, img).convert("RGB")


def _png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk (length, type, data, CRC); ``crc`` overrides the correct one."""
    c = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", c)


def _png_insert(png: bytes, chunk: bytes, after: bytes = b"IHDR") -> bytes:
    """Insert a chunk after the first chunk of type `after` (IHDR: before any IDAT)."""
    i = png.index(after) - 4
    n = struct.unpack(">I", png[i:i + 4])[0]
    j = i + 12 + n
    return png[:j] + chunk + png[j:]


def _tiff_ifd_le(entries) -> bytes:
    """Little-endian TIFF/EXIF block: 'II*\\0', one IFD of (tag, type, count, value bytes)."""
    n = len(entries)
    data_off = 8 + 2 + 12 * n + 4
    ifd, extra = struct.pack("<H", n), b""
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, data_off + len(extra))
            extra += value
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra


def _jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP1 segment (EXIF) holding ``payload`` right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _bmp_v5(rgba: np.ndarray) -> bytes:
    """A 32-bit BI_BITFIELDS BMP with a BITMAPV5HEADER and an alpha mask (GIMP/Windows layout)."""
    h, w = rgba.shape[:2]
    pixels = rgba[::-1][..., [2, 1, 0, 3]].tobytes()
    header = struct.pack("<IiiHHIIiiII", 124, w, h, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    header += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header += b"BGRs" + b"\0" * 48 + struct.pack("<IIII", 4, 0, 0, 0)
    off = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + header + pixels


def _tiff_gray(arr: np.ndarray, sample_format: int, nodata: str | None = None) -> bytes:
    """A one-strip little-endian greyscale TIFF of ``arr`` (SampleFormat 1 uint, 2 int, 3 float),
    with a GDAL_NODATA tag when given: what GDAL writes for elevation models."""
    h, w = arr.shape
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    text = None if nodata is None else nodata.encode() + b"\0"
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, arr.dtype.itemsize * 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, None), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, len(data)),
               (339, 3, 1, sample_format)] + ([(42113, 2, len(text), None)] if text else [])
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = data_at
        if tag == 42113:
            ifd += struct.pack("<HHII", tag, typ, count, data_at + len(data))
        elif typ == 3:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data + (text or b"")


def _report_cases(put) -> None:
    """Cases from public bug reports (Pillow, torchvision, libgd issues; zslabel issue 11), one
    per kind: metadata that must not cost the pixels, deep greys, unused alpha, broken EXIF,
    odd containers. The comment above each names its report."""
    photo = _photo
    base = photo(96, 72, 11)
    png = _enc(base)
    put("reports/base.png", png, "ok")
    # Pillow #8363, #2445; KatherLab/STAMP#76: an iCCP chunk inflating past MAX_TEXT_CHUNK (1 MB)
    icc = b"\0" * 1_200_000
    put("reports/iccp_1200k.png", _png_insert(png, _png_chunk(b"iCCP", b"print\0\0" + zlib.compress(icc, 9))),
        "ok", same_as="reports/base.png")
    # zTXt inflating to 2 MB (XMP/ComfyUI-style metadata)
    put("reports/ztxt_2m.png", _png_insert(png, _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"x" * 2_000_000, 9))),
        "ok", same_as="reports/base.png")
    # 70 zTXt chunks of 1 MB each: Pillow's MAX_TEXT_MEMORY (64 MB) over the whole file
    many = b"".join(_png_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"y" * 1_000_000, 9)) for i in range(70))
    put("reports/ztxt_70x1m.png", _png_insert(png, many), "ok", same_as="reports/base.png")
    # iCCP with an unknown compression method (broken profile must not fail the image)
    put("reports/iccp_bad_method.png", _png_insert(png, _png_chunk(b"iCCP", b"p\0\x07garbage")), "ok",
        same_as="reports/base.png")
    # Pillow #6430: an empty sRGB chunk after IDAT -> IndexError
    put("reports/srgb_empty_after_idat.png", _png_insert(png, _png_chunk(b"sRGB", b""), after=b"IDAT"), "ok",
        same_as="reports/base.png")
    # libpng drops an ancillary chunk with a bad CRC with a warning; Pillow refuses the file
    put("reports/text_bad_crc.png", _png_insert(png, _png_chunk(b"tEXt", b"Title\0hello", crc=1)), "ok",
        same_as="reports/base.png")
    # Pillow #7796, #8877: a palette PNG without its PLTE chunk (bare, and as an ICO's image) opens
    # as mode P with no palette; its transparency check asserted (an internal_error row)
    pal = _enc(base.convert("P"))
    at = pal.find(b"PLTE")
    no_plte = pal[:at - 4] + pal[at + 8 + struct.unpack(">I", pal[at - 4:at])[0]:]
    put("reports/palette_without_plte.png", no_plte, "unidentified_image")
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 96 % 256, 72, 0, 0, 1, 32, len(no_plte), 22) + no_plte
    put("reports/palette_without_plte.ico", ico, "unidentified_image")
    # damaged critical chunks stay errors after the retry: IHDR CRC, corrupt IDAT stream
    bad = bytearray(png)
    bad[29] ^= 0xFF
    put("reports/ihdr_bad_crc_with_text.png", _png_insert(bytes(bad), _png_chunk(b"tEXt", b"a\0b", crc=1)),
        "unidentified_image")
    bad = bytearray(png)
    k = bad.index(b"IDAT")
    bad[k + 6:k + 14] = b"\xff" * 8
    put("reports/idat_corrupt.png", bytes(bad), "unidentified_image")
    # Pillow #6252: a second (empty) IHDR after IDAT -> struct.error
    put("reports/ihdr_after_idat.png", _png_insert(png, _png_chunk(b"IHDR", b""), after=b"IDAT"),
        "ok|unidentified_image")
    # torchvision #2218: 16-bit grey PNG loads all white through convert("RGB")
    ramp = np.linspace(0, 65535, 72 * 96).reshape(72, 96).astype(np.uint16)
    put("reports/gray16.png", _enc(Image.fromarray(ramp)), "ok", same_as="reports/gray16_as_8bit.png")
    put("reports/gray16_as_8bit.png", _enc(Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8), "L")), "ok")
    # issue 11: float32 elevation 0..4000 (min-max)
    elev = (np.linspace(0, 1, 72 * 96).reshape(72, 96) ** 2 * 4000).astype(np.float32)
    put("reports/float_elevation.tif", _enc(Image.fromarray(elev, "F"), "TIFF"), "ok",
        same_as="reports/float_elevation_as_l.png")
    put("reports/float_elevation_as_l.png",
        _enc(Image.fromarray(np.rint(elev.astype(np.float64) * 255 / float(elev.max())).astype(np.uint8), "L")), "ok")
    # 32-bit integer TIFF holding counts 0..100000 (min-max)
    counts = np.linspace(0, 100000, 72 * 96).reshape(72, 96).astype(np.int32)
    put("reports/int32_counts.tif", _enc(Image.fromarray(counts, "I"), "TIFF"), "ok",
        same_as="reports/int32_counts_as_l.png")
    put("reports/int32_counts_as_l.png",
        _enc(Image.fromarray(np.rint(counts * 255 / 100000.0).astype(np.uint8), "L")), "ok")
    # SRTM-style signed 16-bit elevation with GDAL_NODATA -32768 (voids): min-max over the rest,
    # voids black
    dem = np.linspace(-100, 3000, 72 * 96).reshape(72, 96).astype(np.int16)
    dem[:6] = -32768
    put("reports/dem_int16_nodata.tif", _tiff_gray(dem, 2, "-32768"), "ok", same_as="reports/dem_as_l.png")
    lo, hi = float(dem[6:].min()), float(dem.max())
    dem_l = np.where(dem == -32768, 0, np.rint((dem.astype(np.float64) - lo) * 255 / (hi - lo))).astype(np.uint8)
    put("reports/dem_as_l.png", _enc(Image.fromarray(dem_l, "L")), "ok")
    # 64-bit float elevation (GDAL/numpy exports): Pillow lacks the TIFF layout, zslabel adds it
    elev64 = np.linspace(0, 1, 72 * 96).reshape(72, 96) ** 2 * 4000
    put("reports/float64_elevation.tif", _tiff_gray(elev64, 3), "ok", same_as="reports/float64_as_l.png")
    put("reports/float64_as_l.png", _enc(Image.fromarray(np.rint(elev64 * 255 / elev64.max()).astype(np.uint8), "L")),
        "ok")
    # unsigned 32-bit counts (photon counts, 0..4e9)
    u32 = np.linspace(0, 4e9, 72 * 96).reshape(72, 96).astype(np.uint32)
    put("reports/uint32_counts.tif", _tiff_gray(u32, 1), "ok", same_as="reports/uint32_as_l.png")
    put("reports/uint32_as_l.png", _enc(Image.fromarray(np.rint(u32 * 255.0 / float(u32.max())).astype(np.uint8), "L")),
        "ok")
    # 16-bit grey + alpha PNG (Pillow keeps the high byte)
    la16 = np.dstack([np.asarray(base.convert("L")).astype(np.uint16) * 257, np.full((72, 96), 65535, np.uint16)])
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in la16)
    put("reports/la16.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 96, 72, 16, 4, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""), "ok", same_as="reports/base_l.png")
    put("reports/base_l.png", _enc(base.convert("L")), "ok")
    # issue 11: 32-bit BMP (BITMAPV5, alpha mask) whose alpha bytes are all 0 -> opaque
    rgba0 = np.dstack([np.asarray(base), np.zeros((72, 96), np.uint8)])
    put("reports/bmp32_alpha0.bmp", _bmp_v5(rgba0), "ok", same_as="reports/base.png")
    put("reports/tga32_alpha0.tga", _enc(Image.fromarray(rgba0, "RGBA"), "TGA"), "ok", same_as="reports/base.png")
    # ... while a BMP with real alpha is still composited
    rgba_half = rgba0.copy(); rgba_half[:, 48:, 3] = 255
    put("reports/bmp32_alpha_half.bmp", _bmp_v5(rgba_half), "ok", same_as="reports/alpha_half_on_white.png")
    half = np.asarray(base).copy(); half[:, :48] = 255
    put("reports/alpha_half_on_white.png", _enc(Image.fromarray(half)), "ok")
    # Pillow PR #2667: EXIF XResolution 0/0 -> ZeroDivisionError while opening
    jpeg = _enc(base, "JPEG", quality=95)
    put("reports/base.jpg", jpeg, "ok")
    exif = _tiff_ifd_le([(0x011A, 5, 1, struct.pack("<II", 0, 0)), (0x011B, 5, 1, struct.pack("<II", 0, 0)),
                        (0x0128, 3, 1, struct.pack("<H", 2))])
    put("reports/exif_dpi_zero.jpg", _jpeg_with_app1(jpeg, b"Exif\0\0" + exif), "ok", same_as="reports/base.jpg")
    # Pillow #8348: EXIF with a doubled 'Exif\0\0' header: Pillow reads it; orientation 6 applies
    exif6 = _tiff_ifd_le([(0x0112, 3, 1, struct.pack("<H", 6))])
    doubled = _jpeg_with_app1(jpeg, b"Exif\0\0Exif\0\0" + exif6)
    put("reports/exif_double_header.jpg", doubled, "ok", same_as="reports/exif_double_header_upright.png")
    put("reports/exif_double_header_upright.png",
        Image.open(io.BytesIO(doubled)).transpose(Image.Transpose.ROTATE_270), "ok")
    # EXIF whose IFD claims more entries than the segment holds; and an empty EXIF segment
    put("reports/exif_short_ifd.jpg", _jpeg_with_app1(jpeg, b"Exif\0\0" + exif6[:14]), "ok", same_as="reports/base.jpg")
    put("reports/exif_empty.jpg", _jpeg_with_app1(jpeg, b"Exif\0\0"), "ok", same_as="reports/base.jpg")
    # Pillow #6240: PGM with maxval 0 -> ZeroDivisionError in older Pillow
    put("reports/pgm_maxval0.pgm", b"P5\n4 4\n0\n" + b"\0" * 16, "unidentified_image")
    # 16-bit PGM (maxval 65535) -> declared range
    put("reports/gray16.pgm", b"P5\n96 72\n65535\n" + ramp.astype(">u2").tobytes(), "ok",
        same_as="reports/gray16_as_8bit.png")
    # Pillow #8921, libgd #494: a GIF with neither a global nor a local colour table
    put("reports/gif_no_palette.gif",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;", "ok")
    # MPO (stereo cameras): the first image
    put("reports/two_images.mpo", _enc(base, "MPO", save_all=True, append_images=[photo(96, 72, 12)], quality=95),
        "ok", same_as="reports/base_q95.jpg")
    put("reports/base_q95.jpg", jpeg, "ok")
    # multi-page TIFF: page 0
    put("reports/multipage.tif", _enc(base, "TIFF", save_all=True, append_images=[photo(96, 72, 13)]), "ok",
        same_as="reports/base.png")
    # 16-bit RGBA PNG -> Pillow keeps the high byte of each sample
    rgba16 = np.dstack([np.asarray(base).astype(np.uint16) * 257, np.full((72, 96), 65535, np.uint16)])
    ihdr = struct.pack(">IIBBBBB", 96, 72, 16, 6, 0, 0, 0)
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgba16)
    put("reports/rgba16.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b""), "ok", same_as="reports/base.png")
    # ICC profiles are not applied: oversized (2 MB) or broken ones change nothing in JPEG/WebP/TIFF
    big_icc, junk_icc = b"\0" * 2_000_000, b"not an icc profile"
    for fmt, ext, kw in (("JPEG", "jpg", {"quality": 95}), ("WEBP", "webp", {"lossless": True}), ("TIFF", "tif", {})):
        ref = f"reports/base_{ext}.{ext}"
        put(ref, _enc(base, fmt, **kw), "ok")
        put(f"reports/icc_2m.{ext}", _enc(base, fmt, icc_profile=big_icc, **kw), "ok", same_as=ref)
        put(f"reports/icc_junk.{ext}", _enc(base, fmt, icc_profile=junk_icc, **kw), "ok", same_as=ref)
    # progressive JPEG cut short
    prog = _enc(photo(640, 480, 14), "JPEG", progressive=True, quality=90)
    put("reports/progressive_truncated.jpg", prog[: len(prog) // 2], "truncated")
    # extreme aspect ratio
    put("reports/size_1x50000.png", _enc(photo(1, 50000, 15)), "ok")
    put("reports/size_50000x1.png", _enc(photo(50000, 1, 15)), "ok")


def make_extra_cases(out: Path) -> None:
    d = out / "images"
    exp: dict[str, dict] = {}

    def put(name, data, expect, same_as=None):
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else _enc(data, "PNG"))
        exp[name] = {"expect": expect} | ({"same_as": same_as} if same_as else {})

    # --- decode failures
    photo = _photo(320, 240, seed=1)
    for fmt, ext, kw in (("JPEG", "jpg", {}), ("PNG", "png", {}), ("WEBP", "webp", {}),
                         ("BMP", "bmp", {}), ("TIFF", "tif", {}), ("AVIF", "avif", {})):
        good = _enc(photo, fmt, **kw)
        put(f"decode/good.{ext}", good, "ok")
        for frac in (0.02, 0.4, 0.95):
            put(f"decode/truncated_{int(frac * 100)}.{ext}", good[: int(len(good) * frac)], "truncated")
    gif = _enc(photo.convert("P"), "GIF")
    for frac in (0.02, 0.4, 0.95):
        put(f"decode/truncated_{int(frac * 100)}.gif", gif[: int(len(gif) * frac)], "truncated")
    put("decode/one_byte.jpg", b"\xff", "unidentified_image")
    put("decode/html.png", b"<!doctype html><html><body>404 not found</body></html>\n", "unidentified_image")
    put("decode/zeros.bin", b"\0" * 4096, "unidentified_image")
    for brand in (b"heix", b"mif1", b"hevc"):
        put(f"decode/heif_{brand.decode()}.jpg",
            struct.pack(">I", 24) + b"ftyp" + brand + b"\0\0\0\0" + b"mif1" + brand + b"\0" * 64,
            "unsupported_format")
    avif_header = struct.pack(">I", 28) + b"ftypavif" + b"\0\0\0\0" + b"avifmif1miaf" + b"\0" * 40
    put("decode/avif_header_only.avif", avif_header,
        "unidentified_image" if _has_decoder("avif") else "unsupported_format")
    put("decode/jxl_codestream.png", b"\xff\x0a" + b"\x00" * 64, "unsupported_format")
    small_jpeg = _enc(_photo(16, 16), "JPEG")
    put("decode/bomb_jpeg_60000.jpg", _jpeg_with_size(small_jpeg, 60000, 60000), "too_many_pixels")
    gif_bomb = (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00"
                + b"," + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x02\x02\x44\x01\x00;")
    put("decode/bomb_gif_65535.gif", gif_bomb, "too_many_pixels")
    put("decode/bomb_bmp_40000.bmp",
        b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 40000, 40000, 1, 24, 0, 0, 0, 0, 0, 0),
        "too_many_pixels")
    # An ICO whose one frame is a PNG declaring 100000 x 100000 (Pillow's bomb check meets it
    # when the frame opens, at load).
    png = bytearray(_enc(Image.new("RGB", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", 100000, 100000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    put("decode/bomb_ico_png_frame.ico", struct.pack("<HHH", 0, 1, 1)
        + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + bytes(png), "too_many_pixels")
    put("decode/large_12000x8000.jpg", _enc(Image.new("RGB", (12000, 8000), (40, 90, 140)), "JPEG"), "ok")

    # --- colour modes
    rgba = np.dstack([np.asarray(_photo(96, 96, seed=2)), np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1))])
    put("modes/rgba_gradient_alpha.png", Image.fromarray(rgba, "RGBA"), "ok", same_as="modes/rgba_on_white.png")
    put("modes/rgba_on_white.png", _composite_white(rgba), "ok")
    hidden = rgba.copy()
    hidden[..., :3][rgba[..., 3] == 0] = (255, 0, 255)
    put("modes/rgba_hidden_magenta.png", Image.fromarray(hidden, "RGBA"), "ok", same_as="modes/rgba_on_white.png")
    gray = np.asarray(_photo(96, 96, seed=3).convert("L"))
    alpha = np.zeros((96, 96), np.uint8)
    alpha[:, 30:] = 255
    la_a = np.dstack([gray, alpha])
    la_b = la_a.copy()
    la_b[..., 0][alpha == 0] = 7
    put("modes/la_hidden_a.png", Image.fromarray(la_a, "LA"), "ok", same_as="modes/la_hidden_b.png")
    put("modes/la_hidden_b.png", Image.fromarray(la_b, "LA"), "ok")
    put("modes/la_as_rgb.png", _composite_white(np.dstack([gray, gray, gray, alpha])), "ok",
        same_as="modes/la_hidden_a.png")
    pal = Image.fromarray((np.arange(96 * 96).reshape(96, 96) % 4).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0] * 756)
    put("modes/palette_transparent.gif", _enc(pal, "GIF", transparency=0), "ok",
        same_as="modes/palette_transparent_as_rgb.png")
    flat = np.asarray(pal.convert("RGB")).copy()
    flat[np.asarray(pal) == 0] = 255
    put("modes/palette_transparent_as_rgb.png", Image.fromarray(flat), "ok")
    put("modes/palette_transparent.png", _enc(pal, "PNG", transparency=0), "ok",
        same_as="modes/palette_transparent_as_rgb.png")
    ramp16 = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    put("modes/gray16.png", Image.fromarray(ramp16), "ok", same_as="modes/gray16_as_8bit.png")
    put("modes/gray16_as_8bit.png", Image.fromarray(np.rint(ramp16 / 257.0).astype(np.uint8), "L"), "ok")
    put("modes/gray16.tif", _enc(Image.fromarray(ramp16), "TIFF"), "ok", same_as="modes/gray16_as_8bit.png")
    put("modes/int32.tif", _enc(Image.fromarray(ramp16.astype(np.int32), "I"), "TIFF"), "ok",
        same_as="modes/gray16_as_8bit.png")
    put("modes/float_unit.tif", _enc(Image.fromarray((gray / 255.0).astype(np.float32), "F"), "TIFF"), "ok",
        same_as="modes/float_unit_as_l.png")
    put("modes/float_unit_as_l.png", Image.fromarray(gray, "L"), "ok")
    cmyk = _enc(_photo(96, 96, seed=4).convert("CMYK"), "JPEG", quality=95)
    assert b"Adobe" in cmyk  # Pillow writes the Adobe marker (inverted CMYK) for CMYK JPEGs
    put("modes/cmyk_adobe.jpg", cmyk, "ok", same_as="modes/cmyk_adobe_as_rgb.png")
    put("modes/cmyk_adobe_as_rgb.png", Image.open(io.BytesIO(cmyk)).convert("RGB"), "ok")
    put("modes/cmyk.tif", _enc(_photo(96, 96, seed=4).convert("CMYK"), "TIFF"), "ok",
        same_as="modes/cmyk_tif_as_rgb.png")
    put("modes/cmyk_tif_as_rgb.png", _photo(96, 96, seed=4).convert("CMYK").convert("RGB"), "ok")

    # --- geometry: all EXIF orientations, PNG (lossless) and JPEG (compared with its own transpose)
    up = _photo(120, 80, seed=5)
    put("geometry/upright.png", up, "ok")
    T = Image.Transpose
    inverse = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
               6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}
    forward = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
               6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}
    for o in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        stored = up.transpose(inverse[o])
        put(f"geometry/orient_{o}.png", _enc(stored, "PNG", exif=exif), "ok", same_as="geometry/upright.png")
        jpeg = _enc(stored, "JPEG", quality=95, exif=exif)
        put(f"geometry/orient_{o}.jpg", jpeg, "ok", same_as=f"geometry/orient_{o}_jpg_upright.png")
        put(f"geometry/orient_{o}_jpg_upright.png", Image.open(io.BytesIO(jpeg)).transpose(forward[o]), "ok")
    exif = Image.Exif()
    exif[0x0112] = 42
    put("geometry/orient_invalid.png", _enc(up, "PNG", exif=exif), "ok", same_as="geometry/upright.png")
    for w, h in ((2, 1), (1, 2), (5000, 3), (3, 5000), (223, 225)):
        put(f"geometry/size_{w}x{h}.png", _photo(w, h), "ok")

    # --- animation: first frame
    f0, f1 = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 220))
    put("animation/first.png", f0, "ok")
    put("animation/apng.png", _enc(f0, "PNG", save_all=True, append_images=[f1], duration=100), "ok",
        same_as="animation/first.png")
    put("animation/anim.webp", _enc(f0, "WEBP", save_all=True, append_images=[f1], lossless=True), "ok",
        same_as="animation/first.png")

    _report_cases(put)
    (out / "expected.json").write_text(json.dumps(exp, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def extra_cases(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extra_cases")
    make_extra_cases(out)
    return out


def test_extra_cases(extra_cases):
    checked, failures = judge(extra_cases)
    assert checked >= 125
    assert not failures, "\n".join(failures)
