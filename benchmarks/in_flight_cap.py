"""The in-flight cap (``cluster.bound_in_flight``) in force vs lifted, side by side in one Ray
session: wall time of the same label job, alternating after one warm-up run, best of
``--repeat``; the limit each run executed under (``object_store_limit_mb`` in the manifest's timings) is printed beside it.

    python benchmarks/in_flight_cap.py --images 1500 --repeat 2

"Lifted" sets ``IN_FLIGHT_BATCHES_PER_ACTOR`` so high that the cap becomes Ray Data's own
default (half the object store). Peak memory is not measured here (throughput.py
--memory-scaling does that for one setting). Needs no model download: the bundled
models/shapes-clip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_NODE_IP_ADDRESS", "127.0.0.2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1500, help="320x240 JPEGs to label (default 1500)")
    p.add_argument("--repeat", type=int, default=2, help="runs per setting, alternating (default 2)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs of the local Ray instance")
    args = p.parse_args()

    import numpy as np
    import ray
    from PIL import Image

    import zslabel.cluster as cluster
    from zslabel import JobConfig, run_label_job

    ray.init(address="local", num_cpus=args.cpus, _node_ip_address=os.environ["RAY_NODE_IP_ADDRESS"],
             include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="zslabel-cap-"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(8)]
    for i in range(args.images):
        pictures[i % 8].save(images / f"{i:06d}.jpg", quality=90)
    labels = [line.strip() for line in (ROOT / "examples/shapes/labels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    default = cluster.IN_FLIGHT_BATCHES_PER_ACTOR
    # Not counted: the session's first run starts Ray's worker processes (5 s more here).
    run_label_job(JobConfig(input=str(images), output=str(root / "warm-up"), labels=labels,
                            model=str(ROOT / "models/shapes-clip")))
    seconds: dict[str, list[float]] = {"cap": [], "lifted": []}
    for k in range(args.repeat):
        for mode in seconds:
            cluster.IN_FLIGHT_BATCHES_PER_ACTOR = default if mode == "cap" else 10**9
            started = time.perf_counter()
            summary = run_label_job(JobConfig(input=str(images), output=str(root / f"{mode}{k}"), labels=labels,
                                              model=str(ROOT / "models/shapes-clip")))
            seconds[mode].append(time.perf_counter() - started)
            print(f"{mode:6s} run {k}: {seconds[mode][-1]:6.1f} s, {summary.labeled} labeled, "
                  f"object store limit {summary.timings.get('object_store_limit_mb')} MB", flush=True)
    cap, lifted = min(seconds["cap"]), min(seconds["lifted"])
    print(f"best of {args.repeat}: cap {cap:.1f} s, lifted {lifted:.1f} s, ratio cap/lifted {cap / lifted:.3f}")


if __name__ == "__main__":
    main()
