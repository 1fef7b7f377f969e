"""Label sets, prompt ensembling, score maths and config validation (no Ray)."""

import re

import numpy as np
import pytest
import torch
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures)

from zslabel.config import JobConfig, parse_concurrency
from zslabel.errors import ConfigError, ModelLoadError
from zslabel.labels import build_label_set, validate_template
from zslabel.model import load_model, resolve_checkpoint
from zslabel.ranking import ensemble, scores_from_logits, top_k, zero_shot_logits


@pytest.mark.parametrize("template", ["no field", "{} and {}", "{0}", "{name}", "a {"])
def test_template_needs_exactly_one_empty_field(template):
    with pytest.raises(ConfigError):
        validate_template(template)


@pytest.mark.parametrize("template, shown", [("a photo of {:>10}", "{:>10}"), ("a photo of {!r}", "{!r}"),
                                             ("a photo of a {!s:.2}.", "{!s:.2}")])
def test_a_template_field_with_a_conversion_or_format_spec_is_refused(template, shown):
    """``{:.2}`` cut every label to two characters (cat and car became one prompt, refused with a
    word on a missing tokenizer), ``{!r}`` quoted it, ``{:>10}`` padded it: all passed the
    "exactly one empty field" check and changed every prompt silently."""
    with pytest.raises(ConfigError, match=re.escape(f"(found: {shown})")):
        validate_template(template)
    validate_template("a photo of a {}.")  # the plain field, and doubled braces, still pass
    validate_template("{{tag}} {}")


def test_label_validation_messages():
    for labels, words in (([], "no labels"), (["cat", "dog", "cat"], "'cat'"), (["cat", ""], "empty")):
        cfg = JobConfig(input="x", output="y", labels=labels)
        with pytest.raises(ConfigError, match=words):
            cfg.validate()


def test_config_from_dict_rejects_unknown_keys_and_parses():
    with pytest.raises(ConfigError, match="unknown config keys: topk"):
        JobConfig.from_dict({"topk": 3})
    # Keys named after flags that are spelled otherwise in a config say how (new-user trial: the
    # README promised "the same keys as the flags").
    with pytest.raises(ConfigError, match="unknown config keys: ground_truth, resume, template; "
                                          "ground_truth: a command-line flag only.*; resume: write 'mode: resume'; "
                                          "template: write 'templates: "):
        JobConfig.from_dict({"resume": True, "template": "a {}", "ground_truth": "gt.csv"})
    cfg = JobConfig.from_dict({"labels": "a, b", "concurrency": "2,4", "templates": "x {}"})
    assert cfg.labels == ["a", "b"] and cfg.concurrency == (2, 4) and cfg.templates == ["x {}"]
    assert parse_concurrency(3) == (3, 3)
    with pytest.raises(ConfigError):
        parse_concurrency("4,2")


def test_public_dict_redacts_storage_secrets():
    cfg = JobConfig(storage_options={"key": "AKIASECRET", "secret": "hunter2"})
    assert "hunter2" not in str(cfg.public_dict()) and "AKIASECRET" not in str(cfg.public_dict())


def test_ensemble_is_mean_of_normalised_then_renormalised():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 4, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    out = ensemble(e)
    expected = e.mean(1) / np.linalg.norm(e.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-6)


def test_top_k_order_ties_and_clipping():
    s = np.array([[0.1, 0.5, 0.5, 0.2]], np.float32)
    idx, val = top_k(s, 10)
    assert idx.tolist() == [[1, 2, 3, 0]] and val[0].tolist() == pytest.approx([0.5, 0.5, 0.2, 0.1])


def test_softmax_and_sigmoid_scores():
    logits = zero_shot_logits(torch.eye(2), torch.eye(2), logit_scale=10.0, logit_bias=-5.0)
    assert torch.allclose(logits, torch.tensor([[5.0, -5.0], [-5.0, 5.0]]))
    assert torch.allclose(scores_from_logits(logits, "softmax").sum(1), torch.ones(2))
    assert torch.allclose(scores_from_logits(logits, "sigmoid")[0, 0], torch.sigmoid(torch.tensor(5.0)))
    with pytest.raises(ValueError):
        scores_from_logits(logits, "argmax")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_label_embeddings_match_transformers_text_features(family, tiny_clip, tiny_siglip):
    path = tiny_clip if family == "clip" else tiny_siglip
    model = load_model(path)
    ls = build_label_set(["cat", "dog"], ["a {}.", "the {} photo"], model)
    assert ls.embeddings.shape == (2, model.model.config.projection_dim if family == "clip" else 32)
    np.testing.assert_allclose(np.linalg.norm(ls.embeddings, axis=1), 1, rtol=1e-5)
    single = build_label_set(["cat"], ["a {}."], model).embeddings[0]
    direct = model.encode_texts(["a cat."])[0]
    np.testing.assert_allclose(single, direct, atol=1e-6)


def test_prompt_longer_than_text_tower_names_the_label(tiny_clip):
    model = load_model(tiny_clip)
    long_label = "x" * 200
    with pytest.raises(ConfigError, match="x{20}.*longer than the text tower"):
        build_label_set(["cat", long_label], ["a {}."], model)


