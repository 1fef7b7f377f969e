"""Device top-k (ties in label order), label-embedding cache, named label/template sets (no Ray)."""

import numpy as np
import pytest
import torch

from zslabel import labels as labels_mod
from zslabel.config import JobConfig
from zslabel.labels import LABEL_SETS_DIR, TEMPLATE_SETS, build_label_set, label_cache_dir
from zslabel.model import checkpoint_digest, load_model
from zslabel.ranking import RankingRule, rank, top_k, top_k_tensor


def _stable(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_on_tensor_matches_stable_sort(ties):
    rng = np.random.default_rng(1)
    for _ in range(100):
        n, c, k = int(rng.integers(1, 12)), int(rng.integers(1, 60)), int(rng.integers(1, 70))
        s = (rng.integers(0, 4, (n, c)) / 3 if ties else rng.random((n, c))).astype(np.float32)
        idx, val = top_k_tensor(torch.from_numpy(s), k)
        assert isinstance(idx, torch.Tensor)
        np.testing.assert_array_equal(idx.numpy(), _stable(s, k))
        np.testing.assert_array_equal(val.numpy(), np.take_along_axis(s, _stable(s, k), 1))
        np.testing.assert_array_equal(top_k(s, k)[0], _stable(s, k))


def test_top_k_tie_at_the_cut_keeps_the_lowest_label_index():
    s = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    idx, _ = top_k_tensor(s, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]


def test_rank_multi_label_and_abstention_on_tensor_match_numpy():
    rng = np.random.default_rng(2)
    s = (rng.integers(0, 5, (20, 30)) / 4).astype(np.float32)
    rule = RankingRule(top_k=3, multi_label=True, threshold=0.5, min_score=0.9)
    a, b = rank(s, rule), rank(torch.from_numpy(s), rule)
    order = np.argsort(-s, axis=1, kind="stable")
    keep = np.take_along_axis(s, order, 1) >= 0.5
    np.testing.assert_array_equal(a.indices, order[keep])
    np.testing.assert_array_equal(a.counts, keep.sum(1))
    for x, y in ((a.indices, b.indices), (a.scores, b.scores), (a.counts, b.counts), (a.abstained, b.abstained)):
        np.testing.assert_array_equal(x, y)


def test_label_embeddings_cached_on_disk_keyed_by_labels(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSLABEL_CACHE", str(tmp_path))
    model = load_model(tiny_clip)
    digest = checkpoint_digest(tiny_clip)
    calls = []
    real = model.encode_texts
    model.encode_texts = lambda prompts, **kw: calls.append(len(prompts)) or real(prompts, **kw)
    tokenized = []
    real_ids = model.prompt_token_ids
    model.prompt_token_ids = lambda prompts: tokenized.append(len(prompts)) or real_ids(prompts)
    first = build_label_set(["cat", "dog"], ["a {}.", "the {}"], model, digest=digest)
    assert calls == [4] and len(list(label_cache_dir().glob("*.npy"))) == 1 and tokenized == [4]
    second = build_label_set(["cat", "dog"], ["a {}.", "the {}"], model, digest=digest)
    assert calls == [4], "a second build with the same labels and templates must be a cache hit"
    assert tokenized == [4], "a cache hit passed the token checks when it was written: not checked again"
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    build_label_set(["cat", "bird"], ["a {}.", "the {}"], model, digest=digest)   # one label changed: a miss
    build_label_set(["cat", "dog"], ["a {}."], model, digest=digest)             # templates changed: a miss
    assert calls == [4, 4, 2] and len(list(label_cache_dir().glob("*.npy"))) == 3
    build_label_set(["cat", "dog"], ["a {}.", "the {}"], model)  # no digest: no cache
    assert calls == [4, 4, 2, 4]


def test_corrupt_cache_entry_is_recomputed(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSLABEL_CACHE", str(tmp_path))
    model = load_model(tiny_clip)
    digest = checkpoint_digest(tiny_clip)
    good = build_label_set(["cat", "dog"], ["a {}."], model, digest=digest).embeddings
    (entry,) = label_cache_dir().glob("*.npy")
    entry.write_bytes(b"not an array")
    np.testing.assert_array_equal(build_label_set(["cat", "dog"], ["a {}."], model, digest=digest).embeddings, good)


def test_named_sets_imagenet_1k_and_80_templates():
    names = labels_mod.merge_labels_file([], "imagenet-1k")
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[-1] == "toilet paper" and names[744] == "projectile"
    assert len(TEMPLATE_SETS["openai-imagenet-80"]) == 80
    assert TEMPLATE_SETS["openai-imagenet-80"][0] == "a bad photo of a {}."
    cfg = JobConfig(input="x", output="y", labels_file="imagenet-1k", templates=TEMPLATE_SETS["openai-imagenet-80"])
    cfg.validate()
    for f in ("imagenet-1k.txt", "openai-imagenet-80.txt"):
        head = (LABEL_SETS_DIR / f).read_text(encoding="utf-8")[:1500]
        assert "Licence: MIT" in head and "github.com" in head


def test_a_cache_hit_repeats_the_token_checks_warnings(tiny_clip, tmp_path, monkeypatch, caplog):
    """Labels the tokenizer cannot tell apart are warned about on every run, cache hit or not
    (the warning is kept beside the cached embeddings)."""
    monkeypatch.setenv("ZSLABEL_CACHE", str(tmp_path))
    model = load_model(tiny_clip)
    digest = checkpoint_digest(tiny_clip)
    real_ids = model.prompt_token_ids
    # A vocabulary without these two words: both read as one token, as BiomedCLIP's [UNK].
    model.prompt_token_ids = lambda prompts: [real_ids([p.replace("zorp", "x").replace("quib", "x")])[0]
                                              for p in prompts]
    for attempt in range(2):
        caplog.clear()
        with caplog.at_level("WARNING", logger="zslabel.labels"):
            build_label_set(["zorp", "quib", "dog"], ["a {}."], model, digest=digest)
        assert "reads the labels 'zorp', 'quib' as the same tokens" in caplog.text, attempt
    assert len(list(label_cache_dir().glob("*.npy"))) == 1
