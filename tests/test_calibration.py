"""Calibration maths (temperature and Platt scaling, ECE, accuracy at coverage), the calibration
file (id, loader, compatibility checks) and the hierarchy roll-up, on hand-made numbers."""

import json

import numpy as np
import pytest
import torch

from zslabel.calibrate import label_index, logits_from_scores
from zslabel.calibration import (
    accuracy_at_coverage,
    expected_calibration_error,
    fit_calibration,
    fit_logistic,
    fit_temperature,
    load_calibration,
    split_indices,
)
from zslabel.errors import ConfigError
from zslabel.hierarchy import Hierarchy, prompt_name


def test_ece_by_hand():
    # 15 bins: 0.95 -> bin 15, 0.55 -> bin 9, 0.5 -> bin 8 ((7/15, 8/15]).
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.5])
    correct = np.array([True, False, True, True, False])
    # bin 15: acc 0.5 conf 0.95 -> 2/5*0.45; bin 9: acc 1 conf .55 -> 2/5*.45; bin 8: acc 0 conf .5 -> 1/5*.5
    assert expected_calibration_error(conf, correct) == pytest.approx(0.4 * 0.45 + 0.4 * 0.45 + 0.2 * 0.5)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0
    assert expected_calibration_error(np.array([]), np.array([], bool)) == 0.0


def test_accuracy_at_coverage_by_hand():
    conf = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.5, 0.4, 0.95])
    correct = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0, 1], bool)
    out = accuracy_at_coverage(conf, correct, (1.0, 0.5, 0.2))
    # most confident: .95 T, .9 T, .8 T, .7 F, .6 T | ...
    assert out == {"1.0": 0.5, "0.5": 0.8, "0.2": 1.0}


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, c, t_true = 4000, 10, 2.5
    base = rng.normal(0, 3, (n, c))
    # Labels drawn from softmax(base): base is calibrated; the "model" reports base * t_true.
    p = np.exp(base - base.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    t = fit_temperature(base * t_true, y)
    assert t == pytest.approx(t_true, rel=0.08)
    calib = fit_calibration(base * t_true, y, "softmax", labels=[str(i) for i in range(c)], templates=["{}"],
                            checkpoint_digest="d")
    before, after = calib.metrics["before"], calib.metrics["after"]
    assert after["ece"] < 0.03 < before["ece"]
    assert after["nll"] < before["nll"]
    assert after["top1_accuracy"] == before["top1_accuracy"]  # temperature never changes the argmax


def test_platt_recovers_slope_and_intercept():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20000)
    t = rng.random(20000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    a, b = fit_logistic(z, t.astype(float))
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)


def test_platt_calibrates_sigmoid_scores_per_label():
    # SigLIP-like: right labels have logits near -3 (sigmoid ~0.05), wrong ones near -9.
    rng = np.random.default_rng(2)
    n, c = 3000, 6
    y = rng.integers(0, c, n)
    z = rng.normal(-9, 1.5, (n, c))
    z[np.arange(n), y] = rng.normal(-3, 1.5, n)
    z[:, 0] += 2.0  # label 0 runs hot: it needs its own fit
    calib = fit_calibration(z, y, "sigmoid", labels=list("abcdef"), templates=["{}"], checkpoint_digest="d",
                            min_positives=50)
    assert calib.kind == "platt" and all(calib.params["per_label_fit"])
    before, after = calib.metrics["before"], calib.metrics["after"]
    assert before["mean_confidence"] < 0.2 and after["ece"] < before["ece"] / 3
    # Raw-score thresholds where the calibrated score is 0.5: between the wrong and right modes.
    th = np.asarray(calib.params["thresholds"])
    assert ((th > 1 / (1 + np.exp(9))) & (th < 1 / (1 + np.exp(3)))).all()
    adjusted = calib.adjust_logits(torch.from_numpy(z[:5].astype(np.float32)))
    assert isinstance(adjusted, torch.Tensor) and adjusted.shape == (5, c)
    np.testing.assert_allclose(torch.sigmoid(adjusted).numpy(), calib.scores(z[:5]), rtol=1e-5, atol=1e-6)


def test_split_is_deterministic_and_disjoint():
    f1, h1 = split_indices(100, 0.3, 7)
    f2, h2 = split_indices(100, 0.3, 7)
    assert (f1 == f2).all() and (h1 == h2).all() and len(h1) == 30
    assert sorted(np.concatenate([f1, h1]).tolist()) == list(range(100))
    assert not (split_indices(100, 0.3, 8)[1] == h1).all()


