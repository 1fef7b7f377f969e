"""zslabel.sources entry points without a kind: kind detection, brace expansion, fetching one file."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

from source_files import jpeg, write

from zslabel.errors import error_code
from zslabel.sources import IMAGE_EXTENSIONS, detect_kind, expand_braces, fetch_bytes

# ------------------------------------------------------------------------------------------
# pure helpers (no Ray)


def test_expand_braces_ranges_lists_and_padding():
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("keep{literal}") == ["keep{literal}"]


def test_detect_kind_from_uri():
    assert detect_kind("/data/images") == "folder"
    assert detect_kind("s3://b/images/") == "folder"
    assert detect_kind("s3://b/images/*.jpg") == "glob"
    assert detect_kind("gs://b/list.txt") == "manifest"
    assert detect_kind("/x/list.CSV") == "manifest"
    assert detect_kind("/x/list.tsv.gz") == "manifest"
    assert detect_kind("s3://b/shards-{000..009}.tar") == "webdataset"
    assert detect_kind("/x/*.tar") == "webdataset"
    assert detect_kind("/x/part-0.parquet") == "parquet"


def test_image_extensions_are_lowercase_with_dot():
    assert {".jpg", ".jpeg", ".png", ".webp", ".heic", ".avif"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_fetch_bytes_reads_and_reports_missing_as_read_error(tmp_path):
    data = jpeg(1)
    p = write(tmp_path / "a b #ü.jpg", data)
    assert fetch_bytes(str(p)) == (data, None)
    assert fetch_bytes(f"file://{p}") == (data, None)  # fsspec URIs are not %-encoded
    got, err = fetch_bytes(str(tmp_path / "missing.jpg"))
    assert got is None and error_code(err) == "read_error" and "missing.jpg" in err
    got, err = fetch_bytes(str(tmp_path))  # a directory is not a readable file
    assert got is None and error_code(err) == "read_error"


def fetch_as_nobody(paths: list[str]) -> list[tuple[bytes | None, str | None]]:
    """fetch_bytes in a forked child running as uid/gid 65534 (root ignores file modes)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, read, report, exit without running any cleanup
        try:
            os.close(read_fd)
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write_fd, "wb") as out:
                pickle.dump([fetch_bytes(p) for p in paths], out)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        result = pickle.load(f)
    os.waitpid(pid, 0)
    return result


def test_fetch_bytes_permission_denied_is_read_error():
    folder = Path(tempfile.mkdtemp(prefix="zs-perm-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        readable = write(folder / "ok.jpg", jpeg(1))
        readable.chmod(0o644)
        secret = write(folder / "secret.jpg", jpeg(2))
        secret.chmod(0)
        if os.geteuid() == 0:
            results = fetch_as_nobody([str(readable), str(secret)])
        else:
            results = [fetch_bytes(str(readable)), fetch_bytes(str(secret))]
        assert results[0] == (jpeg(1), None)  # same folder, so the mode is what denies
        assert results[1][0] is None
        assert results[1][1].startswith("read_error: PermissionError"), results[1]
    finally:
        shutil.rmtree(folder)


def test_a_folder_lists_every_format_the_decoder_reads(tmp_path):
    """PPM frames, JPEG 2000 scans, TGA, ICO, QOI: each was decoded when a manifest named it,
    but a folder of them was "no images found (N files skipped)". Every extension of a decoded
    format is listed, and each such file decodes."""
    from PIL import Image

    from zslabel.decode import PreprocessSpec, decode_image
    from zslabel.sources import plan_inputs

    img = Image.new("RGB", (20, 16), (200, 30, 40))
    formats = {"a.ppm": "PPM", "b.pgm": "PPM", "c.jp2": "JPEG2000", "d.tga": "TGA", "e.ico": "ICO",
               "f.qoi": "QOI", "g.dib": "DIB", "h.J2K": "JPEG2000"}
    for name, fmt in formats.items():
        (img.convert("L") if name.endswith(".pgm") else img).save(tmp_path / name, format=fmt)
    plan = plan_inputs(str(tmp_path), use_ray=False)
    rows = plan.read_locally()
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == sorted(formats) and plan.skipped == 0
    spec = PreprocessSpec("shortest_edge", shortest_edge=16, crop_hw=(16, 16))
    for name in formats:
        decoded = decode_image((tmp_path / name).read_bytes(), spec)
        assert decoded.error is None and decoded.pixels.shape == (16, 16, 3), (name, decoded.error)
