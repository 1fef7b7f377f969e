"""Smaller items of issue 23: ``eval`` reports top-k only for k the run wrote, a one-label run
is warned about at validation, and the README's format list is the code's."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zslabel import JobConfig
from zslabel.decode import DECODED_FORMATS
from zslabel.evaluate import evaluate
from zslabel.output import output_schema
from zslabel.sources import IMAGE_EXTENSIONS
from zslabel.store import MANIFEST_NAME

README = Path(__file__).resolve().parents[1] / "README.md"
LABELS = [f"l{i}" for i in range(10)]


def run_output(tmp_path, top_k: int, n_labels: int = 10, manifest: bool = True):
    """A zslabel output of 4 rows writing ``top_k`` labels each, and its ground truth: the truth
    is the first label of row 0, the third of row 1, the fifth of row 2 and absent from row 3."""
    out = tmp_path / f"out{top_k}_{n_labels}"
    out.mkdir()
    labels = LABELS[:n_labels]
    rows = [labels[i:] + labels[:i] for i in range(4)]
    truth = [rows[0][0], rows[1][2 % n_labels], rows[2][4 % n_labels], "zzz"]
    written = [r[:top_k] for r in rows]
    table = pa.table({"path": [f"/x/{i}.jpg" for i in range(4)], "input_index": list(range(4)),
                      "labels": written, "scores": [[0.1] * len(w) for w in written], "error": [None] * 4,
                      "width": [8] * 4, "height": [8] * 4}, schema=output_schema())
    pq.write_table(table, out / "part-0.parquet")
    if manifest:
        (out / MANIFEST_NAME).write_text(json.dumps({"labels": labels, "config": {"top_k": top_k}}))
    gt = tmp_path / f"gt{top_k}_{n_labels}.csv"
    gt.write_text("path,label\n" + "".join(f"/x/{i}.jpg,{t}\n" for i, t in enumerate(truth)))
    return str(out), str(gt)


def test_eval_reports_top_k_only_for_k_the_run_wrote(tmp_path):
    r = evaluate(*run_output(tmp_path, top_k=3))
    assert (r.top_k, r.topk_correct, r.top5_accuracy, r.top5_correct) == (3, 2, None, None)
    assert "top-3 accuracy 0.500 (2/4)" in r.text() and "top-5 accuracy" not in r.text()
    r = evaluate(*run_output(tmp_path, top_k=5))
    assert (r.top_k, r.top5_correct, r.top5_accuracy) == (5, 3, 0.75) and "top-5 accuracy 0.750 (3/4)" in r.text()
    r = evaluate(*run_output(tmp_path, top_k=1))
    assert r.top_k == 1 and "no top-5 accuracy: the run wrote 1 label per image" in r.text()
    # top-k 3 over 3 labels wrote every label: top-5 is well defined (the truth is always there)
    r = evaluate(*run_output(tmp_path, top_k=3, n_labels=3))
    assert r.top_k == 5 and r.top5_accuracy is not None
    # without a manifest, the most labels a row holds
    r = evaluate(*run_output(tmp_path, top_k=4, manifest=False))
    assert r.top_k == 4 and r.top5_accuracy is None


def test_one_label_is_warned_about_at_validation(caplog):
    with caplog.at_level(logging.WARNING, logger="zslabel"):
        JobConfig(input="x", output="y", labels=["cat"]).validate()
    text = caplog.text
    assert "only one candidate label ('cat')" in text and "always 1" in text and "sigmoid" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zslabel"):
        JobConfig(input="x", output="y", labels=["cat", "dog"]).validate()
    assert "one candidate label" not in caplog.text


def test_readme_lists_the_extensions_and_formats_of_the_code():
    text = README.read_text()
    listed = re.search(r"files without an image extension\s*\(`([^`]+)`", text)
    assert listed, "README: the extension list moved"
    assert {"." + e for e in listed.group(1).split()} == set(IMAGE_EXTENSIONS)
    formats = re.search(r"decodes these formats \(Pillow names\): ([^.]+)\.", text)
    assert formats, "README: the decoded format list moved"
    assert [f.strip(" `") for f in formats.group(1).replace("\n", " ").split(",")] == list(DECODED_FORMATS)
