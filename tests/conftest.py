"""Shared fixtures: offline tiny checkpoints, one local Ray instance on loopback, sample images.

Environment is pinned before anything imports Ray or transformers: no hub access (offline
flags), Ray token auth disabled consistently for the driver, workers and any subprocess the
tests start, and the node IP on loopback.
"""

from __future__ import annotations

import collections
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_NODE_IP_ADDRESS", "127.0.0.2")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
# Label-embedding and checkpoint caches in a fresh folder: tests never read or fill ~/.cache.
os.environ.setdefault("ZSLABEL_CACHE", tempfile.mkdtemp(prefix="zslabel-test-cache-"))
# Fault injection for the safety-net tests (zslabel.stages.FAIL_DECODE_ENV): inputs whose path
# holds this marker raise inside the decode stage. Set before Ray starts so workers inherit it.
os.environ["ZSLABEL_TEST_FAIL_DECODE"] = "zslabel-injected-failure"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

NODE_IP = os.environ["RAY_NODE_IP_ADDRESS"]
# `-n auto` (pyproject's addopts): one pytest-xdist worker per core, at most this many: each
# worker starts its own local Ray instance, and the suite is CPU-bound (a third worker on two
# cores gained 3 %).
MAX_TEST_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown where it is not installed
def pytest_xdist_auto_num_workers(config) -> int:
    """Workers for ``-n auto``: the cores this process may use, capped at ``MAX_TEST_WORKERS``."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS))


def pytest_collection_modifyitems(config, items):
    """Heaviest first, so that ``--dist loadfile`` (modules handed to workers in this order) ends
    on short modules: modules by how many of their tests run on Ray, most first (the sort is
    stable: collection order otherwise)."""
    on_ray = collections.Counter(item.module.__name__ for item in items if "ray_local" in item.fixturenames)
    items.sort(key=lambda item: -on_ray[item.module.__name__])


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-weight CLIP checkpoint folder (32x32 input, 16-d embeddings)."""
    from zslabel_dev.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_clip"), "clip")


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> Path:
    """A random-weight SigLIP checkpoint folder (32x32 input, sigmoid scores)."""
    from zslabel_dev.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_siglip"), "siglip")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (4 logical CPUs, node IP on loopback).

    Yields the GCS address so CLI subprocesses can join it through ``RAY_ADDRESS``.
    """
    import ray

    # address="local": always a fresh instance, never one a `ray start` left on this machine.
    ray.init(address="local", num_cpus=4, _node_ip_address=NODE_IP, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def pipeline_score_gap(out, files, checkpoint, labels) -> float:
    """Assert that every image of ``files`` has, in the output folder ``out``, the labels (same
    order) and scores (1e-4 abs) of ``transformers.pipeline("zero-shot-image-classification")``
    on the same checkpoint and labels; returns the largest score difference seen."""
    import pyarrow.parquet as pq
    from transformers import pipeline

    rows = {r["path"]: r for r in pq.read_table(str(out)).to_pylist()}
    reference = pipeline("zero-shot-image-classification", model=str(checkpoint))
    worst = 0.0
    for f in files:
        expected = reference(str(f), candidate_labels=labels)
        got = rows[str(f)]
        assert got["labels"] == [e["label"] for e in expected], f.name
        assert got["scores"] == pytest.approx([e["score"] for e in expected], abs=1e-4), f.name
        worst = max(worst, max(abs(a - e["score"]) for a, e in zip(got["scores"], expected)))
    return worst


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, textured RGB picture (gradients + noise), deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / max(w - 1, 1) * 255, y / max(h - 1, 1) * 255,
                    128 + 100 * np.sin(x / (7.0 + seed)) * np.cos(y / 11.0)], -1)
    img = img + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of 12 small images of mixed sizes, formats and modes, in nested folders."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i in range(12):
        img = photo(40 + 7 * i, 30 + 5 * (i % 4), seed=i)
        if i % 3 == 0:
            img.save(d / f"img_{i:02d}.jpg", quality=90)
        elif i % 3 == 1:
            img.convert("L").save(d / "sub" / f"img_{i:02d}.png")
        else:
            img.convert("RGBA").save(d / f"img_{i:02d}.PNG")
    return d
