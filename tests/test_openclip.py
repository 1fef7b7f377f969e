"""open_clip checkpoints (issue 28): parity with open_clip's own zero-shot recipe, every way of
naming one, errors, and the label job + relabel end to end.

Runs where the ``open-clip`` extra is installed (``scripts/setup.sh --open-clip`` builds
.venv-openclip; ``scripts/ci_open_clip.sh`` runs this file there on every CI run). In the default
environment the module is skipped; tests/test_openclip_default_env.py covers what runs without it.

The reference is open_clip's recipe on the same image files: ``create_model_from_pretrained``'s
model and preprocess transform (torchvision on PIL), ``get_tokenizer``,
``build_zero_shot_classifier`` (template ensembling), ``encode_image``, normalise,
``logit_scale.exp()`` (+ ``logit_bias``), softmax or sigmoid.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip is not installed here: the open_clip tests run in .venv-openclip "
                        "(scripts/setup.sh --open-clip; CI: scripts/ci_open_clip.sh)")
import torch  # noqa: E402
from conftest import photo  # noqa: E402

from zslabel import JobConfig, run_label_job  # noqa: E402
from zslabel.decode import decode_image  # noqa: E402
from zslabel.errors import ModelLoadError  # noqa: E402
from zslabel.labels import build_label_set  # noqa: E402
from zslabel.model import load_model, checkpoint_digest, resolve_checkpoint  # noqa: E402
from zslabel.model_openclip import OpenClipModel, preprocess_spec  # noqa: E402
from zslabel.ranking import scores_from_logits, zero_shot_logits  # noqa: E402
from zslabel.relabel import RelabelConfig, run_relabel_job  # noqa: E402
from zslabel.store import MANIFEST_NAME  # noqa: E402
from zslabel_dev.tiny_openclip import build_tiny_openclip, in_folder  # noqa: E402

LABELS = ["cat", "dog", "bird", "a red car", "tree"]
TEMPLATES = ["This is a photo of {}.", "a blurry picture of the {}."]
TOL = 1e-4
MEASURED = {}  # case -> max |zslabel - open_clip| score, printed at the end of the module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> tiny open_clip checkpoint folder (hub layout)."""
    root = tmp_path_factory.mktemp("openclip")
    return {
        "vit": build_tiny_openclip(root / "vit", "vit"),
        "vit-sigmoid": build_tiny_openclip(root / "vit_sigmoid", "vit", sigmoid=True, seed=1),
        "vit-squash-bilinear": build_tiny_openclip(root / "vit_squash", "vit", seed=2, resize_mode="squash",
                                                   interpolation="bilinear"),
        "biomed": build_tiny_openclip(root / "biomed", "biomed", seed=3),
    }


def image_files(d):
    """RGB and grayscale files whose shortest-edge resize leaves odd crop margins (3, 7: where
    torchvision's rounding and transformers' floor differ), an upscale (Pillow's windowed path),
    a downscale and an exact fit."""
    d.mkdir(parents=True, exist_ok=True)
    photo(97, 61, 1).save(d / "landscape.jpg", quality=92)
    photo(70, 64, 2).save(d / "margin3.png")                 # 32 x 35 after resize: margin 3
    photo(64, 78, 3).convert("L").save(d / "margin7_gray.png")  # 39 x 32: margin 7
    photo(20, 22, 4).save(d / "upscaled.png")                # 32 x 35, upscaled
    photo(300, 200, 5).save(d / "large.webp", quality=90)
    photo(32, 32, 6).save(d / "exact.png")
    return sorted(d.iterdir())


def reference_scores(ckpt, files, labels, templates):
    """open_clip's zero-shot recipe: (N, C) float32 scores of ``files`` over ``labels``."""
    with in_folder(ckpt):  # the BiomedCLIP shape names its BERT folder relative to the checkpoint
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{ckpt}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{ckpt}")
    model.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates, device="cpu")
        images = torch.stack([preprocess(Image.open(f)) for f in files])
        feats = model.encode_image(images, normalize=True)
        logits = model.logit_scale.exp() * feats @ classifier
        if model.logit_bias is not None:
            return (logits + model.logit_bias).sigmoid().numpy()
        return logits.softmax(dim=-1).numpy()


