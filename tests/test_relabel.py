"""Relabel stored embeddings (parity with a full run, CLIP and SigLIP, float16 and float32),
refusals, and abstention / multi-label on real runs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import photo

from zslabel import JobConfig, run_label_job
from zslabel.errors import ConfigError, InputError, OutputError
from zslabel.relabel import RelabelConfig, run_relabel_job
from zslabel.store import MANIFEST_NAME

LABELS_A = ["red", "green", "blue", "yellow"]
LABELS_B = ["cat", "dog", "bird", "a red car", "tree"]
TEMPLATES_B = ["a photo of a {}.", "a blurry picture of the {}."]
MEASURED = {}  # (family, dtype) -> max |relabel - full| score, reported at the end of the module


def rows_by_path(out):
    return {r["path"]: r for r in pq.read_table(str(out)).to_pylist()}


def score_maps(rows):
    """path -> {label: score} for labeled rows, None for error rows."""
    return {p: None if r["error"] else dict(zip(r["labels"], r["scores"])) for p, r in rows.items()}


def cut_between(values, lo=0.2, hi=0.8):
    """A cut between two of ``values`` (in their middle range) with the widest gap, so rows on
    either side are far from it compared with float16 rounding."""
    v = np.sort(np.asarray(values, np.float64))
    i0, i1 = int(len(v) * lo), max(int(len(v) * hi), int(len(v) * lo) + 1)
    gaps = v[i0 + 1:i1 + 1] - v[i0:i1]
    j = i0 + int(np.argmax(gaps))
    assert v[j + 1] - v[j] > 4e-4, "test images give no clear cut"
    return float((v[j] + v[j + 1]) / 2)


def multi_label_threshold(score_rows):
    """A threshold between two scores where rows keep different numbers of labels."""
    values = np.unique(np.concatenate(score_rows))
    best, best_t = -1, None
    for a, b in zip(values[:-1], values[1:]):
        if b - a < 1e-4:
            continue
        t = float((a + b) / 2)
        variety = len({int((s >= t).sum()) for s in score_rows})
        if variety > best or (variety == best and abs(t - np.median(values)) < abs(best_t - np.median(values))):
            best, best_t = variety, t
    assert best >= 2
    return best_t


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("relabel_images")
    for i in range(10):
        photo(40 + 7 * i, 30 + 5 * (i % 4), seed=i).save(d / f"img_{i:02d}.{['png', 'jpg'][i % 2]}")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return d


@pytest.fixture(scope="module")
def runs(images, tiny_clip, tiny_siglip, ray_local, tmp_path_factory):
    """Per family: A16/A32 runs with labels A (stored float16/float32 embeddings), the second one
    with abstention (and multi-label for SigLIP); relabels to labels B; a full run with labels B."""
    root = tmp_path_factory.mktemp("relabel_runs")
    out = {}
    for family, ckpt in (("clip", tiny_clip), ("siglip", tiny_siglip)):
        r = {"ckpt": ckpt, "root": root / family}
        common = dict(input=str(images), model=str(ckpt), batch_size=4, store_embeddings=True)
        r["a16"] = root / family / "a16"
        run_label_job(JobConfig(output=str(r["a16"]), labels=LABELS_A, top_k=len(LABELS_A),
                                embedding_dtype="float16", **common))
        full_a = [np.array(list(m.values())) for m in score_maps(rows_by_path(r["a16"])).values() if m]
        r["min_score_a"] = cut_between([s.max() for s in full_a])
        extra = {"top_k": 2}
        if family == "siglip":
            r["threshold_a"] = multi_label_threshold(full_a)
            extra = {"multi_label": True, "threshold": r["threshold_a"]}
        r["a32"] = root / family / "a32"
        run_label_job(JobConfig(output=str(r["a32"]), labels=LABELS_A, embedding_dtype="float32",
                                min_score=r["min_score_a"], **extra, **common))
        for dtype in ("16", "32"):
            run_relabel_job(RelabelConfig(source=str(r["a" + dtype]), output=str(root / family / f"rb{dtype}"),
                                          labels=LABELS_B, templates=TEMPLATES_B, top_k=len(LABELS_B),
                                          batch_size=3))
            r["rb" + dtype] = root / family / f"rb{dtype}"
        full_b = [np.array(list(m.values())) for m in score_maps(rows_by_path(r["rb32"])).values() if m]
        r["min_score_b"] = cut_between([s.max() for s in full_b])
        r["full_b"] = root / family / "full_b"
        run_label_job(JobConfig(input=str(images), output=str(r["full_b"]), model=str(ckpt), labels=LABELS_B,
                                templates=TEMPLATES_B, top_k=len(LABELS_B), batch_size=4,
                                min_score=r["min_score_b"]))
        out[family] = r
    yield out
    print("\nrelabel vs full run, max abs score difference:",
          ", ".join(f"{f} {d}: {v:.2e}" for (f, d), v in sorted(MEASURED.items())))


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("dtype, tol", [("16", 1e-3), ("32", 1e-5)])
def test_relabel_gives_the_scores_of_a_full_run(runs, family, dtype, tol):
    r = runs[family]
    full = rows_by_path(r["full_b"])
    relabeled = rows_by_path(r["rb" + dtype])
    assert set(full) == set(relabeled) and len(full) == 11
    diffs = []
    for path, f in full.items():
        g = relabeled[path]
        assert g["error"] == f["error"] and g["input_index"] == f["input_index"], path
        assert (g["width"], g["height"]) == (f["width"], f["height"])
        if f["error"]:
            assert g["labels"] is None and g["scores"] is None and g["embedding"] is None
            continue
        assert sorted(g["labels"]) == sorted(LABELS_B)
        mf, mg = dict(zip(f["labels"], f["scores"])), dict(zip(g["labels"], g["scores"]))
        diffs += [abs(mf[k] - mg[k]) for k in LABELS_B]
        if dtype == "32":
            assert g["labels"] == f["labels"], path
    MEASURED[(family, "float" + dtype)] = max(diffs)
    assert max(diffs) < tol
    assert sum(f["error"] is not None for f in full.values()) == 1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_relabel_output_contract_and_manifest(runs, family, tmp_path):
    r = runs[family]
    # Same options as the full run (min-score, no stored embeddings) -> the very same schema.
    out = tmp_path / "rb"
    summary = run_relabel_job(RelabelConfig(source=str(r["a16"]), output=str(out), labels=LABELS_B,
                                            templates=TEMPLATES_B, top_k=len(LABELS_B), store_embeddings=False,
                                            min_score=r["min_score_b"]))
    full_counts = json.loads((r["full_b"] / MANIFEST_NAME).read_text())["counts"]
    assert summary.rows == 11 and summary.labeled == 10 and summary.errors_by_code == {"truncated": 1}
    assert summary.errors_by_code == full_counts["errors_by_code"]
    full_schema = pq.read_schema(next(r["full_b"].glob("*.parquet")))
    assert all(pq.read_schema(f) == full_schema for f in out.glob("*.parquet"))
    full, got = rows_by_path(r["full_b"]), rows_by_path(out)
    assert {p: x["abstained"] for p, x in got.items()} == {p: x["abstained"] for p, x in full.items()}
    assert {x["abstained"] for x in got.values() if not x["error"]} == {True, False}
    # A kept embedding column is the source's, bit for bit (float16 stays float16).
    src, kept = rows_by_path(r["a16"]), rows_by_path(r["rb16"])
    assert all(src[p]["embedding"] == kept[p]["embedding"] for p in src)
    # ... and the schema is that of `label --store-embeddings` (a16 ran without --min-score too).
    assert pq.read_schema(next(r["rb16"].glob("*.parquet"))) == pq.read_schema(next(r["a16"].glob("*.parquet")))
    m = json.loads((out / MANIFEST_NAME).read_text())
    src_m = json.loads((r["a16"] / MANIFEST_NAME).read_text())
    assert m["kind"] == "relabel" and m["labels"] == LABELS_B and m["templates"] == TEMPLATES_B
    assert m["model"]["digest"] == src_m["model"]["digest"] and m["model"]["id"] == str(r["ckpt"])
    assert m["model"]["score_kind"] == ("softmax" if family == "clip" else "sigmoid")
    assert m["counts"]["rows"] == 11 and m["counts"]["errors_by_code"] == {"truncated": 1}
    assert m["config"]["labels"] == LABELS_B and m["config"]["min_score"] == r["min_score_b"]
    assert m["config"]["input"] == src_m["config"]["input"] and m["preprocess"] == src_m["preprocess"]
    assert m["relabel"]["source"] == str(r["a16"]) and m["relabel"]["model_checked"] is True


def test_abstention_on_a_real_run(runs):
    """CLIP A32 ran with --min-score and --top-k 2: abstained == best score < S, labels kept."""
    r = runs["clip"]
    full, run = score_maps(rows_by_path(r["a16"])), rows_by_path(r["a32"])
    flags = []
    for path, row in run.items():
        if full[path] is None:
            assert row["error"] and row["abstained"] is None and row["labels"] is None
            continue
        ranked = sorted(full[path].items(), key=lambda kv: -kv[1])
        assert row["labels"] == [k for k, _ in ranked[:2]]
        assert row["scores"] == pytest.approx([v for _, v in ranked[:2]], abs=1e-5)
        assert row["abstained"] == (ranked[0][1] < r["min_score_a"])
        flags.append(row["abstained"])
    assert set(flags) == {True, False}
    assert str(pq.read_schema(next(r["a32"].glob("*.parquet"))).field("abstained").type) == "bool"
    assert "abstained" not in pq.read_schema(next(r["a16"].glob("*.parquet"))).names  # only with --min-score


def test_multi_label_on_a_real_run(runs, tmp_path):
    """SigLIP A32 ran with --multi-label --threshold T --min-score S: every label >= T, best first."""
    r = runs["siglip"]
    t = r["threshold_a"]
    full, run = score_maps(rows_by_path(r["a16"])), rows_by_path(r["a32"])
    counts = set()
    for path, row in run.items():
        if full[path] is None:
            assert row["labels"] is None and row["abstained"] is None
            continue
        expected = sorted(((k, v) for k, v in full[path].items() if v >= t), key=lambda kv: -kv[1])
        assert row["labels"] == [k for k, _ in expected], path
        assert row["scores"] == pytest.approx([v for _, v in expected], abs=1e-5)
        assert row["abstained"] == (max(full[path].values()) < r["min_score_a"])
        counts.add(len(row["labels"]))
    assert len(counts) >= 2
    # Relabeling with the same options reproduces the run; nothing above T -> [] (not null).
    same = tmp_path / "same"
    run_relabel_job(RelabelConfig(source=str(r["a32"]), output=str(same), labels=LABELS_A, multi_label=True,
                                  threshold=t, min_score=r["min_score_a"], store_embeddings=False))
    got = rows_by_path(same)
    for path, row in run.items():
        assert got[path]["labels"] == row["labels"] and got[path]["abstained"] == row["abstained"]
    none = tmp_path / "none"
    run_relabel_job(RelabelConfig(source=str(r["a16"]), output=str(none), labels=LABELS_A, multi_label=True,
                                  threshold=0.999))
    assert [x["labels"] for x in rows_by_path(none).values() if not x["error"]] == [[]] * 10


def test_multi_label_refused_for_softmax_models(runs, images, tiny_clip, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--multi-label needs independent per-label .sigmoid. scores"):
        run_label_job(JobConfig(input=str(images), output=str(out), labels=LABELS_A, model=str(tiny_clip),
                                multi_label=True, threshold=0.5))
    assert not out.exists()
    with pytest.raises(ConfigError, match="softmax"):
        run_relabel_job(RelabelConfig(source=str(runs["clip"]["a16"]), output=str(out), labels=LABELS_B,
                                      multi_label=True, threshold=0.5))
    assert not out.exists()
    with pytest.raises(ConfigError, match="--threshold applies to --multi-label only"):
        JobConfig(input="x", output="y", labels=["a"], threshold=0.5).validate()
    with pytest.raises(ConfigError, match="needs --threshold"):
        JobConfig(input="x", output="y", labels=["a"], multi_label=True).validate()
    with pytest.raises(ConfigError, match="--min-score must be in"):
        JobConfig(input="x", output="y", labels=["a"], min_score=1.5).validate()


def test_relabel_refuses_other_models_and_bad_sources(runs, tiny_siglip, tmp_path):
    from zslabel_dev.tiny import build_tiny_checkpoint

    src = runs["clip"]["a16"]
    other = build_tiny_checkpoint(tmp_path / "other_clip", "clip", seed=1)  # same shapes, other weights
    for model in (other, tiny_siglip):
        with pytest.raises(ConfigError, match="the embeddings were made by model"):
            run_relabel_job(RelabelConfig(source=str(src), output=str(tmp_path / "o"), labels=LABELS_B,
                                          model=str(model)))
    assert not (tmp_path / "o").exists()
    # Without the manifest the model cannot be checked: --model is then required.
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / MANIFEST_NAME).unlink()
    with pytest.raises(ConfigError, match="pass --model"):
        run_relabel_job(RelabelConfig(source=str(bare), output=str(tmp_path / "o"), labels=LABELS_B))
    with pytest.raises(InputError, match="no 'embedding' column"):
        run_relabel_job(RelabelConfig(source=str(runs["clip"]["full_b"]), output=str(tmp_path / "o"),
                                      labels=LABELS_A))
    with pytest.raises(ConfigError, match="inside it"):
        run_relabel_job(RelabelConfig(source=str(src), output=str(src / "sub"), labels=LABELS_A))
    with pytest.raises(OutputError, match="already holds data"):
        run_relabel_job(RelabelConfig(source=str(src), output=str(runs["clip"]["a32"]), labels=LABELS_A))
    one_file = next(src.glob("*.parquet"))  # a single file of a run also works (manifest beside it)
    s = run_relabel_job(RelabelConfig(source=str(one_file), output=str(tmp_path / "one"), labels=LABELS_A))
    assert s.rows == pq.read_metadata(one_file).num_rows


def test_relabel_cli_reads_no_image(runs, images, tmp_path):
    """`zslabel relabel` with the images moved away: only the stored embeddings are used."""
    r = runs["siglip"]
    out = tmp_path / "cli"
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# new labels\n" + "\n".join(LABELS_B) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES_B) + "\n")
    moved = images.with_name(images.name + "_moved")
    os.rename(images, moved)
    try:
        proc = subprocess.run([sys.executable, "-m", "zslabel", "relabel", str(r["a32"]), "--labels-file",
                               str(labels_file), "--templates", str(templates), "--output", str(out),
                               "--top-k", "5", "--drop-embeddings"], capture_output=True, text=True, timeout=300)
        bad = subprocess.run([sys.executable, "-m", "zslabel", "relabel", str(r["a32"]), "--labels", "a,b",
                              "--output", str(tmp_path / "bad"), "--model", str(runs["clip"]["ckpt"])],
                             capture_output=True, text=True, timeout=300)
    finally:
        os.rename(moved, images)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labeled 10 of 11 images" in proc.stdout
    # Not a terminal: one final progress line on stderr (11 rows, the 1 source error kept).
    assert "relabeling: 11/11 rows (100%)" in proc.stderr and "1 errors, took" in proc.stderr
    got, expected = rows_by_path(out), rows_by_path(r["rb32"])
    assert "embedding" not in pq.read_schema(next(out.glob("*.parquet"))).names
    for p, row in expected.items():
        # Other batch sizes (8192 vs 3 rows) may round the matrix product differently in the last bit.
        assert got[p]["labels"] == row["labels"] and got[p]["scores"] == (
            None if row["scores"] is None else pytest.approx(row["scores"], abs=1e-6))
    assert bad.returncode == 2 and "the embeddings were made by model" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_relabel_plain_embeddings_parquet(runs, tmp_path):
    """Any Parquet with ``path`` + a list ``embedding`` column works when --model is given."""
    import pyarrow as pa

    r = runs["clip"]
    src = [x for x in rows_by_path(r["a32"]).values() if x["error"] is None]
    plain = tmp_path / "emb"
    plain.mkdir()
    pq.write_table(pa.table({"path": [x["path"] for x in src], "note": ["n"] * len(src),
                             "embedding": pa.array([x["embedding"] for x in src], pa.list_(pa.float32()))}),
                   plain / "e.parquet")
    out = tmp_path / "out"
    s = run_relabel_job(RelabelConfig(source=str(plain), output=str(out), labels=LABELS_B, templates=TEMPLATES_B,
                                      top_k=len(LABELS_B), model=str(r["ckpt"]), store_embeddings=False))
    assert s.rows == s.labeled == len(src)
    got, expected = pq.read_table(out).to_pylist(), rows_by_path(r["rb32"])
    assert [g["input_index"] for g in got] == list(range(len(src))) and {g["note"] for g in got} == {"n"}
    for g in got:
        assert g["labels"] == expected[g["path"]]["labels"] and g["width"] is None
        assert g["scores"] == pytest.approx(expected[g["path"]]["scores"], abs=1e-6)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["relabel"]["model_checked"] is False
    pq.write_table(pa.table({"path": ["x"], "embedding": pa.array([None], pa.list_(pa.float32()))}),
                   plain / "e.parquet")
    with pytest.raises(InputError, match="no stored embedding"):
        run_relabel_job(RelabelConfig(source=str(plain), output=str(tmp_path / "o2"), labels=LABELS_B,
                                      model=str(r["ckpt"])))
    assert not list((tmp_path / "o2").glob("*.parquet")) and not list((tmp_path / "o2").glob(".*"))


def test_relabel_keeps_the_source_templates_and_top_k_unless_given(runs, tmp_path):
    """A relabel with only new labels keeps the prompt templates and top-k the source run was
    labeled with (it silently reset them to the defaults before); given ones win."""
    src = runs["clip"]["rb32"]  # labeled with TEMPLATES_B and top-k 5
    kept = run_relabel_job(RelabelConfig(source=str(src), output=str(tmp_path / "kept"), labels=LABELS_B[:4]))
    manifest = json.loads((tmp_path / "kept" / "_run_manifest.json").read_text())
    assert manifest["templates"] == TEMPLATES_B and manifest["config"]["top_k"] == len(LABELS_B)
    assert kept.labeled and {len(r["labels"]) for r in rows_by_path(tmp_path / "kept").values() if r["labels"]} == {4}
    run_relabel_job(RelabelConfig(source=str(src), output=str(tmp_path / "given"), labels=LABELS_B,
                                  templates=["{}"], top_k=2))
    manifest = json.loads((tmp_path / "given" / "_run_manifest.json").read_text())
    assert manifest["templates"] == ["{}"] and manifest["config"]["top_k"] == 2


def test_output_that_names_the_source_another_way_is_refused(tmp_path):
    """Validation only (no run): every spelling of the source folder, or of a folder inside it,
    is refused before anything is read or written. ``/r//run``, ``/r/./run``, ``/r/x/../run``
    and a symlink to the source passed the string comparison, and ``--overwrite`` replaced the
    source run with its own relabel."""
    src = tmp_path / "r" / "run"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "r" / "x").mkdir()
    (tmp_path / "link").symlink_to(src)
    r = str(tmp_path / "r")
    given = dict(labels=LABELS_A, templates=["a photo of a {}."], top_k=1, model="any")  # what the source gives
    for output in (f"{r}//run", f"{r}/./run", f"{r}/x/../run", str(tmp_path / "link"), f"{r}/run/",
                   f"file://{r}/run", f"{r}//run/sub", str(tmp_path / "link" / "new")):
        with pytest.raises(ConfigError, match="is the source .or inside it."):
            RelabelConfig(source=str(src), output=output, mode="overwrite", **given).validate()
    RelabelConfig(source=str(src), output=f"{r}/run2", **given).validate()  # a sibling is fine


def test_a_source_file_without_embeddings_is_refused_before_anything_is_written(tmp_path):
    """Every source file's columns are checked when the source is opened (footers only): a
    foreign Parquet file was met mid-relabel, after part files had been committed (exit 2 with
    an output left behind that a rerun called 'an unfinished run')."""
    from zslabel.relabel import RelabelSource

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"path": ["a.jpg"], "embedding": pa.array([[0.5, 0.5]], pa.list_(pa.float32(), 2))}),
                   src / "part-0.parquet")
    pq.write_table(pa.table({"a": [1], "b": [2]}), src / "stats.parquet")
    with pytest.raises(InputError, match="stats.parquet has no 'embedding' column"):
        RelabelSource.open(str(src), {})
