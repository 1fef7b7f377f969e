"""Resumable, exactly-once runs on the real pipeline: output modes, fingerprint refusals,
SIGKILL + --resume, an --overwrite killed mid-run, --retry-errors."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import photo
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures)

from zslabel import JobConfig, run_label_job
from zslabel.errors import ConfigError, OutputError
from zslabel.output import output_schema
from zslabel.store import (
    FINGERPRINT_KEY,
    MANIFEST_NAME,
    STATE_DIR,
    OutputStore,
    WriteSession,
    WriteTarget,
    describe_changes,
    fingerprint_digest,
    fingerprint_fields,
    inspect_output,
)

N_MANY = 240
# A resumed run's batches and files: large (neither is a result setting), as the runs it resumes
# use small ones only to be stopped part-way.
RESUME_BATCH = 60
RESUME_FLAGS = ("--batch-size", str(RESUME_BATCH), "--rows-per-file", str(RESUME_BATCH))
LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """240 tiny PNGs (enough small batches that a run can be killed part-way)."""
    d = tmp_path_factory.mktemp("many")
    for i in range(N_MANY):
        photo(20 + i % 9, 18 + i % 5, seed=i).save(d / f"im_{i:04d}.png")
    return d


@pytest.fixture(scope="module")
def finished_many(many_images, tiny_clip, ray_local, tmp_path_factory):
    """A finished run over ``many_images`` with LABELS, for the tests that start from one: each
    takes its own copy (``copy_of``), one label job instead of one per test."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_label_job(JobConfig(input=str(many_images), output=str(out), labels=LABELS, model=str(tiny_clip),
                            batch_size=64, concurrency=(1, 1)))
    return out


def copy_of(finished, folder):
    """A copy of a finished output at ``folder/out`` (an output moved or synced as a whole is
    the same output: nothing in it names where it lies)."""
    return shutil.copytree(finished, folder / "out")


def snapshot(folder):
    """{relative path: sha256} of every file below ``folder`` (hidden and state files too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def indices(out):
    return sorted(pq.read_table(str(out), columns=["input_index"]).column(0).to_pylist())


def manifest_of(out):
    return json.loads((out / MANIFEST_NAME).read_text())


def start_cli(args, ray_address, log_path):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "zslabel", "label", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def kill_when(proc, folder, pattern, at_least, log_path, timeout=240, sig=signal.SIGKILL):
    """Send ``sig`` to ``proc`` as soon as ``at_least`` files match ``folder/pattern``; wait
    for it to end (at most ``timeout`` s more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n"
                        + log_path.read_text()[-3000:])
        if len(list(folder.glob(pattern))) >= at_least:
            os.kill(proc.pid, sig)
            proc.wait(timeout=timeout)
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no committed file appeared in time:\n" + log_path.read_text()[-3000:])


def cli_args(images, out, model, labels, *extra):
    return [str(images), "--labels", ",".join(labels), "--model", str(model), "--output", str(out),
            "--batch-size", "4", "--rows-per-file", "4", "--concurrency", "1", *extra]


