"""Failures a new user found trying to break zslabel from a clean clone (stop 37); each test
failed on the code it was written against."""


import pyarrow.parquet as pq
import pytest
from conftest import photo

from zslabel import cli

LABELS = "red,green,blue"


def make_images(folder, n, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(40 + 3 * i, 30 + 2 * i, seed=i).save(folder / f"{prefix}_{i:02d}.png")
    return folder


def label(ray_local, ckpt, src, out, *extra):
    return cli.main(["label", str(src), "--labels", LABELS, "--model", str(ckpt), "--output", str(out),
                     "--address", ray_local, "-q", *extra])


@pytest.fixture(scope="module")
def run(tiny_clip, ray_local, tmp_path_factory):
    """A finished run with stored embeddings over 6 images, and a ground-truth CSV for it."""
    root = tmp_path_factory.mktemp("trial8")
    images = make_images(root / "images", 6)
    out = root / "run"
    assert label(ray_local, tiny_clip, images, out, "--store-embeddings") == 0
    gt = root / "gt.csv"
    names = LABELS.split(",")
    gt.write_text("path,label\n" + "".join(f"{p.name},{names[i % 3]}\n"
                                           for i, p in enumerate(sorted(images.iterdir()))))
    return {"images": images, "out": out, "gt": gt}


@pytest.mark.parametrize("command", [["export", "--format", "label-studio", "--output"], ["calibrate", "--output"],
                                     ["fit", "--output"], ["eval", "--json"]])
def test_one_file_named_as_a_folder_is_a_one_line_error(command, run, tmp_path, capsys):
    """`zslabel export RUN --format label-studio --output DIR/`: the tasks were written to a file
    named DIR, then the label config (DIR/.label_config.xml) raised FileExistsError: traceback,
    exit 1 (the error-budget code). `calibrate --output DIR/` (and fit's, eval's --json) wrote a
    file named DIR, exit 0. A bad --output should exit 2 in one line, writing nothing."""
    name, *flags = command
    rc = cli.main([name, str(run["out"]), "--ground-truth", str(run["gt"]), *flags, str(tmp_path / "dir") + "/"]
                  if name != "export" else [name, str(run["out"]), *flags, str(tmp_path / "dir") + "/"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "names a folder" in err and not (tmp_path / "dir").exists()


def test_eval_json_inside_the_run_folder_is_refused(run):
    """`zslabel eval RUN --json RUN/eval.json` wrote into the run's folder, after which
    `label --overwrite` of that run refuses ('holds files zslabel did not write (eval.json)').
    report/calibrate/fit/export refuse such a path; eval --json (and label --eval-json) should too."""
    target = run["out"] / "eval.json"
    try:
        rc = cli.main(["eval", str(run["out"]), "--ground-truth", str(run["gt"]), "--json", str(target)])
        assert rc == 2
        assert not target.exists()
    finally:
        if target.exists():
            target.unlink()


def test_eval_negative_top_confusions_is_refused(run):
    """`--top-confusions -1` was taken as a Python slice: every confusion but the last listed, exit 0."""
    rc = cli.main(["eval", str(run["out"]), "--ground-truth", str(run["gt"]), "--top-confusions", "-1"])
    assert rc == 2


def test_label_eval_json_without_ground_truth_is_refused(tiny_clip, ray_local, run, tmp_path):
    """`label ... --eval-json E` without --ground-truth ran the job, wrote no E, exit 0: the flag
    was silently ignored (as --threshold without --multi-label is refused, exit 2)."""
    out = tmp_path / "out"
    rc = label(ray_local, tiny_clip, run["images"], out, "--eval-json", str(tmp_path / "e.json"))
    assert rc == 2
    assert not out.exists()


def test_relabel_resume_after_the_source_lost_rows(tiny_clip, ray_local, tmp_path):
    """The source run is relabeled with fewer images (--overwrite); `relabel --resume` of the
    finished relabel exited 4 ('This is a zslabel bug') and removed that finished relabel's
    run manifest. It should refuse (exit 2, the finished output untouched) or relabel afresh."""
    images = make_images(tmp_path / "images", 6)
    src, rel = tmp_path / "src", tmp_path / "rel"
    assert label(ray_local, tiny_clip, images, src, "--store-embeddings", "--rows-per-file", "2") == 0
    assert cli.main(["relabel", str(src), "--labels", "cat,dog", "--output", str(rel), "-q"]) == 0
    for p in sorted(images.iterdir())[:2]:
        p.unlink()
    assert label(ray_local, tiny_clip, images, src, "--store-embeddings", "--rows-per-file", "2", "--overwrite") == 0
    rc = cli.main(["relabel", str(src), "--labels", "cat,dog", "--output", str(rel), "--resume", "-q"])
    assert rc in (0, 2), f"exit {rc}"
    if rc == 2:
        assert (rel / "_run_manifest.json").exists()
    else:
        assert sorted(r["path"] for r in pq.read_table(str(rel)).to_pylist()) == \
            sorted(r["path"] for r in pq.read_table(str(src)).to_pylist())


def test_relabel_resume_after_the_source_changed_keeps_no_stale_rows(tiny_clip, ray_local, tmp_path):
    """The source run is relabeled after its images were renamed; `relabel --resume` said
    'nothing to label: every input already has its row' (exit 0) and kept rows of paths the
    source no longer holds. It should refuse (exit 2) or write the source's rows."""
    images = make_images(tmp_path / "images", 4)
    src, rel = tmp_path / "src", tmp_path / "rel"
    assert label(ray_local, tiny_clip, images, src, "--store-embeddings") == 0
    assert cli.main(["relabel", str(src), "--labels", "cat,dog", "--output", str(rel), "-q"]) == 0
    for p in sorted(images.iterdir()):
        p.rename(p.with_name("x_" + p.name))
    assert label(ray_local, tiny_clip, images, src, "--store-embeddings", "--overwrite") == 0
    rc = cli.main(["relabel", str(src), "--labels", "cat,dog", "--output", str(rel), "--resume", "-q"])
    if rc != 2:
        assert sorted(r["path"] for r in pq.read_table(str(rel)).to_pylist()) == \
            sorted(r["path"] for r in pq.read_table(str(src)).to_pylist())
