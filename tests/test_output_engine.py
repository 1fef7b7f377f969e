"""One output engine: relabel through the commit protocol (atomic --overwrite, --resume), the
shared labeling options, and the fail-fast rule (no Ray, no model for what can be checked first).

CLI runs are real subprocesses on real Parquet files; "Ray was not started" / "the model was not
loaded" is asserted from the subprocess's own ``sys.modules`` after ``cli.main`` returned.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zslabel import JobConfig, run_label_job
from zslabel.store import MANIFEST_NAME

LABELS_A = ["red", "green", "blue"]
LABELS_B = ["cat", "dog", "bird", "tree"]
LABELS_C = ["sun", "moon"]
DIM = 16  # tiny checkpoints' embedding size

# Runs cli.main in a fresh interpreter and reports which heavy modules it imported.
PROBE = ("import sys, json; from zslabel.cli import main; rc = main(sys.argv[1:]); "
         "print('MODULES ' + json.dumps({m: m in sys.modules for m in ('ray', 'torch', 'transformers')})); "
         "sys.exit(rc)")


def zslabel(*args, env_extra=None):
    """Run the CLI in a subprocess (no RAY_ADDRESS: it would start its own Ray if it got that far)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    proc.wall_s = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES ")), "MODULES {}")
    proc.modules = json.loads(line[len("MODULES "):])
    return proc