def test_killed_run_resumes_exactly_once_without_recomputing(tiny_clip, ray_local, many_images, tmp_path):
    out, log = tmp_path / "out", tmp_path / "killed.log"
    proc = start_cli(cli_args(many_images, out, tiny_clip, LABELS), ray_local, log)
    kill_when(proc, out, "part-*.parquet", 3, log)
    assert not (out / MANIFEST_NAME).exists(), "killed too late: the run had committed"
    # Whatever is visible after a SIGKILL is whole: the folder reads as Parquet.
    before = indices(out)
    assert 0 < len(before) < N_MANY and len(set(before)) == len(before)

    # Resumed in large batches: batch size is no result setting, and small batches only cost time.
    base = dict(input=str(many_images), output=str(out), labels=LABELS, model=str(tiny_clip),
                batch_size=RESUME_BATCH, concurrency=(1, 1))
    with pytest.raises(OutputError, match="already holds data .an unfinished run.*--resume"):
        run_label_job(JobConfig(**base))
    summary = run_label_job(JobConfig(**base, mode="resume"))

    assert indices(out) == list(range(N_MANY))  # every input exactly once
    table = pq.read_table(str(out))
    paths = dict(zip(table.column("input_index").to_pylist(), table.column("path").to_pylist()))
    assert [paths[i] for i in range(N_MANY)] == sorted(str(p) for p in many_images.iterdir())
    counts = manifest_of(out)["counts"]
    assert summary.carried_over >= len(before) and summary.rows == N_MANY == counts["rows"]
    assert counts["model_images"] == summary.model_images == N_MANY - summary.carried_over < N_MANY
    assert counts["carried_over"] == summary.carried_over and counts["written_this_run"] == summary.model_images
    leftovers = [p for p in out.rglob("*") if p.name != MANIFEST_NAME and not p.name.startswith("part-")]
    assert leftovers == []  # state folder and hidden temp files are gone after the commit


def test_sigterm_mid_run_exits_143_like_ctrl_c_and_resumes_exactly_once(tiny_clip, ray_local, many_images, tmp_path):
    """`timeout`, Kubernetes and Slurm stop a job with SIGTERM: it unwinds as after Ctrl-C (one
    message, the claim given up, committed files kept), exit 143, and --resume completes it.
    Ray's own handler used to abort the driver (exit 134, a C++ stack on stderr)."""
    out, log = tmp_path / "out", tmp_path / "terminated.log"
    proc = start_cli(cli_args(many_images, out, tiny_clip, LABELS, "--rows-per-file", "1", "--batch-size", "1"),
                     ray_local, log)
    kill_when(proc, out, "part-*.parquet", 1, log, sig=signal.SIGTERM)
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert ("zslabel: interrupted by SIGTERM; committed files are kept: rerun with --resume (in place of "
            "--overwrite, if given) to continue") in text
    for dump in ("SIGTERM received", "Aborted", "Traceback", "*** "):
        assert dump not in text, text[-3000:]
    assert not (out / MANIFEST_NAME).exists(), "stopped too late: the run had committed"
    assert not (out / STATE_DIR / "claim.json").exists()  # given up: the next run needs no lease to expire
    before = indices(out)
    assert 0 < len(before) < N_MANY and len(set(before)) == len(before)

    resumed = start_cli(cli_args(many_images, out, tiny_clip, LABELS, "--resume", *RESUME_FLAGS), ray_local, log)
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert indices(out) == list(range(N_MANY))  # every input exactly once
    counts = manifest_of(out)["counts"]
    assert counts["rows"] == N_MANY and counts["carried_over"] >= len(before)


