"""GPU smoke test and throughput check for zslabel (a person runs it on a GPU machine; < 5 min).

1. Smoke: the tiny offline checkpoint end to end on CUDA (``num_gpus_per_actor=1``, float16),
   every image labeled, and its scores compared with a float32 CPU run of the same images:
   they must agree within 1e-2 and must not be bit-identical (which would mean the actor did
   not run in float16 on the GPU).
2. Model sweep: ViT-B/32- and ViT-L/14-shaped CLIPs (random weights) in float16, uint8 pixels
   from host memory, at 3 and 21,843 labels (ImageNet-21k size): encode + logits + softmax +
   top-5 on the device, in batches of ``--batch-size``; prints images/s per case and the time the
   text tower took for the 21,843 label embeddings.
3. Throughput: a ViT-B/32-shaped CLIP (``VIT_B32_CLIP_CONFIG``: the real architecture, random
   weights, nothing downloaded) in float16 over ``--images`` generated 640x480 JPEGs, one GPU
   actor. Prints images/s (over the labeling phase, and over the whole job including model
   load), GPU utilisation sampled with ``nvidia-smi`` every 0.5 s while labeling, and the run
   manifest's verdict on whether the run was decode-bound or model-bound.

Usage:
    python benchmarks/gpu_smoke.py [--images 3000] [--batch-size 256] [--dir /tmp/zs-gpu] [--keep]

Exits 0 with a message and does nothing when no CUDA device is visible; exit 1 when a check
fails. ``--cpu`` runs the same steps without a GPU (checks the script itself; the numbers then
mean nothing and the float16 checks are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# zslabel_dev (tiny checkpoints) lives at the repository root, beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = ["cat", "dog", "bird", "car", "tree", "boat", "person", "building"]
MANY = 21_843  # ImageNet-21k classes
# Published architecture of openai/clip-vit-large-patch14 (its config.json).
VIT_L14_CLIP_CONFIG = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                    "projection_dim": 768},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "image_size": 224, "patch_size": 14, "projection_dim": 768},
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}


def many_labels(n: int) -> list[str]:
    return LABELS[:n] if n <= len(LABELS) else [f"label {i}" for i in range(n)]


def sweep(workdir: Path, batch_size: int, seconds: float, cpu: bool) -> list[dict]:
    """images/s of the model path (no Ray, no decoding) per shape and label count; see the docstring."""
    import torch

    from zslabel.model import load_model
    from zslabel.ranking import RankingRule, rank, scores_from_logits, zero_shot_logits
    from zslabel_dev.tiny import VIT_B32_CLIP_CONFIG, build_tiny_checkpoint

    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.float16)
    results = []
    for shape, cfg in (("ViT-B/32", VIT_B32_CLIP_CONFIG), ("ViT-L/14", VIT_L14_CLIP_CONFIG)):
        t0 = time.perf_counter()
        ckpt = build_tiny_checkpoint(workdir / shape.replace("/", ""), "clip", config=cfg)
        model = load_model(ckpt, device=device, dtype=dtype)
        print(f"sweep: {shape} built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        pixels = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
        for n_labels in (3, MANY):
            t = time.perf_counter()
            labels = torch.from_numpy(model.encode_texts([f"This is a photo of {x}." for x in many_labels(n_labels)],
                                                         batch_size=1024)).to(device)
            text_s = time.perf_counter() - t
            rule = RankingRule(top_k=5)

            def step():
                emb = model.encode_images(pixels)
                scores = scores_from_logits(zero_shot_logits(emb, labels, model.logit_scale), model.score_kind)
                return rank(scores, rule)  # copies only the top-5 to the host (a sync point)

            for _ in range(2):
                step()
            done, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                step()
                done += batch_size
            rate = done / (time.perf_counter() - t)
            results.append({"shape": shape, "labels": n_labels, "images_per_s": rate, "text_tower_s": text_s})
            print(f"sweep: {shape}, {n_labels} labels: {rate:.0f} images/s (batch {batch_size}, {dtype}); "
                  f"label embeddings {text_s:.1f} s", flush=True)
        del model
        if not cpu:
            torch.cuda.empty_cache()
    print("| shape | labels | images/s | ratio to 3 labels |\n|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["shape"] == r["shape"] and x["labels"] == 3)["images_per_s"]
        print(f"| {r['shape']} | {r['labels']} | {r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f} |")
    return results


class GpuSampler:
    """Samples ``nvidia-smi --query-gpu=utilization.gpu`` (percent, first GPU) in a thread."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=False).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "n/a (nvidia-smi not available)" if not self.available else "n/a (no samples)"
        return (f"mean {statistics.mean(self.samples):.0f}%, median {statistics.median(self.samples):.0f}%, "
                f"max {max(self.samples):.0f}% over {len(self.samples)} samples")


