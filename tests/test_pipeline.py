"""The labeling job end to end on local Ray: parity with transformers, contract, CLI, validation."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import photo
from PIL import Image

from zslabel import JobConfig, run_label_job
from zslabel.errors import (
    AccountingError,
    ConfigError,
    ErrorBudgetExceeded,
    InputError,
    OutputError,
    RayStartError,
)
from zslabel.store import MANIFEST_NAME

LABELS = ["cat", "dog", "bird", "a red car", "tree"]


def read_rows(out):
    return {r["path"]: r for r in pq.read_table(str(out)).to_pylist()}


def mixed_images(d):
    """Images of different sizes and modes (all opaque, so the reference sees the same picture)."""
    d.mkdir(parents=True, exist_ok=True)
    photo(97, 61, 1).save(d / "landscape.jpg", quality=92)
    photo(40, 90, 2).convert("L").save(d / "portrait_gray.png")
    photo(20, 20, 3).save(d / "smaller_than_input.png")
    photo(64, 64, 4).convert("RGBA").save(d / "rgba_opaque.png")
    photo(50, 70, 5).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    photo(300, 200, 6).save(d / "large.webp", quality=90)
    return sorted(d.iterdir())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_scores_match_transformers_pipeline(family, tiny_clip, tiny_siglip, ray_local, tmp_path):
    from transformers import pipeline

    ckpt = tiny_clip if family == "clip" else tiny_siglip
    files = mixed_images(tmp_path / "in")
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), labels=LABELS,
                    model=str(ckpt), top_k=len(LABELS), batch_size=4)
    summary = run_label_job(cfg)
    assert summary.rows == len(files) == summary.labeled
    rows = read_rows(tmp_path / "out")
    reference = pipeline("zero-shot-image-classification", model=str(ckpt))
    for f in files:
        expected = reference(str(f), candidate_labels=LABELS)
        got = rows[str(f)]
        assert got["labels"] == [e["label"] for e in expected], f.name
        assert got["scores"] == pytest.approx([e["score"] for e in expected], abs=1e-4), f.name
    if family == "clip":
        assert all(sum(r["scores"]) == pytest.approx(1, abs=1e-4) for r in rows.values())


def test_contract_errors_schema_and_manifest(tiny_clip, ray_local, tmp_path, image_folder):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "text.png").write_text("hello")
    (image_folder / "notes.txt").write_text("not an image")
    trunc = (image_folder / "img_00.jpg").read_bytes()
    (image_folder / "truncated.jpg").write_bytes(trunc[: len(trunc) // 2])
    out = tmp_path / "out"
    summary = run_label_job(JobConfig(input=str(image_folder), output=str(out), labels=["a", "b", "c"],
                                      model=str(tiny_clip), top_k=5, batch_size=3))
    rows = read_rows(out)
    assert len(rows) == 16 == summary.rows and summary.skipped == 1
    errors = {os.path.basename(p): r["error"] for p, r in rows.items() if r["error"]}
    assert set(errors) == {"broken.jpg", "empty.png", "text.png", "truncated.jpg"}
    assert errors["truncated.jpg"].startswith("truncated:")
    assert errors["empty.png"].startswith("unidentified_image:")
    for r in rows.values():
        if r["error"]:
            assert r["labels"] is None and r["scores"] is None
        else:
            assert len(r["labels"]) == 3 and r["width"] > 0 and r["height"] > 0  # top-k capped at C
            assert r["scores"] == sorted(r["scores"], reverse=True)
    schemas = {str(pq.read_schema(f)) for f in out.glob("*.parquet")}
    assert len(schemas) == 1
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    by_code = manifest["counts"]["errors_by_code"]
    assert manifest["counts"]["rows"] == 16 and sum(by_code.values()) == 4 and by_code["unidentified_image"] >= 2
    assert manifest["labels"] == ["a", "b", "c"] and manifest["model"]["score_kind"] == "softmax"
    assert manifest["templates"] == ["This is a photo of {}."] and "transformers" in manifest["versions"]


def test_dedupe_through_the_job_counts_and_says_the_repeats(tiny_clip, ray_local, tmp_path, image_folder):
    """A manifest naming images twice (and once by another spelling) with ``--dedupe``: one row
    per image, the repeats counted in the manifest and said in the summary line, which said
    "skipped 0 listed entries" and nothing of the 3 removed (trial)."""
    images = sorted(str(p) for p in image_folder.glob("*.jpg"))[:3]
    lines = images + [images[0], images[1], images[2].replace("/images/", "/images//")]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_label_job(JobConfig(input=str(tmp_path / "list.txt"), output=str(out), labels=["a", "b"],
                                      model=str(tiny_clip), dedupe=True))
    assert sorted(read_rows(out)) == images and summary.rows == 3 and summary.duplicates_removed == 3
    assert "3 duplicates removed (--dedupe)" in summary.line()
    counts = json.loads((out / MANIFEST_NAME).read_text())["counts"]
    assert counts["listed"] == 6 and counts["duplicates_removed"] == 3 and counts["rows"] == 3


def test_refuses_occupied_output_and_validates_before_reading(tiny_clip, ray_local, tmp_path, image_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already holds data"):
        run_label_job(JobConfig(input=str(image_folder), output=str(out), labels=["a"], model=str(tiny_clip)))
    assert (out / "old.parquet").read_bytes() == b"keep me"
    # A folder of other files (here the input itself) is not a run: no --resume/--overwrite advice.
    with pytest.raises(OutputError, match=r"holds files that are not a zslabel output .*; choose an empty or "
                                          r"new location$"):
        run_label_job(JobConfig(input=str(image_folder), output=str(image_folder), labels=["a"],
                                model=str(tiny_clip)))
    # --overwrite/--resume never touch a folder that is not a zslabel output (e.g. the input).
    for mode in ("overwrite", "resume"):
        with pytest.raises(OutputError, match="not a zslabel output"):
            run_label_job(JobConfig(input=str(image_folder), output=str(image_folder), labels=["a"],
                                    model=str(tiny_clip), mode=mode))
    assert len(list(image_folder.rglob("*.*"))) == 12
    with pytest.raises(ConfigError, match="duplicate labels"):
        run_label_job(JobConfig(input=str(image_folder), output=str(tmp_path / "o2"), labels=["a", "a"],
                                model=str(tiny_clip)))
    with pytest.raises(InputError):
        empty = tmp_path / "empty"
        empty.mkdir()
        run_label_job(JobConfig(input=str(empty), output=str(tmp_path / "o3"), labels=["a"], model=str(tiny_clip)))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def run_cli(args, ray_address, **kw):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    return subprocess.run([sys.executable, "-m", "zslabel", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def test_cli_end_to_end_with_yaml_config(tiny_clip, ray_local, tmp_path, image_folder):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"labels: [red, green, blue]\nmodel: {tiny_clip}\ntop_k: 1\nbatch_size: 5\n")
    out = tmp_path / "out"
    proc = run_cli(["label", str(image_folder), "--config", str(cfg), "--output", str(out), "--top-k", "2"],
                   ray_local)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labeled 12 of 12 images" in proc.stdout
    rows = read_rows(out)
    assert len(rows) == 12 and all(len(r["labels"]) == 2 for r in rows.values())  # flag beats YAML
    assert all(set(r["labels"]) <= {"red", "green", "blue"} for r in rows.values())
    shown = run_cli(["show", str(out), "-n", "3"], ray_local)
    lines = shown.stdout.splitlines()
    assert shown.returncode == 0 and len(lines) == 3
    assert "(showing 3 of 12 rows; --rows N for more)" in shown.stderr
    assert "showing" not in run_cli(["show", str(out), "--rows", "12"], ray_local).stderr
    assert "warning" not in shown.stderr
    first = min(rows.values(), key=lambda r: r["input_index"])
    assert lines[0].split()[:2] == [first["path"].rsplit("/", 1)[-1], first["labels"][0]]
    bad = run_cli(["show", str(out), "--rows", "-1"], ray_local)
    assert bad.returncode == 2 and "must be >= 0 (got -1)" in bad.stderr
    # Rows of a run that never committed (no run manifest): shown, with a warning saying so.
    (out / MANIFEST_NAME).unlink()
    unfinished = run_cli(["show", str(out), "-n", "3"], ray_local)
    assert unfinished.returncode == 0 and unfinished.stdout == shown.stdout
    assert f"warning: {out} holds no finished run (no {MANIFEST_NAME})" in unfinished.stderr


def test_cli_warns_when_nothing_was_labeled(tiny_clip, ray_local, tmp_path):
    """The labels file given as the input (a manifest of label names): every row is a
    read_error; the run keeps its contract (exit 0, a row each) and says so on stderr."""
    labels = tmp_path / "labels.txt"
    labels.write_text("red circle\nblue square\n")
    proc = run_cli(["label", str(labels), "--labels-file", str(labels), "--model", str(tiny_clip),
                    "--output", str(tmp_path / "out")], ray_local)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labeled 0 of 2 images; errors: read_error=2" in proc.stdout
    assert f"warning: no image was labeled: all 2 inputs failed; check that {labels} is the input" in proc.stderr


def test_show_names_stay_apart():
    """`show` names rows relative to their common folder and escapes what looks alike."""
    from zslabel.show import display_names

    assert display_names(["/d/a/x.jpg", "/d/b/x.jpg"]) == ["a/x.jpg", "b/x.jpg"]
    assert display_names(["s3://b/k/\u00e9.jpg", "s3://b/k/e\u0301.jpg"]) == ["\u00e9.jpg", "e\\u0301.jpg"]
    assert display_names(["/d/tab\there.jpg", "/d/%FF.jpg"]) == ["tab\\there.jpg", "%FF.jpg"]
    assert display_names(["/d/only.jpg"]) == ["only.jpg"]


def test_show_on_parquet_files_of_another_tool_is_one_line(tmp_path):
    """`show` on a folder of someone else's Parquet files: one line naming the missing columns
    and what the files hold (no schema dump, no "unfinished run" advice), exit 2."""
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "f1.parquet")
    proc = subprocess.run([sys.executable, "-m", "zslabel", "show", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"zslabel: error: {tmp_path} is not a zslabel output: its Parquet files "
                                        "have no column path, input_index, labels, scores, error (they hold a, b)"]


@pytest.mark.parametrize("args, message", [
    (["--labels", "a,b,a"], "duplicate labels: 'a'"),
    (["--labels", "a", "--template", "no field here"], "exactly one"),
    (["--labels", ""], "empty label"),
    (["--labels", "a", "--model", "/nonexistent/ckpt"], "no such checkpoint folder: /nonexistent/ckpt"),
    (["--labels", "a", "--model", "tests/nonexistent"], "no such checkpoint folder: tests/nonexistent"),
    (["--labels", "a", "--io-timeout", "-1"], "--io-timeout must be > 0 and at most 86400 seconds"),
    (["--labels", "a", "--io-timeout", "inf"], "--io-timeout must be > 0 and at most 86400 seconds"),
    (["--labels", "a", "--io-timeout", "1e10"], "--io-timeout must be > 0 and at most 86400 seconds"),
    (["--labels", "a", "--decode-timeout", "inf"], "--decode-timeout must be 0 (no limit) to 86400 seconds"),
    (["--labels", "a", "--decode-timeout", "nan"], "--decode-timeout must be 0 (no limit) to 86400 seconds"),
    (["--labels", "a", "--io-retries", "-1"], "--io-retries must be >= 0 (got -1)"),
])
def test_cli_validation_errors_exit_2_and_write_nothing(args, message, tiny_clip, ray_local, tmp_path, image_folder):
    out = tmp_path / "out"
    model = [] if "--model" in args else ["--model", str(tiny_clip)]
    proc = run_cli(["label", str(image_folder), "--output", str(out), *model, *args], ray_local)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_cli_help_explains():
    proc = subprocess.run([sys.executable, "-m", "zslabel", "label", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--labels" in proc.stdout and "softmax" in proc.stdout


def test_decode_tasks_use_every_cpu_the_labeler_leaves_free(tiny_clip, ray_local, tmp_path):
    """One labeler actor holding 1 of the instance's 4 CPUs leaves 3 to decoding, and decode
    tasks (1 CPU each) must run several at a time (3 when Ray's workers start in time; under
    load a third may start after the first finished, so the test asks for 2). When write tasks asked for CPUs with no cap on how
    many run at once, Ray Data's resource allocator gave the write operator the CPUs no operator
    had reserved, and decoding ran one task at a time: a decode-bound GPU node used a fraction
    of its cores (benchmarks/README.md, "Decode-bound")."""
    import time

    from zslabel_dev.timeline import concurrency, task_intervals

    d = tmp_path / "in"
    d.mkdir()
    pictures = [photo(256, 256, seed=s) for s in range(4)]
    for i in range(640):  # 10 planned blocks of 64 rows, ~0.2 s of decoding each
        pictures[i % 4].save(d / f"img_{i:04d}.jpg", quality=90)
    started_us = time.time() * 1e6
    cfg = JobConfig(input=str(d), output=str(tmp_path / "out"), labels=LABELS, model=str(tiny_clip),
                    concurrency=(1, 1), num_cpus_per_actor=1.0, decode_cpus_per_task=1.0)
    assert run_label_job(cfg).labeled == 640

    intervals = task_intervals("decode_block", started_us)
    assert len(intervals) == 10
    assert concurrency(intervals)["most"] >= 2  # was 1: the budget allowed one task at a time


def test_output_dash_is_refused_not_made_a_folder(tmp_path, monkeypatch):
    """``-o -`` (a Unix "stdout") made a folder named ``-`` in the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the output is a folder of Parquet files, not a stream"):
        JobConfig(input=str(tmp_path), output="-", labels=["a", "b"], model="m").validate()
    assert not (tmp_path / "-").exists()