def test_refusals_touch_nothing_resume_keeps_errors_and_retry_errors_recomputes_them(
        tiny_clip, ray_local, image_folder, tmp_path):
    broken = [image_folder / "broken_a.jpg", image_folder / "sub" / "broken_b.png", image_folder / "zz.png"]
    for b in broken:
        b.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    base = dict(input=str(image_folder), output=str(out), labels=LABELS, model=str(tiny_clip), top_k=2,
                batch_size=4, concurrency=(1, 1))
    first = run_label_job(JobConfig(**base))
    assert (first.rows, first.labeled, first.model_images) == (15, 12, 12)
    before = snapshot(out)
    manifest = manifest_of(out)
    assert manifest["fingerprint"] == fingerprint_digest(manifest["fingerprint_fields"])
    for f in out.glob("*.parquet"):
        assert pq.read_schema(f).metadata[FINGERPRINT_KEY] == manifest["fingerprint"].encode()

    with pytest.raises(OutputError, match="already holds data .a finished run."):
        run_label_job(JobConfig(**base))
    with pytest.raises(OutputError, match="labels differ: added 'fox', removed 'bird'"):
        run_label_job(JobConfig(**dict(base, labels=["cat", "dog", "fox"]), mode="resume"))
    with pytest.raises(OutputError, match=r"templates differ: added 'a photo of a \{\}\.'; top_k: 2 -> 3"):
        run_label_job(JobConfig(**dict(base, top_k=3, templates=["This is a photo of {}.", "a photo of a {}."]),
                                mode="resume"))
    with pytest.raises(ConfigError, match="--retry-errors only applies with --resume"):
        run_label_job(JobConfig(**base, mode="overwrite", retry_errors=True))
    assert snapshot(out) == before  # byte-identical: refusals touch nothing

    rows_before = {r["input_index"]: r for r in pq.read_table(str(out)).to_pylist()}
    for i, b in enumerate(broken):  # the storage problem is fixed
        photo(30, 26, seed=50 + i).save(b, format="PNG")
    # Resume of a finished run (other execution settings are fine): error rows are kept, nothing
    # is recomputed, the rows are the same.
    kept = run_label_job(JobConfig(**dict(base, batch_size=5), mode="resume"))
    assert (kept.rows, kept.labeled, kept.model_images, kept.carried_over) == (15, 12, 0, 15)
    assert kept.errors_by_code == {"unidentified_image": 3}
    assert {r["input_index"]: r for r in pq.read_table(str(out)).to_pylist()} == rows_before

    retried = run_label_job(JobConfig(**base, mode="resume", retry_errors=True))
    assert (retried.rows, retried.labeled, retried.model_images, retried.carried_over) == (15, 15, 3, 12)
    assert manifest_of(out)["counts"]["retried_errors"] == 3
    rows_after = {r["input_index"]: r for r in pq.read_table(str(out)).to_pylist()}
    assert sorted(rows_after) == list(range(15))
    for idx, row in rows_before.items():
        if row["error"] is None:
            assert rows_after[idx] == row  # labeled rows are carried over untouched
        else:
            assert rows_after[idx]["error"] is None and len(rows_after[idx]["labels"]) == 2


def test_overwrite_killed_mid_run_keeps_previous_output(tiny_clip, ray_local, many_images, finished_many, tmp_path):
    out, log = copy_of(finished_many, tmp_path), tmp_path / "overwrite.log"
    old_table = pq.read_table(str(out)).sort_by("input_index")
    old_files = snapshot(out)

    new_labels = ["red", "green", "blue"]
    proc = start_cli(cli_args(many_images, out, tiny_clip, new_labels, "--overwrite"), ray_local, log)
    kill_when(proc, out / STATE_DIR / "staging", "*/part-*.parquet", 3, log)
    assert pq.read_table(str(out)).sort_by("input_index").equals(old_table)  # same rows, whole
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(STATE_DIR)} == old_files

    # --resume with the overwrite's settings continues its staged run, then swaps it in.
    summary = run_label_job(JobConfig(input=str(many_images), output=str(out), labels=new_labels,
                                      model=str(tiny_clip), batch_size=RESUME_BATCH, concurrency=(1, 1),
                                      mode="resume"))
    new_table = pq.read_table(str(out))
    assert indices(out) == list(range(N_MANY))
    assert all(set(r) <= set(new_labels) for r in new_table.column("labels").to_pylist())
    assert 0 < summary.carried_over and summary.model_images == N_MANY - summary.carried_over
    assert manifest_of(out)["labels"] == new_labels and not (out / STATE_DIR).exists()
    assert not set(old_files) & {str(p.relative_to(out)) for p in out.glob("*.parquet")}


