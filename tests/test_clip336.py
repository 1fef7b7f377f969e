"""A 336-pixel CLIP (openai/clip-vit-large-patch14-336's geometry: 336-pixel input, 14-pixel
patches, shortest-edge 336 + centre crop 336) matches transformers' zero-shot pipeline through the
Ray job, on images smaller and larger than 336 pixels, with odd crop margins."""

import json

import pytest
from conftest import photo, pipeline_score_gap

from zslabel import JobConfig, run_label_job
from zslabel.store import MANIFEST_NAME

LABELS = ["cat", "dog", "bird", "a red car", "tree"]


@pytest.fixture(scope="module")
def tiny_clip336(tmp_path_factory):
    from zslabel_dev.tiny import TINY_VIT_L14_336_CONFIG, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("clip336"), "clip", seed=7, config=TINY_VIT_L14_336_CONFIG)


def test_336_pixel_clip_matches_transformers_pipeline(tiny_clip336, ray_local, tmp_path):

    from zslabel.model import load_model

    model = load_model(tiny_clip336)
    assert model.preprocess.output_hw == (336, 336) and model.preprocess.shortest_edge == 336
    assert model.model.config.vision_config.patch_size == 14
    d = tmp_path / "in"
    d.mkdir()
    photo(500, 339, 1).save(d / "landscape_margin.jpg", quality=92)  # 495 x 336: margin 159
    photo(200, 120, 2).save(d / "upscaled.png")                      # 560 x 336
    photo(336, 343, 3).convert("L").save(d / "gray_margin7.png")     # 336 x 343: margin 7
    photo(1024, 768, 4).save(d / "large.webp", quality=90)
    photo(336, 336, 5).save(d / "exact.png")
    files = sorted(d.iterdir())
    summary = run_label_job(JobConfig(input=str(d), output=str(tmp_path / "out"), labels=LABELS,
                                      model=str(tiny_clip336), top_k=len(LABELS), batch_size=4))
    assert summary.rows == summary.labeled == len(files)
    worst = pipeline_score_gap(tmp_path / "out", files, tiny_clip336, LABELS)
    print(f"336-pixel CLIP parity: max |zslabel - pipeline| = {worst:.2e}")
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["model"]["library"] == "transformers" and manifest["model"]["architecture"] == "CLIPModel"
