"""Where a labeling run's time went, read once the run has ended: each stage's busy time from Ray
Data's per-operator stats of the executed dataset, the labeler actors' lifetimes from the GCS
actor table (a private Ray API, kept to this one module), and from those whether the run was
decode-bound or model-bound. Reporting only: nothing here can fail a job.
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger(__name__)


def stage_timings(ds, since_epoch_s: float, *, num_cpus_per_actor: float,
                  decode_cpus_per_task: float) -> dict[str, float | str]:
    """Where the labeling time went, and whether the run was decode-bound or model-bound.

    Measured: each stage's busy time, the sum of its task times (Ray Data's per-operator stats
    of the executed ``ds``), and this run's labeler actors with their lifetimes, counted from
    when each had loaded the model (the GCS actor table). Returns (seconds unless named):

    - ``decode_busy_s``, ``model_busy_s``, and per image ``decode_ms_per_image``,
      ``model_ms_per_image`` (per decode task or per actor).
    - ``model_actors``: labeler actors that came up; ``decode_slots``: decode tasks the CPUs
      they left free could run at once, (cluster CPUs - actors x ``num_cpus_per_actor``) /
      ``decode_cpus_per_task``, at least 1.
    - ``decode_need_s`` = decode_busy_s / decode_slots and ``model_need_s`` = model_busy_s /
      model_actors: the wall time each stage needs with all its slots busy.
    - ``bound``: the stage with the larger need, ``"decode"`` (reading + decoding; more decode
      CPUs or nodes would speed the run up) or ``"model"`` (more or faster actors would). A
      capacity comparison, so it holds for short runs too, where actors start after decoding
      has already run ahead.
    - ``model_actor_s``, ``model_utilisation`` = model_busy_s / model_actor_s in [0, 1]: the
      observed busy share of the actors' lifetime (low: they waited for images).
    - ``object_store_limit_mb``: the object store memory Ray Data let the run hold (the
      executed dataset's own limit: ``cluster.bound_in_flight``'s cap), absent when unlimited.

    Empty when the stats are unavailable (nothing labeled); never raises.
    """
    try:
        import ray
        import ray._private.state

        ops = []
        todo = [ds.get_stats_summary()]
        while todo:
            summary = todo.pop()
            ops += summary.operators_stats
            todo += summary.parents
        busy = {"decode": 0.0, "model": 0.0}
        images = 0
        for op in ops:
            name = op.operator_name
            stage = "decode" if "decode_block" in name else "model" if "Labeler" in name else None
            if stage and op.wall_time is not None:
                busy[stage] += op.wall_time.sum
                if stage == "model" and op.output_num_rows is not None:
                    images += op.output_num_rows.sum
        if not images:
            return {}
        now_ms = time.time() * 1000
        # Private but dependency-free (the public ray.util.state needs the dashboard): the GCS
        # actor table, with each actor's ALIVE time (after its constructor) and death time.
        job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        lifetimes_ms = [(a["EndTime"] or now_ms) - a["StartTime"]
                        for a in ray._private.state.actors(job_id=job_id).values()
                        if "Labeler" in a.get("ActorClassName", "") and a.get("StartTime")
                        and a["StartTime"] >= since_epoch_s * 1000]
        cpus = ray.cluster_resources().get("CPU", 0.0)
        limit = ds.context.execution_options.resource_limits.object_store_memory
    except Exception as exc:  # noqa: BLE001 - reporting only; a Ray upgrade must not fail the job
        log.debug("no stage timings: %s", exc)
        return {}
    actors = max(1, len(lifetimes_ms))
    actor_s = sum(lifetimes_ms) / 1000
    slots = max(1.0, (cpus - actors * num_cpus_per_actor) / decode_cpus_per_task)
    decode_need, model_need = busy["decode"] / slots, busy["model"] / actors
    return {"decode_busy_s": round(busy["decode"], 3), "model_busy_s": round(busy["model"], 3),
            "decode_ms_per_image": round(1000 * busy["decode"] / images, 3),
            "model_ms_per_image": round(1000 * busy["model"] / images, 3),
            "model_actors": actors, "decode_slots": round(slots, 2),
            "decode_need_s": round(decode_need, 3), "model_need_s": round(model_need, 3),
            "model_actor_s": round(actor_s, 3),
            "model_utilisation": round(min(1.0, busy["model"] / actor_s) if actor_s > 0 else 0.0, 3),
            "bound": "model" if model_need >= decode_need else "decode",
            **({"object_store_limit_mb": round(limit / 2**20, 1)} if math.isfinite(limit) else {})}