def test_an_output_that_cannot_be_written_exits_2_keeps_its_files_and_resume_completes_it(
        tiny_clip, ray_local, many_images, finished_many, tmp_path, monkeypatch, capsys):
    """The output's storage refuses data files mid-run (a full disk, a quota, a read-only
    folder): one `zslabel: error: cannot write the output ...` line and exit 2, not Ray's
    traceback and exit 1 (which means "error budget exceeded"; the hunt's ENOSPC repro,
    ray-project/ray#55174); the files committed so far are kept and --resume completes the run.

    The failure is a real OSError from the filesystem, as root too: a file where the run's data
    folder goes (an --overwrite's staging folder, moved aside with the files it holds), so every
    write task of the resumed run fails to create its file."""
    from zslabel import job, pipeline
    from zslabel.cli import main

    out = copy_of(finished_many, tmp_path)
    new_labels = ["red", "green", "blue"]
    args = ["label", str(many_images), "--labels", ",".join(new_labels), "--model", str(tiny_clip),
            "--output", str(out), "--batch-size", "4", "--rows-per-file", "4", "--concurrency", "1", "-q"]

    class StopAtFirstFile(pipeline.Progress):  # Ctrl-C once the overwrite has committed a file
        def update(self, rows, errors=0):
            raise KeyboardInterrupt

    real_progress = pipeline.Progress
    monkeypatch.setattr(pipeline, "Progress", StopAtFirstFile)
    assert main([*args, "--overwrite"]) == 130
    monkeypatch.setattr(pipeline, "Progress", real_progress)
    staged = list((out / STATE_DIR / "staging").glob("*/part-*.parquet"))
    assert 0 < len(staged) < N_MANY // 4, staged

    real_begin, moved = job.begin, []

    def begin(*a, **kw):  # the resumed run's data folder: its committed files moved aside, a file in its place
        session = real_begin(*a, **kw)
        folder = out / session.target.data_dir
        folder.rename(tmp_path / "aside")
        folder.write_bytes(b"in the way")
        moved.append(folder)
        return session

    monkeypatch.setattr(job, "begin", begin)
    capsys.readouterr()
    assert main([*args, "--resume", *RESUME_FLAGS]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("zslabel: error:")]
    assert lines and re.fullmatch(
        rf"zslabel: error: cannot write the output {re.escape(str(out))}: FileExistsError: \[Errno 17\] .+; "
        r"the files committed so far are kept: fix the output's storage and rerun with --resume", lines[-1]), err
    assert "Traceback" not in err, err

    monkeypatch.setattr(job, "begin", real_begin)
    moved[0].unlink()  # the obstacle removed, the committed files back
    (tmp_path / "aside").rename(moved[0])
    assert main([*args, "--resume", *RESUME_FLAGS]) == 0
    assert indices(out) == list(range(N_MANY))  # one row per input
    assert manifest_of(out)["labels"] == new_labels and not (out / STATE_DIR).exists()


def test_overwrite_and_refusal_on_s3(s3, tiny_clip, ray_local):
    """Object stores: files are published by single uploads, the swap is per-object renames."""
    import fsspec

    for i in range(6):
        buf = io.BytesIO()
        photo(30, 20, seed=i).save(buf, "PNG")
        s3.put(f"images/img_{i}.png", buf.getvalue())
    base = dict(input=s3.uri("images/"), output=s3.uri("out/"), model=str(tiny_clip), labels=LABELS,
                storage_options=s3.storage_options, batch_size=2, concurrency=(1, 1))
    run_label_job(JobConfig(**base))
    fs = fsspec.filesystem("s3", **s3.storage_options)
    root = f"{s3.bucket}/out"
    old = sorted(fs.find(root))
    with pytest.raises(OutputError, match="already holds data"):
        run_label_job(JobConfig(**base))
    assert sorted(fs.find(root)) == old

    summary = run_label_job(JobConfig(**dict(base, labels=["red", "green"]), mode="overwrite"))
    # This test's filesystem listed the folder before the swap and caches listings; zslabel's
    # own (with its I/O timeouts) is another instance, so look again as a new reader would.
    fs.invalidate_cache()
    table = pq.read_table(root, filesystem=fs)
    assert sorted(table.column("input_index").to_pylist()) == list(range(6)) and summary.model_images == 6
    assert all(set(r) <= {"red", "green"} for r in table.column("labels").to_pylist())
    now = sorted(fs.find(root))
    old_parts = [f for f in old if "/part-" in f]
    assert old_parts and not set(now) & set(old_parts) and not [f for f in now if "/_zslabel" in f or "/." in f]
    assert json.loads(fs.cat_file(f"{root}/{MANIFEST_NAME}"))["labels"] == ["red", "green"]