def zslabel_scores(model, files, labels, templates):
    """zslabel's own path without Ray: decode_image -> encode_images -> label set -> scores."""
    label_set = build_label_set(labels, templates, model)
    pixels = np.stack([decode_image(f.read_bytes(), model.preprocess).pixels for f in files])
    logits = zero_shot_logits(model.encode_images(pixels), torch.from_numpy(label_set.embeddings),
                              model.logit_scale, model.logit_bias)
    return scores_from_logits(logits, model.score_kind).numpy()


@pytest.mark.parametrize("name", ["vit", "vit-sigmoid", "vit-squash-bilinear", "biomed"])
def test_scores_match_open_clip_recipe(name, ckpts, tmp_path):
    ckpt = ckpts[name]
    files = image_files(tmp_path / "in")
    model = load_model(resolve_checkpoint(str(ckpt)))
    assert isinstance(model, OpenClipModel) and model.library == "open_clip"
    assert model.score_kind == ("sigmoid" if name == "vit-sigmoid" else "softmax")
    expected = reference_scores(ckpt, files, LABELS, TEMPLATES)
    got = zslabel_scores(model, files, LABELS, TEMPLATES)
    MEASURED[name] = float(np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The labels' scores lie well apart (the text tower reads the words): a prompt embedded
    # otherwise than open_clip embeds it would move its score past TOL.
    assert (np.ptp(expected, axis=1) > 10 * TOL).all(), np.ptp(expected, axis=1)


def test_decoded_pixels_equal_open_clip_transform(ckpts, tmp_path):
    """The decode stage's uint8 pixels, normalised, are open_clip's preprocess output (float
    rounding only), including odd crop margins, where transformers' floor would be a pixel off."""
    import dataclasses

    files = image_files(tmp_path / "in")
    for name in ("vit", "vit-squash-bilinear"):
        model = load_model(ckpts[name])
        _, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{ckpts[name]}")
        for f in files:
            ours = model.pixel_values(decode_image(f.read_bytes(), model.preprocess).pixels[None])[0]
            ref = preprocess(Image.open(f))
            assert float((ours - ref).abs().max()) < 1e-5, (name, f.name)
    floor = dataclasses.replace(load_model(ckpts["vit"]).preprocess, crop_offset="floor")
    a = decode_image((tmp_path / "in" / "margin3.png").read_bytes(), floor).pixels
    b = decode_image((tmp_path / "in" / "margin3.png").read_bytes(), load_model(ckpts["vit"]).preprocess).pixels
    assert not np.array_equal(a, b)  # the crop offset matters for this image


def test_preprocess_config_is_read_from_the_checkpoint(ckpts):
    vit, squash = load_model(ckpts["vit"]), load_model(ckpts["vit-squash-bilinear"])
    assert (vit.preprocess.resize_mode, vit.preprocess.shortest_edge, vit.preprocess.crop_hw,
            vit.preprocess.crop_offset, vit.preprocess.resample) == ("shortest_edge", 32, (32, 32), "round",
                                                                     int(Image.Resampling.BICUBIC))
    assert (squash.preprocess.resize_mode, squash.preprocess.size_hw,
            squash.preprocess.resample) == ("exact", (32, 32), int(Image.Resampling.BILINEAR))
    assert load_model(ckpts["vit"], max_pixels=1000).preprocess.max_pixels == 1000
    with pytest.raises(ValueError, match="longest"):
        preprocess_spec({"size": 224, "resize_mode": "longest"})
    with pytest.raises(ValueError, match="non-square|square"):
        preprocess_spec({"size": (224, 160), "resize_mode": "shortest"})


def test_biomed_shape_and_model_facts(ckpts):
    model = load_model(ckpts["biomed"])
    assert model.architecture == "CustomTextCLIP(vision=timm:test_vit, text=hf:hf_text)"
    assert model.model_type == "open_clip:" + model.architecture
    assert model.max_text_length == 256
    ids = model.prompt_token_ids(["This is a photo of cat.", "dog"])
    assert ids[1][0] != ids[1][1] and len(ids[0]) > len(ids[1])  # [CLS] ... [SEP], not all [UNK]
    with pytest.raises(Exception, match="longer than the text tower's maximum"):
        build_label_set(["cat " * 300], ["{}"], model)


def test_biomed_tokenizer_gives_words_their_ids(ckpts):
    """The tiny BiomedCLIP's tokenizer, loaded as zslabel and open_clip load it, gives the words of
    its vocabulary their own ids (no [UNK]), so the biomed parity cases compare text embeddings of
    different prompts, not of one all-[UNK] prompt."""
    ckpt = ckpts["biomed"]
    vocab = (ckpt / "vocab.txt").read_text().splitlines()
    with in_folder(ckpt):
        reference = open_clip.get_tokenizer(f"local-dir:{ckpt}")
    model = load_model(ckpt)
    prompts = [t.format(label) for label in LABELS for t in TEMPLATES]
    ids = model.tokenizer(prompts)
    assert torch.equal(ids, reference(prompts))
    assert vocab.index("[UNK]") not in ids
    assert len({tuple(row.tolist()) for row in ids}) == len(prompts)  # every prompt its own ids
    cat, dog = model.prompt_token_ids(["This is a photo of a cat.", "This is a photo of a Dog."])
    assert [vocab[i] for i in cat] == ["[CLS]", "this", "is", "a", "photo", "of", "a", "cat", ".", "[SEP]"]
    assert [vocab[i] for i in dog] == ["[CLS]", "this", "is", "a", "photo", "of", "a", "dog", ".", "[SEP]"]


def test_fsspec_uri_is_copied_once_and_scores_the_same(ckpts, tmp_path):
    """A checkpoint folder at an fsspec URI (here memory://, in this process) is copied into the
    node cache once; the copy is self-contained (BiomedCLIP shape: BERT config and tokenizer inside)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    src = ckpts["biomed"]
    for f in src.rglob("*"):
        if f.is_file():
            fs.pipe(f"/models/biomed/{f.relative_to(src)}", f.read_bytes())
    local = resolve_checkpoint("memory://models/biomed")
    assert local != src and (local / "open_clip_config.json").is_file()
    assert checkpoint_digest(local) == checkpoint_digest(src)
    assert resolve_checkpoint("memory://models/biomed") == local  # copied once
    files = image_files(tmp_path / "in")
    np.testing.assert_allclose(zslabel_scores(load_model(local), files, LABELS, TEMPLATES[:1]),
                               zslabel_scores(load_model(src), files, LABELS, TEMPLATES[:1]), atol=1e-6)


def test_hf_hub_prefix_reads_the_hub_cache(ckpts, tmp_path, monkeypatch):
    """``hf-hub:ORG/NAME`` resolves through huggingface_hub's cache (offline here: a cache laid
    out as snapshot_download leaves it), as BiomedCLIP's ``hf-hub:microsoft/...`` does online."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny--biomedclip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ckpts["biomed"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    path = resolve_checkpoint("hf-hub:tiny/biomedclip")
    assert path == repo / "snapshots" / commit
    model = load_model(path)
    assert model.library == "open_clip"
    with pytest.raises(ModelLoadError, match="cannot download model 'tiny/absent'"):
        resolve_checkpoint("hf-hub:tiny/absent")
    # A hub repo with a transformers config.json + open_clip files (laion/CLIP-*) stays transformers.
    from zslabel.model import family_of

    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "both" / "open_clip_config.json").write_text("{}")
    assert family_of(tmp_path / "both").name == "transformers"
    (tmp_path / "both" / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224"}))
    assert family_of(tmp_path / "both").name == "open_clip"  # timm's config.json (timm/* repos)


@pytest.fixture
def tiny_pretrained_tag(ckpts, tmp_path):
    """Register architecture 'Tiny-ViT-T8' with tag 'tiny_s1' in open_clip's registry (in this
    process), weights from the tiny ViT, preprocessing (bilinear, own mean/std) and QuickGELU
    (as the openai tags) from the tag."""
    pretrained = open_clip.pretrained  # (no import statement: scripts/check_lock.py reads those as dependencies)
    cfg = json.loads((ckpts["vit"] / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "Tiny-ViT-T8.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    tag = {"file": str(ckpts["vit"] / "open_clip_pytorch_model.bin"), "mean": (0.5, 0.5, 0.5),
           "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "quick_gelu": True}
    pretrained._PRETRAINED["Tiny-ViT-T8"] = {"tiny_s1": tag}
    try:
        yield "Tiny-ViT-T8:tiny_s1"
    finally:
        del pretrained._PRETRAINED["Tiny-ViT-T8"]


def test_arch_tag_matches_create_model_and_transforms(tiny_pretrained_tag, tmp_path):
    path = resolve_checkpoint(tiny_pretrained_tag)
    assert (path / "open_clip_config.json").is_file() and resolve_checkpoint(tiny_pretrained_tag) == path
    model = load_model(path)
    assert model.architecture == "Tiny-ViT-T8" and model.model_type == "open_clip:Tiny-ViT-T8"
    assert model.preprocess.resample == int(Image.Resampling.BILINEAR)
    assert json.loads((path / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    files = image_files(tmp_path / "in")
    # The tag's QuickGELU applied, as open_clip's ARCH-quickgelu names do (zslabel does it for tags).
    ref, _, preprocess = open_clip.create_model_and_transforms("Tiny-ViT-T8", pretrained="tiny_s1",
                                                               force_quick_gelu=True)
    tokenizer = open_clip.get_tokenizer("Tiny-ViT-T8")
    ref.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(ref, tokenizer, LABELS, TEMPLATES, device="cpu")
        feats = ref.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]), normalize=True)
        expected = (ref.logit_scale.exp() * feats @ classifier).softmax(-1).numpy()
    got = zslabel_scores(model, files, LABELS, TEMPLATES)
    MEASURED["ARCH:tag"] = float(np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_unknown_arch_or_tag_names_close_matches():
    with pytest.raises(ModelLoadError, match=r"unknown open_clip architecture 'ViT-B-3'.*close matches: .*ViT-B-32"):
        resolve_checkpoint("ViT-B-3:openai")
    with pytest.raises(ModelLoadError, match=r"no pretrained tag 'laion2b_s34b_b7'.*close matches: laion2b_s34b_b79k"):
        resolve_checkpoint("ViT-B-32:laion2b_s34b_b7")
    with pytest.raises(ModelLoadError, match="expected hf-hub:ORG/NAME"):
        resolve_checkpoint("hf-hub:no-org")


def test_cli_unknown_arch_exits_2_before_ray(tmp_path):
    import subprocess
    import sys
    import time

    (tmp_path / "in").mkdir()
    photo(40, 40).save(tmp_path / "in" / "a.png")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zslabel", "label", str(tmp_path / "in"), "--labels", "a,b",
                           "--model", "ViT-L-14-33:openai", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "ViT-L-14-336" in proc.stderr and "unknown open_clip architecture" in proc.stderr
    assert not (tmp_path / "out").exists()
    print(f"CLI exit 2 after {time.monotonic() - t0:.1f} s")


def test_label_job_and_relabel_match_open_clip(ckpts, ray_local, tmp_path):
    """The Ray job on the BiomedCLIP shape: prompt ensembling, every label scored, embeddings
    stored; then relabel of those embeddings with other (hierarchical) labels. Both equal
    open_clip's recipe; the manifest names the library and architecture."""
    ckpt = ckpts["biomed"]
    files = image_files(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_label_job(JobConfig(input=str(tmp_path / "in"), output=str(out), labels=LABELS,
                                      templates=TEMPLATES, model=str(ckpt), top_k=len(LABELS), batch_size=4,
                                      store_embeddings=True, embedding_dtype="float32"))
    assert summary.rows == summary.labeled == len(files)
    rows = {r["path"]: r for r in pq.read_table(str(out)).to_pylist()}
    expected = reference_scores(ckpt, files, LABELS, TEMPLATES)
    worst = 0.0
    for f, exp in zip(files, expected):
        got = rows[str(f)]
        assert got["labels"][0] == LABELS[int(exp.argmax())], f.name
        by_label = dict(zip(got["labels"], got["scores"]))
        diff = np.abs(np.array([by_label[lab] for lab in LABELS]) - exp).max()
        worst = max(worst, float(diff))
    MEASURED["label job (Ray), biomed"] = worst
    assert worst < TOL
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model"]["library"] == "open_clip"
    assert manifest["model"]["architecture"] == "CustomTextCLIP(vision=timm:test_vit, text=hf:hf_text)"
    assert manifest["model"]["digest"] == checkpoint_digest(ckpt)
    assert manifest["preprocess"]["crop_offset"] == "round"
    assert "open_clip_torch" in manifest["versions"]

    new_labels = ["animal/cat", "animal/dog", "vehicle/a red car"]
    summary = run_relabel_job(RelabelConfig(source=str(out), output=str(tmp_path / "re"), labels=new_labels,
                                            top_k=3, min_score=0.05, hierarchy=True), progress=False)
    assert summary.rows == len(files)
    rerows = {r["path"]: r for r in pq.read_table(str(tmp_path / "re")).to_pylist()}
    # The relabel keeps the source run's templates (no templates given): both of TEMPLATES.
    assert json.loads((tmp_path / "re" / MANIFEST_NAME).read_text())["templates"] == TEMPLATES
    expected = reference_scores(ckpt, files, ["cat", "dog", "a red car"], TEMPLATES)
    worst = 0.0
    for f, exp in zip(files, expected):
        by_label = dict(zip(rerows[str(f)]["labels"], rerows[str(f)]["scores"]))
        worst = max(worst, max(abs(by_label[lab] - e) for lab, e in zip(new_labels, exp) if lab in by_label))
    MEASURED["relabel, biomed"] = worst
    assert worst < TOL
    # The hierarchy roll-up ran: the top node of every row is one of the two parents or a leaf.
    assert {r["hier_path"][0] for r in rerows.values() if r["hier_path"]} <= {"animal", "vehicle"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vit", "biomed"])
def test_cuda_float16_close_to_cpu_float32(name, ckpts, tmp_path):
    """float16 on CUDA (open_clip's mixed precision, what the labeler actors use on a GPU) ranks
    as float32 on the CPU, within float16 rounding. Not run on this project's CPU machines."""
    files = image_files(tmp_path / "in")
    cpu = zslabel_scores(load_model(ckpts[name]), files, LABELS, TEMPLATES)
    model = load_model(ckpts[name], device="cuda", dtype=torch.float16)
    label_set = build_label_set(LABELS, TEMPLATES, load_model(ckpts[name], device="cuda"))
    pixels = np.stack([decode_image(f.read_bytes(), model.preprocess).pixels for f in files])
    logits = zero_shot_logits(model.encode_images(pixels), torch.from_numpy(label_set.embeddings).cuda(),
                              model.logit_scale, model.logit_bias)
    gpu = scores_from_logits(logits, model.score_kind).cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)


def test_zz_report_measured():
    """Prints the measured parity (run with -s to see it)."""
    for case, diff in MEASURED.items():
        print(f"open_clip parity {case}: max |zslabel - open_clip| = {diff:.2e}")
    assert all(d < TOL for d in MEASURED.values())
