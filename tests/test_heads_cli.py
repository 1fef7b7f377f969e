"""`zslabel fit` and `--head` end to end: on the bundled shapes example with Ray (label with
--store-embeddings, fit, label --head and relabel --head give the same scores, --resume refuses
another head, calibration is tied to its head), and the refusals without Ray (exit 2, nothing
written) on a run output built from the shapes model's own label embeddings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zslabel.calibration import load_calibration
from zslabel.cli import main
from zslabel.heads import load_head

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-clip"
EXAMPLE = ROOT / "examples" / "shapes"
LABELS = EXAMPLE / "labels.txt"


def _scores(out: Path) -> dict[str, dict[str, float]]:
    return {r["path"]: dict(zip(r["labels"], r["scores"])) for r in pq.read_table(out).to_pylist()}


def test_fit_then_label_and_relabel_with_the_head(ray_local, tmp_path, capsys):
    common = [str(EXAMPLE), "--labels-file", str(LABELS), "--model", str(MODEL), "--top-k", "48"]
    run1 = tmp_path / "run1"
    assert main(["label", *common, "--store-embeddings", "--output", str(run1)]) == 0
    head_path = tmp_path / "head.safetensors"
    assert main(["fit", str(run1), "--ground-truth", str(EXAMPLE / "ground_truth.csv"), "--output", str(head_path),
                 "--folds", "3", "-q"]) == 0
    report = capsys.readouterr().out
    # 24 images of 48 labels: at most one per label, so none can be held out to measure
    assert "examples: 24 over" in report and "nothing measured" in report
    head = load_head(str(head_path))
    assert head.labels == [x for x in LABELS.read_text().splitlines() if x.strip()] and head.score_kind == "softmax"
    assert head.fit["examples"] == 24 and head.fit["matching"]["used"] == 24

    # label --head (images, float32 embeddings) == relabel --head (stored float16 embeddings);
    # relabel as `fit --help` shows it: the labels (and top-k) are the source run's
    run2, rel = tmp_path / "run2", tmp_path / "rel"
    assert main(["label", *common, "--head", str(head_path), "--output", str(run2)]) == 0
    assert main(["relabel", str(run1), "--head", str(head_path), "--output", str(rel)]) == 0
    a, b = _scores(run2), _scores(rel)
    assert a.keys() == b.keys() and len(a) == 24
    worst = max(abs(a[p][lab] - b[p][lab]) for p in a for lab in a[p])
    assert worst < 1e-3, worst
    for out in (run2, rel):
        assert json.loads((out / "_run_manifest.json").read_text())["head"]["id"] == head.id
    # the head changed the scores (it is not the zero-shot classifier). One example per label, so
    # the cross-validation's NLL is flat (every held-out image's label is unseen in its fold) and
    # the chosen strength is a strong one (lam 1000 since the distillation of labels without
    # examples; 31.6 before): both runs embed the images in float32, so any change above float
    # noise (1e-6) is the head's; measured 4.4e-4.
    raw = _scores(run1)
    assert head.params["lam"] is not None
    assert max(abs(raw[p][lab] - a[p][lab]) for p in a for lab in a[p]) > 1e-4

    # --resume refuses another head (another id), before any image is read; and no head at all
    other = tmp_path / "other.safetensors"
    assert main(["fit", str(run1), "--ground-truth", str(EXAMPLE / "ground_truth.csv"), "--output", str(other),
                 "--folds", "3", "--seed", "1", "--no-learning-curve", "-q"]) == 0
    assert load_head(str(other)).id != head.id
    capsys.readouterr()
    assert main(["label", *common, "--head", str(other), "--output", str(run2), "--resume"]) == 2
    assert "head" in capsys.readouterr().err
    assert main(["label", *common, "--output", str(run2), "--resume"]) == 2

    # calibrate works on the head-labeled run and records its head; refused without it
    calib_path = tmp_path / "calib.json"
    assert main(["calibrate", str(rel), "--ground-truth", str(EXAMPLE / "ground_truth.csv"),
                 "--output", str(calib_path)]) == 0
    assert load_calibration(str(calib_path)).head == head.id
    capsys.readouterr()
    assert main(["relabel", str(run1), "--labels-file", str(LABELS), "--calibration", str(calib_path),
                 "--output", str(tmp_path / "rel_no_head")]) == 2
    assert "head" in capsys.readouterr().err and not (tmp_path / "rel_no_head").exists()
    assert main(["relabel", str(run1), "--labels-file", str(LABELS), "--calibration", str(calib_path),
                 "--head", str(head_path), "--output", str(tmp_path / "rel_cal")]) == 0


def _synthetic_run(tmp: Path, *, nan_rows: int = 0, embeddings: bool = True) -> tuple[Path, list[str]]:
    """A run output as `label --store-embeddings` writes it, without Ray: each image's embedding
    is its label's text embedding plus noise (the shapes model's own label set)."""
    from zslabel.labels import build_label_set
    from zslabel.model import load_model, checkpoint_digest

    labels = [x for x in LABELS.read_text().splitlines() if x.strip()]
    model = load_model(MODEL)
    w = np.asarray(build_label_set(labels, ["This is a photo of {}."], model).embeddings, np.float32)
    rng = np.random.default_rng(0)
    y = np.arange(4 * len(labels)) % len(labels)
    e = w[y] + 0.05 * rng.standard_normal((len(y), w.shape[1])).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[:nan_rows] = np.nan
    run = tmp / "run"
    run.mkdir()
    paths = [f"/images/{i:04d}.png" for i in range(len(y))]
    cols = {"path": paths, "labels": pa.array([[labels[c]] for c in y]), "error": pa.nulls(len(y), pa.string())}
    if embeddings:
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(e.astype(np.float16).ravel()), w.shape[1])
    pq.write_table(pa.table(cols), run / "part-00000.parquet")
    (run / "_run_manifest.json").write_text(json.dumps({
        "labels": labels, "templates": ["This is a photo of {}."],
        "model": {"id": str(MODEL), "revision": None, "digest": checkpoint_digest(MODEL), "score_kind": "softmax"}}))
    with open(tmp / "gt.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label")] + [(p, labels[c]) for p, c in zip(paths, y)])
    return run, labels


def _gt(tmp: Path, rows) -> str:
    path = tmp / f"gt{len(list(tmp.glob('gt*')))}.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return str(path)


def test_fit_refusals_write_nothing(tmp_path, capsys):
    run, labels = _synthetic_run(tmp_path)
    out = tmp_path / "head.safetensors"

    def fit(gt, src=run) -> int:
        return main(["fit", str(src), "--ground-truth", gt, "--output", str(out), "--folds", "3", "-q",
                     "--no-learning-curve"])

    # ground truth naming only labels the run does not have: counted, exit 2
    assert fit(_gt(tmp_path, [(f"/images/{i:04d}.png", "purple hexagon") for i in range(5)])) == 2
    err = capsys.readouterr().err
    assert "5 images name 1 labels that are not labels of the run" in err and not out.exists()
    # one label only
    assert fit(_gt(tmp_path, [(f"/images/{i:04d}.png", labels[0]) for i in (0, 48, 96)])) == 2
    assert "one label" in capsys.readouterr().err and not out.exists()
    # a run without embeddings
    bare = tmp_path / "bare"
    bare.mkdir()
    run_no, _ = _synthetic_run(bare, embeddings=False)
    assert fit(str(bare / "gt.csv"), run_no) == 2
    assert "--store-embeddings" in capsys.readouterr().err and not out.exists()
    # NaN embeddings
    nan = tmp_path / "nan"
    nan.mkdir()
    run_nan, _ = _synthetic_run(nan, nan_rows=3)
    assert fit(str(nan / "gt.csv"), run_nan) == 2
    assert "3 of 192 sample embeddings are NaN" in capsys.readouterr().err and not out.exists()

    # some unknown labels: fitted on the others, counted in the file
    rows = [(f"/images/{i:04d}.png", labels[i % 48]) for i in range(192)] + [("/images/x.png", "nope")]
    assert fit(_gt(tmp_path, rows)) == 0
    head = load_head(str(out))
    assert head.fit["examples"] == 192 and head.fit["matching"]["used"] == 192
    # synthetic embeddings sit next to their label's text embedding: the head stays right
    assert head.fit["metrics"]["after"]["top1"] >= 0.9

    # a head for another model (another checkpoint digest) is refused by relabel before reading
    head.checkpoint_digest = "0" * 16
    head.save(str(tmp_path / "foreign.safetensors"))
    capsys.readouterr()
    assert main(["relabel", str(run), "--labels-file", str(LABELS), "--head", str(tmp_path / "foreign.safetensors"),
                 "--output", str(tmp_path / "rel")]) == 2
    assert "checkpoint digest" in capsys.readouterr().err and not (tmp_path / "rel").exists()