def write_part(path, idx, fingerprint, errors=None):
    table = pa.table({"input_index": pa.array(idx, pa.int64()),
                      "error": pa.array(errors or [None] * len(idx), pa.string())})
    pq.write_table(table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()}), path)


def test_duplicates_from_re_executed_writers_are_removed_before_the_commit(tmp_path):
    """Rows of earlier runs win, then this run's files in name order; no input is lost."""
    out = tmp_path / "out"
    out.mkdir()
    write_part(out / "part-R0-c.parquet", [0, 1], "fp")          # committed by an earlier run
    write_part(out / "part-R1-a.parquet", [1, 2], "fp")          # this run, 1 is a duplicate
    write_part(out / "part-R1-b.parquet", [2, 3], "fp", [None, "truncated: x"])
    write_part(out / "part-R1-z.parquet", [1], "fp")             # only duplicates: deleted
    carried_before = (out / "part-R0-c.parquet").read_bytes()
    plan = WriteSession(inspect_output(str(out)), WriteTarget(str(out), {}, "", "R1", "fp"), {}, done=None,
                        carried_files=("part-R0-c.parquet", "part-R0-d.parquet"))
    counts = plan.counts()
    assert indices(out) == [0, 1, 2, 3] and not (out / "part-R1-z.parquet").exists()
    assert (out / "part-R0-c.parquet").read_bytes() == carried_before
    assert pq.read_table(out / "part-R1-a.parquet").column("input_index").to_pylist() == [2]
    assert pq.read_table(out / "part-R1-b.parquet").column("input_index").to_pylist() == [3]
    assert (counts.rows, counts.written, counts.carried_over, counts.model_images) == (4, 2, 2, 1)
    assert counts.errors_by_code == {"truncated": 1}

    write_part(out / "part-R0-d.parquet", [0], "fp")  # earlier runs disagree: not repairable here
    with pytest.raises(OutputError, match="holds 1 inputs more than once"):
        plan.counts()


def begin_in(out, mode, fields):
    """The store's lifecycle up to ``begin``, as a command runs it (check, claim, begin)."""
    store = OutputStore.open(str(out))
    store.check(mode)
    try:
        session = store.begin(mode, fields)
    finally:
        store.release()
    return session


def test_swap_cut_short_is_finished_by_the_next_run(tmp_path):
    """A crash inside an overwrite's swap (some old files deleted, some staged files moved) is
    rolled forward by the next --resume/--overwrite; the default mode refuses and touches nothing."""
    out = tmp_path / "out"
    r1, r2 = "20261205T000001-aaaaaaaa", "20261205T000002-bbbbbbbb"  # run ids as the store makes them
    a, x, y = (f"part-{r}-{h * 16}.parquet" for r, h in ((r1, "a"), (r2, "b"), (r2, "c")))
    staging = out / STATE_DIR / "staging" / r2
    staging.mkdir(parents=True)
    fields = {"labels": ["new"]}
    fp = fingerprint_digest(fields)

    write_part(out / a, [0, 1], "old")   # old output: its other part and its manifest already deleted
    write_part(out / x, [0, 1], fp)      # staged file already moved in
    write_part(staging / y, [2, 3], fp)  # staged file not yet moved
    manifest = {"run_id": r2, "fingerprint": fp, "fingerprint_fields": fields}
    record = {"run_id": r2, "data_dir": f"_zslabel/staging/{r2}", "fingerprint": fp, "fingerprint_fields": fields}
    (out / STATE_DIR / "run.json").write_text(json.dumps(record))
    (out / STATE_DIR / "swap.json").write_text(json.dumps(dict(record, files=[x, y],
                                                               manifest=manifest)))
    before = snapshot(out)
    with pytest.raises(OutputError, match="unfinished run"):
        begin_in(out, "error", fields)
    assert snapshot(out) == before

    plan = begin_in(out, "resume", fields)
    assert sorted(p.name for p in out.glob("*.parquet")) == [x, y]
    assert indices(out) == [0, 1, 2, 3] and plan.done.tolist() == [0, 1, 2, 3] and not plan.staged
    assert not staging.exists()


