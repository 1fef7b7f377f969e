"""zslabel eval: every number on a hand-made ground truth with known answers; folder-per-class
ground truth; path matching rules; the CLI; label + evaluate in one run."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import photo

from zslabel.errors import InputError
from zslabel.evaluate import evaluate, load_ground_truth, normalise_path
from zslabel.output import output_schema
from zslabel.store import MANIFEST_NAME

CANDIDATES = ["cat", "dog", "bird", "fish", "tree", "frog"]


def write_predictions(out, rows, *, files=2, manifest_labels=CANDIDATES):
    """Write ``rows`` (path, labels, error, abstained) as a zslabel output over ``files`` files."""
    out.mkdir(parents=True)
    schema = output_schema(abstained=True)
    for f, chunk in enumerate(np.array_split(np.arange(len(rows)), files)):
        part = [rows[i] for i in chunk]
        table = pa.table({
            "path": [r[0] for r in part], "input_index": [int(i) for i in chunk],
            "labels": [r[1] for r in part],
            "scores": [None if r[1] is None else [0.5] * len(r[1]) for r in part],
            "error": [r[2] for r in part], "width": [None if r[2] else 10 for r in part],
            "height": [None if r[2] else 10 for r in part], "abstained": [r[3] for r in part]}, schema=schema)
        pq.write_table(table, out / f"part-{f}.parquet")
    if manifest_labels is not None:
        (out / MANIFEST_NAME).write_text(json.dumps({"labels": manifest_labels}))
    return out


@pytest.fixture
def known_case(tmp_path):
    """13 ground-truth images, 15 prediction rows; the expected numbers are worked out by hand."""
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    img = str(gt_dir / "imgs")
    (gt_dir / "truth.csv").write_text(
        "path,label\n"
        "imgs/a1.jpg,cat\nimgs/a2.jpg,cat\n./imgs/a3.jpg,cat\n"       # "./" is resolved
        "imgs/b1.jpg,dog\nimgs/b2.jpg,dog\nimgs/b3.jpg,dog\n"
        "imgs/c1.jpg,bird\nimgs/c2.jpg,bird\nimgs/c3.jpg,bird\n"
        "imgs/e1.jpg,dog\n"                                           # errored in the predictions
        "imgs/m1.jpg,horse\n"                                         # never predicted; not a candidate
        "other/x.jpg,bird\n"                                          # predicted elsewhere: basename match
        "sub1/y.jpg,cat\n")                                           # two predictions named y.jpg: ambiguous
    five = ["fish", "tree", "frog"]
    rows = [
        (f"{img}/a1.jpg", None, "read_error: flaky", None),           # duplicate: the labeled row wins
        (f"{img}/a1.jpg", ["cat", "dog", *five], None, False),        # top1 hit
        (f"{img}/a2.jpg", ["dog", "cat", *five], None, True),         # top1 miss (cat->dog), top5 hit, abstained
        (f"file://{img}/a3.jpg", ["cat", *five], None, False),        # top1 hit (file:// normalised)
        (f"{img}/b1.jpg", ["dog", "cat"], None, False),               # top1 hit
        (f"{img}/b2.jpg", ["cat", "bird", "fish", "tree", "dog"], None, True),  # miss (dog->cat), dog 5th
        (f"{img}/b3.jpg", ["cat", "dog"], None, False),               # miss (dog->cat), top5 hit
        (f"{img}/c1.jpg", ["bird", "cat"], None, False),              # top1 hit
        (f"{img}/c2.jpg", ["cat", "dog", "fish", "tree", "frog", "bird"], None, False),  # miss; bird 6th
        (f"{img}/c3.jpg", [], None, False),                           # multi-label, nothing kept
        (f"{img}/e1.jpg", None, "truncated: image file is truncated", None),
        ("/elsewhere/x.jpg", ["bird"], None, False),                  # top1 hit via basename
        ("/p/q1/y.jpg", ["cat"], None, False),
        ("/p/q2/y.jpg", ["cat"], None, False),
        (f"{img}/z.jpg", ["dog"], None, False),                       # not in ground truth
    ]
    return write_predictions(tmp_path / "pred", rows), gt_dir / "truth.csv"


def test_every_number_on_known_answers(known_case):
    pred, gt = known_case
    r = evaluate(str(pred), str(gt))
    assert (r.ground_truth_images, r.predicted_rows, r.duplicate_predictions) == (13, 14, 1)
    assert (r.matched, r.matched_by_basename, r.unmatched_ground_truth, r.unmatched_predictions) == (11, 1, 2, 3)
    assert (r.errored, r.errors_by_code, r.labeled) == (1, {"truncated": 1}, 10)
    assert (r.top1_correct, r.top5_correct) == (5, 8)
    assert r.top1_accuracy == pytest.approx(5 / 10)
    assert r.top5_accuracy == pytest.approx(8 / 10)
    assert r.top1_including_errors == pytest.approx(5 / 11)
    assert r.max_labels_per_row == 5 and r.no_prediction == 1
    assert r.abstained == 2 and r.coverage == pytest.approx(8 / 10)
    assert r.top1_accuracy_answered == pytest.approx(5 / 8)
    expected = {  # label: (support, predicted, correct, precision, recall)
        "cat": (3, 5, 2, 2 / 5, 2 / 3),
        "dog": (3, 2, 1, 1 / 2, 1 / 3),
        "bird": (4, 2, 2, 1.0, 2 / 4),
        "horse": (0, 0, 0, None, None),
    }
    assert set(r.per_label) == set(expected)
    for name, (support, predicted, correct, precision, recall) in expected.items():
        m = r.per_label[name]
        assert (m["support"], m["predicted"], m["correct"]) == (support, predicted, correct), name
        assert m["precision"] == (None if precision is None else pytest.approx(precision)), name
        assert m["recall"] == (None if recall is None else pytest.approx(recall)), name
    assert r.macro_precision == pytest.approx((2 / 5 + 1 / 2 + 1) / 3)
    assert r.macro_recall == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert r.confusions == [{"true": "dog", "predicted": "cat", "count": 2},
                            {"true": "bird", "predicted": "cat", "count": 1},
                            {"true": "cat", "predicted": "dog", "count": 1}]
    assert r.ground_truth_labels_not_candidates == ["horse"]
    assert sorted(os.path.basename(p) for p in r.examples["unmatched_ground_truth"]) == ["m1.jpg", "y.jpg"]
    assert sorted(r.examples["unmatched_predictions"]) == sorted(["/p/q1/y.jpg", "/p/q2/y.jpg",
                                                                  str(pred.parent / "gt" / "imgs" / "z.jpg")])
    text = r.text()
    assert "top-1 accuracy 0.500 (5/10)" in text and "top-5 accuracy 0.800 (8/10)" in text
    assert "top-1 including errors 0.455 (5/11)" in text and "dog -> cat: 2" in text and "horse" in text


def test_eval_cli_prints_and_writes_json(known_case, tmp_path):
    pred, gt = known_case
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(pred), "--ground-truth", str(gt),
                           "--json", str(out), "--top-confusions", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-1 accuracy 0.500 (5/10)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["top1_accuracy"] == 0.5 and report["top5_accuracy"] == 0.8
    assert report["confusions"] == [{"true": "dog", "predicted": "cat", "count": 2}]
    assert report["per_label"]["cat"]["precision"] == pytest.approx(0.4)
    bad = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(pred), "--ground-truth",
                          str(tmp_path / "missing.csv")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # --json naming a folder: one line and exit 2, no traceback (IsADirectoryError was raised)
    folder = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(pred), "--ground-truth", str(gt),
                             "--json", str(tmp_path)], capture_output=True, text=True)
    assert folder.returncode == 2 and "Is a directory" in folder.stderr and "Traceback" not in folder.stderr
    # a truncated Parquet file of the predictions: one line and exit 2 (pyarrow's ArrowInvalid was a traceback)
    for part in (pred.glob("*.parquet") if pred.is_dir() else [pred]):
        part.write_bytes(part.read_bytes()[:100])
    cut = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(pred), "--ground-truth", str(gt)],
                         capture_output=True, text=True)
    assert cut.returncode == 2 and "cannot read a Parquet file of the output: ArrowInvalid" in cut.stderr, \
        cut.stderr[-2000:]
    assert "Traceback" not in cut.stderr


def test_a_reader_that_leaves_early_costs_no_file_and_no_traceback(known_case, tmp_path):
    """``zslabel eval ... --json F | head -1``: the pipe closed under the report's text raised
    BrokenPipeError (a traceback, exit 1) before the JSON report was written (new-user trial).
    Here stdout is a pipe whose reader is gone before the command starts: every write fails."""
    pred, gt = known_case
    out = tmp_path / "report.json"
    for command in (["eval", str(pred), "--ground-truth", str(gt), "--json", str(out)], ["show", str(pred)]):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([sys.executable, "-m", "zslabel", *command], stdout=write, stderr=subprocess.PIPE,
                                  text=True)
        finally:
            os.close(write)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Broken" not in proc.stderr, proc.stderr
    assert json.loads(out.read_text())["top1_accuracy"] == 0.5


def test_folder_per_class_ground_truth(tmp_path):
    root = tmp_path / "classes"
    for rel in ["cat/1.jpg", "cat/2.png", "dog/3.jpg", "animals/bird/4.webp", "top.jpg", ".hidden/5.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        photo(8, 8, 0).save(root / rel)
    (root / "cat" / "notes.txt").write_text("not an image")
    gt = load_ground_truth(str(root))
    assert gt.kind == "folders" and gt.skipped == 1
    assert dict(zip(gt.paths, gt.labels)) == {
        str(root / "cat/1.jpg"): "cat", str(root / "cat/2.png"): "cat", str(root / "dog/3.jpg"): "dog",
        str(root / "animals/bird/4.webp"): "bird"}
    pred = write_predictions(tmp_path / "pred", [
        (str(root / "cat/1.jpg"), ["cat", "dog"], None, False),
        (str(root / "cat/2.png"), ["dog", "cat"], None, False),
        (str(root / "dog/3.jpg"), ["dog", "cat"], None, False),
        (str(root / "animals/bird/4.webp"), None, "unidentified_image: x", None),
    ], files=1, manifest_labels=None)
    r = evaluate(str(pred), str(root))
    assert (r.matched, r.labeled, r.errored, r.top1_correct) == (4, 3, 1, 2)
    assert r.top1_accuracy == pytest.approx(2 / 3) and (r.top_k, r.topk_accuracy, r.top5_accuracy) == (2, 1.0, None)
    assert r.top1_including_errors == pytest.approx(2 / 4)
    assert r.per_label["cat"]["recall"] == 0.5 and r.per_label["dog"]["precision"] == 0.5
    assert r.per_label["bird"]["support"] == 0 and r.ground_truth_labels_not_candidates is None
    assert r.abstained == 0 and r.coverage == 1.0


def test_ground_truth_tables_and_refusals(tmp_path):
    (tmp_path / "t.tsv").write_text("File\tClass\n/x/a.jpg\t007\n/x/a.jpg\t007\n")
    gt = load_ground_truth(str(tmp_path / "t.tsv"))
    assert gt.paths == ("/x/a.jpg",) and gt.labels == ("007",)  # label stays text; exact duplicate collapses
    pq.write_table(pa.table({"path": ["rel/b.jpg"], "label": ["dog"]}), tmp_path / "t.parquet")
    assert load_ground_truth(str(tmp_path / "t.parquet")).paths == (str(tmp_path / "rel/b.jpg"),)
    (tmp_path / "conflict.csv").write_text("path,label\n/x/a.jpg,cat\n/x/a.jpg,dog\n")
    with pytest.raises(InputError, match="two labels"):
        load_ground_truth(str(tmp_path / "conflict.csv"))
    (tmp_path / "nolabel.csv").write_text("path,name\n/x/a.jpg,cat\n")
    with pytest.raises(InputError, match="label column"):
        load_ground_truth(str(tmp_path / "nolabel.csv"))
    (tmp_path / "empty.csv").write_text("path,label\n/x/a.jpg,\n")
    with pytest.raises(InputError, match="empty path or label"):
        load_ground_truth(str(tmp_path / "empty.csv"))
    assert normalise_path("s3://b/x/../y.jpg") == "s3://b/y.jpg"
    assert normalise_path("file:///a/./b.jpg") == "/a/b.jpg"
    # The same reading of file: URIs as the inputs' (RFC 8089), so such ground truth matches rows.
    assert normalise_path(" file:/no/such%20dir/b%C3%A9.jpg ") == normalise_path("file://localhost/no/such dir/bé.jpg") \
        == "/no/such dir/bé.jpg"
    assert normalise_path("s3://b//x.jpg") == "s3://b/x.jpg"


def test_label_with_ground_truth_in_one_run(tiny_clip, ray_local, tmp_path, image_folder):
    """`zslabel label --ground-truth` labels, then prints the same report `zslabel eval` gives."""
    from zslabel.evaluate import evaluate as evaluate_api

    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    truth = tmp_path / "truth.csv"
    truth.write_text("path,label\n" + "".join(
        f"{os.path.relpath(f, tmp_path)},{['red', 'green', 'blue'][i % 3]}\n" for i, f in enumerate(files))
        + f"{os.path.relpath(image_folder / 'broken.jpg', tmp_path)},red\n")
    out, report = tmp_path / "out", tmp_path / "report.json"
    env = dict(os.environ, RAY_ADDRESS=ray_local)
    proc = subprocess.run([sys.executable, "-m", "zslabel", "label", str(image_folder), "--labels", "red,green,blue",
                           "--model", str(tiny_clip), "--output", str(out), "--ground-truth", str(truth),
                           "--eval-json", str(report), "--min-score", "0.4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(report.read_text())
    expected = evaluate_api(str(out), str(truth)).to_dict()
    assert got == expected
    assert (got["matched"], got["labeled"], got["errored"], got["unmatched_predictions"]) == (13, 12, 1, 0)
    rows = pq.read_table(out).to_pylist()
    truth_of = {str(f): ["red", "green", "blue"][i % 3] for i, f in enumerate(files)}
    hits = sum(r["labels"][0] == truth_of[r["path"]] for r in rows if r["error"] is None)
    assert got["top1_correct"] == hits and got["top5_correct"] == 12  # 3 labels: always within the top 5
    assert got["abstained"] == sum(bool(r["abstained"]) for r in rows)
    assert f"top-1 accuracy {hits / 12:.3f} ({hits}/12)" in proc.stdout
    assert f"top-1 including errors {hits / 13:.3f} ({hits}/13)" in proc.stdout
    # Over the error budget (exit 1): the counts line is printed as for any run (it was missing
    # on stdout: only the error on stderr; new-user trial), and so is the evaluation.
    over = subprocess.run([sys.executable, "-m", "zslabel", "label", str(image_folder), "--labels", "red,green,blue",
                           "--model", str(tiny_clip), "--output", str(tmp_path / "over"), "--ground-truth", str(truth),
                           "--max-error-fraction", "0.05", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert over.returncode == 1 and "more than --max-error-fraction 5.0%" in over.stderr, over.stderr[-3000:]
    assert over.stdout.startswith("labeled 12 of 13 images; errors: "), over.stdout
    assert f"top-1 accuracy {hits / 12:.3f} ({hits}/12)" in over.stdout


def test_nothing_matched_is_an_error_showing_both_sides(tmp_path):
    """A new user's trial: ground truth written for other paths than the run saw. ``matched 0``
    with exit 0 hid the mistake; now exit 2, naming what was compared with examples."""
    pred = write_predictions(tmp_path / "pred", [(f"/data/run/img_{i}.jpg", ["cat"], None, False)
                                                 for i in range(3)], files=1)
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n" + "".join(f"/elsewhere/photo_{i}.jpg,cat\n" for i in range(3)))
    with pytest.raises(InputError, match="no prediction matches the ground truth") as info:
        evaluate(str(pred), str(gt))
    msg = str(info.value)
    assert "'path' column (3 rows, e.g. '/data/run/img_0.jpg'" in msg
    assert "path column" in msg and "(3 images, e.g. '/elsewhere/photo_0.jpg'" in msg
    proc = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(pred), "--ground-truth", str(gt)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no prediction matches" in proc.stderr and "matched 0" not in proc.stdout


def test_class_folders_in_nfd_match_labels_in_nfc(tmp_path):
    """macOS writes folder names in NFD: a class folder 'café' (NFD) is the label 'café' (NFC),
    a hit, not "a ground-truth label that was not a candidate"; the other way round too."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    root = tmp_path / "gt"
    for folder, name in ((nfd, "a.jpg"), (nfd, "b.jpg"), ("tea", "c.jpg")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(b"x")
    rows = [(str(root / nfd / "a.jpg"), [nfc, "tea"], None, False),
            (str(root / nfd / "b.jpg"), ["tea", nfc], None, False),
            (str(root / "tea" / "c.jpg"), ["tea", nfd], None, False)]
    out = write_predictions(tmp_path / "out", rows, files=1, manifest_labels=[nfc, "tea"])
    report = evaluate(str(out), str(root))
    assert report.matched == 3 and report.top1_correct == 2
    assert not report.ground_truth_labels_not_candidates


def test_ground_truth_labels_differing_only_in_case_are_read_as_the_candidate(tmp_path, caplog):
    """An Excel-saved CSV (UTF-8 BOM, CRLF, ``Path,Label``) writing ``Dog`` for the candidate
    ``dog`` scored top-1 0.000 with exit 0, listing ``Dog`` as "not a candidate (always wrong)".
    A label equal to exactly one candidate after case folding, stripping and NFC is read as it,
    with one warning listing the mappings, the same way in eval, calibrate and fit; a label that
    folds to no candidate stays unknown."""
    from zslabel.calibrate import read_sample
    from zslabel.evaluate import map_to_candidates
    from zslabel.fit import read_labeled_embeddings

    labels = ["cat", "dog", "bird", "caf\u00e9"]
    truth = ["dog", "cat", "bird", "dog", "caf\u00e9", "cat", "horse"]
    paths = [str(tmp_path / "imgs" / f"i{i}.png") for i in range(len(truth))]
    out = tmp_path / "out"
    out.mkdir()
    emb = np.eye(len(truth), 4, dtype=np.float32) + 0.1
    pq.write_table(pa.table({
        "path": paths, "labels": [[t if t in labels else "cat", "bird"] for t in truth],
        "scores": pa.array([[0.7, 0.2]] * len(truth), pa.list_(pa.float32())),
        "error": pa.nulls(len(truth), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4)}), out / "part-0.parquet")
    (out / MANIFEST_NAME).write_text(json.dumps({"labels": labels, "templates": ["{}"], "model": {
        "id": "m", "digest": "abc", "score_kind": "softmax"}}))
    clean, excel = tmp_path / "clean.csv", tmp_path / "excel.csv"
    clean.write_text("path,label\n" + "".join(f"{p},{t}\n" for p, t in zip(paths, truth)))
    written = {"dog": "Dog", "cat": "cat ", "bird": "BIRD", "caf\u00e9": "CAFE\u0301"}  # NFD and upper case
    excel.write_bytes(("\ufeffPath,Label\r\n" + "".join(
        f"{p},{written.get(t, t)}\r\n" for p, t in zip(paths, truth))).encode("utf-8"))

    want = evaluate(str(out), str(clean))
    assert (want.top1_correct, want.labeled) == (6, 7) and want.ground_truth_labels_not_candidates == ["horse"]
    caplog.set_level("WARNING")
    got = evaluate(str(out), str(excel))
    assert (got.top1_correct, got.labeled, got.top1_accuracy) == (want.top1_correct, 7, want.top1_accuracy)
    assert got.per_label == want.per_label and got.ground_truth_labels_not_candidates == ["horse"]
    assert got.ground_truth_labels_mapped == {"BIRD": "bird", "CAF\u00c9": "caf\u00e9", "Dog": "dog"}
    assert "ground-truth labels read as the candidate label" in got.text() and "Dog -> dog" in got.text()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "3 ground-truth labels" in warning and "'Dog' -> 'dog'" in warning
    proc = subprocess.run([sys.executable, "-m", "zslabel", "eval", str(out), "--ground-truth", str(excel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "top-1 accuracy 0.857 (6/7)" in proc.stdout and "'Dog' -> 'dog'" in proc.stderr

    sample, _ = read_sample(str(out), str(excel))                  # calibrate
    assert sample.y.tolist() == [1, 0, 2, 1, 3, 0] and sample.counts["truth_not_a_label"] == ["horse"]
    assert sample.counts["truth_labels_mapped"]["Dog"] == "dog"
    x, y, _, counts = read_labeled_embeddings(str(out), str(excel))  # fit
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 3] and counts["unknown_labels"] == ["horse"]
    assert counts["truth_labels_mapped"]["BIRD"] == "bird"

    # ambiguous (two candidates fold alike) or nothing alike: not mapped
    assert map_to_candidates(["DOG", "Cat", "horse"], ["Dog", "dog", "cat"]) == {"Cat": "cat"}
