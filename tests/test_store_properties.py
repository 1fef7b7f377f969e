"""Property test of the output store (no Ray, no model): random sequences of runs in every mode,
runs cut short part way, changed settings, and files a user drops into the output. After every
step: a committed output holds each input exactly once, all of one fingerprint; the store never
deletes or changes a file it did not write; a refused run changes nothing.

Examples: a few dozen in the quick set, more with ``HYPOTHESIS_PROFILE=slow`` (the slow set)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zslabel.errors import OutputError
from zslabel.store import Accounting, OutputStore, fingerprint_digest, write_block
from zslabel.store.layout import FINGERPRINT_KEY, inspect_output, is_store_file

EXAMPLES = 200 if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else 25

run_step = st.fixed_dictionaries({
    "op": st.just("run"),
    "mode": st.sampled_from(["error", "resume", "overwrite"]),
    "inputs": st.integers(0, 12),
    "settings": st.sampled_from(["A", "B"]),
    "rows_per_file": st.integers(1, 5),
    "cut_after_files": st.none() | st.integers(0, 3),   # a run cut short (no commit)
    "retry_errors": st.booleans(),
})
user_step = st.fixed_dictionaries({
    "op": st.sampled_from(["add_user_file", "remove_user_files"]),
    "name": st.sampled_from(["notes.csv", "plots/hist.png", "README.txt", "data/extra.parquet"]),
})


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def user_files(root: Path, names: set[str]) -> dict[str, str]:
    snap = snapshot(root) if root.exists() else {}
    return {n: snap[n] for n in names if n in snap}


def do_run(out: Path, step: dict) -> str:
    """One run through the store as a command runs it; returns what happened."""
    fields = {"labels": [step["settings"]], "top_k": 1}
    store = OutputStore.open(str(out))
    try:
        store.check(step["mode"], None)
    except OutputError:
        return "refused"
    try:
        try:
            session = store.begin(step["mode"], fields, retry_errors=step["retry_errors"] and step["mode"] == "resume",
                                  planned_paths=pa.array([f"im{i}" for i in range(step["inputs"])], pa.string()))
        except OutputError:
            return "refused"
        todo = np.setdiff1d(np.arange(step["inputs"], dtype=np.int64), session.done)
        files = 0
        for start in range(0, len(todo), step["rows_per_file"]):
            if step["cut_after_files"] is not None and files >= step["cut_after_files"]:
                return "cut"
            idx = todo[start:start + step["rows_per_file"]]
            errors = [None if i % 5 else "truncated: x" for i in idx]  # some error rows
            write_block(pa.table({"path": [f"im{i}" for i in idx], "input_index": pa.array(idx, pa.int64()),
                                  "error": pa.array(errors, pa.string())}), session.target)
            files += 1
        counts = session.counts()
        Accounting(step["inputs"]).check(str(out), counts.rows)
        session.commit({"inputs": step["inputs"]})
        return "committed"
    finally:
        store.release()


def check_output(out: Path) -> None:
    """A committed output holds each input once, in files of the manifest's fingerprint."""
    state = inspect_output(str(out))
    if state.manifest is None or state.run_record is not None:
        return
    files = [f for f in state.data_files() if is_store_file(f)]  # a user's own Parquet file is theirs
    idx: list[int] = []
    for rel in files:
        f = pq.ParquetFile(state.path(rel))
        assert (f.schema_arrow.metadata or {}).get(FINGERPRINT_KEY, b"").decode() == state.manifest["fingerprint"]
        idx += f.read(columns=["input_index"]).column(0).to_pylist()
    assert sorted(idx) == list(range(state.manifest["inputs"]))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.one_of(run_step, user_step), min_size=1, max_size=8))
def test_store_keeps_inputs_once_and_never_touches_user_files(steps):
    tmp = Path(tempfile.mkdtemp(prefix="zslabel-store-prop-"))
    out = tmp / "out"
    placed: set[str] = set()
    try:
        for step in steps:
            if step["op"] == "add_user_file":
                if not out.exists():
                    continue  # a user file in a new folder would make it "not an output"; covered elsewhere
                path = out / step["name"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"user data " + step["name"].encode())
                placed.add(step["name"])
                continue
            if step["op"] == "remove_user_files":
                for name in placed:
                    (out / name).unlink(missing_ok=True)
                placed.clear()
                continue
            mine = user_files(out, placed)
            before = snapshot(out) if out.exists() else None
            result = do_run(out, step)
            assert user_files(out, placed) == mine, f"the store changed a user file ({result})"
            if result == "refused":
                assert (snapshot(out) if out.exists() else None) == before, "a refused run changed the output"
            check_output(out)
            if result == "committed" and step["mode"] != "resume":
                state = inspect_output(str(out))
                assert state.manifest["fingerprint"] == fingerprint_digest({"labels": [step["settings"]], "top_k": 1})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.one_of(run_step, user_step), min_size=1, max_size=12))
def test_store_properties_more_examples(steps):
    test_store_keeps_inputs_once_and_never_touches_user_files.hypothesis.inner_test(steps)