def test_one_job_from_any_folder_has_one_fingerprint(tmp_path, monkeypatch):
    """The input and a local model folder are fingerprinted by one spelling (absolute), so a
    --resume from another working folder, or with the path written another way, is the same job
    (it was refused: "input: 'photos' -> '/data/photos'"). Hub ids and URIs stay as written."""
    (tmp_path / "data" / "photos").mkdir(parents=True)
    (tmp_path / "models" / "clip").mkdir(parents=True)

    def settings(cwd, photos, model):
        monkeypatch.chdir(cwd)
        return JobConfig(input=photos, output="out", labels=LABELS, model=model).result_settings()

    here = settings(tmp_path / "data", "photos", "../models/clip")
    assert here == settings(tmp_path, "data/photos/", "models/clip") == settings(
        tmp_path / "models", f"file://{tmp_path}/data/photos", str(tmp_path / "models" / "clip"))
    assert here["input"] == str(tmp_path / "data" / "photos")
    hub = settings(tmp_path, "s3://b/photos/", "openai/clip-vit-base-patch32")
    assert hub["input"] == "s3://b/photos/" and hub["model"]["id"] == "openai/clip-vit-base-patch32"


def test_fingerprint_covers_results_not_execution():
    schema = output_schema()

    def fields(**kw):
        cfg = JobConfig(**{"input": "in", "output": "out", "labels": LABELS, **kw})
        return fingerprint_fields(cfg.result_settings(), checkpoint_digest="abc", model_type="clip",
                                  score_kind="softmax", preprocess={"size": 224}, schema=schema)

    base = fields()
    same = fields(batch_size=7, concurrency=(1, 2), address="x", mode="resume", storage_options={"key": "s3cr3t"})
    assert fingerprint_digest(same) == fingerprint_digest(base) and "s3cr3t" not in json.dumps(same)
    assert describe_changes(base, fields(top_k=3, store_embeddings=True)) == [
        "store_embeddings: False -> True", "top_k: 5 -> 3"]
    assert describe_changes(base, fields(labels=["dog", "cat", "fox", "cow"])) == [
        "labels differ: added 'fox', 'cow', removed 'bird'"]
    assert describe_changes(base, fields(labels=["dog", "cat", "bird"])) == [
        "labels differ: same entries, other order: 'cat', 'dog', 'bird' -> 'dog', 'cat', 'bird'"]
    # A taxonomy-sized change stays one readable line.
    many = describe_changes(base, fields(labels=[f"n{i}" for i in range(1000)]))
    assert many == ["labels differ: added 'n0', 'n1', 'n2', 'n3', 'n4', ... (1,000 in all), "
                    "removed 'cat', 'dog', 'bird'"]
    assert describe_changes({"model": {"digest": "a"}}, {"model": {"digest": "b"}}) == ["model.digest: 'a' -> 'b'"]


def test_cli_flags_map_to_modes():
    from zslabel.cli import build_parser, config_from_args

    def parse(*flags):
        return config_from_args(build_parser().parse_args(["label", "in", "-o", "out", "--labels", "a", *flags]))

    cfg = parse("--resume", "--retry-errors")
    assert (cfg.mode, cfg.retry_errors) == ("resume", True)
    assert (parse().mode, parse().retry_errors, parse("--overwrite").mode) == ("error", False, "overwrite")
    with pytest.raises(ConfigError, match="only applies with --resume"):
        parse("--retry-errors").validate()


