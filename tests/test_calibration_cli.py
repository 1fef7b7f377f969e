"""End to end with Ray on the bundled shapes example (24 images): label with --store-embeddings,
`zslabel calibrate`, label again with --calibration --hierarchy; refusals with exit 2 for a
calibration of another checkpoint and for resuming under another calibration."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq

from zslabel.calibration import fit_calibration, load_calibration
from zslabel.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-clip"
EXAMPLE = ROOT / "examples" / "shapes"


def _rows(out: Path) -> dict:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def test_calibrate_then_label_with_calibration_and_hierarchy(ray_local, tmp_path, capsys):
    # colour/shape paths; ground truth says "red circle", matched by the unique leaf name.
    labels = [ln.strip() for ln in (EXAMPLE / "labels.txt").read_text().splitlines() if ln.strip()]
    hier = tmp_path / "hier.txt"
    hier.write_text("\n".join(f"{x.split()[0]}/{x}" for x in labels) + "\n")
    common = [str(EXAMPLE), "--labels-file", str(hier), "--model", str(MODEL)]
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert main(["label", *common, "--store-embeddings", "--output", str(run1)]) == 0

    calib_path = tmp_path / "calib.json"
    assert main(["calibrate", str(run1), "--ground-truth", str(EXAMPLE / "ground_truth.csv"),
                 "--output", str(calib_path)]) == 0
    report = capsys.readouterr().out
    assert "temperature T =" in report and "before" in report and "after" in report
    calib = load_calibration(str(calib_path))
    assert calib.kind == "temperature" and calib.fit["used"] == 24 and calib.fit["source"] == "embeddings"
    assert calib.fit["fit_images"] + calib.fit["held_out_images"] == 24
    t = calib.params["temperature"]

    assert main(["label", *common, "--calibration", str(calib_path), "--hierarchy", "--min-score", "0.6",
                 "--output", str(run2)]) == 0
    manifest = json.loads((run2 / "_run_manifest.json").read_text())
    assert manifest["calibration"]["id"] == calib.id and manifest["calibration"]["temperature"] == t
    raw, cal = _rows(run1), _rows(run2)
    assert raw.keys() == cal.keys() and len(cal) == 24
    for path, r in cal.items():
        assert r["labels"][0] == raw[path]["labels"][0]  # a temperature keeps the order
        # log-odds between two labels shrink by exactly T: (log s0 - log s1) = (raw log-odds) / T
        lo_raw = math.log(raw[path]["scores"][0]) - math.log(raw[path]["scores"][1])
        lo_cal = math.log(r["scores"][0]) - math.log(r["scores"][1])
        assert abs(lo_cal * t - lo_raw) < 1e-3 * max(1.0, abs(lo_raw))
        if r["hier_label"] is None:
            assert r["hier_score"] is None and r["hier_path"] is None
        else:
            assert r["hier_score"] >= 0.6 and r["hier_path"] == r["hier_label"].split("/")
            # the node's score sums all its labels' scores, so at least those of the written top-k
            under = sum(sc for lab, sc in zip(r["labels"], r["scores"])
                        if lab == r["hier_label"] or lab.startswith(r["hier_label"] + "/"))
            assert 0 < under <= r["hier_score"] + 1e-5
    assert any(r["hier_label"] for r in cal.values())

    # Resuming run2 under another calibration (other split seed -> other fit and id) is refused.
    other_seed = tmp_path / "calib_seed1.json"
    assert main(["calibrate", str(run1), "--ground-truth", str(EXAMPLE / "ground_truth.csv"),
                 "--output", str(other_seed), "--seed", "1"]) == 0
    assert load_calibration(str(other_seed)).id != calib.id
    capsys.readouterr()
    assert main(["label", *common, "--calibration", str(other_seed), "--hierarchy", "--min-score", "0.6",
                 "--output", str(run2), "--resume"]) == 2
    assert "calibration" in capsys.readouterr().err

    # A calibration file fitted for another checkpoint: exit 2, nothing written.
    foreign = fit_calibration(
        [[1.0] * len(labels)] * 4, [0, 1, 2, 3], "softmax", labels=hier.read_text().split("\n")[:-1],
        templates=list(calib.templates), checkpoint_digest="0" * 64, model="another/model", holdout=0.5)
    foreign_path = tmp_path / "foreign.json"
    foreign.save(str(foreign_path))
    run3 = tmp_path / "run3"
    assert main(["label", *common, "--calibration", str(foreign_path), "--output", str(run3)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint digest" in err and "another/model" in err
    assert not run3.exists()


def test_calibrate_refuses_outputs_it_cannot_use(tmp_path, capsys):
    gt = EXAMPLE / "ground_truth.csv"
    assert main(["calibrate", str(tmp_path / "nothing"), "--ground-truth", str(gt)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A held-out fraction it cannot use: said first, before the run is read.
    assert main(["calibrate", str(tmp_path / "nothing"), "--ground-truth", str(gt), "--holdout", "1"]) == 2
    assert "--holdout must be in (0, 1) (got 1.0)" in capsys.readouterr().err
    # An output without embeddings or scores columns.
    out = tmp_path / "out"
    out.mkdir()
    import pyarrow as pa

    pq.write_table(pa.table({"path": ["a.png"], "error": [None]}), out / "part.parquet")
    (out / "_run_manifest.json").write_text(json.dumps({"labels": ["a"], "model": {"id": "m"}}))
    assert main(["calibrate", str(out), "--ground-truth", str(gt)]) == 2
    assert "neither an 'embedding' nor a 'scores' column" in capsys.readouterr().err