def _calib(tmp_path):
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, (60, 3))
    y = z.argmax(1)
    calib = fit_calibration(z, y, "softmax", labels=["a", "b", "c"], templates=["a {}"], checkpoint_digest="abc",
                            model="m")
    path = tmp_path / "calib.json"
    calib.save(str(path))
    return calib, path


def test_file_round_trip_and_id(tmp_path):
    calib, path = _calib(tmp_path)
    loaded = load_calibration(str(path))
    assert loaded.id == calib.id and len(calib.id) == 16
    assert loaded.params == calib.params and loaded.labels == ["a", "b", "c"]
    data = json.loads(path.read_text())
    assert data["fit"]["images"] == 60 and data["fit"]["held_out_images"] == 18
    assert set(data["metrics"]) == {"split", "before", "after"}
    data["params"]["temperature"] = 5.0  # edited: the id no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="does not match its content"):
        load_calibration(str(path))
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a zslabel calibration"):
        load_calibration(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(str(tmp_path / "missing.json"))


def test_compatibility_check_names_every_difference(tmp_path):
    calib, _ = _calib(tmp_path)
    calib.check_compatible(checkpoint_digest="abc", labels=["a", "b", "c"], templates=["a {}"], score_kind="softmax")
    with pytest.raises(ConfigError) as exc:
        calib.check_compatible(checkpoint_digest="xyz", labels=["a", "b", "d"], templates=["{}"],
                               score_kind="sigmoid")
    msg = str(exc.value)
    assert "checkpoint digest abc" in msg and "labels differ" in msg and "templates" in msg and "score kind" in msg
    # More than five labels added: the list says how many it leaves out (it was cut silently).
    many = ["a", "b", "c", *[f"new{i}" for i in range(8)]]
    with pytest.raises(ConfigError, match=r"run adds \['new0', 'new1', 'new2', 'new3', 'new4'\] and 3 more\)"):
        calib.check_compatible(checkpoint_digest="abc", labels=many, templates=["a {}"], score_kind="softmax")


def test_fit_refuses_bad_holdout_and_tiny_samples():
    z, y = np.zeros((3, 2)), np.array([0, 1, 0])
    with pytest.raises(ConfigError, match="holdout"):
        fit_calibration(z, y, "softmax", labels=["a", "b"], templates=["{}"], checkpoint_digest="d", holdout=1.0)
    with pytest.raises(ConfigError, match="at least 2"):
        fit_calibration(z, y, "softmax", labels=["a", "b"], templates=["{}"], checkpoint_digest="d")


# ---- hierarchy -------------------------------------------------------------------------------

LABELS = ["animal/mammal/dog", "animal/mammal/cat", "animal/bird", "vehicle/car"]


def test_hierarchy_nodes_and_softmax_sums():
    h = Hierarchy.from_labels(LABELS)
    assert h.nodes == ("animal", "animal/mammal", "animal/mammal/dog", "animal/mammal/cat", "animal/bird",
                       "vehicle", "vehicle/car")
    assert h.depth.tolist() == [1, 2, 3, 3, 2, 1, 2]
    scores = np.array([[0.30, 0.25, 0.15, 0.30],     # animal .70, mammal .55, vehicle .30
                       [0.10, 0.10, 0.10, 0.70],     # vehicle/car .70
                       [0.45, 0.05, 0.05, 0.45]], np.float32)
    nodes = h.rollup(scores, "softmax")
    np.testing.assert_allclose(nodes[0], [0.70, 0.55, 0.30, 0.25, 0.15, 0.30, 0.30], atol=1e-6)
    idx, val = h.deepest(nodes, 0.5)
    assert [h.nodes[i] for i in idx] == ["animal/mammal", "vehicle/car", "animal/mammal"]
    np.testing.assert_allclose(val, [0.55, 0.70, 0.50], atol=1e-6)
    idx, val = h.deepest(nodes, 0.8)   # nothing reaches 0.8 in rows 0 and 1; row 2: animal .55
    assert idx.tolist() == [-1, -1, -1] and np.isnan(val).all()
    idx, _ = h.deepest(nodes, 0.4)     # row 2: dog .45 and car .45 both qualify; dog is deeper
    assert h.nodes[idx[2]] == "animal/mammal/dog"


def test_hierarchy_sigmoid_noisy_or_and_columns():
    h = Hierarchy.from_labels(LABELS)
    scores = np.array([[0.5, 0.5, 0.0, 0.1]], np.float32)
    nodes = h.rollup(scores, "sigmoid")
    np.testing.assert_allclose(nodes[0], [0.75, 0.75, 0.5, 0.5, 0.0, 0.1, 0.1], atol=1e-6)
    cols = h.columns(scores, np.array([False, True]), "sigmoid", 0.7)
    assert cols == {"hier_label": [None, "animal/mammal"], "hier_score": [None, pytest.approx(0.75)],
                    "hier_path": [None, ["animal", "mammal"]]}


def test_prompt_names_and_ground_truth_leaf_matching():
    assert prompt_name("animal/mammal/dog") == "dog" and prompt_name("red circle") == "red circle"
    assert prompt_name("red / red circle") == "red circle"
    idx = label_index(["a/x", "b/x", "b/y"])
    assert idx["a/x"] == 0 and idx["y"] == 2 and "x" not in idx  # ambiguous leaf: full path needed
    with pytest.raises(ValueError):
        Hierarchy.from_labels(["a//b"])


def test_logits_from_scores_exact_when_complete():
    z = np.array([[1.0, 2.0, 0.5]])
    p = np.exp(z) / np.exp(z).sum()
    order = [1, 0, 2]
    logits, complete = logits_from_scores([[["a", "b", "c"][i] for i in order]], [p[0, order].tolist()],
                                          ["a", "b", "c"], "softmax")
    assert complete
    np.testing.assert_allclose(logits - logits.max(), z - z.max(), atol=1e-5)  # up to a constant
    logits, complete = logits_from_scores([["b"]], [[0.6]], ["a", "b", "c"], "softmax")
    assert not complete
    np.testing.assert_allclose(np.exp(logits[0]), [0.2, 0.6, 0.2], atol=1e-6)


def test_platt_file_from_a_sigmoid_run_applied_by_relabel(tiny_siglip, tmp_path):
    """calibrate (from stored embeddings, exact logits) and relabel --calibration on a SigLIP
    checkpoint, without Ray: the run output is written by hand as `label --store-embeddings` would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zslabel.calibrate import run_calibrate
    from zslabel.labels import build_label_set
    from zslabel.model import load_model, checkpoint_digest
    from zslabel.ranking import zero_shot_logits
    from zslabel.relabel import RelabelConfig, run_relabel_job

    rng = np.random.default_rng(5)
    n, labels = 150, ["cat", "dog", "bird"]
    model = load_model(tiny_siglip)
    label_set = build_label_set(labels, ["a photo of a {}."], model)
    y = rng.integers(0, 3, n)
    # Image embeddings near their label's embedding, so the logits carry signal.
    emb = label_set.embeddings[y] + rng.normal(0, 0.6, (n, label_set.embeddings.shape[1]))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    run = tmp_path / "run"
    run.mkdir()
    paths = [str(tmp_path / f"img_{i:03d}.png") for i in range(n)]
    pq.write_table(pa.table({"path": paths, "input_index": np.arange(n), "error": [None] * n,
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])}),
                   run / "part-0.parquet")
    (run / "_run_manifest.json").write_text(json.dumps({
        "labels": labels, "templates": ["a photo of a {}."],
        "model": {"id": str(tiny_siglip), "revision": None, "digest": checkpoint_digest(tiny_siglip),
                  "score_kind": "sigmoid"}}))
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n" + "".join(f"img_{i:03d}.png,{labels[y[i]]}\n" for i in range(n)))
    calib = run_calibrate(str(run), str(gt), calibration_path=str(tmp_path / "c.json"))
    assert calib.kind == "platt" and calib.fit["used"] == n and calib.fit["source"] == "embeddings"
    assert calib.metrics["after"]["ece"] < calib.metrics["before"]["ece"]

    out = tmp_path / "relabeled"
    run_relabel_job(RelabelConfig(source=str(run), output=str(out), labels=labels,
                                  templates=["a photo of a {}."], top_k=3, calibration=str(tmp_path / "c.json")))
    rows = pq.read_table(out).sort_by("input_index").to_pylist()
    z = zero_shot_logits(torch.from_numpy(emb), torch.from_numpy(label_set.embeddings), model.logit_scale,
                         model.logit_bias).numpy()
    expected = calib.scores(z)
    for i, r in enumerate(rows):
        got = dict(zip(r["labels"], r["scores"]))
        np.testing.assert_allclose([got[x] for x in labels], expected[i], atol=1e-5)
    manifest = json.loads((out / "_run_manifest.json").read_text())
    assert manifest["calibration"]["id"] == calib.id and manifest["calibration"]["kind"] == "platt"


def test_calibrate_from_written_scores_and_clear_errors(tmp_path):
    """An output without embeddings: logits come from the written scores (exact for softmax when
    every label was written), and the fitted T equals a fit on the true logits. Ground truth
    that matches nothing exits 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zslabel.calibrate import run_calibrate
    from zslabel.cli import main

    rng = np.random.default_rng(6)
    n, labels = 200, ["a", "b", "c", "d"]
    z = rng.normal(0, 3, (n, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)])
    order = np.argsort(-p, axis=1)
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({
        "path": [str(tmp_path / f"{i}.jpg") for i in range(n)], "error": [None] * n,
        "labels": [[labels[j] for j in o] for o in order],
        "scores": pa.array([p[i, o].tolist() for i, o in enumerate(order)], pa.list_(pa.float32()))}),
        run / "part.parquet")
    (run / "_run_manifest.json").write_text(json.dumps({
        "labels": labels, "templates": ["{}"], "model": {"id": "m", "digest": "abc", "score_kind": "softmax"}}))
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n" + "".join(f"{i}.jpg,{labels[y[i]]}\n" for i in range(n)))
    calib = run_calibrate(str(run), str(gt), calibration_path=str(tmp_path / "c.json"))
    assert calib.fit["source"] == "scores" and calib.fit["scores_complete"] and calib.fit["used"] == n
    fit_idx, _ = split_indices(n, 0.3, 0)
    assert calib.params["temperature"] == pytest.approx(fit_temperature(z[fit_idx], y[fit_idx]), rel=1e-3)
    assert calib.params["temperature"] == pytest.approx(2.0, rel=0.3)

    other = tmp_path / "other.csv"
    other.write_text("path,label\nelsewhere/x.jpg,a\n")
    assert main(["calibrate", str(run), "--ground-truth", str(other), "--output", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_calibrate_refuses_damaged_stored_embeddings(tmp_path):
    """One NaN embedding row: the fit ran on it and wrote T = 1000 as if all were well (fit, the
    head command, already refused such samples)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zslabel.calibrate import read_sample
    from zslabel.errors import InputError

    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    emb[2] = np.nan
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({"path": [str(tmp_path / f"{i}.jpg") for i in range(6)], "error": [None] * 6,
                             "embedding": pa.array(emb.tolist(), pa.list_(pa.float32(), 4))}), run / "part.parquet")
    (run / "_run_manifest.json").write_text(json.dumps({
        "labels": ["a", "b"], "templates": ["{}"], "model": {"id": "m", "digest": "abc", "score_kind": "softmax"}}))
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n" + "".join(f"{i}.jpg,{'ab'[i % 2]}\n" for i in range(6)))
    with pytest.raises(InputError, match="1 of 6 sample embeddings are NaN/infinite"):
        read_sample(str(run), str(gt))


def test_a_calibration_that_hurts_held_out_scores_is_warned_about():
    """The fit split's logits point at the true label, the held-out split's at another: the fit
    sharpens the scores (T < 1) and so makes the held-out NLL worse, which the warning names
    with both numbers; a fit on rows alike on both sides draws no warning."""
    from zslabel.calibrate import worse_on_held_out
    from zslabel.calibration import split_indices

    n, c = 40, 3
    y = np.arange(n) % c
    _, held = split_indices(n, 0.3, 0)
    z = np.zeros((n, c), np.float32)
    z[np.arange(n), y] = 1.0
    z[held] = 0.0
    z[held, (y[held] + 1) % c] = 1.0
    kw = dict(labels=["a", "b", "c"], templates=["{}"], checkpoint_digest="d", holdout=0.3, seed=0)
    hurt = fit_calibration(z, y, "softmax", **kw)
    assert hurt.params["temperature"] < 1.0
    assert hurt.metrics["after"]["nll"] > hurt.metrics["before"]["nll"]
    message = worse_on_held_out(hurt)
    assert message is not None and "worse" in message and f"{hurt.metrics['after']['nll']:.4f}" in message
    assert f"fitted on {n - len(held)} images" in message
    z_alike = np.zeros((n, c), np.float32)
    z_alike[np.arange(n), y] = 1.0
    assert worse_on_held_out(fit_calibration(z_alike, y, "softmax", **kw)) is None