def write_photos(folder: Path, n: int, size: tuple[int, int], distinct: int = 32, seed: int = 0) -> None:
    """``n`` JPEGs of ``size`` (w, h): ``distinct`` textured pictures, written round-robin."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = []
    for k in range(min(n, distinct)):
        img = np.stack([x / w * 255, y / h * 255, 128 + 100 * np.sin(x / (5.0 + k)) * np.cos(y / (9.0 + k))], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{k:05d}.jpg"
        Image.fromarray(img, "RGB").save(path, quality=90)
        blobs.append(path.read_bytes())
    for i in range(len(blobs), n):
        (folder / f"img_{i:05d}.jpg").write_bytes(blobs[i % len(blobs)])


def scores_by_path(out: Path) -> dict[str, dict[str, float]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(str(out), columns=["path", "labels", "scores", "error"]).to_pylist()
    bad = [r for r in rows if r["error"]]
    if bad:
        raise SystemExit(f"FAIL: {len(bad)} rows have errors, e.g. {bad[0]['path']}: {bad[0]['error']}")
    return {r["path"]: dict(zip(r["labels"], r["scores"])) for r in rows}


def smoke(workdir: Path, gpus: float) -> bool:
    """Tiny checkpoint on the GPU in float16 vs. on the CPU in float32; returns pass/fail."""
    from zslabel import JobConfig, run_label_job
    from zslabel_dev.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(workdir / "tiny_clip", "clip")
    images = workdir / "smoke_images"
    write_photos(images, 64, (160, 120))
    common = {"input": str(images), "labels": LABELS, "model": str(ckpt), "top_k": len(LABELS), "batch_size": 16}
    t0 = time.perf_counter()
    gpu = run_label_job(JobConfig(output=str(workdir / "smoke_gpu"), num_gpus_per_actor=gpus, dtype="auto", **common))
    t_gpu = time.perf_counter() - t0
    cpu = run_label_job(JobConfig(output=str(workdir / "smoke_cpu"), num_gpus_per_actor=0, dtype="float32", **common))
    ok = gpu.labeled == gpu.rows == 64 and cpu.labeled == cpu.rows == 64
    a, b = scores_by_path(workdir / "smoke_gpu"), scores_by_path(workdir / "smoke_cpu")
    diffs = [abs(a[p][label] - b[p][label]) for p in b for label in LABELS]
    worst = max(diffs)
    first = "fp16 GPU" if gpus else "CPU"
    print(f"smoke: {gpu.labeled}/{gpu.rows} labeled with num_gpus_per_actor={gpus:g} in {t_gpu:.1f} s; "
          f"max |score({first}) - score(fp32 CPU)| = {worst:.2e} over {len(diffs)} scores")
    ok = ok and worst <= 1e-2
    if gpus > 0 and worst == 0:
        print("FAIL: float16 scores are bit-identical to float32 CPU ones; the actor did not run in float16 on CUDA")
        ok = False
    return ok


def throughput(workdir: Path, n_images: int, batch_size: int, gpus: float, fast_decode: bool,
               n_labels: int = len(LABELS)) -> None:
    from zslabel import JobConfig, run_label_job
    from zslabel_dev.tiny import VIT_B32_CLIP_CONFIG, build_tiny_checkpoint

    t0 = time.perf_counter()
    ckpt = build_tiny_checkpoint(workdir / "vit_b32", "clip", config=VIT_B32_CLIP_CONFIG)
    images = workdir / "images_640x480"
    write_photos(images, n_images, (640, 480))
    print(f"setup: ViT-B/32-shaped CLIP and {n_images} 640x480 JPEGs in {time.perf_counter() - t0:.1f} s")
    print(f"throughput run: {n_labels} labels")
    config = JobConfig(input=str(images), output=str(workdir / "throughput"), labels=many_labels(n_labels), model=str(ckpt),
                       top_k=5, batch_size=batch_size, num_gpus_per_actor=gpus, num_cpus_per_actor=1,
                       concurrency=(1, 1), dtype="auto", fast_decode=fast_decode, mode="overwrite")
    with GpuSampler() as sampler:
        summary = run_label_job(config)
    timings = json.loads(Path(summary.manifest_path).read_text())["timings"]
    labeling = timings.get("labeling_s") or summary.wall_seconds
    # The one actor's lifetime counts from when its model was loaded: the steady-state rate.
    actor_s = timings.get("model_actor_s") or 0.0
    steady = f"{summary.rows / actor_s:.0f} images/s while the labeler actor was up ({actor_s:.1f} s); " if actor_s else ""
    print(f"throughput: {summary.labeled}/{summary.rows} labeled; {steady}{summary.rows / labeling:.0f} images/s "
          f"over the labeling phase ({labeling:.1f} s, actor start-up included), "
          f"{summary.images_per_second:.0f} images/s over the whole job ({summary.wall_seconds:.1f} s)")
    print(f"GPU utilisation while the job ran: {sampler.summary()}")
    keys = ("bound", "decode_need_s", "model_need_s", "decode_slots", "model_actors", "model_utilisation",
            "decode_ms_per_image", "model_ms_per_image")
    print("stage timings: " + ", ".join(f"{k}={timings[k]}" for k in keys if k in timings))
    print(f"this machine has {os.cpu_count()} cores; decode tasks take {config.decode_cpus_per_task:g} CPU each "
          "(raise --images for a longer, steadier measurement)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="640x480 JPEGs for the throughput run (default 3000)")
    ap.add_argument("--batch-size", type=int, default=256, help="model batch size of the throughput run")
    ap.add_argument("--fast-decode", action="store_true", help="throughput run with JPEG draft decoding")
    ap.add_argument("--sweep-seconds", type=float, default=8.0, help="timed seconds per sweep case (default 8)")
    ap.add_argument("--dir", help="working folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--cpu", action="store_true", help="run without a GPU (checks the script; numbers meaningless)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "nothing to test here. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0
    gpus = 0.0 if args.cpu else 1.0
    if not args.cpu:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="zs-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        ok = smoke(workdir, gpus)
        sweep(workdir, args.batch_size, args.sweep_seconds, args.cpu)
        for n_labels in (3, MANY):
            throughput(workdir, args.images, args.batch_size, gpus, args.fast_decode, n_labels)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
