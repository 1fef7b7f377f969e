"""Benchmark: how many decode tasks run at once next to one labeler actor, on N logical CPUs.

A GPU node's labeler actor holds 1 GPU and a fraction of its CPUs; every other CPU should run a
decode task, because a GPU run is decode-bound. This script starts a local Ray instance with
``--cpus`` logical CPUs (they need not exist: the question is what Ray Data schedules), runs
``zslabel``'s labeling job on small JPEGs with one 1-CPU labeler actor (the tiny test checkpoint,
built offline), and reads the decode tasks' start and end times from Ray's task timeline. Side by
side in one run, it does so with the write stage as shipped (``0`` CPUs per write task, at most
``cluster.write_tasks`` at once) and as before (``0.25`` CPUs, no cap: Ray Data's resource
allocator then hands the CPUs that no operator reserved to the uncapped write operator, not to
decoding).

Usage:
  python benchmarks/decode_slots.py --cpus 8 --images 20000 --repeat 2 --out bench_out

Prints, per setting: decode tasks, the most running at once, the time-weighted mean, and the
share of the decode stage's time spent at each concurrency. On a machine with fewer cores than
``--cpus`` the wall time says nothing (the tasks share the cores); the concurrency does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"})
os.environ.pop("RAY_ADDRESS", None)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # + zslabel_dev

import throughput  # noqa: E402  (same folder: image writer and tiny checkpoint)

from zslabel_dev.timeline import concurrency, task_intervals  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray instance (default 8)")
    p.add_argument("--images", type=int, default=20000, help="64x64 JPEGs to label (default 20,000)")
    p.add_argument("--repeat", type=int, default=2, help="rounds over the settings (default 2)")
    p.add_argument("--out", default="bench_out", help="working folder (default bench_out)")
    args = p.parse_args(argv)

    import ray

    import zslabel.pipeline as pipeline
    from zslabel import JobConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = throughput.build_tiny(out)
    folder = out / f"small_64x64_{args.images}"
    throughput.write_images(folder, args.images, 64, 64, distinct=min(args.images, 1000))
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        # Alternating rounds: the first job also starts the instance's worker processes, which
        # limits how many tasks can start at once (seconds per worker on a small machine).
        shipped = (pipeline.WRITE_CPUS_PER_TASK, pipeline.write_tasks)
        settings = {f"{shipped[0]:g} CPU, at most write_tasks() at once (shipped)": shipped,
                    "0.25 CPU, no cap (before)": (0.25, lambda cpus: None)}
        for name in [name for _ in range(args.repeat) for name in settings]:
            # Both are read when the job builds its write stage.
            pipeline.WRITE_CPUS_PER_TASK, pipeline.write_tasks = settings[name]
            dest = out / "decode_slots"
            shutil.rmtree(dest, ignore_errors=True)
            cfg = JobConfig(input=str(folder), output=str(dest), labels=["cat", "dog", "bird"], model=str(ckpt),
                            concurrency=(1, 1), num_cpus_per_actor=1.0)
            since = time.time() * 1e6
            summary = pipeline.run_label_job(cfg, progress=False)
            found = task_intervals("decode_block", since)
            results.append(dict(concurrency(found), setting=name, labeling_s=summary.timings["labeling_s"]))
    finally:
        ray.shutdown()
    free = args.cpus - 1
    print(f"\ndecode tasks at once next to one 1-CPU labeler actor, {args.cpus} logical CPUs ({free} free), "
          f"{args.images} 64x64 JPEGs:")
    print("| round | write stage | decode tasks | most at once | mean at once | share of time at 0..n |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        shares = ", ".join(f"{k}: {v:.0%}" for k, v in r["share_at"].items())
        print(f"| {i // len(settings) + 1} | {r['setting']} | {r['tasks']} | {r['most']} | "
              f"{r['mean']:.2f} | {shares} |")
    (out / "decode_slots.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
