"""How long `zslabel report` takes on a 1,000,000-row output, and how big the report is.

Synthesises a contract-conforming output (``zslabel.output.output_schema`` Parquet files of
``--rows-per-file`` rows, zslabel's default 1024, plus a run manifest) over the 1,000 ImageNet
labels with top-5 labels and scores, 1% error rows over four codes and an ``abstained`` column.
Paths are unique and readable: ``--images`` real JPEGs (320x240, a few hundred) in one folder,
reached through many symlinked folders (``d0000/img_000.jpg`` ...), so the report's
thumbnails are real reads and decodes, never deduplicated by path. Then runs
``zslabel report`` in a subprocess (imports included) and prints its wall time and the report
folder's size; ``--browser`` also opens the report in headless Chromium with the test's checks
(no console error, every image decoded, no request outside the folder).

    .venv/bin/python benchmarks/report_scale.py                   # 1,000,000 rows
    .venv/bin/python benchmarks/report_scale.py --rows 100000 --browser

The synthetic output is kept in ``--work`` (default /tmp/zslabel-report-scale) and reused when
its row count matches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CODES = ["read_error: FileNotFoundError: [Errno 2] No such file", "unidentified_image: cannot identify image file",
         "truncated: image file is truncated", "too_many_pixels: 200000000 pixels > 178956970"]


def make_images(folder: Path, n: int) -> None:
    """``n`` distinct 320x240 JPEGs: gradients, noise and a coloured disc, deterministic."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    for i in range(n):
        base = np.stack([x * (i % 7 + 1) % 256, y * (i % 5 + 1) % 256, (x + y + 13 * i) % 256], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        cx, cy, r = rng.integers(60, 260), rng.integers(60, 180), rng.integers(20, 60)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(folder / f"img_{i:03d}.jpg", quality=85)


def synthesise(work: Path, rows: int, images: int, rows_per_file: int, seed: int = 0) -> Path:
    """The output folder (made once per row count)."""
    from zslabel.output import output_schema
    from zslabel.store import MANIFEST_NAME

    out = work / f"out_{rows}"
    if (out / MANIFEST_NAME).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    img_dir = work / "images"
    if not img_dir.exists():
        make_images(img_dir, images)
    links = work / "links"
    folders = -(-rows // images)
    links.mkdir(exist_ok=True)
    for k in range(folders):
        link = links / f"d{k:04d}"
        if not link.exists():
            link.symlink_to(img_dir, target_is_directory=True)
    labels = [ln.strip() for ln in (ROOT / "zslabel" / "label_sets" / "imagenet-1k.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    names = pa.array(labels, pa.string())
    rng = np.random.default_rng(seed)
    schema = output_schema(abstained=True)
    out.mkdir(parents=True)
    # label popularity is skewed, as in real collections: the k-th most common label ~ k^-0.8
    weights = rng.permutation(1.0 / np.arange(1, len(labels) + 1) ** 0.8)
    weights /= weights.sum()
    errors = 0
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        idx = np.arange(start, start + n)
        paths = pa.array([f"{links}/d{i // images:04d}/img_{i % images:03d}.jpg" for i in idx.tolist()])
        top = rng.choice(len(labels), size=(n, 5), p=weights)
        s0 = rng.beta(2.0, 2.0, n).astype(np.float32)
        rest = np.sort(rng.random((n, 4)).astype(np.float32), axis=1)[:, ::-1] * (1 - s0)[:, None] * 0.9
        rest = np.minimum(rest, s0[:, None])
        scores = np.concatenate([s0[:, None], rest], axis=1)
        is_err = rng.random(n) < 0.01
        errors += int(is_err.sum())
        offsets = np.arange(0, 5 * n + 1, 5, dtype=np.int32)
        mask = pa.array(is_err)
        lab = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(top.ravel())), mask=mask)
        sc = pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores.ravel(), pa.float32()), mask=mask)
        err = pa.array([CODES[i % 4] if e else None for i, e in zip(idx.tolist(), is_err.tolist())], pa.string())
        table = pa.Table.from_arrays([
            paths, pa.array(idx, pa.int64()), lab, sc, err,
            pa.array(np.where(is_err, 0, 240), pa.int32(), mask=is_err),
            pa.array(np.where(is_err, 0, 320), pa.int32(), mask=is_err),
            pa.array(s0 < 0.3, pa.bool_(), mask=is_err)], schema=schema)
        pq.write_table(table, out / f"part-{start // rows_per_file:06d}.parquet")
    by_code = {c.split(":")[0]: 0 for c in CODES}
    for f in sorted(out.glob("*.parquet")):
        for e in pq.read_table(f, columns=["error"]).column("error").drop_null().to_pylist():
            by_code[e.split(":")[0]] += 1
    manifest = {"zslabel_run": 1, "kind": "label", "labels": labels, "templates": ["This is a photo of {}."],
                "model": {"id": "synthetic (benchmarks/report_scale.py)", "score_kind": "softmax", "digest": "0" * 16},
                "config": {"top_k": 5, "min_score": 0.3, "input": str(links)},
                "counts": {"rows": rows, "labeled": rows - errors, "errors_by_code": by_code, "skipped": 0,
                           "listed": rows},
                "timings": {"wall_s": 3600.0}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--rows-per-file", type=int, default=1024)
    ap.add_argument("--work", default="/tmp/zslabel-report-scale")
    ap.add_argument("--browser", action="store_true", help="open the report in headless Chromium and check it")
    ap.add_argument("report_args", nargs="*", help="extra `zslabel report` arguments (after --)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    out = synthesise(work, args.rows, args.images, args.rows_per_file)
    files = len(list(out.glob("*.parquet")))
    print(f"output: {out} ({args.rows:,} rows, {files} files, {folder_bytes(out) / 1e6:.0f} MB; "
          f"ready in {time.perf_counter() - t:.1f} s)", flush=True)
    report = work / f"report_{args.rows}"
    shutil.rmtree(report, ignore_errors=True)
    cmd = [sys.executable, "-m", "zslabel", "report", str(out), "--output", str(report), *args.report_args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t
    if proc.returncode:
        print(f"zslabel report failed with exit {proc.returncode}", file=sys.stderr)
        return proc.returncode
    size = folder_bytes(report)
    thumbs = len(list((report / "thumbs").glob("*.jpg")))
    load = os.getloadavg()[0]
    print(f"report: {seconds:.1f} s for {args.rows:,} rows; folder {size / 1e6:.1f} MB ({thumbs} thumbnails); "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    if args.browser:
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from test_review_report import Chromium, check_page, chromium_executable

        exe = chromium_executable()
        if exe is None:
            print("browser: chromium not installed (scripts/ci_chromium.sh)")
            return 0
        profile = tempfile.mkdtemp(prefix="zslabel-chromium-")
        browser = Chromium(exe, profile)
        try:
            t = time.perf_counter()
            facts = check_page(browser, report / "index.html", work / f"report_{args.rows}.png")
            print(f"browser: {len(facts['images'])} images decoded, no console error, no outside request "
                  f"({time.perf_counter() - t:.1f} s); screenshot {work / f'report_{args.rows}.png'}")
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