def test_weights_changed_during_a_run_are_refused_not_mixed(tiny_clip, ray_local, image_folder, tmp_path, capsys):
    """New weights written into the checkpoint folder after the driver read it (its label
    embeddings, digest and fingerprint are those of the first) and before the labeler actors
    load it: the actors loaded the new ones, so the output mixed two models under one
    manifest, exit 0. Now each actor checks the digest and the run exits 2 naming the change;
    nothing is committed. Without the change, the same run labels every image."""
    import shutil

    from zslabel import pipeline
    from zslabel.cli import main
    from zslabel_dev.tiny import build_tiny_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_clip, checkpoint)
    other = build_tiny_checkpoint(tmp_path / "other", "clip", seed=1)
    args = ["label", str(image_folder), "--labels", "cat,dog", "--model", str(checkpoint), "--concurrency", "1", "-q"]
    real_compose = pipeline.compose

    def compose_after_a_push(*a, **kw):
        for weights in other.glob("*.safetensors"):
            shutil.copy(weights, checkpoint / weights.name)
        return real_compose(*a, **kw)

    pipeline.compose = compose_after_a_push
    try:
        assert main([*args, "--output", str(tmp_path / "mixed")]) == 2
    finally:
        pipeline.compose = real_compose
    err = capsys.readouterr().err
    # Ray Data logs each failed actor start (it replaces such actors 3 times) before it gives up;
    # the run's last word is one line naming the change.
    assert err.strip().splitlines()[-1].startswith(
        f"zslabel: error: the checkpoint of --model {checkpoint} changed during the run: "), err[-3000:]
    assert not (tmp_path / "mixed" / MANIFEST_NAME).exists()
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0  # the folder as it is now: one model
    assert pq.read_table(str(tmp_path / "whole")).num_rows == 12


@pytest.mark.parametrize("error, code", [
    (ErrorBudgetExceeded("3 of 4 images failed"), 1), (RayStartError("the Ray node timed out during startup"), 3),
    (AccountingError("5 inputs listed, the output holds 3 rows"), 4), (OutputError("cannot write"), 2),
    (IsADirectoryError(21, "Is a directory"), 2)])
def test_each_error_exits_with_the_readme_code_in_one_line(error, code, tmp_path, image_folder, monkeypatch, capsys):
    """The README's exit codes: 1 error budget, 3 Ray did not start, 4 the rows do not account
    for the inputs, 2 any other error the CLI names (a ZslabelError, a folder where a file goes);
    each said in one ``zslabel: error:`` line, no traceback."""
    from zslabel import pipeline
    from zslabel.cli import main

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "run_label_job", fails)
    assert main(["label", str(image_folder), "--labels", "a,b", "--model", str(tmp_path),
                 "--output", str(tmp_path / "out"), "-q"]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"zslabel: error: {error}" and "Traceback" not in err, err
