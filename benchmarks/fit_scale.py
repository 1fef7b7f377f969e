"""`zslabel fit` at scale: N stored embeddings x C labels (default 100,000 x 1,000, D = 512).

Builds, offline, a random-weight CLIP checkpoint whose text tower embeds in 512 dimensions (the
size of ViT-B/32's), a run output laid out as ``zslabel label --store-embeddings`` writes it
(Parquet files of ``path``, ``input_index``, ``labels``, ``scores``, ``error``, ``embedding``
float16, plus a run manifest naming the checkpoint, labels and templates) and a ground-truth CSV
naming every row; then runs ``zslabel fit`` on it in a child process and reports its wall time,
CPU seconds and peak RSS (``os.wait4``'s resource usage: that child alone), with the load average
around it (the machine is shared: CPU seconds say more than wall time under load), and the fit's
figures from the head file (held-out top-1 before/after, strength, learning curve).

``--baseline SRC`` first runs the same fit with another checkout's package (``PYTHONPATH=SRC``,
e.g. ``git archive main zslabel | tar -x -C /tmp/base``) on the same data, so before and after
are measured side by side under the same load; ``--work DIR`` keeps (and reuses) the data.

The embeddings are class-structured so the fit has something to learn: image ``i`` of label
``c`` is ``normalise(0.35 T_c + 0.6 V_c + 0.8 noise)``, ``T_c`` the label's text embedding (the
zero-shot signal; weak here: a random text tower embeds the prompts "label 0001", ... almost
alike) and ``V_c`` a random "visual" direction the text tower does not know (what a head can
learn from examples); ``V_c`` and the noise have a power-law spectrum, as real embeddings do.

    .venv/bin/python benchmarks/fit_scale.py [--rows 100000] [--labels 1000] [--no-learning-curve]
        [--work DIR] [--baseline SRC]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
DIM = 512
ROWS_PER_FILE = 10_000


def build(work: Path, rows: int, n_labels: int, seed: int = 0) -> tuple[Path, Path]:
    """Checkpoint, run output and ground truth under ``work``; returns (run, ground truth)."""
    from zslabel.labels import build_label_set
    from zslabel.model import load_model, checkpoint_digest
    from zslabel_dev.tiny import build_tiny_checkpoint

    config = {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_hidden_layers": 2, "max_position_embeddings": 77},
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
              "projection_dim": DIM}
    ckpt = build_tiny_checkpoint(work / "ckpt", "clip", config=config)
    labels = [f"label {i:04d}" for i in range(n_labels)]
    templates = ["This is a photo of {}."]
    model = load_model(ckpt)
    t = np.asarray(build_label_set(labels, templates, model).embeddings, np.float32)
    rng = np.random.default_rng(seed)
    # CLIP embeddings are far from isotropic: a power-law spectrum (component j ~ j^-0.5 in
    # standard deviation) for the noise and the visual directions, so a low-rank basis holds
    # most of the energy as it does for real embeddings.
    spread = (np.arange(1, DIM + 1) ** -0.5).astype(np.float32)
    visual = rng.standard_normal((n_labels, DIM)).astype(np.float32) * spread
    visual /= np.linalg.norm(visual, axis=1, keepdims=True)
    y = np.arange(rows) % n_labels
    run = work / "run"
    run.mkdir()
    gt_path = work / "gt.csv"
    with open(gt_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for start in range(0, rows, ROWS_PER_FILE):
            yy = y[start:start + ROWS_PER_FILE]
            noise = rng.standard_normal((len(yy), DIM)).astype(np.float32) * spread
            noise /= np.linalg.norm(spread)
            e = 0.35 * t[yy] + 0.6 * visual[yy] + 0.8 * noise
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            paths = [f"{run}/img/{start + i:07d}.jpg" for i in range(len(yy))]
            emb = pa.FixedSizeListArray.from_arrays(pa.array(e.astype(np.float16).ravel()), DIM)
            table = pa.table({"path": paths, "input_index": np.arange(start, start + len(yy), dtype=np.int64),
                              "labels": pa.array([[labels[c]] for c in yy], pa.list_(pa.string())),
                              "scores": pa.array([[0.5]] * len(yy), pa.list_(pa.float32())),
                              "error": pa.nulls(len(yy), pa.string()), "embedding": emb})
            pq.write_table(table, run / f"part-{start // ROWS_PER_FILE:05d}.parquet")
            w.writerows([p, labels[c]] for p, c in zip(paths, yy))
    manifest = {"labels": labels, "templates": templates,
                "model": {"id": str(ckpt), "revision": None, "digest": checkpoint_digest(ckpt),
                          "score_kind": "softmax"}}
    (run / "_run_manifest.json").write_text(json.dumps(manifest))
    return run, gt_path


def fit_once(work: Path, run: Path, gt: Path, src: str | None, learning_curve: bool, name: str) -> dict:
    """``zslabel fit`` in a child process (``src``: the package's checkout, None = this one)."""
    from zslabel.heads import load_head

    head_path = work / f"head-{name}.safetensors"
    cmd = [sys.executable, "-m", "zslabel", "fit", str(run), "--ground-truth", str(gt),
           "--output", str(head_path)] + ([] if learning_curve else ["--no-learning-curve"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", ZSLABEL_CACHE=str(work / "cache"))
    if src:
        env["PYTHONPATH"] = src
    load = os.getloadavg()[0]
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=src or ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t1
    code = os.waitstatus_to_exitcode(status)
    out = {"version": name, "exit": code, "fit_wall_s": round(wall, 1),
           "fit_cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
           "load_avg_1min_before": round(load, 1), "load_avg_1min_after": round(os.getloadavg()[0], 1)}
    if code == 0:
        fit = load_head(str(head_path)).fit
        m = fit.get("metrics") or {}
        out.update(top1_zero_shot=m.get("before", {}).get("top1"), top1_head=m.get("after", {}).get("top1"),
                   lam=(fit.get("split_params") or {}).get("lam"),
                   curve=[(r["shots"], round(r["top1"], 4), r["lam"]) for r in fit.get("learning_curve") or []])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--labels", type=int, default=1_000)
    ap.add_argument("--no-learning-curve", action="store_true")
    ap.add_argument("--work", help="folder for the data (default: a temporary one); reused when it holds them")
    ap.add_argument("--baseline", metavar="SRC", help="also run the fit with the zslabel package under SRC, first")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="zslabel-fit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    run, gt = work / "run", work / "gt.csv"
    if not (run / "_run_manifest.json").exists():
        t0 = time.perf_counter()
        run, gt = build(work, args.rows, args.labels)
        print(f"built {args.rows} x {args.labels} (D = {DIM}) in {time.perf_counter() - t0:.1f} s under {work}",
              flush=True)
    print(json.dumps({"rows": args.rows, "labels": args.labels, "dim": DIM, "cpus": os.cpu_count(),
                      "learning_curve": not args.no_learning_curve}), flush=True)
    code = 0
    for name, src in ([("baseline", os.path.abspath(args.baseline))] if args.baseline else []) + [("this", None)]:
        res = fit_once(work, run, gt, src, not args.no_learning_curve, name)
        print(json.dumps(res), flush=True)
        code = code or res["exit"]
    return code


if __name__ == "__main__":
    sys.exit(main())
