"""heads.py without Ray or a model: the file format and its checks, the maths' promises (labels
without examples keep their zero-shot weights, the zero-shot end of the path, refusals), and the
fit's building blocks (stratified folds, splits, calibrated-stacking offset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zslabel import heads
from zslabel.calibration import Calibration
from zslabel.errors import ConfigError, InputError
from zslabel.ranking import zero_shot_logits


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _toy(c=6, d=8, per_label=12, seed=0, kind="softmax", labels_with_examples=None):
    """Zero-shot weights W0 and image embeddings near a label's own direction, which is W0's
    direction turned a little (so the zero-shot classifier is decent and a head can do better)."""
    rng = np.random.default_rng(seed)
    w0 = _unit(rng.standard_normal((c, d)))
    true_dir = _unit(w0 + 0.6 * rng.standard_normal((c, d)))
    which = np.arange(c) if labels_with_examples is None else np.asarray(labels_with_examples)
    y = np.repeat(which, per_label)
    x = _unit(true_dir[y] + 0.5 * rng.standard_normal((len(y), d)))
    zs = heads.ZeroShot(w0, 10.0, -2.0 if kind == "sigmoid" else 0.0, kind)
    return x, y, zs


def _head(c=4, d=5, **kw) -> heads.Head:
    rng = np.random.default_rng(1)
    h = heads.Head(weights=rng.standard_normal((c, d)).astype(np.float32), bias=rng.standard_normal(c).astype(np.float32),
                   scale=12.5, score_kind="softmax", labels=[f"l{i}" for i in range(c)], templates=["a {}"],
                   checkpoint_digest="abc123", model="m", params={"lam": 0.1}, fit={"examples": 7})
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def test_head_file_round_trip_and_content_id(tmp_path):
    h = _head()
    path = str(tmp_path / "h.safetensors")
    hid = h.save(path)
    back = heads.load_head(path)
    assert back.id == hid == h.compute_id() and len(hid) == 16
    np.testing.assert_array_equal(back.weights, h.weights)
    np.testing.assert_array_equal(back.bias, h.bias)
    assert (back.labels, back.templates, back.scale, back.params, back.fit) == (h.labels, h.templates, 12.5,
                                                                                {"lam": 0.1}, {"examples": 7})
    # Any change of content changes the id; an edited file is refused.
    assert _head(bias=h.bias + 1).compute_id() != hid
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x40                                    # a bit of the last bias value
    (tmp_path / "edited.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its content"):
        heads.load_head(str(tmp_path / "edited.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a head")
    with pytest.raises(ConfigError, match="not a zslabel head"):
        heads.load_head(str(tmp_path / "junk.safetensors"))
    with pytest.raises(ConfigError, match="cannot read head file"):
        heads.load_head(str(tmp_path / "missing.safetensors"))


def test_head_refused_for_another_setup():
    h = _head()
    ok = dict(checkpoint_digest="abc123", labels=h.labels, templates=["a {}"], score_kind="softmax", dim=5)
    h.check_compatible(**ok)
    for change, words in ((dict(checkpoint_digest="zzz"), "checkpoint digest"),
                          (dict(labels=["l0", "l1", "l2", "other"]), "labels differ"),
                          (dict(labels=list(reversed(h.labels))), "other order"),
                          (dict(templates=["b {}"]), "templates"), (dict(score_kind="sigmoid"), "score kind"),
                          (dict(dim=7), "embedding size")):
        with pytest.raises(ConfigError, match=words):
            h.check_compatible(**{**ok, **change})


def test_head_logits_numpy_and_torch_agree_and_zero_shot_head_is_zero_shot():
    x, y, zs = _toy()
    h = heads.Head(weights=zs.weights, bias=np.zeros(len(zs.weights), np.float32), scale=zs.scale,
                   score_kind="softmax", labels=[str(i) for i in range(6)], templates=["{}"], checkpoint_digest="d")
    ref = zero_shot_logits(torch.from_numpy(x), torch.from_numpy(zs.weights), zs.scale).numpy()
    np.testing.assert_allclose(h.logits(x), ref, rtol=1e-6, atol=1e-5)
    t = h.logits(torch.from_numpy(x).half())           # float16 embeddings are computed in float32
    assert t.dtype == torch.float32 and t.shape == (len(x), 6)
    np.testing.assert_allclose(t.numpy(), ref, atol=0.05)


def test_labels_without_examples_keep_zero_shot_weights():
    x, y, zs = _toy(labels_with_examples=[0, 2, 3])
    res = heads.fit_head(x, y, zs, lam=0.1)
    for c in (1, 4, 5):
        np.testing.assert_array_equal(res.weights[c], zs.weights[c])
    assert np.all(res.bias[[1, 4, 5]] == res.bias[1])   # one shared calibrated-stacking offset
    assert res.params["unexampled_offset"] >= 0
    assert not np.allclose(res.weights[[0, 2, 3]], zs.weights[[0, 2, 3]])
    # SigLIP-style heads: per-label sigmoid; unexampled labels keep weights and bias exactly.
    xs, ys, zss = _toy(kind="sigmoid", labels_with_examples=[0, 2, 3])
    rs = heads.fit_head(xs, ys, zss, lam=0.1)
    np.testing.assert_array_equal(rs.weights[[1, 4, 5]], zss.weights[[1, 4, 5]])
    np.testing.assert_array_equal(rs.bias[[1, 4, 5]], np.float32(-2.0))


def test_path_ends_zero_shot_and_probe():
    x, y, zs = _toy(per_label=30)
    strong = heads.fit_head(x, y, zs, lam=1e7)
    np.testing.assert_allclose(strong.weights, zs.weights, atol=1e-4)   # lam -> inf: zero-shot
    zs_only = heads.fit_head(x, y, zs, lam=float("inf"))
    np.testing.assert_array_equal(zs_only.weights, zs.weights)
    assert zs_only.params["lam"] is None
    weak = heads.fit_head(x, y, zs, lam=1e-3)
    acc = lambda r: (heads._head_logits(r, zs)(x).argmax(1) == y).mean()          # noqa: E731
    assert acc(weak) >= acc(strong) and acc(weak) > (zs.logits(x).argmax(1) == y).mean()
    # fit's report says when the head is the zero-shot classifier (a new user labeled with one,
    # expecting a change); a head that won says nothing of the kind.
    meta = dict(labels=[f"l{i}" for i in range(6)], templates=["a {}"], checkpoint_digest="d", model="m", fit={})
    said = heads.report_text(heads.head_from_fit(zs_only, zs, **meta))
    assert "strength lam = inf (zero-shot won)" in said and "labeling with it changes nothing" in said
    assert "changes nothing" not in heads.report_text(heads.head_from_fit(weak, zs, **meta))


def test_cross_validation_chooses_a_strength_and_records_the_path():
    x, y, zs = _toy(per_label=16)
    res = heads.fit_head(x, y, zs, folds=4)
    table = res.params["cv"]
    assert table[0]["lam"] is None and len(table) >= 3 and res.params["folds"] == 4
    best = min(table, key=lambda r: r["nll"])
    assert res.params["lam"] == best["lam"]
    assert all(np.isfinite(r["nll"]) for r in table)


def test_bad_samples_refused():
    x, y, zs = _toy()
    with pytest.raises(InputError, match="one label"):
        heads.fit_head(x[y == 0], y[y == 0], zs)
    bad = x.copy()
    bad[[1, 5]] = np.nan
    with pytest.raises(InputError, match="2 of 72 sample embeddings are NaN"):
        heads.fit_head(bad, y, zs)


def test_stratified_folds_and_holdout_split():
    y = np.repeat(np.arange(5), [1, 2, 5, 10, 23])
    f = heads.stratified_folds(y, 5, seed=3)
    for c in range(5):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1                      # spread as evenly as possible
    fit, held = heads.holdout_split(y, 0.3, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y)
    assert set(y[fit]) == set(range(5))                              # every label keeps an example
    assert np.bincount(y[held], minlength=5).tolist() == [0, 1, 2, 3, 7]   # round(0.3 n), n - 1 at most
    sub = heads.per_label_subsample(y, 4, seed=0)
    assert np.bincount(y[sub]).tolist() == [1, 2, 4, 4, 4]
    assert heads.curve_shots(y) == [1, 2, 4]


def test_tempered_nll_and_delta_logits():
    from zslabel.calibration import _softmax_nll, fit_temperature

    rng = np.random.default_rng(4)
    for scale in (0.3, 3.0, 30.0):                      # best temperature below, near and above 1
        z = (scale * rng.standard_normal((200, 7))).astype(np.float32)
        t = rng.integers(0, 7, 200)
        z[np.arange(100), t[:100]] += scale              # half of the rows lean to their truth
        want = _softmax_nll(z.astype(np.float64) / fit_temperature(z, t), t)
        got = heads._tempered_nll(torch.from_numpy(z), torch.from_numpy(t))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # a head's logits are zero-shot's plus its low-rank change
    x, y, zs = _toy(per_label=10)
    res = heads.fit_head(x, y, zs, lam=0.1)
    np.testing.assert_allclose(zs.logits(x) + res.delta_logits(x, zs), heads._head_logits(res, zs)(x),
                               rtol=1e-5, atol=1e-4)


def test_stacking_offset_matches_zero_shot_share():
    z0 = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    unex = np.array([False, False, True])
    # zero-shot sends 1 of 4 rows to label 2; the head sends none until label 2 gets +gamma
    z = np.array([[5.0, 1.0, 0.0], [0.0, 4.0, 2.0], [5.0, 0.0, 1.0], [0.0, 6.0, 1.0]])
    g = heads.stacking_offset(z, z0, unex)
    assert g == pytest.approx(2.0)
    assert (unex[(z + g * unex).argmax(1)]).mean() >= 0.25
    assert heads.stacking_offset(z, z0, np.zeros(3, bool)) == 0.0


def test_calibration_records_and_checks_its_head():
    calib = Calibration(kind="temperature", score_kind="softmax", labels=["a", "b"], templates=["{}"],
                        checkpoint_digest="d", model=None, params={"temperature": 1.5}, head="h1")
    ok = dict(checkpoint_digest="d", labels=["a", "b"], templates=["{}"], score_kind="softmax")
    calib.check_compatible(**ok, head="h1")
    with pytest.raises(ConfigError, match="head h1"):
        calib.check_compatible(**ok, head=None)
    with pytest.raises(ConfigError, match="head h2"):
        calib.check_compatible(**ok, head="h2")
    plain = Calibration(kind="temperature", score_kind="softmax", labels=["a", "b"], templates=["{}"],
                        checkpoint_digest="d", model=None, params={"temperature": 1.5})
    assert "head" not in plain.content()                 # files without heads keep their ids
    with pytest.raises(ConfigError, match="zero-shot classifier"):
        plain.check_compatible(**ok, head="h1")


def test_a_sample_of_one_label_is_refused_naming_it():
    from zslabel.errors import InputError
    from zslabel.heads import check_sample

    x = np.ones((3, 4), np.float32)
    with pytest.raises(InputError, match="examples of one label .'dog'."):
        check_sample(x, np.array([1, 1, 1]), 2, ["cat", "dog"])
    with pytest.raises(InputError, match="examples of one label .1."):  # no names given: the index
        check_sample(x, np.array([1, 1, 1]), 2)
