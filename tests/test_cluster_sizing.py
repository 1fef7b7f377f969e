"""Cluster sizing without a cluster (``zslabel.cluster``): the actor pool sized from the nodes an
autoscaler can start (cluster.yaml's GPU workers scale from zero), the in-flight cap reaching
the dataset's execution, and the manifest's verdict on a model-bound run (on ``ray_local``).
The real two-node cluster's tests are ``test_cluster.py``'s (run one at a time in CI)."""

from __future__ import annotations

import pytest
from test_cluster import LABELS, make_images

from zslabel.cluster import MIN_IN_FLIGHT_BYTES


def test_actor_pool_counts_nodes_the_autoscaler_can_start():
    """cluster.yaml's shape: a head that takes no work, GPU and CPU workers scaling from zero."""
    from zslabel import JobConfig
    from zslabel.cluster import UNLIMITED_NODES, plan_actor_pool
    from zslabel.errors import ConfigError

    head = [{"CPU": 0.0}]
    g5, c6i = {"CPU": 8.0, "GPU": 1.0, "memory": 3e10}, {"CPU": 16.0}
    gpu_job = JobConfig(num_gpus_per_actor=1)
    assert plan_actor_pool(gpu_job, head, [(g5, 8), (c6i, 8)]) == (1, 8)
    assert plan_actor_pool(JobConfig(num_gpus_per_actor=0.5), head, [(g5, 8)]) == (1, 16)
    assert plan_actor_pool(gpu_job, [*head, g5], [(g5, 8)]) == (1, 8)  # one worker up already
    with pytest.raises(ConfigError, match="GPU"):
        plan_actor_pool(gpu_job, head, [(c6i, 8)])
    with pytest.raises(ConfigError, match="CPUs per node: 0, 8, 16"):
        plan_actor_pool(JobConfig(num_cpus_per_actor=32), head, [(g5, 8), (c6i, 8)])
    # CPU actors leave CPUs for decoding; an unlimited node type counts as UNLIMITED_NODES nodes.
    # The default half-CPU actors: one single-threaded actor per core (the cores cap them), the
    # other half of the logical CPUs left to decode tasks (benchmarks/README.md, "CPU split").
    assert plan_actor_pool(JobConfig(), [{"CPU": 2.0}, {"CPU": 2.0}]) == (1, 4)
    assert plan_actor_pool(JobConfig(num_cpus_per_actor=1), [{"CPU": 2.0}, {"CPU": 2.0}]) == (1, 3)
    assert plan_actor_pool(JobConfig(), [{"CPU": 16.0}]) == (1, 16)
    assert plan_actor_pool(JobConfig(num_cpus_per_actor=4), head, [(c6i, -1)]) == (1, (16 * UNLIMITED_NODES - 1) // 4)
    with pytest.raises(ConfigError, match="decode-cpus-per-task 4"):
        plan_actor_pool(JobConfig(decode_cpus_per_task=4), [{"CPU": 2.0}, {"CPU": 2.0}])
    assert plan_actor_pool(JobConfig(concurrency=(2, 5)), [{"CPU": 2.0}]) == (2, 5)

# A ViT-S/16-sized image tower (random weights): ~100x the per-image work of decoding a small JPEG.
HEAVY_VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6, "num_hidden_layers": 6,
                "image_size": 224, "patch_size": 16}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}


@pytest.mark.slow
def test_manifest_says_model_bound_when_the_model_is_the_limit(ray_local, tmp_path):
    """Small JPEGs for a ViT-S/16-sized model: the actor is busy from its first batch to its last.

    (The decode-bound verdict is checked on the cluster run below: tiny model, idle actors.)
    """
    from zslabel import JobConfig, run_label_job
    from zslabel_dev.tiny import build_tiny_checkpoint

    heavy = build_tiny_checkpoint(tmp_path / "heavy", "clip", config={
        "text_config": TINY_TEXT, "vision_config": HEAVY_VISION, "projection_dim": 16})
    files = make_images(tmp_path / "small", 48, size=(64, 48))
    summary = run_label_job(JobConfig(input=str(tmp_path / "small"), output=str(tmp_path / "out"),
                                      labels=LABELS.split(","), model=str(heavy), batch_size=8, concurrency=(1, 1)))
    t = summary.timings
    assert summary.labeled == len(files)
    assert t["bound"] == "model" and t["model_need_s"] > t["decode_need_s"] > 0, t
    assert t["model_actors"] == 1 and t["model_need_s"] == t["model_busy_s"]
    # Observed too: the one actor was busy nearly all of its life (it never waited for images).
    assert 0.7 <= t["model_utilisation"] <= 1, t
    # The run executed under the in-flight cap (the floor, for 8-image batches of tiny images).
    assert t["object_store_limit_mb"] == MIN_IN_FLIGHT_BYTES / 2**20, t
    print(f"model-bound run: {t}")


def test_in_flight_cap_is_the_datasets_own_and_reaches_its_execution(ray_local):
    """Ray Data copies the process-wide DataContext into a dataset when it is created: a cap set
    there after planning never reached the run. bound_in_flight sets it on the planned dataset's
    own context, which every dataset derived from it (the composed chain) executes with."""
    import types

    import ray.data

    from zslabel.cluster import IN_FLIGHT_BATCHES_PER_ACTOR, bound_in_flight

    process_wide = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    planned = ray.data.range(32)
    ask = types.SimpleNamespace(batch_size=64, num_gpus_per_actor=0.0, num_cpus_per_actor=1.0,
                                decode_cpus_per_task=1.0, concurrency=(1, 4))
    cap = bound_in_flight(ask, (224, 224), (1, 4), planned)
    assert cap == IN_FLIGHT_BATCHES_PER_ACTOR * 4 * 64 * 224 * 224 * 3 > MIN_IN_FLIGHT_BYTES
    composed = planned.map_batches(lambda batch: {"id": batch["id"] * 2})
    assert composed.context.execution_options.resource_limits.object_store_memory == cap
    assert sorted(r["id"] for r in composed.iter_rows()) == list(range(0, 64, 2))
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == process_wide
    assert bound_in_flight(ask, (8, 8), (1, 1), planned) == MIN_IN_FLIGHT_BYTES  # the floor
