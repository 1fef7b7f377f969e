"""zslabel export: the format registry, the Label Studio tasks and labeling config (image
references, predictions, uncertainty order, refusals), and the way back: a Label Studio JSON
export as --ground-truth of eval and calibrate.

Runs are written with the output contract's own schema (``zslabel.output.output_schema``) and a
run manifest, so these tests need no Ray; the real end-to-end round trip (a `zslabel label` run,
a real Label Studio server) is tests/test_export_label_studio.py.
"""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zslabel.cli import build_parser
from zslabel.errors import ConfigError, InputError
from zslabel.evaluate import evaluate, load_ground_truth
from zslabel.exports import FORMATS, get
from zslabel.exports.label_studio import ImageRefs, export_label_studio, margin, path_from_reference
from zslabel.output import output_schema
from zslabel.store import MANIFEST_NAME

LABELS = ["cat", "dog", "bird", "fish"]
RUN_ID = "20261205T000000-abcdef12"


def write_run(out, rows, *, labels=LABELS, dim=None, files=2, carried=(), seed=0):
    """Write a finished zslabel output: ``rows`` of (path, top labels | None, top scores | None,
    error | None), split over ``files`` Parquet files (in shuffled input order), plus a manifest.

    With ``dim`` every labeled row gets a random L2-normalised float16 embedding (error rows a
    null one). Returns ``(out, embeddings (N, dim) float32 or None)``.
    """
    out.mkdir(parents=True)
    schema = output_schema(list(carried), embedding_dim=dim)
    rng = np.random.default_rng(seed)
    emb = None
    if dim:
        emb = rng.normal(size=(len(rows), dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb.astype(np.float16).astype(np.float32)
    order = rng.permutation(len(rows))  # files are not in input order: exports must not assume it
    for f, chunk in enumerate(np.array_split(order, files)):
        cols = {"path": [rows[i][0] for i in chunk], "input_index": [int(i) for i in chunk],
                "labels": [rows[i][1] for i in chunk], "scores": [rows[i][2] for i in chunk],
                "error": [rows[i][3] for i in chunk],
                "width": [None if rows[i][3] else 64 for i in chunk],
                "height": [None if rows[i][3] else 48 for i in chunk]}
        for c in carried:
            cols[c] = [f"{c}-{i}" for i in chunk]
        if dim:
            mask = np.array([rows[i][3] is not None for i in chunk])
            values = pa.array(emb[chunk].astype(np.float16).ravel(), pa.float16())
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(mask))
        pq.write_table(pa.table(cols, schema=schema), out / f"part-{RUN_ID}-{f}.parquet")
    (out / MANIFEST_NAME).write_text(json.dumps({"run_id": RUN_ID, "labels": list(labels),
                                                 "counts": {"rows": len(rows)}}))
    return out, emb


def zslabel(*args):
    return subprocess.run([sys.executable, "-m", "zslabel", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def run(tmp_path):
    """12 rows under tmp/images: 8 labeled local images (names needing quoting among them), an
    s3 URI, a tar member, 2 error rows."""
    img = tmp_path / "images"
    rows = [
        (f"{img}/a/cat1.jpg", ["cat", "dog", "bird"], [0.90, 0.06, 0.03], None),     # margin 0.84
        (f"{img}/a/cat2.jpg", ["cat", "bird", "dog"], [0.50, 0.45, 0.03], None),     # 0.05
        (f"{img}/b/dog 1.jpg", ["dog", "cat", "fish"], [0.70, 0.20, 0.05], None),    # 0.50
        (f"{img}/b/dog&2#x%.jpg", ["dog", "cat", "bird"], [0.40, 0.39, 0.10], None),  # 0.01
        (f"{img}/c/bird1.jpg", ["bird", "fish", "cat"], [0.60, 0.30, 0.05], None),   # 0.30
        (f"{img}/c/bird2.jpg", None, None, "truncated: image file is truncated"),
        (f"{img}/c/fish1.jpg", ["fish", "bird", "cat"], [0.80, 0.10, 0.05], None),   # 0.70
        (f"{img}/c/fish2.jpg", ["fish", "dog", "cat"], [0.45, 0.40, 0.10], None),    # 0.05 (tie with cat2)
        ("s3://bucket/pics/cat3.jpg", ["cat", "dog", "fish"], [0.55, 0.25, 0.10], None),  # 0.30
        (f"{tmp_path}/shards/s-000.tar#x/dog3.jpg", ["dog", "cat", "bird"], [0.6, 0.3, 0.1], None),
        (f"{img}/d/broken.jpg", None, None, "unidentified_image: cannot identify image file"),
        (f"{img}/d/cat4.jpg", ["cat", "dog", "bird"], [0.35, 0.33, 0.30], None),     # 0.02
    ]
    out, _ = write_run(tmp_path / "out", rows)
    return out, img, rows


def test_registry_is_the_only_list_of_formats():
    """--format's choices are the registry; each format is one module with its flags and runner."""
    assert [f.name for f in FORMATS] == ["label-studio", "lance"]
    parser = build_parser()
    export = parser._subparsers._group_actions[0].choices["export"]
    assert next(a for a in export._actions if a.dest == "format").choices == [f.name for f in FORMATS]
    for fmt in FORMATS:
        module = fmt.load()
        assert callable(module.add_arguments) and callable(module.run) and module.NAME == fmt.name
    with pytest.raises(ConfigError, match="unknown export format 'coco'; formats: label-studio, lance"):
        get("coco")


def test_label_studio_tasks_predictions_and_config(run, tmp_path):
    out, img, rows = run
    tasks_path = tmp_path / "ls" / "tasks.json"
    proc = zslabel("export", out, "--format", "label-studio", "--output", tasks_path, "--image-root", img)
    assert proc.returncode == 0, proc.stderr
    # 12 rows: 2 error rows and 1 tar member left out, each counted in the message
    assert "exported 9 of 12 rows" in proc.stdout
    assert "2 error rows" in proc.stdout and "1 in a tar, Parquet or Arrow file (no URL)" in proc.stdout
    tasks = json.loads(tasks_path.read_text())
    # default order: input order, although the files hold rows shuffled
    assert [t["data"]["zslabel_input_index"] for t in tasks] == [0, 1, 2, 3, 4, 6, 7, 8, 11]
    by_index = {t["data"]["zslabel_input_index"]: t for t in tasks}
    assert by_index[0]["data"]["image"] == "/data/local-files/?d=a/cat1.jpg"
    # quoted so that the server's query parsing gives the name back
    assert by_index[2]["data"]["image"] == "/data/local-files/?d=b/dog%201.jpg"
    assert by_index[3]["data"]["image"] == "/data/local-files/?d=b/dog%262%23x%25.jpg"
    assert path_from_reference("/data/local-files/?d=b/dog%262%23x%25.jpg") == "/b/dog&2#x%.jpg"
    assert by_index[8]["data"]["image"] == "s3://bucket/pics/cat3.jpg"        # cloud storage resolves it
    t = by_index[1]
    assert t["data"]["zslabel_path"] == rows[1][0]
    assert t["data"]["zslabel_labels"] == ["cat", "bird", "dog"]
    assert t["data"]["zslabel_scores"] == pytest.approx([0.50, 0.45, 0.03])
    (pred,) = t["predictions"]
    assert pred["model_version"] == RUN_ID and pred["score"] == pytest.approx(0.5)
    assert pred["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                               "value": {"choices": ["cat"]}, "score": pytest.approx(0.5)}]
    # the config offers every label of the run, single choice, on the image the tasks name
    root = ET.fromstring((tmp_path / "ls" / "tasks.label_config.xml").read_text())
    assert root.tag == "View"
    assert root.find("Image").attrib == {"name": "image", "value": "$image"}
    choices = root.find("Choices")
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == ("label", "image", "single")
    assert [c.get("value") for c in choices.iter("Choice")] == LABELS


def test_url_prefix_and_paths_outside_the_root(run, tmp_path):
    out, img, _ = run
    res = export_label_studio(str(out), str(tmp_path / "t.json"), image_root=str(img),
                              url_prefix="http://127.0.0.1:8081/images/")
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert tasks[0]["data"]["image"] == "http://127.0.0.1:8081/images/a/cat1.jpg"
    assert res.rows == 9 and res.left_out["error rows"] == 2
    # a local image outside --image-root would be a broken link in Label Studio: refused, nothing written
    proc = zslabel("export", out, "--format", "label-studio", "--output", tmp_path / "x.json",
                   "--image-root", img / "a")
    assert proc.returncode == 2
    assert "is not under --image-root" in proc.stderr and "LOCAL_FILES_DOCUMENT_ROOT" in proc.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.label_config.xml").exists()
    assert ImageRefs("/")("/srv/x y.png") == "/data/local-files/?d=srv/x%20y.png"
    assert ImageRefs("/")("gs://b/k.png") == "gs://b/k.png"
    assert ImageRefs("/")("file:///srv/z.png") == "/data/local-files/?d=srv/z.png"


def test_uncertainty_order_and_limit(run, tmp_path):
    """Least sure first: smallest top-1 minus top-2 margin; ties by input order; --limit N."""
    out, img, rows = run
    res = export_label_studio(str(out), str(tmp_path / "u.json"), image_root=str(img), order="uncertainty", limit=5)
    tasks = json.loads((tmp_path / "u.json").read_text())
    assert [t["data"]["zslabel_input_index"] for t in tasks] == [3, 11, 1, 7, 4]
    margins = [margin(t["data"]["zslabel_scores"]) for t in tasks]
    assert margins == sorted(margins)
    assert res.rows == 5 and res.left_out["beyond --limit"] == 4
    assert margin([0.7]) == pytest.approx(0.7) and margin([]) == 0.0


def test_existing_label_config_must_offer_every_label(run, tmp_path):
    out, img, _ = run
    bad = tmp_path / "project.xml"
    bad.write_text('<View><Image name="img" value="$url"/><Choices name="cls" toName="img">'
                   '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
    proc = zslabel("export", out, "--format", "label-studio", "--output", tmp_path / "t.json",
                   "--image-root", img, "--label-config", bad)
    assert proc.returncode == 2
    assert "2 of its 4 labels are not choices" in proc.stderr and "['bird', 'fish']" in proc.stderr
    assert not (tmp_path / "t.json").exists()
    # a superset ("other" for the humans) is accepted, and the tasks use the project's names
    good = tmp_path / "project2.xml"
    good.write_text('<View><Header value="Pick one"/><Image name="img" value="$url"/>'
                    '<Choices name="cls" toName="img" choice="single">'
                    + "".join(f'<Choice value="{x}"/>' for x in [*LABELS, "other"]) + "</Choices></View>")
    res = export_label_studio(str(out), str(tmp_path / "t.json"), image_root=str(img), label_config=str(good))
    task = json.loads((tmp_path / "t.json").read_text())[0]
    assert task["data"]["url"] == "/data/local-files/?d=a/cat1.jpg"
    assert task["predictions"][0]["result"][0]["from_name"] == "cls"
    assert task["predictions"][0]["result"][0]["to_name"] == "img"
    assert (tmp_path / "t.label_config.xml").read_text() == good.read_text()
    assert any("'other'" in n for n in res.notes)
    not_xml = tmp_path / "n.xml"
    not_xml.write_text("<View><Image")
    with pytest.raises(ConfigError, match="is not XML"):
        export_label_studio(str(out), str(tmp_path / "n.json"), image_root=str(img), label_config=str(not_xml))


def test_refusals(run, tmp_path):
    out, img, _ = run
    target = tmp_path / "t.json"
    assert zslabel("export", out, "--format", "label-studio", "--output", target, "--image-root", img).returncode == 0
    proc = zslabel("export", out, "--format", "label-studio", "--output", target, "--image-root", img)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    proc = zslabel("export", out, "--format", "label-studio", "--output", target, "--image-root", img, "--overwrite",
                   "--order", "uncertainty", "--limit", "2")
    assert proc.returncode == 0 and len(json.loads(target.read_text())) == 2
    proc = zslabel("export", out, "--format", "label-studio", "--output", target, "--index")
    assert proc.returncode == 2 and "--index is an option of --format lance, not label-studio" in proc.stderr
    proc = zslabel("export", tmp_path / "nothing", "--format", "label-studio", "--output", tmp_path / "y.json")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    unfinished = tmp_path / "unfinished"
    write_run(unfinished, [("/x.jpg", ["cat"], [1.0], None)], files=1)
    (unfinished / MANIFEST_NAME).unlink()
    with pytest.raises(InputError, match="not a finished zslabel run"):
        export_label_studio(str(unfinished), str(tmp_path / "z.json"))


def label_studio_export(tasks_json, choices_by_index, *, extra=()):
    """What Label Studio's JSON export gives back after humans annotated the exported tasks:
    each task's data as imported, plus ``annotations`` (shape as Label Studio 1.23 writes it)."""
    out = []
    for n, t in enumerate(json.loads(tasks_json.read_text())):
        t = {"id": n + 1, "data": t["data"], "predictions": [n + 1], "annotations": []}
        choice = choices_by_index.get(t["data"]["zslabel_input_index"])
        if choice is not None:
            t["annotations"].append({
                "id": 10 * n, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
                "created_at": "2026-12-05T01:00:00.000000Z", "updated_at": "2026-12-05T01:00:00.000000Z",
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [choice]}}]})
        out.append(t)
    return out + list(extra)


def test_label_studio_export_is_ground_truth_for_eval(run, tmp_path):
    out, img, rows = run
    tasks = tmp_path / "tasks.json"
    export_label_studio(str(out), str(tasks), image_root=str(img))
    # humans: agree on 0, correct 1 (cat -> bird), agree on 2; task 4 annotated twice (latest wins);
    # task 6 cancelled ("skip"); a task from another project matches no row; one task without
    # zslabel_path is matched by its local-files URL's file name
    exported = label_studio_export(tasks, {0: "cat", 1: "bird", 2: "dog", 4: "fish"}, extra=[
        {"id": 90, "data": {"image": "/data/local-files/?d=elsewhere/zebra.jpg"},
         "annotations": [{"id": 900, "was_cancelled": False, "result": [
             {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]}]},
        {"id": 91, "data": {"image": "/data/local-files/?d=d/cat4.jpg"},
         "annotations": [{"id": 910, "was_cancelled": False, "updated_at": "2026-12-05T01:00:00Z", "result": [
             {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["dog"]}}]}]}])
    t4 = next(t for t in exported if t["data"].get("zslabel_input_index") == 4)
    t4["annotations"].append(dict(t4["annotations"][0], id=5, updated_at="2026-12-05T02:00:00.000000Z",
                                  result=[dict(t4["annotations"][0]["result"][0], value={"choices": ["bird"]})]))
    t6 = next(t for t in exported if t["data"].get("zslabel_input_index") == 6)
    t6["annotations"] = [{"id": 6, "was_cancelled": True, "result": []}]
    gt_path = tmp_path / "project-1-at-2026-12-05.json"
    gt_path.write_text(json.dumps(exported))

    gt = load_ground_truth(str(gt_path))
    assert gt.kind == "label-studio"
    # 11 tasks: 6 usable; 5 without a label (4 never annotated, 1 cancelled)
    assert len(gt.paths) == 6 and gt.skipped == 5
    assert dict(zip(gt.paths, gt.labels))[rows[4][0]] == "bird"   # the latest annotation
    report = evaluate(str(out), gt)
    assert (report.ground_truth_images, report.matched, report.unmatched_ground_truth) == (6, 5, 1)
    assert report.matched_by_basename == 1                          # cat4.jpg via its image URL
    # truth vs top-1: cat/cat, bird/cat, dog/dog, bird/bird, dog/cat
    assert (report.labeled, report.top1_correct) == (5, 3)
    proc = zslabel("eval", out, "--ground-truth", gt_path)
    assert proc.returncode == 0, proc.stderr
    assert "in ground truth but not predicted 1" in proc.stdout
    assert "ground-truth entries without a usable label (not counted): 5" in proc.stdout
    assert "top-1 accuracy 0.600 (3/5)" in proc.stdout
    assert "5 of 11 Label Studio tasks give no label" in proc.stderr


def test_label_studio_ground_truth_refusals(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text(json.dumps({"path": "x"}))
    with pytest.raises(InputError, match="not a Label Studio export"):
        load_ground_truth(str(p))
    p.write_text(json.dumps([{"id": 1, "data": {"image": "/data/local-files/?d=a.jpg"}, "annotations": []}]))
    with pytest.raises(InputError, match="none of its 1 Label Studio tasks has an annotation"):
        load_ground_truth(str(p))
    p.write_text("[{not json")
    with pytest.raises(InputError, match="cannot read ground truth .* as JSON"):
        load_ground_truth(str(p))


def test_calibrate_takes_a_label_studio_export(tmp_path):
    """calibrate reads the same ground truth (rebuilt logits from the written scores)."""
    from zslabel.calibrate import read_sample

    rng = np.random.default_rng(1)
    rows, truth = [], {}
    for i in range(60):
        s = rng.dirichlet(np.ones(len(LABELS)))
        order = np.argsort(-s)
        rows.append((f"/imgs/{i}.jpg", [LABELS[j] for j in order], [float(s[j]) for j in order], None))
        truth[i] = LABELS[order[0]] if i % 3 else LABELS[order[1]]
    out, _ = write_run(tmp_path / "out", rows)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest.update(model={"id": "m", "digest": "d", "score_kind": "softmax"}, templates=["{}"])
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    tasks = tmp_path / "tasks.json"
    export_label_studio(str(out), str(tasks))
    gt = tmp_path / "ls.json"
    gt.write_text(json.dumps(label_studio_export(tasks, {i: truth[i] for i in range(0, 60, 2)}, extra=[
        {"id": 99, "data": {"zslabel_path": "/imgs/none.jpg", "image": "x"},
         "annotations": [{"id": 1, "result": [{"type": "choices", "value": {"choices": ["cat"]}}]}]}])))
    sample, _ = read_sample(str(out), str(gt))
    assert sample.counts["matched"] == 30 and sample.counts["unmatched_ground_truth"] == 1
    assert sample.counts["used"] == 30


def test_no_command_writes_its_own_file_inside_a_run(run, tmp_path):
    """export, calibrate, fit and report refuse a destination inside a zslabel output (a finished
    run, or an unfinished one holding only its state folder), through a symlink too, and write
    nothing there: the file would be read as part of the run or block its next --overwrite."""
    out, img, rows = run
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n" + "".join(f"{p},{labels[0]}\n" for p, labels, _, _ in rows if labels))
    unfinished = tmp_path / "unfinished"
    (unfinished / "_zslabel").mkdir(parents=True)
    (tmp_path / "link").symlink_to(out)
    before = {d: sorted(p.name for p in d.rglob("*")) for d in (out, unfinished)}
    for inside in (out / "tasks.json", tmp_path / "link" / "sub" / "tasks.json", unfinished / "t.json"):
        commands = [
            ("export", out, "--format", "label-studio", "--output", inside, "--image-root", img),
            ("export", out, "--format", "lance", "--output", inside.with_suffix(".lance")),
            ("calibrate", out, "--ground-truth", gt, "--output", inside.with_name("cal.json")),
            ("fit", out, "--ground-truth", gt, "--output", inside.with_name("head.safetensors")),
            ("report", out, "--output", inside.with_name("report")),
        ]
        for args in commands:
            proc = zslabel(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "is inside the zslabel output" in proc.stderr and "write it outside" in proc.stderr, proc.stderr
    assert {d: sorted(p.name for p in d.rglob("*")) for d in (out, unfinished)} == before
    assert zslabel("export", out, "--format", "label-studio", "--output", tmp_path / "fine.json",
                   "--image-root", img).returncode == 0
