"""``--reference-pixels`` end to end (issue 23): for images with alpha and 16/32-bit samples, a
labeling job's scores equal ``transformers.pipeline("zero-shot-image-classification")`` on the
same files, and the option is part of the run's fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import photo, pipeline_score_gap
from PIL import Image

from zslabel import JobConfig, run_label_job
from zslabel.errors import OutputError

LABELS = ["cat", "dog", "bird", "a red car", "tree"]


def alpha_and_deep_images(d):
    """Files where zslabel's default pixels and load_image's differ (plus one opaque control)."""
    d.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:50, 0:60]
    rgb = np.asarray(photo(60, 50, 1))
    alpha = ((x * 4) % 256).astype(np.uint8)
    alpha[:, :15] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(d / "rgba.png")
    Image.merge("LA", (Image.fromarray(rgb).convert("L"), Image.fromarray(alpha))).save(d / "la.png")
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(d / "rgba.webp", lossless=True)
    Image.fromarray((x * 1000 + y * 50).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray((x * 70000 - 5000).astype(np.int32)).save(d / "int32.tif")
    Image.fromarray((x / 59.0 * 4.0 - 1.0).astype(np.float32)).save(d / "float32.tif")
    photo(64, 48, 2).save(d / "opaque.jpg", quality=92)
    return sorted(d.iterdir())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_reference_pixels_scores_equal_the_transformers_pipeline(family, tiny_clip, tiny_siglip, ray_local,
                                                                 tmp_path):

    ckpt = tiny_clip if family == "clip" else tiny_siglip
    files = alpha_and_deep_images(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_label_job(JobConfig(input=str(tmp_path / "in"), output=str(out), labels=LABELS,
                                      model=str(ckpt), top_k=len(LABELS), batch_size=4, reference_pixels=True))
    assert summary.rows == summary.labeled == len(files)
    worst = pipeline_score_gap(out, files, ckpt, LABELS)
    print(f"{family}: largest score difference with --reference-pixels {worst:.2e}")
    if family == "clip":
        # The option shapes results: resuming this output without it is refused, naming it.
        with pytest.raises(OutputError, match="reference_pixels"):
            run_label_job(JobConfig(input=str(tmp_path / "in"), output=str(out), labels=LABELS, model=str(ckpt),
                                    top_k=len(LABELS), batch_size=4, mode="resume"))
