"""Benchmark: images/s of `zslabel label` against the transformers pipeline and the model-bound limit.

One run measures, side by side, on the same photo-like JPEGs (640x480 and 1920x1080 by default)
and the same ViT-B/32-shaped CLIP (the real architecture with random weights, built offline,
with real CLIP token counts for the prompts: see ``add_word_tokens``):

  (a) reference  ``transformers.pipeline("zero-shot-image-classification")`` called once per
                 image path with the candidate labels (the usage its documentation shows);
  (b) batched    the same pipeline given the whole list of paths with ``batch_size``;
  (c) limit      one process, no Ray: read + decode (``zslabel.decode``, a thread per core) +
                 batched forward (``ZeroShotModel.encode_images``, torch threads = cores) +
                 logits/softmax/top-k against precomputed label embeddings, in a tight loop;
                 (c1) is the same loop with one torch thread, which can be faster on a machine
                 busy with other work (intra-op threads then wait for each other);
  (d) zslabel    ``python -m zslabel label --address local`` in a subprocess: Parquet written,
                 a fresh local Ray started by the CLI. Reported two ways: ``labeling_s`` from
                 the run manifest (the Ray Data stream: labeler actor start-up + decode + model +
                 Parquet writes) and the CLI wall (Python and Ray start, driver model load,
                 label embeddings, labeling, counting, manifest).

Ratios ``d/a``, ``d/b``, ``d/c`` use ``labeling_s`` (start-up of the actors included, once);
``d cli/a`` uses the CLI wall. Every method runs in its own subprocess, at the same priority
(Ray's workers normally run at nice 15, see ``ENV``), and the peak memory of that process tree
(the process and all its descendants: Ray's GCS, raylet, dashboard and workers) is sampled with
psutil every 0.2 s: "RSS sum" adds the RSS of all processes (pages shared between them, e.g.
Ray's object store and the torch libraries, count once per process: an upper bound), "PSS"
shares them out (sampled every 1 s).

Label sets: 3 labels and 1,000 labels ("label 0" .. "label 999"). With 1,000 labels the
reference re-encodes the 1,000 prompts per call (per image; batched: per batch of images), so
(a) runs on ``--ref-images-many`` images and (b) on one batch; images/s is measured on those.

Usage:
  python benchmarks/throughput.py --n 300 --out bench_out/
  python benchmarks/throughput.py --memory-scaling --out bench_out/     # 2,000 vs 20,000 images
  python benchmarks/throughput.py --device cuda --out bench_out/        # GPU, fp16
  python benchmarks/throughput.py --n 320 --sizes 640x480 --labels 3 --methods c,d \\
      --variant "2x1thread:--num-cpus-per-actor 0.5 --concurrency 2"   # extra (d) configurations

Writes ``OUT/throughput.json`` (or ``OUT/memory_scaling.json``) and prints the same as a table.
Images and checkpoints are cached under OUT and reused. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Offline, no telemetry, a private local Ray per CLI run: set before anything imports Ray or HF.
# Ray starts its workers at nice 15 by default (``RAY_worker_niceness``): on a machine shared with
# other work that starves (d)'s decode tasks and actors next to (a)-(c), which run at nice 0; the
# same priority for every method keeps the comparison fair (no effect on an idle machine).
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
       "RAY_worker_niceness": "0"}
os.environ.update(ENV)
os.environ.pop("RAY_ADDRESS", None)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS_FEW = ["cat", "dog", "bird"]


def label_set(n: int) -> list[str]:
    """The benchmark's label names: 3 animal names, or "label 0" .. "label {n-1}"."""
    return LABELS_FEW[:n] if n <= len(LABELS_FEW) else [f"label {i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Inputs


def photo_array(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 photo-like picture: the formula of ``tests/conftest.py::photo`` (gradients,
    a sine texture, Gaussian noise of sigma 10), in float32 and with the texture as an outer
    product so a 1920x1080 frame takes tens of milliseconds."""
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = x[None, :] / max(w - 1, 1) * 255
    img[..., 1] = y[:, None] / max(h - 1, 1) * 255
    img[..., 2] = 128 + 100 * np.outer(np.cos(y / 11.0), np.sin(x / (7.0 + seed % 13)))
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * 10
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, w: int, h: int, distinct: int | None = None) -> list[Path]:
    """``n`` JPEGs (quality 90) of ``w`` x ``h`` in ``folder`` (kept when already complete).

    ``distinct`` limits the number of different pictures (files cycle through them), for the
    memory-scaling mode's 20,000 files.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:06d}.jpg" for i in range(n)]
    done = folder.parent / f".{folder.name}.complete"  # outside: the job would count it as skipped
    if done.exists():
        return paths
    encoded: dict[int, bytes] = {}
    for i, p in enumerate(paths):
        key = i if distinct is None else i % distinct
        if key not in encoded:
            buf = io.BytesIO()
            Image.fromarray(photo_array(w, h, key)).save(buf, "JPEG", quality=90)
            encoded[key] = buf.getvalue()
            if distinct is None:
                p.write_bytes(encoded.pop(key))
                continue
        p.write_bytes(encoded[key])
    done.write_text("ok")
    return paths


# A 224-pixel CLIP about 9x cheaper than ViT-B/32 (4 layers of width 192, 16-pixel patches) for
# the memory-scaling mode: the model is still ~5x slower than decoding a 320x240 JPEG, so decoded
# blocks would pile up if nothing bounded them, while 20,000 images take minutes, not an hour.
SMALL224_CLIP_CONFIG = {
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2,
                    "num_hidden_layers": 2, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 3,
                      "num_hidden_layers": 4, "image_size": 224, "patch_size": 16},
    "projection_dim": 64,
}


def build_checkpoint(out: Path, kind: str) -> Path:
    """The benchmark checkpoint, built once under ``out`` (random weights, offline): ``vitb32`` =
    the ViT-B/32 CLIP architecture with word tokens for the prompt words (``add_word_tokens``);
    ``small224`` = ``SMALL224_CLIP_CONFIG``."""
    path = out / f"ckpt_{kind}"
    if (path / ".complete").exists():
        return path
    config = "VIT_B32_CLIP_CONFIG" if kind == "vitb32" else json.dumps(SMALL224_CLIP_CONFIG)
    code = ("import sys; from zslabel_dev.tiny import build_tiny_checkpoint, VIT_B32_CLIP_CONFIG; "
            f"build_tiny_checkpoint(sys.argv[1], 'clip', config={config})")
    if kind == "vitb32":
        code += "; import benchmarks.throughput as t; t.add_word_tokens(sys.argv[1], t.PROMPT_WORDS)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (path / ".complete").write_text("ok")
    return path


# Every word of the benchmark's prompts ("This is a photo of {label}.", lower-cased as CLIP does).
PROMPT_WORDS = ["this", "is", "a", "photo", "of", "label"] + LABELS_FEW


def add_word_tokens(path: str | Path, words: list[str]) -> None:
    """Give the offline checkpoint's tokenizer one BPE token per word in ``words``.

    ``zslabel_dev.tiny`` writes a character-level tokenizer: "This is a photo of cat." would be 20
    tokens where the real CLIP tokenizer makes 9, so the reference pipeline, which runs the text
    tower on every call, would pay ~2x the real text cost. Adding merges for the prompt words
    (CLIP's BPE format: ``end_of_word_suffix`` "</w>") restores the real token counts (digits
    stay single tokens, as in CLIP); the new rows of the token embedding are random like the rest.
    """
    import torch
    from transformers import CLIPModel

    path = Path(path)
    tok_path = path / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            if [cur, nxt] not in merges:
                merges.append([cur, nxt])
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    tok_path.write_text(json.dumps(tok))
    model = CLIPModel.from_pretrained(path)
    old = model.text_model.embeddings.token_embedding
    new = torch.nn.Embedding(len(vocab), old.embedding_dim)
    with torch.no_grad():
        new.weight.normal_(0, 0.02)
        new.weight[:old.num_embeddings] = old.weight
    model.text_model.embeddings.token_embedding = new
    model.config.text_config.vocab_size = len(vocab)
    model.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Memory of a process tree


class TreeMemory:
    """Samples the summed RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) of a
    process and all its descendants in a background thread; ``peak_rss``/``peak_pss`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.peak_breakdown: dict[str, float] = {}  # MB of PSS per process name at the PSS peak
        self.peak_by_kind: dict[str, float] = {}    # MB: each kind's own peak of summed PSS (see process_kind)
        # CPU seconds (user + system) of each process as last sampled, with its kind: where the
        # cores went. A process's last < interval s before it exits is not counted.
        self._cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds (user + system) per process kind over the run (see ``process_kind``)."""
        out: dict[str, float] = {}
        for kind, seconds in self._cpu.values():
            out[kind] = out.get(kind, 0.0) + seconds
        return dict(sorted(out.items()))

    def _procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return []

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            procs = self._procs()
            rss = pss = 0
            names: dict[str, float] = {}
            kinds: dict[str, float] = {}
            for p in procs:
                try:
                    if i % self.pss_every == 0:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += getattr(info, "pss", info.rss)
                        name = (p.cmdline() or [p.name()])[0].rsplit("/", 1)[-1]
                        if name.startswith("python"):
                            name = " ".join(p.cmdline()[1:3])[-40:]
                        names[name] = names.get(name, 0) + getattr(info, "pss", info.rss) / 2**20
                        kind = process_kind(p, self.root.pid)
                        kinds[kind] = kinds.get(kind, 0) + getattr(info, "pss", info.rss) / 2**20
                    else:
                        rss += p.memory_info().rss
                    t = p.cpu_times()
                    known = self._cpu.get(p.pid)
                    self._cpu[p.pid] = (known[0] if known else process_kind(p, self.root.pid), t.user + t.system)
                except self._psutil.Error:
                    pass  # exited between listing and reading
            self.peak_rss = max(self.peak_rss, rss)
            for k, v in kinds.items():
                self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0.0), v)
            if pss > self.peak_pss:
                self.peak_pss = pss
                self.peak_breakdown = dict(sorted(names.items(), key=lambda kv: -kv[1])[:8])
            self.peak_procs = max(self.peak_procs, len(procs))
            i += 1
            self._stop.wait(self.interval)