def embeddings_source(root, files=3, rows=100):
    """A plain embeddings dataset: ``files`` Parquet files of ``rows`` rows (path, note, L2-normalised
    float32 embedding of size DIM), as an earlier run or another tool would leave them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(files):
        e = rng.normal(size=(rows, DIM)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        pq.write_table(pa.table({
            "path": [f"img_{f}_{i:03d}.jpg" for i in range(rows)],
            "note": [f"file {f}"] * rows,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), DIM)}), root / f"part-{f}.parquet")
    return sorted(root.glob("*.parquet"))


def damage(path):
    """Break the first data page header, keep the footer: the file lists fine, reading it fails."""
    data = bytearray(path.read_bytes())
    good = bytes(data)
    data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))
    return good


def labels_of(out):
    table = pq.read_table(str(out))
    return table.num_rows, {lab for row in table.column("labels").to_pylist() if row for lab in row}


def test_failed_relabel_overwrite_keeps_old_output_whole_and_resume_finishes(tiny_clip, tmp_path):
    src = tmp_path / "src"
    files = embeddings_source(src)
    out = tmp_path / "out"
    first = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(LABELS_A), "-o", out, "--top-k", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert labels_of(out) == (300, set(LABELS_A))
    old_files = sorted(p.name for p in out.glob("*.parquet"))

    good = damage(files[-1])
    failed = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(LABELS_B), "-o", out,
                     "--top-k", "2", "--overwrite")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert f"cannot read relabel source file {files[-1]}" in failed.stderr
    # The old output is whole: the same files, 300 rows, the old labels, its manifest.
    assert sorted(p.name for p in out.glob("*.parquet")) == old_files
    assert labels_of(out) == (300, set(LABELS_A))
    assert json.loads((out / MANIFEST_NAME).read_text())["labels"] == LABELS_A

    # Fixed source: --resume finishes the staged relabel; the two files written before are kept.
    files[-1].write_bytes(good)
    resumed = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(LABELS_B), "-o", out,
                      "--top-k", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "labeled 300 of 300 images" in resumed.stdout and "200 rows kept from earlier runs" in resumed.stdout
    assert labels_of(out) == (300, set(LABELS_B))
    table = pq.read_table(str(out))
    assert sorted(table.column("input_index").to_pylist()) == list(range(300))
    assert set(table.column("note").to_pylist()) == {"file 0", "file 1", "file 2"}
    assert not (out / "_zslabel").exists() and not set(old_files) & {p.name for p in out.glob("*.parquet")}
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["kind"] == "relabel" and m["labels"] == LABELS_B and m["counts"]["rows"] == 300
    assert m["counts"]["carried_over"] == 200 and m["fingerprint"]

    # Nothing left to do: a second --resume returns without loading the model.
    again = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(LABELS_B), "-o", out,
                    "--top-k", "2", "--resume")
    assert again.returncode == 0 and "labeled 300 of 300 images" in again.stdout, again.stderr[-3000:]
    assert again.modules == {"ray": False, "torch": False, "transformers": False}


def test_relabel_overwrite_replaces_the_old_output_completely(tiny_clip, tmp_path):
    src = tmp_path / "src"
    embeddings_source(src, files=2, rows=50)
    out = tmp_path / "out"
    for labels in (LABELS_A, LABELS_C):
        proc = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(labels), "-o", out,
                       "--top-k", "1", "--drop-embeddings", "--overwrite")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert labels_of(out) == (100, set(labels))
        assert len(list(out.glob("*.parquet"))) == 2 and not (out / "_zslabel").exists()
    # A relabel that changes a setting cannot --resume into that output: refused before the model loads.
    refused = zslabel("relabel", src, "--model", tiny_clip, "--labels", ",".join(LABELS_B), "-o", out, "--resume")
    assert refused.returncode == 2 and "labels differ" in refused.stderr, refused.stderr[-3000:]
    assert refused.modules["transformers"] is False


def test_typo_in_input_path_fails_in_seconds_without_ray(tiny_clip, tmp_path):
    proc = zslabel("label", tmp_path / "no_such_folder", "--labels", "a,b", "--model", tiny_clip,
                   "-o", tmp_path / "out")
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-3000:]
    assert proc.modules == {"ray": False, "torch": False, "transformers": False}
    assert proc.wall_s < 15  # loose guard only; the modules above are the real check
    assert not (tmp_path / "out").exists()


def test_empty_folder_fails_in_seconds_without_ray(tiny_clip, tmp_path):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.png").write_bytes(b"not counted: hidden")
    proc = zslabel("label", tmp_path / "empty", "--labels", "a,b", "--model", tiny_clip, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "holds only hidden files" in proc.stderr, proc.stderr[-3000:]
    assert proc.modules == {"ray": False, "torch": False, "transformers": False}
    assert not (tmp_path / "out").exists()


def test_finished_run_resume_and_refused_resume_need_no_ray(tiny_clip, ray_local, image_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_label_job(JobConfig(input=str(image_folder), output=str(out), labels=LABELS_A,
                                      model=str(tiny_clip), top_k=2, batch_size=4))
    assert summary.rows == 12
    args = [image_folder, "--labels", ",".join(LABELS_A), "--model", tiny_clip, "-o", out, "--top-k", "2"]
    done = zslabel("label", *args, "--resume")
    assert done.returncode == 0 and "labeled 12 of 12 images" in done.stdout, done.stderr[-3000:]
    assert done.modules == {"ray": False, "torch": False, "transformers": False}
    refused = zslabel("label", *args[:-2], "--top-k", "3", "--resume")
    assert refused.returncode == 2 and "top_k: 2 -> 3" in refused.stderr, refused.stderr[-3000:]
    assert refused.modules["ray"] is False and refused.modules["transformers"] is False
    occupied = zslabel("label", *args)
    assert occupied.returncode == 2 and "already holds data" in occupied.stderr
    assert occupied.modules["ray"] is False
    # A new image that sorts after the others: the finished run is no longer complete, so
    # --resume labels just that one. (One sorting in front moves committed rows: refused,
    # tests/test_resume.py::test_resume_after_the_input_changed.)
    new = image_folder / "zz_new.png"
    new.write_bytes((image_folder / "sub" / "img_01.png").read_bytes())
    more = run_label_job(JobConfig(input=str(image_folder), output=str(out), labels=LABELS_A,
                                   model=str(tiny_clip), top_k=2, batch_size=4, mode="resume"))
    assert (more.rows, more.carried_over, more.model_images) == (13, 12, 1)
    paths = pq.read_table(str(out), columns=["path"]).column(0).to_pylist()
    assert len(set(paths)) == 13 and str(new) in paths


def test_resume_of_a_finished_run_over_shard_patterns_returns_at_once(tiny_clip, ray_local, image_folder, tmp_path,
                                                                       caplog):
    """Tar shards named by a brace range: a --resume of the finished run returns at once (a
    stamp over the matched files; it started Ray and listed every shard, ~25 s here), and a
    shard changed since is noticed (the run goes ahead; the model runs on nothing new). Globs:
    tests/test_storage.py::test_the_stamp_of_a_pattern_covers_every_file_it_matches."""
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    images = sorted(p for p in image_folder.rglob("*") if p.is_file())
    for s_i in range(2):
        with tarfile.open(shards / f"s-{s_i}.tar", "w") as t:
            for i, p in enumerate(images[s_i * 6:(s_i + 1) * 6]):
                t.add(p, arcname=f"{s_i}{i:03d}{p.suffix.lower()}")
    pattern, out = f"{shards}/s-{{0..1}}.tar", tmp_path / "out"
    config = JobConfig(input=pattern, output=str(out), labels=LABELS_A, model=str(tiny_clip), top_k=2, batch_size=4)
    run_label_job(config)
    done = zslabel("label", pattern, "--labels", ",".join(LABELS_A), "--model", tiny_clip, "-o", out, "--top-k", "2",
                   "--resume")
    assert done.returncode == 0 and "labeled 12 of 12 images" in done.stdout, done.stderr[-3000:]
    assert "nothing to do" in done.stderr and done.modules["ray"] is False
    os.utime(shards / "s-1.tar", ns=(1, 1))
    with caplog.at_level("INFO", logger="zslabel"):
        again = run_label_job(dataclasses.replace(config, mode="resume"))
    assert "nothing to do" not in caplog.text
    assert (again.rows, again.carried_over, again.model_images) == (12, 12, 0)


def test_output_inside_the_input_folder_is_no_input_of_a_rerun(tiny_clip, ray_local, image_folder):
    """`zslabel label /data --output /data/out`: the output's own files (parts, manifest, state)
    are one skipped entry, not inputs, so a --resume of the finished run returns at once (input
    stamp unchanged, no Ray) and an --overwrite counts what the first run counted."""
    out = image_folder / "out"
    base = dict(input=str(image_folder), output=str(out), labels=LABELS_A, model=str(tiny_clip), top_k=2,
                batch_size=4)
    first = run_label_job(JobConfig(**base))
    def input_counts():
        c = json.loads((out / MANIFEST_NAME).read_text())["counts"]
        return {k: c.get(k) for k in ("rows", "listed", "skipped", "skipped_by_reason", "duplicates_removed")}

    counts = input_counts()
    assert (first.rows, first.skipped, first.skipped_by_reason) == (12, 1, {"output_folder": 1})
    assert counts["listed"] == 13 and counts["skipped_by_reason"] == {"output_folder": 1}

    args = [image_folder, "--labels", ",".join(LABELS_A), "--model", tiny_clip, "-o", out, "--top-k", "2"]
    done = zslabel("label", *args, "--resume")
    assert done.returncode == 0 and "labeled 12 of 12 images" in done.stdout, done.stderr[-3000:]
    assert "nothing to do" in done.stderr
    assert done.modules == {"ray": False, "torch": False, "transformers": False}

    again = run_label_job(JobConfig(**base, mode="overwrite"))
    assert (again.rows, again.listed, again.skipped, again.skipped_by_reason) == (
        first.rows, first.listed, first.skipped, first.skipped_by_reason)
    assert input_counts() == counts
    paths = pq.read_table(str(out), columns=["path"]).column(0).to_pylist()
    assert len(paths) == 12 and not [p for p in paths if p.startswith(str(out))]


def test_every_label_and_relabel_flag_is_an_option_field():
    import dataclasses

    from zslabel.cli import CLI_ONLY, build_parser
    from zslabel.relabel import RelabelConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, cls in (("label", JobConfig), ("relabel", RelabelConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        dests = {a.dest for a in sub.choices[name]._actions if a.dest != "help"}
        assert dests - CLI_ONLY <= fields, (name, dests - CLI_ONLY - fields)
    args = build_parser().parse_args(["relabel", "src", "-o", "o", "--labels", "a, b", "--template", "x {}",
                                      "--drop-embeddings", "--resume", "--retry-errors", "--top-k", "1"])
    cfg = RelabelConfig.from_args(args)
    assert (cfg.labels, cfg.templates, cfg.store_embeddings, cfg.mode, cfg.retry_errors, cfg.top_k) == (
        ["a", "b"], ["x {}"], False, "resume", True, 1)
    assert RelabelConfig.from_args(build_parser().parse_args(["relabel", "s", "-o", "o"])).store_embeddings is True
