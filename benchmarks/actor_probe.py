"""Probe: ms per image of ``ZeroShotModel.encode_images`` in a plain process vs in a Ray actor.

Isolates what costs the labeler actor time (issue 15): torch threads, interop threads, Ray's
worker niceness, ``inference_mode`` vs ``no_grad``, batch size, memory layout. Every case runs
the same batches of random uint8 pixels (no decoding, no Ray Data), in one run, side by side.

Usage:
  python benchmarks/actor_probe.py CKPT [--batch 64] [--batches 4] [--cases plain2,plain1,...]

Prints one line per case: ms per image (median over batches, after one warm-up batch), torch
threads, interop threads, niceness. Compare the lines of one run; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def measure(ckpt: str, batch: int, batches: int, threads: int | None, mode: str = "inference",
            layout: str = "default", interop: int | None = None) -> dict:
    """Time ``encode_images`` on ``batches`` batches of ``batch`` random images (after a warm-up)."""
    import numpy as np
    import torch

    from zslabel.model import load_model

    if threads:
        torch.set_num_threads(threads)
    if interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError:
            pass
    model = load_model(ckpt)
    h, w = model.preprocess.output_hw
    px = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    if layout == "channels_last":
        model.model = model.model.to(memory_format=torch.channels_last)

    def run():
        if mode == "no_grad":
            with torch.no_grad():
                feats = model.model.get_image_features(pixel_values=model.pixel_values(px))
        else:
            model.encode_images(px)

    run()
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) / batch * 1e3)
    return {"ms_per_image": statistics.median(times), "all_ms": [round(x, 1) for x in times],
            "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "nice": os.nice(0), "omp_env": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()}


def plain(args, threads, **kw) -> dict:
    """The case in a fresh subprocess (nice 0 unless ``nice`` given)."""
    nice = kw.pop("nice", 0)
    code = ("import json,sys; sys.path.insert(0,'.'); from benchmarks.actor_probe import measure; "
            f"print(json.dumps(measure({args.ckpt!r}, {args.batch}, {args.batches}, {threads!r}, **{kw!r})))")
    cmd = [sys.executable, "-c", code]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    out = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_actors(args, n_actors: int, num_cpus: float, threads: int | None, niceness: int | None,
              decode_load: int = 0) -> list[dict]:
    """The case in ``n_actors`` Ray actors at once (a fresh local Ray with 2 CPUs per core count);
    ``decode_load`` busy-loop tasks of 1 CPU run alongside (stand-ins for decode tasks)."""
    env = {**os.environ, **ENV}
    if niceness is not None:
        env["RAY_worker_niceness"] = str(niceness)
    else:
        env.pop("RAY_worker_niceness", None)
    code = f"""
import json, sys, time; sys.path.insert(0, '.')
import ray
ray.init(address='local', num_cpus={os.cpu_count()}, include_dashboard=False, log_to_driver=False)
from benchmarks.actor_probe import measure
@ray.remote
class A:
    def run(self):
        return measure({args.ckpt!r}, {args.batch}, {args.batches}, {threads!r})
@ray.remote(num_cpus=1)
def spin(seconds):
    t = time.time()
    while time.time() - t < seconds:
        sum(range(10000))
actors = [A.options(num_cpus={num_cpus}).remote() for _ in range({n_actors})]
spins = [spin.remote(60) for _ in range({decode_load})]
print(json.dumps(ray.get([a.run.remote() for a in actors])))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = {
    "plain2": lambda a: plain(a, 2),
    "plain1": lambda a: plain(a, 1),
    "plain2_nice15": lambda a: plain(a, 2, nice=15),
    "plain2_nograd": lambda a: plain(a, 2, mode="no_grad"),
    "plain2_interop1": lambda a: plain(a, 2, interop=1),
    "plain2_channels_last": lambda a: plain(a, 2, layout="channels_last"),
    # Ray's default: num_cpus=1 -> OMP_NUM_THREADS=1 -> torch 1 thread; workers at nice 15.
    "actor_1cpu_default": lambda a: in_actors(a, 1, 1, None, None),
    "actor_1cpu_2threads": lambda a: in_actors(a, 1, 1, 2, None),
    "actor_1cpu_2threads_nice0": lambda a: in_actors(a, 1, 1, 2, 0),
    "actor_2cpu_2threads": lambda a: in_actors(a, 1, 2, 2, None),
    "actors_2x0.5cpu_1thread": lambda a: in_actors(a, 2, 0.5, 1, None),
    "actor_1cpu_2threads_busy1": lambda a: in_actors(a, 1, 1, 2, None, decode_load=1),
    "actor_1cpu_1thread_busy1": lambda a: in_actors(a, 1, 1, 1, None, decode_load=1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeat", type=int, default=1, help="rounds over all cases (interleaved)")
    args = p.parse_args()
    print(f"load {os.getloadavg()}", flush=True)
    for name in args.cases.split(",") * args.repeat:
        t = time.perf_counter()
        try:
            r = CASES[name](args)
        except Exception as exc:  # noqa: BLE001 - a Ray start-up timeout on a loaded machine
            print(f"{name:32s} failed: {str(exc).strip().splitlines()[-1][:200]}", flush=True)
            continue
        rs = r if isinstance(r, list) else [r]
        agg = sum(1000 / x["ms_per_image"] for x in rs)
        print(f"{name:32s} " + " | ".join(f"{x['ms_per_image']:.1f} ms/img thr={x['threads']} "
                                           f"interop={x['interop']} nice={x['nice']} omp={x['omp_env']}"
                                           for x in rs)
              + f"  -> {agg:.2f} img/s total  ({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