@pytest.mark.parametrize("data, key", [({"top_k": "three"}, "top_k"), ({"labels": 5}, "labels"),
                                       ({"store_embeddings": "no"}, "store_embeddings"),
                                       ({"threshold": "abc"}, "threshold")])
def test_yaml_values_of_the_wrong_type_are_config_errors(data, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        JobConfig.from_dict(data)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_token_checks_hold_across_chunks(tiny_clip, tmp_path, monkeypatch, chunk):
    """The prompts are tokenized a chunk of labels at a time (``TOKEN_CHECK_PROMPTS``, here as
    small as one label's prompts): labels read alike in different chunks, a long prompt in a
    later chunk, and a missing tokenizer are found as in one chunk. A missing tokenizer with
    templates of other lengths (every label alike, not every prompt) went on with a warning."""
    import shutil

    from zslabel import labels as labels_module

    monkeypatch.setattr(labels_module, "TOKEN_CHECK_PROMPTS", chunk)
    model = load_model(tiny_clip)
    templates = ["a {}.", "the {}"]
    with pytest.raises(ConfigError, match="'Red Circle' = 'red circle'"):
        build_label_set(["Red Circle", "blue", "green", "red circle"], templates, model)
    with pytest.raises(ConfigError, match="x{20}.*longer than the text tower"):
        build_label_set(["cat", "dog", "bird", "x" * 200], templates, model)
    assert build_label_set(["cat", "dog", "bird"], templates, model).embeddings.shape[0] == 3
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_clip, broken, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt",
                                                                      "special_tokens_map.json"))
    # Loading refuses such a folder (test_checkpoint_without_tokenizer_files_is_refused); the
    # label set's own checks stay a second line for a tokenizer that reads labels alike.
    from zslabel import model_transformers

    monkeypatch.setattr(model_transformers, "_check_tokenizer", lambda *a: None)
    # Without its files the tokenizer reads one [UNK]-like id per character: templates of other
    # lengths give other prompts, but every label's prompts are alike.
    with pytest.raises(ConfigError, match="maps every label to the same tokens"):
        build_label_set(["cat", "dog", "owl"], templates, load_model(broken))
    with pytest.raises(ConfigError, match="maps every label to the same tokens"):
        build_label_set(["cat", "dog", "owl"], ["a {}."], load_model(broken))
    with pytest.raises(ConfigError, match="maps every prompt to the same tokens"):
        build_label_set(["cat"], ["a {}.", "b {}."], load_model(broken))  # one label, alike templates


@pytest.mark.parametrize("key, value", [("num_cpus_per_actor", float("nan")), ("num_cpus_per_actor", float("inf")),
                                        ("num_gpus_per_actor", -1.0), ("decode_cpus_per_task", 0.0)])
def test_resources_per_actor_or_task_must_be_finite(key, value):
    """``--num-cpus-per-actor nan`` passed validation and was refused later as "no node has nan
    CPUs"; each flag is now named with its range."""
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} must be a finite number"):
        JobConfig.from_dict({"input": "x", "output": "o", "labels": ["a", "b"], key: value}).validate()


def test_storage_options_that_are_neither_json_nor_yaml_are_one_line():
    from zslabel.config import parse_storage_options

    with pytest.raises(ConfigError) as info:
        parse_storage_options("{bad")
    assert "\n" not in str(info.value) and "(line 1, column 5)" in str(info.value)
    with pytest.raises(ConfigError, match="--storage-options file nofile.json does not exist"):
        parse_storage_options("nofile.json")


def test_checkpoint_without_tokenizer_files_is_refused(tiny_clip, tmp_path):
    """Without its tokenizer files a CLIP folder loaded with a stand-in tokenizer of 2 tokens
    (huggingface/transformers#45538): labels of different lengths (red, green, blue) passed the
    "read alike" check and every image got 1/3 for each, exit 0. Loading refuses it now. (A
    SigLIP folder without them already failed to load: no stand-in for its tokenizer.)"""
    import shutil

    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_clip, broken, ignore=shutil.ignore_patterns(
        "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"))
    with pytest.raises(ModelLoadError, match=r"the tokenizer of .*no_tokenizer knows \d+ tokens, its text tower \d+: "
                                             r"its tokenizer files are missing"):
        load_model(broken)
    assert len(load_model(tiny_clip).tokenizer) > 2  # the whole folder loads


def test_siglip_checkpoint_without_tokenizer_files_says_so_in_one_line(tiny_siglip, tmp_path):
    """A SigLIP folder without its tokenizer files fails to load (transformers makes no stand-in
    for it): the error was transformers' own, its second line the ~300 model types AutoTokenizer
    knows. One line now, saying which files are missing and where they come from."""
    import shutil

    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_siglip, broken, ignore=shutil.ignore_patterns("tokenizer*", "spiece.model"))
    with pytest.raises(ModelLoadError, match=r"cannot load checkpoint at .*no_tokenizer: ValueError: .* \(.*no_tokenizer "
                                             r"holds no tokenizer files: copy tokenizer\.json and") as info:
        load_model(broken)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600, str(info.value)


