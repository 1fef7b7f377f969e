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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zslabel.decode import PreprocessSpec, decode_image, _has_decoder
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


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
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

    (out / "expected.json").write_text(json.dumps(exp, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def extra_cases(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extra_cases")
    make_extra_cases(out)
    return out


def test_extra_cases(extra_cases):
    checked, failures = judge(extra_cases)
    assert checked >= 85
    assert not failures, "\n".join(failures)
