"""Ray's task timeline, read for how many tasks of one stage ran at once (tests, benchmarks)."""

from __future__ import annotations

import collections
import time


def task_intervals(stage: str, since_us: float, settle_s: float = 2.0, timeout_s: float = 60.0
                   ) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the Ray Data map tasks whose operator name contains
    ``stage`` (e.g. ``"decode_block"``) and that started after ``since_us`` (``time.time()``
    x 1e6), once their count has held for ``settle_s`` (task events reach the GCS about once a
    second). Needs ``ray.init`` in this process."""
    import ray

    found: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = len(found)
        found = [(e["ts"], e["ts"] + e["dur"]) for e in ray.timeline()
                 if e.get("ph") == "X" and stage in e.get("cat", "") and e["ts"] >= since_us
                 and e.get("name", "").endswith("_map_task")]
        if found and len(found) == before:
            break
        time.sleep(settle_s)
    return found


def concurrency(intervals: list[tuple[float, float]]) -> dict:
    """``most`` intervals open at one instant, the time-weighted ``mean``, and ``share_at``:
    the share of the whole span spent at each count."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    span = events[-1][0] - events[0][0]
    time_at: collections.Counter = collections.Counter()
    current = most = 0
    last = events[0][0]
    for t, step in events:
        time_at[current] += t - last
        last, current = t, current + step
        most = max(most, current)
    return {"tasks": len(intervals), "most": most, "mean": sum(k * v for k, v in time_at.items()) / span,
            "share_at": {k: round(v / span, 3) for k, v in sorted(time_at.items())}}
