"""Time `zslabel export` on a synthetic 1,000,000-row output: rows/s and peak memory.

Writes (once; reused while the parameters match) a zslabel output with the output contract's
schema: 1,024-row Parquet files as `zslabel label` commits them (its default --rows-per-file),
top-5 labels of 1,000 with scores, 1% error rows, a carried `key` column and a 512-d float16
L2-normalised embedding (ViT-B/32's width), plus a run manifest. Then runs, each in a child
process so that its peak RSS is its own (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read
after each child, which is the largest child so far, so the cheapest export runs first):

    zslabel export OUT --format label-studio --output TASKS.json --order uncertainty
    zslabel export OUT --format lance --output TABLE.lance [--index with --index]

    .venv/bin/python benchmarks/export_lance.py                         # 1,000,000 rows, ~3 GB of disk
    .venv/bin/python benchmarks/export_lance.py --rows 100000 --index   # and a vector index
    .venv/bin/python benchmarks/export_lance.py --formats lance --keep  # keep the files

Prints one line per export (wall and CPU seconds of the child, rows/s, peak RSS in MB) and a JSON
summary. On a shared machine the CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zslabel.output import output_schema  # noqa: E402
from zslabel.store import MANIFEST_NAME


def make_output(out: Path, rows: int, dim: int, rows_per_file: int, labels: int, seed: int = 0) -> None:
    """A finished zslabel output of ``rows`` synthetic rows (module docstring)."""
    out.mkdir(parents=True)
    schema = output_schema(["key"], embedding_dim=dim)
    names = np.array([f"label {i:04d}" for i in range(labels)], object)
    rng = np.random.default_rng(seed)
    k = 5
    for f, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        idx = np.arange(start, start + n)
        err = rng.random(n) < 0.01
        ok = ~err
        m = int(ok.sum())
        top = rng.choice(labels, size=(m, k))
        sc = np.sort(rng.dirichlet(np.ones(k) * 0.5, size=m).astype(np.float32), axis=1)[:, ::-1]
        offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32))
        mask = pa.array(err)
        labels_arr = pa.ListArray.from_arrays(offsets, pa.array(names[top.ravel()], pa.string()), mask=mask)
        scores_arr = pa.ListArray.from_arrays(offsets, pa.array(sc.ravel(), pa.float32()), mask=mask)
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb_arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).ravel(), pa.float16()), dim,
                                                    mask=mask)
        table = pa.Table.from_arrays([
            pa.array([f"/data/images/{i // 1000:04d}/{i:09d}.jpg" for i in idx], pa.string()),
            pa.array(idx, pa.int64()), labels_arr, scores_arr,
            pa.array(np.where(err, "truncated: image file is truncated", None), pa.string()),
            pa.array(np.where(err, 0, 640), pa.int32(), mask=err),
            pa.array(np.where(err, 0, 480), pa.int32(), mask=err),
            pa.array([f"k{i}" for i in idx], pa.string()), emb_arr], schema=schema)
        pq.write_table(table, out / f"part-bench-{f:06d}.parquet", row_group_size=rows_per_file)
    manifest = {"zslabel_run": 1, "run_id": "bench", "labels": list(names), "counts": {"rows": rows},
                "bench": {"rows": rows, "dim": dim, "rows_per_file": rows_per_file, "seed": seed}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


def timed_export(source: Path, fmt: str, target: Path, extra: list[str]) -> dict:
    """Run one export in a child process; wall seconds and the child's peak RSS (MB)."""
    cmd = [sys.executable, "-m", "zslabel", "export", str(source), "--format", fmt, "--output", str(target),
           "--overwrite", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"export failed ({proc.returncode}): {proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the child: on a shared machine wall time mostly measures the neighbours
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"format": fmt, "args": extra, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mb_children_so_far": round(after.ru_maxrss / 1024),  # KiB on Linux
            "line": proc.stdout.strip().splitlines()[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rows-per-file", type=int, default=1024)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--formats", default="label-studio,lance", help="comma-separated, run in this order")
    p.add_argument("--index", action="store_true", help="also time `--format lance --index`")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "zslabel-bench-export"))
    p.add_argument("--keep", action="store_true", help="keep the exports (the synthetic output is always kept)")
    args = p.parse_args()
    work = Path(args.workdir)
    source = work / f"out-{args.rows}-{args.dim}-{args.rows_per_file}"
    if not (source / MANIFEST_NAME).exists():
        shutil.rmtree(source, ignore_errors=True)
        t0 = time.perf_counter()
        make_output(source, args.rows, args.dim, args.rows_per_file, args.labels)
        print(f"wrote the synthetic output {source} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in source.iterdir())
    results = []
    runs = []
    for fmt in args.formats.split(","):
        if fmt == "label-studio":
            runs.append((fmt, work / "tasks.json", ["--order", "uncertainty"]))
        elif fmt == "lance":
            runs.append((fmt, work / "table.lance", []))
            if args.index:
                runs.append((fmt, work / "table-indexed.lance", ["--index"]))
        else:
            sys.exit(f"unknown format {fmt}")
    for fmt, target, extra in runs:
        r = timed_export(source, fmt, target, extra)
        r["rows_per_s"] = round(args.rows / r["wall_s"])
        results.append(r)
        r["rows_per_cpu_s"] = round(args.rows / max(r["cpu_s"], 1e-3))
        print(f"{fmt} {' '.join(extra)}: {r['wall_s']} s wall ({r['rows_per_s']:,} rows/s), {r['cpu_s']} s CPU "
              f"({r['rows_per_cpu_s']:,} rows per CPU-second), peak RSS (largest child so far) "
              f"{r['peak_rss_mb_children_so_far']} MB", flush=True)
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            Path(str(target)[:-len(".json")] + ".label_config.xml").unlink(missing_ok=True)
    print(json.dumps({"rows": args.rows, "dim": args.dim, "files": args.rows // args.rows_per_file + 1,
                      "source_mb": round(size / 2**20), "load_average": os.getloadavg(), "results": results},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
