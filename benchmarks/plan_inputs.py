"""Benchmark: input planning cost before the first image is read, and filesystem calls made.

Timings: "plan s" = plan_inputs() on the driver; "1st row s" = from the start of planning to the
first row coming out of the dataset (what delays the first decode); "all rows s" = executing
the whole (lazy) dataset on its own, i.e. the block-cutting tasks that normally fuse into the
decode stage. The fs-call counts cover plan_inputs() only.

Cases: a folder of N small files (default 200,000, in 200 sub-folders, plus 1% non-image files)
and a text manifest of M lines (default 1,000,000). The folder is planned twice: as a plain path
(zslabel/sources/folder.py's os.scandir walk, no fsspec calls to count) and through countfs (fsspec's generic
``find``, the path every non-local filesystem takes). ``countfs://`` is a LocalFileSystem
subclass that counts every call made on it:
"top" = calls made by zslabel.sources itself, "all" = including the calls fsspec makes inside
them (e.g. the per-directory ``ls`` and per-entry ``info`` of a local ``find``).

Usage: python benchmarks/plan_inputs.py [--files 200000] [--lines 1000000] [--dir /tmp/zs-bench]
Prints a table; the working folder is removed unless --keep.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import threading
import time
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import fsspec
from fsspec.implementations.local import LocalFileSystem

COUNTED = ("ls", "info", "find", "glob", "walk", "exists", "isdir", "isfile", "open", "_open",
           "cat_file", "cat", "size", "modified", "created")


class CountingFileSystem(LocalFileSystem):
    """Local filesystem under the ``countfs://`` protocol that counts its method calls."""

    protocol = ("countfs",)
    top: ClassVar[collections.Counter] = collections.Counter()
    all: ClassVar[collections.Counter] = collections.Counter()
    _depth = threading.local()

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.core.stringify_path(path)
        path = path.removeprefix("countfs://")
        return super()._strip_protocol(path)

    @classmethod
    def reset(cls) -> None:
        cls.top.clear()
        cls.all.clear()


def _counting(name):
    base = getattr(LocalFileSystem, name)

    def method(self, *args, **kwargs):
        depth = getattr(CountingFileSystem._depth, "n", 0)
        CountingFileSystem.all[name] += 1
        if depth == 0:
            CountingFileSystem.top[name] += 1
        CountingFileSystem._depth.n = depth + 1
        try:
            return base(self, *args, **kwargs)
        finally:
            CountingFileSystem._depth.n = depth

    method.__name__ = name
    return method


for _name in COUNTED:
    setattr(CountingFileSystem, _name, _counting(_name))
fsspec.register_implementation("countfs", CountingFileSystem, clobber=True)


def make_folder(root: Path, n: int) -> None:
    per_dir = 1000
    for i in range(n):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:07d}.jpg").touch()
        if i % 100 == 0:
            (d / f"notes_{i:07d}.txt").touch()


def make_manifest(path: Path, n: int) -> None:
    with open(path, "w") as f:
        f.writelines(f"s3://bucket/images/d{i // 1000:04d}/img_{i:07d}.jpg\n" for i in range(n))


def measure(uri: str) -> dict:
    from zslabel.sources import plan_inputs

    CountingFileSystem.reset()
    t0 = time.perf_counter()
    plan = plan_inputs(uri)
    t_plan = time.perf_counter() - t0
    first = next(iter(plan.dataset.iter_batches(batch_size=1, batch_format="pyarrow")))
    t_first = time.perf_counter() - t0
    assert first.num_rows == 1
    top, every = dict(CountingFileSystem.top), dict(CountingFileSystem.all)
    t0 = time.perf_counter()
    done = plan.dataset.materialize()
    return {"rows": done.count(), "listed": plan.listed, "skipped": plan.skipped,
            "plan_s": t_plan, "first_row_s": t_first, "all_rows_s": time.perf_counter() - t0,
            "blocks": done.num_blocks(), "top": top, "all": every}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/zs-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import ray

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t = time.perf_counter()
        make_folder(work / "folder", args.files)
        make_manifest(work / "list.txt", args.lines)
        setup_s = time.perf_counter() - t
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address=os.environ.get("RAY_NODE_IP_ADDRESS", "127.0.0.2"))
        # Warm Ray Data once so the first case does not pay its one-time start-up.
        ray.data.from_items([{"x": 1}]).take(1)
        results = {
            "folder (local fast path)": measure(str(work / "folder")),
            "folder via countfs (fsspec find)": measure(f"countfs://{work / 'folder'}"),
            f"manifest .txt, {args.lines:,} lines": measure(f"countfs://{work / 'list.txt'}"),
        }
        print(f"(setup: wrote {args.files:,} files + 1% non-images and a {args.lines:,}-line "
              f"manifest in {setup_s:.1f} s; load average {os.getloadavg()[0]:.1f})")
        head = (f"{'case':36} {'rows':>9} {'listed':>9} {'skipped':>7} {'blocks':>6} "
                f"{'plan s':>7} {'1st row s':>9} {'all rows s':>10}  fs calls: by zslabel.sources | incl. fsspec-internal")
        print(head)
        print("-" * len(head))
        for name, r in results.items():
            top = " ".join(f"{k}={v}" for k, v in sorted(r["top"].items())) or "-"
            every = " ".join(f"{k}={v}" for k, v in sorted(r["all"].items())) or "-"
            print(f"{name:36} {r['rows']:>9,} {r['listed']:>9,} {r['skipped']:>7,} "
                  f"{r['blocks']:>6} {r['plan_s']:>7.2f} {r['first_row_s']:>9.2f} {r['all_rows_s']:>10.2f}  "
                  f"{top} | {every}")
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
