"""The labeling job on a CUDA device: float16 labeler actors agree with the float32 CPU run.

Skipped without CUDA. With it, the same images go through the pipeline twice on the session's
local Ray: once with ``num_gpus_per_actor=1`` and ``dtype="auto"`` (the actor sees its GPU and
runs float16), once on CPU actors in float32. Every score must agree within 1e-2 and not be
bit-identical everywhere (identical scores would mean the GPU run never left float32 on CPU).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from zslabel import JobConfig, run_label_job  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LABELS = ["cat", "dog", "bird", "a red car", "tree"]


def scores(out) -> dict[str, dict[str, float]]:
    rows = pq.read_table(str(out)).to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    return {r["path"]: dict(zip(r["labels"], r["scores"])) for r in rows}


def test_cuda_float16_scores_match_cpu_float32(tiny_clip, ray_local, tmp_path, image_folder):
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1, "torch sees CUDA but the local Ray has no GPU"
    common = {"input": str(image_folder), "labels": LABELS, "model": str(tiny_clip), "top_k": len(LABELS),
              "batch_size": 4}
    gpu = run_label_job(JobConfig(output=str(tmp_path / "gpu"), num_gpus_per_actor=1, dtype="auto", **common))
    cpu = run_label_job(JobConfig(output=str(tmp_path / "cpu"), num_gpus_per_actor=0, dtype="float32", **common))
    assert gpu.rows == gpu.labeled == cpu.rows == cpu.labeled == 12

    on_gpu, on_cpu = scores(tmp_path / "gpu"), scores(tmp_path / "cpu")
    assert on_gpu.keys() == on_cpu.keys()
    diffs = [abs(on_gpu[p][label] - on_cpu[p][label]) for p in on_cpu for label in LABELS]
    assert max(diffs) <= 1e-2
    assert max(diffs) > 0, "float16 scores equal the float32 CPU ones bit for bit: did the actor run on CUDA?"
