"""open_clip support in the default environment (no open-clip extra): recognising open_clip
checkpoints and ``--model`` forms without importing open_clip, the one install command when it is
missing, and the torchvision centre-crop rounding of ``PreprocessSpec`` (pure numpy/Pillow).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from zslabel.decode import PreprocessSpec, _center_crop
from zslabel.errors import ModelLoadError
from zslabel.model import load_model, family_of, resolve_checkpoint
from zslabel.model_openclip import INSTALL_COMMAND, claims

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_no_open_clip = pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed here: these tests check "
                                                              "the message shown where it is not")


def test_model_values_claimed_by_open_clip():
    for value in ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "ViT-B-32:openai",
                  "ViT-L-14-336:openai", "EVA02-B-16:merged2b_s8b_b131k", "ViT-B-16-SigLIP:webli"):
        assert claims(value), value
    for value in ("openai/clip-vit-base-patch16", "C:\\models\\clip", "s3://b/m", "./models/x", "clip"):
        assert not claims(value), value


def test_family_is_read_from_the_folder(tmp_path):
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    assert family_of(oc).name == "open_clip"
    (oc / "config.json").write_text(json.dumps({"model_type": "clip"}))  # laion/CLIP-*: both files
    assert family_of(oc).name == "transformers"
    (tmp_path / "none").mkdir()
    assert family_of(tmp_path / "none") is None
    with pytest.raises(ModelLoadError, match="has no config.json or open_clip_config.json"):
        resolve_checkpoint(str(tmp_path / "none"))


@needs_no_open_clip
@pytest.mark.parametrize("value", ["hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                                   "ViT-B-32:laion2b_s34b_b79k", "FOLDER"])
def test_without_the_extra_the_error_names_the_install_command(value, tmp_path):
    if value == "FOLDER":
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
        with pytest.raises(ModelLoadError, match=f"Install the open-clip extra with: {INSTALL_COMMAND}"):
            load_model(resolve_checkpoint(str(tmp_path)))
    else:
        with pytest.raises(ModelLoadError, match=f"Install the open-clip extra with: {INSTALL_COMMAND}"):
            resolve_checkpoint(value)


@needs_no_open_clip
def test_cli_exits_2_with_the_install_command(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not read")
    proc = subprocess.run([sys.executable, "-m", "zslabel", "label", str(tmp_path / "in"), "--labels", "a,b",
                           "--model", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert INSTALL_COMMAND in proc.stderr and not (tmp_path / "out").exists()


def torchvision_center_crop(arr, crop_hw):
    """torchvision.transforms.functional.center_crop's arithmetic (v0.29), for (H, W, C) arrays."""
    h, w = arr.shape[:2]
    ch, cw = crop_hw
    if cw > w or ch > h:
        ltrb = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
                (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
        arr = np.pad(arr, ((ltrb[1], ltrb[3]), (ltrb[0], ltrb[2]), (0, 0)))
        h, w = arr.shape[:2]
        if (h, w) == (ch, cw):
            return arr
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return arr[top:top + ch, left:left + cw]


@pytest.mark.parametrize("hw", [(32, 35), (35, 32), (39, 32), (32, 43), (33, 32), (20, 25), (40, 40), (31, 45)])
def test_round_crop_offset_is_torchvision_center_crop(hw):
    arr = np.arange(hw[0] * hw[1] * 3, dtype=np.int64).reshape(hw[0], hw[1], 3)
    np.testing.assert_array_equal(_center_crop(arr, (32, 32), "round"), torchvision_center_crop(arr, (32, 32)))
    margin = max(hw) - 32
    if margin in (3, 7, 11):  # floor and round differ by one pixel exactly here
        assert not np.array_equal(_center_crop(arr, (32, 32), "floor"), _center_crop(arr, (32, 32), "round"))


def test_crop_offset_default_keeps_old_fingerprints():
    spec = PreprocessSpec(resize_mode="shortest_edge", shortest_edge=32, crop_hw=(32, 32))
    assert "crop_offset" not in spec.fingerprint_dict()
    rounded = PreprocessSpec(resize_mode="shortest_edge", shortest_edge=32, crop_hw=(32, 32), crop_offset="round")
    assert rounded.fingerprint_dict()["crop_offset"] == "round"
    with pytest.raises(ValueError, match="crop_offset"):
        PreprocessSpec(resize_mode="exact", size_hw=(32, 32), crop_offset="ceil")