@pytest.mark.parametrize("value", ["./ckpt", "../ckpt", "/no/such/ckpt", "~/no-such-ckpt", "C:\\models\\clip",
                                   "models\\clip", "a/b/c", "models/nonexistent"])
def test_a_missing_local_path_is_never_sent_to_the_hub(value, monkeypatch, tmp_path):
    """``--model models/nonexistent`` (a typo of a local folder) said it could not download from
    the hub; a value that looks like a path says "no such checkpoint folder" instead."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/nonexistent": its parent folder exists here
    with pytest.raises(ModelLoadError, match="no such checkpoint folder"):
        resolve_checkpoint(value)


def test_a_hub_id_still_goes_to_the_hub():
    # HF_HUB_OFFLINE=1 (conftest): the hub is asked and refuses, with the hub message.
    with pytest.raises(ModelLoadError, match="cannot download model 'openai-nonexistent/clip'"):
        resolve_checkpoint("openai-nonexistent/clip")


def test_a_remote_checkpoint_is_copied_again_when_its_files_change(s3, tiny_clip, tmp_path, monkeypatch):
    """New weights pushed to the same --model URI (a retrained 'latest') are used: the local copy
    is keyed on the URI and the listing's names, sizes and ETags, so changed content gets a fresh
    copy (it was keyed on the URI alone and kept forever: the old weights, silently; the class of
    fsspec/filesystem_spec#971). Unchanged content is copied once: resolving it again reads no
    object, only the listing."""
    from urllib.parse import urlparse

    from zslabel.model import checkpoint_digest
    from zslabel_dev.tiny import build_tiny_checkpoint

    monkeypatch.setenv("ZSLABEL_CACHE", str(tmp_path / "cache"))
    files = sorted(f for f in tiny_clip.iterdir() if f.is_file())
    for f in files:
        s3.put(f"models/latest/{f.name}", f.read_bytes())
    uri, options = s3.uri("models/latest/"), s3.storage_options

    first = resolve_checkpoint(uri, storage_options=options)
    digest = checkpoint_digest(first)
    assert digest == checkpoint_digest(tiny_clip)
    with s3.requests() as requests:
        assert resolve_checkpoint(uri, storage_options=options) == first
    object_reads = [r for r in requests if urlparse(r["url"]).path.strip("/") != s3.bucket]
    assert not object_reads, object_reads  # not copied again

    # Retrained weights of the same size under the same name: only the ETag tells them apart.
    weights = next(f for f in files if f.suffix == ".safetensors")
    retrained = build_tiny_checkpoint(tmp_path / "retrained", "clip", seed=1) / weights.name
    assert retrained.stat().st_size == weights.stat().st_size and retrained.read_bytes() != weights.read_bytes()
    s3.put(f"models/latest/{weights.name}", retrained.read_bytes())
    second = resolve_checkpoint(uri, storage_options=options)
    assert second != first and checkpoint_digest(second) != digest
    assert (second / weights.name).read_bytes() == retrained.read_bytes()
    assert checkpoint_digest(first) == digest  # the old copy (a run may be using it) is untouched
    assert resolve_checkpoint(uri, storage_options=options) == second


def test_labels_the_tokenizer_reads_alike_are_refused(tiny_clip, caplog):
    """CLIP's tokenizer lower-cases and normalises Unicode: 'Red Circle' and 'red circle', or
    NFC and NFD 'café', are one prompt and would split one score. Refused, naming them, before
    the text tower runs; distinct labels pass. Labels whose texts differ but whose tokens do not
    (outside the vocabulary) are warned about, not refused."""
    model = load_model(tiny_clip)
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    with pytest.raises(ConfigError, match="written two ways.*'Red Circle' = 'red circle'.*" + nfc + "' = '" + nfd):
        build_label_set(["Red Circle", "red circle", "blue", nfc, nfd], ["a {}."], model)
    # Two labels only, one template: every prompt is the same tokens, which is no missing
    # tokenizer (it was called one: "is the tokenizer missing from the checkpoint folder?").
    with pytest.raises(ConfigError, match="written two ways.*'Apple' = 'apple'"):
        build_label_set(["Apple", "apple"], ["a {}."], model)
    with pytest.raises(ConfigError, match="'animal/dog' = 'toy/dog'"):
        build_label_set(["animal/dog", "toy/dog"], ["a {}.", "{}"], model)
    assert build_label_set(["red circle", "blue circle"], ["a {}."], model).embeddings.shape[0] == 2
    # A WordPiece vocabulary without these words reads both as [CLS] [UNK] [SEP] (BiomedCLIP's
    # tokenizer for words it lacks): a warning, not a refusal.
    from zslabel.labels import _refuse_labels_read_alike

    warnings = _refuse_labels_read_alike(["\u4e2d", "\u6587", "cat"], [b"[2, 1, 3]", b"[2, 1, 3]", b"[2, 7, 3]"])
    assert len(warnings) == 1 and "reads the labels '\u4e2d', '\u6587' as the same tokens" in warnings[0]