def test_resume_after_the_input_changed(tiny_clip, ray_local, tmp_path):
    """Resume skips inputs by position in the listing: a file added in front of others, or one
    removed, must make --resume refuse (touching nothing) instead of skipping new images,
    labeling others twice or keeping rows of deleted ones; inputs added after all earlier ones
    (here: manifest lines appended) extend the run, each input exactly once."""
    d = tmp_path / "in"
    d.mkdir()
    for name, seed in (("b.png", 1), ("c.png", 2), ("d.png", 3)):
        photo(24, 20, seed=seed).save(d / name)
    out = tmp_path / "out"
    base = dict(input=str(d), output=str(out), labels=LABELS, model=str(tiny_clip), concurrency=(1, 1))
    assert run_label_job(JobConfig(**base)).rows == 3
    before = snapshot(out)

    photo(24, 20, seed=4).save(d / "a.png")  # sorts first: every committed row would move
    with pytest.raises(OutputError, match=r"input changed.*3 of its 3 committed rows.*input_index 0 was "
                                          r"'[^']*b\.png', now '[^']*a\.png'.*--overwrite"):
        run_label_job(JobConfig(**base, mode="resume"))
    (d / "a.png").unlink()
    (d / "d.png").unlink()  # the last one gone: its row would stay behind
    with pytest.raises(OutputError, match=r"1 of its 3 committed rows.*input_index 2 was '[^']*d\.png', "
                                          r"no longer listed"):
        run_label_job(JobConfig(**base, mode="resume"))
    assert snapshot(out) == before  # refusals touch nothing

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{d / 'b.png'}\n{d / 'c.png'}\n")
    mout = tmp_path / "mout"
    mbase = dict(base, input=str(manifest), output=str(mout))
    assert run_label_job(JobConfig(**mbase)).rows == 2
    photo(24, 20, seed=5).save(d / "e.png")
    manifest.write_text(f"{d / 'b.png'}\n{d / 'c.png'}\n{d / 'e.png'}\n")
    extended = run_label_job(JobConfig(**mbase, mode="resume"))
    assert (extended.rows, extended.model_images, extended.carried_over) == (3, 1, 2)
    rows = sorted((r["input_index"], r["path"]) for r in pq.read_table(str(mout)).to_pylist())
    assert [(i, os.path.basename(p)) for i, p in rows] == [(0, "b.png"), (1, "c.png"), (2, "e.png")]


def test_resume_after_the_tar_shards_changed(tiny_clip, ray_local, tmp_path):
    """Tar members are listed in tasks, so a resume checks the shards instead: the earlier run's
    shards (recorded in its manifest) must come first, in order. A shard sorting in front is
    refused, touching nothing; one sorting last extends the run."""
    from source_files import jpeg, make_tar

    d = tmp_path / "shards"
    d.mkdir()
    make_tar(d / "b.tar", [("k1.jpg", jpeg(1)), ("k2.jpg", jpeg(2))])
    make_tar(d / "c.tar", [("k3.jpg", jpeg(3))])
    out = tmp_path / "out"
    base = dict(input=str(d), output=str(out), labels=LABELS, model=str(tiny_clip), concurrency=(1, 1))
    assert run_label_job(JobConfig(**base)).rows == 3
    assert manifest_of(out)["input_files"] == [str(d / "b.tar"), str(d / "c.tar")]
    before = snapshot(out)

    make_tar(d / "a.tar", [("k0.jpg", jpeg(0))])
    with pytest.raises(OutputError, match=r"input changed.*file #0 was '[^']*b\.tar', now '[^']*a\.tar'"):
        run_label_job(JobConfig(**base, mode="resume"))
    assert snapshot(out) == before
    (d / "a.tar").unlink()
    make_tar(d / "d.tar", [("k4.jpg", jpeg(4))])
    extended = run_label_job(JobConfig(**base, mode="resume"))
    assert (extended.rows, extended.model_images, extended.carried_over) == (4, 1, 3)
    paths = [os.path.basename(p) for p in pq.read_table(str(out), columns=["path"]).column(0).to_pylist()]
    assert sorted(paths) == ["b.tar#k1.jpg", "b.tar#k2.jpg", "c.tar#k3.jpg", "d.tar#k4.jpg"]