def process_kind(p, root_pid: int) -> str:
    """Which part of a zslabel run a process is: driver (the CLI), labeler actors, decode/other
    Ray workers, raylet, gcs, or ray-other (dashboard, agents, log monitor)."""
    if p.pid == root_pid:
        return "driver"
    cmd = " ".join(p.cmdline()[:3])
    if "raylet" in cmd:
        return "raylet"
    if "gcs_server" in cmd:
        return "gcs"
    title = p.cmdline()[0] if p.cmdline() else p.name()
    if "Labeler" in title:
        return "labeler actors"
    if title.startswith("ray::") and "Agent" not in title:
        return "ray workers (decode, write)"
    if "default_worker.py" in cmd:
        return "ray workers (decode, write)"
    return "ray other"


def run_measured(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run ``cmd`` (cwd = repo root), sampling its process tree's memory; returns wall, rc, peaks."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # Own process group: on timeout or Ctrl-C the command and everything it started (a local
        # Ray's GCS, raylet and workers) are stopped together.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:
                _stop_tree(proc)
                raise
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed (rc={rc}): {shlex.join(cmd)}\n--- log tail ---\n{tail}")
    return {"cli_wall_s": wall, "peak_rss_mb": mem.peak_rss / 2**20, "peak_pss_mb": mem.peak_pss / 2**20,
            "peak_processes": mem.peak_procs,
            "peak_pss_by_process_mb": {k: round(v, 1) for k, v in mem.peak_breakdown.items()},
            "peak_pss_by_kind_mb": {k: round(v, 1) for k, v in sorted(mem.peak_by_kind.items())},
            "cpu_s_by_kind": {k: round(v, 1) for k, v in mem.cpu_by_kind.items()}}


def _stop_tree(proc: subprocess.Popen) -> None:
    """Terminate ``proc``'s process group and any descendant that left it; wait for the command."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        procs = []
    try:
        os.killpg(proc.pid, 15)
    except OSError:
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def run_child(method: str, params: dict, out: Path, timeout: float) -> dict:
    """Run ``method`` (a, b or c) of this file in a fresh subprocess; its JSON result + memory."""
    tag = params["tag"]
    result_path = out / f"result_{method}_{tag}.json"
    result_path.unlink(missing_ok=True)
    params_path = out / f"params_{method}_{tag}.json"
    params_path.write_text(json.dumps(dict(params, result=str(result_path))))
    mem = run_measured([sys.executable, __file__, "--_child", method, str(params_path)],
                       out / f"log_{method}_{tag}.txt", timeout)
    result = json.loads(result_path.read_text())
    result.update(peak_rss_mb=mem["peak_rss_mb"], peak_pss_mb=mem["peak_pss_mb"])
    return result


# ---------------------------------------------------------------------------------------------
# (a), (b), (c): run inside a child process


def _device_dtype(device: str):
    import torch

    return (torch.device("cuda"), torch.float16) if device == "cuda" else (torch.device("cpu"), torch.float32)


def child_reference(p: dict) -> dict:
    """(a) one pipeline call per image path, or (b) one call over all paths with ``batch_size``."""
    import torch
    from transformers import pipeline

    device, dtype = _device_dtype(p["device"])
    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    clf = pipeline("zero-shot-image-classification", model=p["ckpt"], device=device, dtype=dtype)
    labels = label_set(p["labels"])
    paths = p["paths"]
    clf(paths[0], candidate_labels=labels[:3])  # warm-up (lazy initialisation), not re-timing 1,000 prompts
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if p["batched"]:
        out = clf(paths, candidate_labels=labels, batch_size=p["batch_size"])
    else:
        out = [clf(path, candidate_labels=labels) for path in paths]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert len(out) == len(paths)
    return {"images": len(paths), "seconds": dt, "images_per_s": len(paths) / dt,
            "torch_threads": torch.get_num_threads()}


def child_limit(p: dict) -> dict:
    """(c) read + decode (a thread per core) + batched forward + scores, in one process.

    Also decodes every image with the other decode path (fast vs exact) afterwards, untimed in
    the loop, to report the decode cost of both and the top-1 agreement between them.
    """
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from zslabel.decode import decode_image
    from zslabel.model import load_model
    from zslabel.ranking import scores_from_logits, zero_shot_logits

    device, dtype = _device_dtype(p["device"])
    cores = os.cpu_count() or 1
    torch.set_num_threads(p.get("threads") or cores)
    model = load_model(p["ckpt"], device=str(device), dtype=dtype)
    spec = dataclasses.replace(model.preprocess, fast=p["fast"])
    other = dataclasses.replace(spec, fast=not p["fast"])
    label_embs = {}
    for n in p["label_sets"]:
        prompts = [f"This is a photo of {name}." for name in label_set(n)]
        label_embs[n] = torch.from_numpy(model.encode_texts(prompts)).to(device)
    scale, bias = model.logit_scale, model.logit_bias
    paths, bs = p["paths"], p["batch_size"]
    pool = ThreadPoolExecutor(cores)

    def decode_one(path, s):
        t = time.perf_counter()
        with open(path, "rb") as f:
            r = decode_image(f.read(), s)
        assert r.error is None, r.error
        return r.pixels, time.perf_counter() - t

    def forward(pixels):
        emb = model.encode_images(pixels)
        top1 = {}
        for n, lab in label_embs.items():
            scores = scores_from_logits(zero_shot_logits(emb, lab, scale, bias), model.score_kind)
            top1[n] = torch.topk(scores, min(5, n), dim=1).indices[:, 0].cpu().numpy()
        return top1

    forward(np.stack([decode_one(paths[0], spec)[0]] * min(bs, 4)))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_decode = t_model = decode_cpu = 0.0
    top1 = {n: [] for n in label_embs}
    t0 = time.perf_counter()
    for i in range(0, len(paths), bs):
        t = time.perf_counter()
        decoded = list(pool.map(lambda q: decode_one(q, spec), paths[i:i + bs]))
        t_decode += time.perf_counter() - t
        decode_cpu += sum(d for _, d in decoded)
        t = time.perf_counter()
        for n, idx in forward(np.stack([px for px, _ in decoded])).items():
            top1[n].append(idx)  # includes the device sync of .cpu()
        t_model += time.perf_counter() - t
    dt = time.perf_counter() - t0
    n_img = len(paths)

    # Other decode path: decode cost (single image at a time, same threads) and top-1 agreement.
    agree_n = min(p["agree_n"], n_img)
    other_cpu, agree, mad = 0.0, {n: 0 for n in label_embs}, []
    for i in range(0, agree_n, bs):
        chunk = paths[i:min(i + bs, agree_n)]
        dec_other = list(pool.map(lambda q: decode_one(q, other), chunk))
        dec_main = list(pool.map(lambda q: decode_one(q, spec), chunk))
        other_cpu += sum(d for _, d in dec_other)
        mad += [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
                for (a, _), (b, _) in zip(dec_other, dec_main)]
        for n, idx in forward(np.stack([px for px, _ in dec_other])).items():
            agree[n] += int((idx == np.concatenate(top1[n])[i:i + len(chunk)]).sum())
    pool.shutdown()
    per = {"fast" if spec.fast else "exact": decode_cpu / n_img * 1e3,
           "fast" if other.fast else "exact": other_cpu / max(agree_n, 1) * 1e3}
    return {"images": n_img, "seconds": dt, "images_per_s": n_img / dt, "torch_threads": torch.get_num_threads(),
            "decode_threads": cores, "decode_path": "fast" if spec.fast else "exact",
            "decode_wall_ms_per_image": t_decode / n_img * 1e3, "model_wall_ms_per_image": t_model / n_img * 1e3,
            "decode_cpu_ms_per_image": per,
            "fast_vs_exact": {"images": agree_n, "mean_abs_pixel_diff": float(np.mean(mad)) if mad else None,
                              "top1_agreement": {str(n): agree[n] / max(agree_n, 1) for n in agree}}}


def child_bare(p: dict) -> dict:
    """(e) the bare decode-bound loop: one process, one torch thread, per image read + decode +
    resize (``zslabel.decode``), and per batch forward + softmax + top-k."""
    import torch

    from zslabel.decode import decode_image
    from zslabel.model import load_model
    from zslabel.ranking import scores_from_logits, top_k, zero_shot_logits

    torch.set_num_threads(1)
    model = load_model(p["ckpt"])
    labels = torch.from_numpy(model.encode_texts([f"This is a photo of {n}." for n in label_set(p["labels"])]))
    scale, bias, bs = model.logit_scale, model.logit_bias, p["batch_size"]

    def forward(pixels):
        emb = model.encode_images(np.stack(pixels))
        return top_k(scores_from_logits(zero_shot_logits(emb, labels, scale, bias), model.score_kind), 5)

    paths = p["paths"]
    forward([decode_image(open(paths[0], "rb").read(), model.preprocess).pixels])  # warm-up
    t0 = time.perf_counter()
    batch = []
    for path in paths:
        with open(path, "rb") as f:
            r = decode_image(f.read(), model.preprocess)
        batch.append(r.pixels)
        if len(batch) == bs:
            forward(batch)
            batch = []
    if batch:
        forward(batch)
    dt = time.perf_counter() - t0
    return {"images": len(paths), "seconds": dt, "images_per_s": len(paths) / dt}


def child_main(method: str, params: dict) -> None:
    result = (child_reference(params) if method in ("a", "b") else child_bare(params) if method == "e"
              else child_limit(params))
    Path(params["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# (d): the CLI


def run_zslabel(folder: Path, ckpt: Path, labels: int, out: Path, tag: str, extra: list[str],
                device: str, timeout: float) -> dict:
    """``python -m zslabel label FOLDER`` into ``OUT/parquet_TAG``; CLI wall, manifest timings, memory."""
    dest = out / f"parquet_{tag}"
    shutil.rmtree(dest, ignore_errors=True)  # a fresh output each run (no --overwrite staging)
    labels_file = out / f"labels_{labels}.txt"
    labels_file.write_text("\n".join(label_set(labels)) + "\n")
    # --address local: a fresh Ray for this run. Without it ray.init() joins any cluster that
    # `ray start` left running on this machine, whose workers are not this command's children.
    cmd = [sys.executable, "-m", "zslabel", "label", str(folder), "--model", str(ckpt),
           "--labels-file", str(labels_file), "--output", str(dest), "--address", "local"]
    if device == "cuda":
        cmd += ["--num-gpus-per-actor", "1"]
    cmd += extra
    for attempt in range(3):
        try:
            mem = run_measured(cmd, out / f"log_d_{tag}.txt", timeout)
            break
        except RuntimeError as exc:
            # A machine under heavy load can miss Ray's start-up deadline: retry, not a result.
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            log("    Ray start-up timed out (machine busy); retrying")
            shutil.rmtree(dest, ignore_errors=True)
    manifest = json.loads((dest / "_run_manifest.json").read_text())
    rows = manifest["counts"]["rows"]
    assert manifest["counts"]["labeled"] == rows, manifest["counts"]
    timings = manifest["timings"]
    result = dict(mem, images=rows, timings=timings, actor_pool=manifest.get("actor_pool"),
                  config={k: manifest["config"].get(k) for k in
                          ("batch_size", "num_cpus_per_actor", "decode_cpus_per_task", "fast_decode",
                           "num_gpus_per_actor", "concurrency")},
                  images_per_s=rows / timings["labeling_s"], cli_images_per_s=rows / mem["cli_wall_s"])
    # Ray Data's own account of the object store in use (its progress lines), the in-flight data.
    used = [float(m) * {"B": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 1024}[u] for m, u in re.findall(
        r"Active & requested resources: .*?([\d.]+)(B|KiB|MiB|GiB)/[\d.]+\w+ object store",
        (out / f"log_d_{tag}.txt").read_text(errors="replace"))]
    result["peak_object_store_mb"] = max(used, default=None)
    result["steady_images_per_s"] = steady_rate(dest)
    # What the labeler actors sustain while busy (start-up and the last blocks' tail excluded):
    # actors x (1000 / busy ms per image and actor). The CPU default and --concurrency N start
    # the whole pool (pipeline.initial_actors), so the pool's maximum is the number of actors.
    ms = timings.get("model_ms_per_image")
    result["busy_images_per_s"] = (manifest["actor_pool"][1] * 1000 / ms
                                   if ms and manifest.get("actor_pool") and device != "cuda" else None)
    # zslabel.stages.actor_threads: a CPU actor runs ceil(CPUs it holds) torch threads.
    cpus = result["config"]["num_cpus_per_actor"]
    result["actor_threads"] = None if device == "cuda" else max(1, math.ceil(cpus - 1e-6))
    return result


def committed_rows(dest: Path) -> tuple[np.ndarray, np.ndarray]:
    """(modification time of each committed Parquet file in commit order, cumulative rows)."""
    import pyarrow.parquet as pq

    files = sorted(dest.rglob("part-*.parquet"), key=lambda f: f.stat().st_mtime)
    stamps = np.array([f.stat().st_mtime for f in files])
    return stamps, np.cumsum([pq.ParquetFile(f).metadata.num_rows for f in files])


def rate_between(stamps: np.ndarray, rows: np.ndarray, lo: float, hi: float) -> float | None:
    """Rows/s committed between the moments the output first held ``lo`` and ``hi`` of its rows."""
    if len(rows) < 2:
        return None
    n = rows[-1]

    def t_at(frac):
        return stamps[min(len(rows) - 1, int(np.searchsorted(rows, frac * n)))]

    dt = t_at(hi) - t_at(lo)
    return (hi - lo) * n / dt if dt > 0 else None


def steady_rate(dest: Path) -> float | None:
    """zslabel's steady state: rows/s committed between 20 % and 90 % of the run's rows, so the
    labeler actors' start-up (before the first commit) and the last blocks' tail are left out.
    None with fewer than 5 committed files (see ``d_rows_per_file``)."""
    stamps, rows = committed_rows(dest)
    return rate_between(stamps, rows, 0.2, 0.9) if len(rows) >= 5 else None


def d_rows_per_file(n: int) -> list[str]:
    """``--rows-per-file`` giving ~20 committed files for ``n`` images, enough commit times for
    ``steady_rate`` (a file every few seconds; the default 1,024 rows gives one file for 1,000)."""
    return ["--rows-per-file", str(max(16, n // 20))]


# ---------------------------------------------------------------------------------------------
# Orchestration


def machine() -> dict:
    """What the numbers were measured on."""
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()}


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (least disturbed by other load), with every rate kept."""
    best = dict(max(runs, key=lambda r: r["images_per_s"]))
    best["all_images_per_s"] = [r["images_per_s"] for r in runs]
    return best


def _ratio(x: dict | None, y: dict | None, key: str = "images_per_s") -> float | None:
    return x[key] / y["images_per_s"] if x and y else None


def throughput(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ckpt = build_checkpoint(out, "vitb32")
    variants = [("default", [])] + [(v.split(":", 1)[0], shlex.split(v.split(":", 1)[1])) for v in args.variant]
    common = (["--batch-size", str(args.d_batch_size)] if args.d_batch_size else []) + d_rows_per_file(args.n)
    if args.fast_decode:
        common.append("--fast-decode")
    report = {"machine": machine(), "args": vars(args), "checkpoint": "ViT-B/32 CLIP shape, random weights",
              "results": []}
    for size in args.sizes:
        w, h = parse_size(size)
        folder = out / f"images_{w}x{h}_{args.n}"
        paths = [str(p) for p in write_images(folder, args.n, w, h)]
        base = {"ckpt": str(ckpt), "device": args.device, "batch_size": args.batch_size}
        rows = {n: {"size": size, "labels": n, "a": None, "b": None, "c": None, "d": {}} for n in args.labels}
        c_runs, c1_runs, d_runs = [], [], {(n, name): [] for n in args.labels for name, _ in variants}
        # c and d alternate, repeated, so that both see the same mix of outside load.
        for rep in range(args.repeat):
            if "c" in args.methods:
                log(f"[{size}] (c) model-bound limit on {len(paths)} images (run {rep + 1})")
                c_runs.append(run_child("c", dict(base, tag=f"{size}", paths=paths, label_sets=args.labels,
                                                  fast=args.fast_decode, agree_n=args.agree_n if rep == 0 else 0),
                                        out, args.timeout))
                log(f"    {c_runs[-1]['images_per_s']:.2f} images/s")
                if args.device == "cpu" and (os.cpu_count() or 1) > 1:
                    # The same loop with one torch thread: on a machine shared with other work,
                    # intra-op threads wait for each other and one thread can be faster.
                    log(f"[{size}] (c1) the same with 1 torch thread (run {rep + 1})")
                    c1_runs.append(run_child("c", dict(base, tag=f"{size}_1thread", paths=paths,
                                                       label_sets=args.labels, fast=args.fast_decode,
                                                       agree_n=0, threads=1), out, args.timeout))
                    log(f"    {c1_runs[-1]['images_per_s']:.2f} images/s")
            if "d" in args.methods:
                for n_labels in args.labels:
                    for name, extra in variants:
                        log(f"[{size}, {n_labels} labels] (d) zslabel label, variant {name} "
                            f"{shlex.join(common + extra)} (run {rep + 1})")
                        d = run_zslabel(folder, ckpt, n_labels, out, f"{size}_{n_labels}_{name}", common + extra,
                                        args.device, args.timeout)
                        d_runs[n_labels, name].append(d)
                        log(f"    labeling {d['images_per_s']:.2f} images/s, CLI wall {d['cli_wall_s']:.1f} s, "
                            f"model {d['timings'].get('model_ms_per_image')} ms/img/actor")
        limit = _best(c_runs) if c_runs else None
        if limit and c_runs[0].get("fast_vs_exact"):
            limit["fast_vs_exact"] = c_runs[0]["fast_vs_exact"]
            limit["decode_cpu_ms_per_image"] = c_runs[0]["decode_cpu_ms_per_image"]
        limit1 = _best(c1_runs) if c1_runs else None
        best_c = max((x for x in (limit, limit1) if x), key=lambda x: x["images_per_s"], default=None)
        for n_labels in args.labels:
            row = rows[n_labels]
            row["c"], row["c1"] = limit, limit1
            many = n_labels > 100
            tag = f"{size}_{n_labels}"
            for method, batched in (("a", False), ("b", True)):
                if method not in args.methods:
                    continue
                ref_paths = (paths[:args.batch_size] if batched else paths[:args.ref_images_many]) if many else paths
                runs = []
                for threads in args.ref_threads:
                    log(f"[{size}, {n_labels} labels] ({method}) pipeline {'batched' if batched else 'per image'} "
                        f"on {len(ref_paths)} images, torch threads {threads or 'default'}")
                    runs.append(run_child(method, dict(base, tag=f"{tag}_t{threads}", paths=ref_paths, labels=n_labels,
                                                       batched=batched, threads=threads), out, args.timeout))
                    log(f"    {runs[-1]['images_per_s']:.3f} images/s")
                # The faster thread setting is the reference: ratios against it are the conservative ones.
                row[method] = _best(runs)
                row[method]["by_threads"] = {r["torch_threads"]: r["images_per_s"] for r in runs}
            for name, _ in variants:
                if not d_runs[n_labels, name]:
                    continue
                d = row["d"][name] = _best(d_runs[n_labels, name])
                d["ratios"] = {"d/a": _ratio(d, row["a"]), "d/b": _ratio(d, row["b"]), "d/c": _ratio(d, limit),
                               "d/c_best": _ratio(d, best_c), "d_cli/a": _ratio(d, row["a"], "cli_images_per_s"),
                               "d_busy/c": _ratio(d, limit, "busy_images_per_s") if d.get("busy_images_per_s")
                               else None,
                               "d_steady/c": _ratio(d, limit, "steady_images_per_s") if d.get("steady_images_per_s")
                               else None,
                               "d_steady/c_best": _ratio(d, best_c, "steady_images_per_s")
                               if d.get("steady_images_per_s") else None}
            report["results"].append(row)
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_seconds"] = time.perf_counter() - t_start
    (out / "throughput.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB; load average (1, 5, 15 min) at start "
          f"{m['load_avg_at_start']}, at end {m.get('load_avg_at_end')}; device {report['args']['device']}; "
          f"best of {report['args']['repeat']} for c and d")
    print("images/s. d = rows / labeling_s of the run manifest (the Ray Data stream, actor start-up included); "
          "d steady = rows/s committed between 20 % and 90 % of the rows (output file times; start-up and tail "
          "left out); "
          "d busy = what the labeler actors sustain while busy (manifest model_ms_per_image); "
          "d cli = rows / whole CLI wall (Python and Ray start, model load, label embeddings, labeling, "
          "counting). Ratios d/x use d = labeling_s; 'd cli/a' uses the CLI wall.\n")
    hdr = ("size", "labels", "variant", "a", "b", "c", "c1", "d", "d steady", "d busy", "d cli", "d/a", "d/b",
           "d/c", "d/max(c,c1)", "d steady/c", "d steady/max(c,c1)", "d busy/c",
           "d cli/a", "peak MB a", "b", "c", "d (RSS sum)", "d (PSS)")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in report["results"]:
        a, b, c, c1 = r["a"], r["b"], r["c"], r.get("c1")
        for name, d in (r["d"] or {"-": None}).items():
            ra = d["ratios"] if d else {}
            print("| " + " | ".join([
                r["size"], str(r["labels"]), name, _f(a and a["images_per_s"], ".3f"), _f(b and b["images_per_s"], ".3f"),
                _f(c and c["images_per_s"], ".2f"), _f(c1 and c1["images_per_s"], ".2f"),
                _f(d and d["images_per_s"], ".2f"), _f(d and d.get("steady_images_per_s"), ".2f"),
                _f(d and d.get("busy_images_per_s"), ".2f"),
                _f(d and d["cli_images_per_s"], ".2f"),
                _f(ra.get("d/a"), ".1f"), _f(ra.get("d/b"), ".1f"), _f(ra.get("d/c"), ".2f"),
                _f(ra.get("d/c_best"), ".2f"), _f(ra.get("d_steady/c"), ".2f"), _f(ra.get("d_steady/c_best"), ".2f"),
                _f(ra.get("d_busy/c"), ".2f"), _f(ra.get("d_cli/a"), ".1f"),
                _f(a and a["peak_rss_mb"], ".0f"), _f(b and b["peak_rss_mb"], ".0f"), _f(c and c["peak_rss_mb"], ".0f"),
                _f(d and d["peak_rss_mb"], ".0f"), _f(d and d["peak_pss_mb"], ".0f")]) + " |")
    print()
    for r in report["results"]:
        for m in ("a", "b"):
            if r[m]:
                print(f"{r['size']}, {r['labels']} labels: ({m}) on {r[m]['images']} images, images/s by torch "
                      f"threads {r[m].get('by_threads')}")
        for name, d in r["d"].items():
            t = d["timings"]
            print(f"{r['size']}, {r['labels']} labels, d {name}: config {d['config']}, actor pool {d['actor_pool']}, "
                  f"torch threads {d.get('actor_threads')}; labeling {t['labeling_s']:.1f} s, model+labels "
                  f"{t['model_and_labels_s']:.1f} s, CLI wall {d['cli_wall_s']:.1f} s; model "
                  f"{_f(t.get('model_ms_per_image'), '.0f')} ms/img/actor, utilisation {t.get('model_utilisation')}, "
                  f"bound {t.get('bound')}; runs {[round(x, 2) for x in d['all_images_per_s']]}")
    seen = set()
    for r in report["results"]:
        c = r["c"]
        if not c or r["size"] in seen:
            continue
        seen.add(r["size"])
        fe = c["fast_vs_exact"]
        print(f"{r['size']}: (c) per image: decode {c['decode_wall_ms_per_image']:.1f} ms wall "
              f"({c['decode_threads']} threads; one-thread decode ms/img: "
              + ", ".join(f"{k} {v:.1f}" for k, v in c["decode_cpu_ms_per_image"].items())
              + f"), model {c['model_wall_ms_per_image']:.1f} ms ({c['torch_threads']} torch threads); "
              f"runs {[round(x, 2) for x in c['all_images_per_s']]}"
              + (f"; c1 (1 torch thread) model {r['c1']['model_wall_ms_per_image']:.1f} ms/img" if r.get("c1") else "")
              + f"; fast vs exact over {fe['images']} images: "
              f"mean |pixel diff| {_f(fe['mean_abs_pixel_diff'], '.2f')}, top-1 agreement "
              + ", ".join(f"{k} labels {v:.1%}" for k, v in fe["top1_agreement"].items()))
    print(f"total {report['total_seconds']:.0f} s")


def memory_scaling(args) -> dict:
    """Peak process-tree memory of (d) at each of ``--scaling-n`` image counts (same files, prefix)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(out, args.scaling_model)
    w, h = parse_size(args.scaling_size)
    top = max(args.scaling_n)
    all_folder = out / f"scaling_{w}x{h}"
    log(f"writing {top} images of {w}x{h} (cached)")
    all_paths = write_images(all_folder, top, w, h, distinct=256)
    report = {"machine": machine(), "args": vars(args), "runs": []}
    for n in args.scaling_n:
        folder = out / f"scaling_{w}x{h}_first_{n}"
        marker = folder.parent / f".{folder.name}.complete"
        if not marker.exists():
            folder.mkdir(parents=True, exist_ok=True)
            for p in all_paths[:n]:
                (folder / p.name).unlink(missing_ok=True)
                (folder / p.name).symlink_to(p)
            marker.write_text("ok")
        log(f"(d) zslabel label on {n} images")
        extra = ["--batch-size", str(args.d_batch_size)] if args.d_batch_size else []
        d = run_zslabel(folder, ckpt, 3, out, f"scaling_{n}", extra, args.device, args.timeout)
        d["n"] = n
        report["runs"].append(d)
        log(f"    peak RSS {d['peak_rss_mb']:.0f} MB, PSS {d['peak_pss_mb']:.0f} MB, "
            f"{d['images_per_s']:.1f} images/s")
    lo, hi = report["runs"][0], report["runs"][-1]
    report["growth_rss"] = hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1
    report["growth_pss"] = hi["peak_pss_mb"] / lo["peak_pss_mb"] - 1
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "memory_scaling.json").write_text(json.dumps(report, indent=2))
    print(f"\nmemory scaling ({args.scaling_model} checkpoint, {w}x{h} JPEGs, load {report['machine']['load_avg_at_start']}):")
    print("| images | labeling s | images/s | peak RSS MB (sum) | peak PSS MB | processes | peak object store MB |")
    print("|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['n']} | {r['timings']['labeling_s']:.1f} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_pss_mb']:.0f} | {r['peak_processes']} | {_f(r['peak_object_store_mb'], '.0f')} |")
    for r in report["runs"]:
        print(f"{r['n']} images, PSS MB at the peak by process: {r['peak_pss_by_process_mb']}")
    print(f"growth {args.scaling_n[0]} -> {args.scaling_n[-1]}: RSS {report['growth_rss']:+.1%}, "
          f"PSS {report['growth_pss']:+.1%} (target < +20%)")
    return report


def build_tiny(out: Path) -> Path:
    """The tiny CLIP checkpoint of the tests (2 layers, 32-pixel input), built once under ``out``."""
    path = out / "ckpt_tiny"
    if not (path / ".complete").exists():
        subprocess.run([sys.executable, "-c", "import sys; from zslabel_dev.tiny import build_tiny_checkpoint; "
                        "build_tiny_checkpoint(sys.argv[1], 'clip')", str(path)], check=True, cwd=ROOT)
        (path / ".complete").write_text("ok")
    return path


def decode_bound(args) -> dict:
    """Framework overhead where decoding bounds the run: (e) the bare one-process loop against
    (d) zslabel end to end on ``--small-n`` 64x64 JPEGs with the tiny checkpoint, side by side,
    ``--repeat`` times alternating; ratio per core = (d / cores) / e."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = build_tiny(out)
    folder = out / f"small_64x64_{args.small_n}"
    log(f"writing {args.small_n} images of 64x64 (cached)")
    paths = write_images(folder, args.small_n, 64, 64, distinct=min(args.small_n, 1000))
    cores = os.cpu_count() or 1
    report = {"machine": machine(), "args": vars(args), "e": [], "d": {}}
    variants = [("default", [])] + [tuple(v.split(":", 1)) for v in args.variant]
    variants = [(name, shlex.split(flags) if isinstance(flags, str) else flags) for name, flags in variants]
    for rep in range(args.repeat):
        log(f"(e) bare loop, {args.small_n} images (round {rep + 1}, load {os.getloadavg()[0]:.1f})")
        e = run_child("e", {"tag": f"bare_{rep}", "ckpt": str(ckpt), "paths": [str(p) for p in paths],
                            "labels": 3, "batch_size": 64}, out, args.timeout)
        e["load"] = os.getloadavg()[0]
        report["e"].append(e)
        log(f"    {e['images_per_s']:.0f} images/s")
        for name, flags in variants:
            log(f"(d) zslabel {name} (round {rep + 1}, load {os.getloadavg()[0]:.1f})")
            d = run_zslabel(folder, ckpt, 3, out, f"small_{name}_{rep}", d_rows_per_file(args.small_n) + list(flags),
                            args.device, args.timeout)
            d["load"] = os.getloadavg()[0]
            d["per_core_vs_e"] = d["images_per_s"] / cores / e["images_per_s"]
            d["steady_per_core_vs_e"] = (d["steady_images_per_s"] / cores / e["images_per_s"]
                                         if d.get("steady_images_per_s") else None)
            report["d"].setdefault(name, []).append(d)
            log(f"    {d['images_per_s']:.0f} images/s (labeling_s), per core / e = {d['per_core_vs_e']:.2f}; "
                f"steady {_f(d['steady_images_per_s'], '.0f')} images/s, per core / e = "
                f"{_f(d['steady_per_core_vs_e'], '.2f')}; cpu s by kind {d['cpu_s_by_kind']}; "
                f"timings {json.dumps({k: d['timings'].get(k) for k in ('labeling_s', 'decode_ms_per_image', 'model_ms_per_image', 'bound')})}")
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "decode_bound.json").write_text(json.dumps(report, indent=2))
    print(f"\ndecode-bound ({args.small_n} 64x64 JPEGs, tiny checkpoint, {cores} cores; e = one process, "
          f"1 thread; d = zslabel labeling_s):")
    print("| round | load | e img/s | d variant | d img/s | d per core / e | d steady img/s | d steady per core / e "
          "| d cli img/s | labeling s | peak d PSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rep, e in enumerate(report["e"]):
        for name, runs in report["d"].items():
            d = runs[rep]
            print(f"| {rep + 1} | {d['load']:.1f} | {e['images_per_s']:.0f} | {name} | {d['images_per_s']:.0f} | "
                  f"{d['per_core_vs_e']:.2f} | {_f(d['steady_images_per_s'], '.0f')} | "
                  f"{_f(d['steady_per_core_vs_e'], '.2f')} | {d['cli_images_per_s']:.0f} | "
                  f"{d['timings']['labeling_s']:.1f} | {d['peak_pss_mb']:.0f} |")
    return report


def scale(args) -> dict:
    """One zslabel run over ``--scale-n`` 64x64 JPEGs (tiny checkpoint): wall time, peak memory per
    process kind, output files, and throughput over the first and last tenth of the rows (from
    the committed files' modification times and row counts)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = build_tiny(out)
    folder = out / f"small_64x64_{args.scale_n}"
    log(f"writing {args.scale_n} images of 64x64 (cached; 1,000 distinct pictures)")
    write_images(folder, args.scale_n, 64, 64, distinct=1000)
    log(f"(d) zslabel on {args.scale_n} images (load {os.getloadavg()[0]:.1f})")
    extra = shlex.split(args.variant[0].split(":", 1)[1]) if args.variant else []
    d = run_zslabel(folder, ckpt, 3, out, f"scale_{args.scale_n}", extra, args.device, args.timeout)
    stamps, rows = committed_rows(out / f"parquet_scale_{args.scale_n}")
    n = rows[-1]
    first = rate_between(stamps, rows, 0.1, 0.2)   # 10-20 %: after the actors' start-up
    last = rate_between(stamps, rows, 0.9, 1.0)
    # Every tenth: the first ones drain blocks decoded while the actors were starting (the
    # in-flight cap holds tens of thousands of small images), so "first" alone flatters it.
    tenths = [rate_between(stamps, rows, i / 10, (i + 1) / 10) for i in range(10)]
    middle = float(np.median([r for r in tenths if r]))
    report = {"machine": machine(), "args": vars(args), "d": d, "files": len(rows), "rows": int(n),
              "rate_10_20pct": first, "rate_90_100pct": last, "last_over_first": last / first,
              "rate_per_tenth": tenths, "last_over_median_tenth": last / middle}
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "scale.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nscale: {n} images, {len(rows)} output files, CLI wall {d['cli_wall_s']:.0f} s, labeling "
          f"{d['timings']['labeling_s']:.0f} s ({d['images_per_s']:.0f} images/s); rows/s over 10-20 % "
          f"{first:.0f}, over 90-100 % {last:.0f} (last/first {last / first:.2f}); load at start "
          f"{report['machine']['load_avg_at_start']}, at end {report['machine']['load_avg_at_end']}")
    print("rows/s per tenth of the rows: " + ", ".join(_f(r, ".0f") for r in tenths)
          + f"; last tenth / median tenth {last / middle:.2f}")
    print(f"peak PSS MB by process kind (each kind's own peak): {d['peak_pss_by_kind_mb']}; "
          f"whole tree peak PSS {d['peak_pss_mb']:.0f} MB, RSS sum {d['peak_rss_mb']:.0f} MB")
    return report


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--n", type=int, default=300, help="images per size (default 300)")
    p.add_argument("--out", default="bench_out", help="working and result folder (default bench_out)")
    p.add_argument("--sizes", type=lambda s: s.split(","), default=["640x480", "1920x1080"])
    p.add_argument("--labels", type=lambda s: [int(x) for x in s.split(",")], default=[3, 1000],
                   help="label set sizes (default 3,1000)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of (b) and (c) (default 64)")
    p.add_argument("--d-batch-size", type=int, default=None, help="--batch-size for (d) (default: zslabel's)")
    p.add_argument("--ref-images-many", type=int, default=2,
                   help="images for (a) when there are > 100 labels (default 2; (b) gets one batch)")
    p.add_argument("--agree-n", type=int, default=10**9, help="images for the fast-vs-exact agreement (default all)")
    p.add_argument("--fast-decode", action="store_true", help="(c) and (d) use the JPEG draft fast path")
    p.add_argument("--variant", action="append", default=[],
                   help="extra (d) configuration NAME:'CLI flags', repeatable")
    p.add_argument("--ref-threads", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                   help="torch threads for (a) and (b), each measured, the faster kept; 0 = torch's "
                   "default (= cores) (default 0,1)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["a", "b", "c", "d"],
                   help="which of a,b,c,d to run (default all)")
    p.add_argument("--repeat", type=int, default=1, help="runs of (c) and each (d), alternating; best kept")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    p.add_argument("--memory-scaling", action="store_true", help="peak memory of (d) at --scaling-n images")
    p.add_argument("--scaling-n", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 20000])
    p.add_argument("--scaling-size", default="320x240")
    p.add_argument("--scaling-model", choices=["small224", "vitb32"], default="small224",
                   help="small224: a 4-layer CLIP with a 224-pixel input (real-size pixel blocks, model "
                   "slower than decoding, 20,000 images in minutes); vitb32: the real shape (slow on CPU)")
    p.add_argument("--decode-bound", action="store_true",
                   help="framework overhead: bare decode loop vs zslabel on --small-n 64x64 JPEGs, tiny checkpoint")
    p.add_argument("--small-n", type=int, default=20000,
                   help="images for --decode-bound (default 20,000: the steady state needs a run of seconds)")
    p.add_argument("--scale", action="store_true",
                   help="one zslabel run on --scale-n 64x64 JPEGs: wall, memory per process kind, flatness")
    p.add_argument("--scale-n", type=int, default=100_000, help="images for --scale (default 100,000)")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # A plain kill of the benchmark still stops the command it is measuring (see run_measured).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args._child:
        child_main(args._child[0], json.loads(Path(args._child[1]).read_text()))
        return 0
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        print("psutil is needed (pip install psutil; it comes with ray[default])", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        args.ref_threads = [0]  # torch's CPU threads do not matter for a GPU forward

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here; skipping", file=sys.stderr)
            return 0
    if args.decode_bound:
        decode_bound(args)
    elif args.scale:
        scale(args)
    elif args.memory_scaling:
        memory_scaling(args)
    else:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