def test_two_jobs_into_one_output_second_is_refused_first_is_whole(tiny_clip, ray_local, many_images, tmp_path):
    """A new user's two jobs started seconds apart into one output: the second exits 2 in one line
    naming the first run, changes nothing, and the first commits exactly its own rows."""
    out = tmp_path / "out"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_cli(cli_args(many_images, out, tiny_clip, LABELS), ray_local, first_log)
    deadline = time.monotonic() + 240
    while not (out / STATE_DIR / "claim.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()[-3000:]
        time.sleep(0.05)
    first_run = json.loads((out / STATE_DIR / "claim.json").read_text())["run_id"]
    for mode in ([], ["--resume"], ["--overwrite"]):
        second = start_cli(cli_args(many_images, out, tiny_clip, ["fox", "owl"], *mode), ray_local, second_log)
        assert second.wait(timeout=240) == 2, second_log.read_text()[-3000:]
        errors = [line for line in second_log.read_text().splitlines() if line.startswith("zslabel: error")]
        assert len(errors) == 1 and first_run in errors[0] and "being written by" in errors[0], errors
    assert first.wait(timeout=600) == 0, first_log.read_text()[-3000:]
    assert indices(out) == list(range(N_MANY))
    manifest = manifest_of(out)
    assert manifest["run_id"] == first_run and manifest["labels"] == LABELS
    assert set(pq.read_table(str(out), columns=["labels"]).column(0).combine_chunks().flatten().to_pylist()) <= set(LABELS)


def test_the_summary_of_a_finished_run_keeps_its_skip_reasons():
    """A --resume with nothing to do said "skipped 2 listed entries" where the run itself had
    said why (not_an_image=2)."""
    from zslabel.summary import summary_of_finished

    manifest = {"counts": {"rows": 24, "labeled": 24, "skipped": 2, "listed": 26,
                           "skipped_by_reason": {"not_an_image": 2}}}
    summary = summary_of_finished("out", manifest, "out/_run_manifest.json", 0.0)
    assert summary.skipped_by_reason == {"not_an_image": 2} and "not_an_image=2" in summary.line()
    # It says that nothing was labeled now, with no rate (it said "0.0 images/s"; new-user trial).
    line = summary.line()
    assert line.startswith("nothing to label: every input already has its row; labeled 24 of 24 images;")
    assert "images/s" not in line and "rows kept" not in line


def test_the_interrupt_message_says_whether_anything_was_committed(tmp_path):
    """Ctrl-C before the first commit said "committed files are kept: rerun with --resume" of
    an output that did not exist (the claim's folder is removed when empty; new-user trial)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zslabel.cli import _after_interrupt

    assert _after_interrupt(str(tmp_path / "never"), {}) == f"nothing was committed to {tmp_path / 'never'}, " \
                                                            "which is as it was: rerun the same command"
    # An --overwrite of a finished run interrupted before it staged a file removed its run
    # record: the old output is as it was, and "--resume to continue" was wrong advice (trial).
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "out" / "part-00000.parquet")
    (tmp_path / "out" / "_run_manifest.json").write_text("{}")
    assert _after_interrupt(str(tmp_path / "out"), {}).startswith(f"nothing was committed to {tmp_path / 'out'}")
    (tmp_path / "out" / "_zslabel").mkdir()
    (tmp_path / "out" / "_zslabel" / "run.json").write_text("{}")  # a run that committed files keeps it
    assert _after_interrupt(str(tmp_path / "out"), {}) == \
        "committed files are kept: rerun with --resume (in place of --overwrite, if given) to continue"
