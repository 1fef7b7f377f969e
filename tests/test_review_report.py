"""``zslabel report``: the sampling pass (unit, on contract-conforming Parquet written here), image
reading from local files, tar members and Parquet bytes, escaping, placeholders, reproducibility,
ground truth through ``zslabel eval``'s code, and the page as a person sees it: the report of a
real ``zslabel label`` run on the bundled example, opened in a real headless Chromium over the
DevTools protocol (no console error, every image decoded, no network request, a ``<script>``
label shown as text, a screenshot saved).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures: a real S3 API on 127.0.0.1)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-clip"
EXAMPLE = ROOT / "examples" / "shapes"
XSS_LABEL = "<script>window.__zslabel_xss = 1</script>"
XSS_NAME = "<img src=x onerror=window.__zslabel_xss=2>.png"

pytest.importorskip("matplotlib", reason="the 'report' extra is not installed (pip install 'zslabel[report]')")
pytest.importorskip("jinja2", reason="the 'report' extra is not installed (pip install 'zslabel[report]')")


# --------------------------------------------------------------------------- helpers

def write_output(folder: Path, rows: list[dict], labels: list[str], *, manifest_extra: dict | None = None,
                 abstained: bool = False, files: int = 1) -> Path:
    """A zslabel output written directly: ``output.output_schema`` Parquet file(s) + manifest.

    ``rows``: dicts with path, labels, scores, error (and abstained); input_index defaults to
    the row number; width/height default to null.
    """
    from zslabel.output import output_schema
    from zslabel.store import MANIFEST_NAME

    folder.mkdir(parents=True, exist_ok=True)
    schema = output_schema(abstained=abstained)
    full = [{"input_index": i, "width": None, "height": None, **r} for i, r in enumerate(rows)]
    for r in full:
        if r.get("error"):
            r["labels"] = r["scores"] = None
    per = -(-len(full) // files)
    for k in range(files):
        part = full[k * per:(k + 1) * per]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in part], schema=schema)
        pq.write_table(table, folder / f"part-{k:05d}.parquet")
    errors: dict[str, int] = {}
    for r in full:
        if r.get("error"):
            code = r["error"].split(":", 1)[0]
            errors[code] = errors.get(code, 0) + 1
    manifest = {"zslabel_run": 1, "kind": "label", "labels": labels, "templates": ["a photo of {}."],
                "model": {"id": "test/model", "score_kind": "softmax", "digest": "0" * 16},
                "config": {"top_k": 3, "min_score": 0.5 if abstained else None},
                "counts": {"rows": len(full), "labeled": len(full) - sum(errors.values()),
                           "errors_by_code": errors, "skipped": 0, "listed": len(full)},
                "timings": {"wall_s": 2.0, "bound": "decode", "decode_need_s": 1.0, "model_need_s": 0.5,
                            "decode_slots": 1, "model_actors": 1, "model_utilisation": 0.4},
                **(manifest_extra or {})}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def example_images() -> list[Path]:
    return sorted(EXAMPLE.glob("*.png"))


def _softmax_row(rng, n_labels: int, k: int = 3) -> tuple[list[int], list[float]]:
    z = rng.normal(0, 2, n_labels)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [int(i) for i in order], [float(np.float32(p[i])) for i in order]


# --------------------------------------------------------------------------- collect (unit)

def test_scan_keeps_exact_top_bottom_and_a_seeded_sample(tmp_path):
    from zslabel.review.collect import read_rows, scan_output, split_ref

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    rows = []
    for i in range(3000):
        if i % 97 == 0:
            rows.append({"path": f"/x/{i}.jpg", "error": "read_error: FileNotFoundError: gone"})
        elif i % 211 == 0:
            rows.append({"path": f"/x/{i}.jpg", "error": "truncated: image file is truncated"})
        else:
            ids, sc = _softmax_row(rng, len(labels))
            rows.append({"path": f"/x/{i}.jpg", "labels": [labels[j] for j in ids], "scores": sc})
    out = write_output(tmp_path / "out", rows, labels, files=3)

    scan = scan_output(str(out), seed=7, per_label=5)
    assert scan.rows == 3000 and len(scan.files) == 3
    errored = [r for r in rows if r.get("error")]
    assert scan.errored == len(errored)
    assert scan.errors_by_code == {"read_error": sum(r["error"].startswith("read") for r in errored),
                                   "truncated": sum(r["error"].startswith("trunc") for r in errored)}
    # refs -> row numbers in the whole output (files hold 1000 rows each)
    def number(ref):
        f, r = split_ref(ref)
        return f * 1000 + r

    labeled = [(i, r) for i, r in enumerate(rows) if not r.get("error")]
    for lid, name in enumerate(labels):
        mine = [(i, r) for i, r in labeled if r["labels"][0] == name]
        assert int(scan.top1_count[lid]) == len(mine)
        s0 = {i: np.float32(r["scores"][0]) for i, r in mine}
        margin = {i: np.float32(r["scores"][0]) - np.float32(r["scores"][1]) for i, r in mine}
        want_conf = sorted(s0, key=lambda i: (-float(s0[i]), i))[:5]
        want_unsure = sorted(margin, key=lambda i: (float(margin[i]), i))[:5]
        assert [number(r) for r in scan.confident.of(lid)] == want_conf
        assert [number(r) for r in scan.unsure.of(lid)] == want_unsure
        assert int(scan.hist[lid].sum()) == len(mine)
        sample = [number(r) for r in scan.sample.of(lid)]
        assert len(set(sample)) == 5 and all(rows[i]["labels"][0] == name for i in sample)

    again = scan_output(str(out), seed=7, per_label=5)
    other = scan_output(str(out), seed=8, per_label=5)
    assert all(again.sample.of(i) == scan.sample.of(i) for i in range(4))
    assert any(other.sample.of(i) != scan.sample.of(i) for i in range(4))

    details = read_rows(scan, set(scan.confident.of(0)) | set(scan.error_sample.all_refs()))
    for ref, row in details.items():
        src = rows[number(ref)]
        assert row.path == src["path"] and row.input_index == number(ref)
        assert row.error == src.get("error")
        if not row.error:
            assert row.labels == src["labels"] and np.allclose(row.scores, src["scores"])


def test_scan_of_an_output_of_only_errors_and_empty_label_lists(tmp_path):
    from zslabel.review import build_report

    rows = [{"path": "/none/a.jpg", "error": "unidentified_image: cannot identify"},
            {"path": "/none/b.jpg", "labels": [], "scores": []}]
    out = write_output(tmp_path / "out", rows, ["x", "y"])
    result = build_report(str(out), str(tmp_path / "rep"), progress=False)
    html = Path(result.index).read_text()
    assert result.rows == 2 and result.label_sections == 0
    assert "unidentified_image" in html and "/none/a.jpg" in html


# --------------------------------------------------------------------------- images and page

@pytest.fixture
def weird_output(tmp_path) -> Path:
    """Local images under hostile names, a label holding <script>, a missing file, error rows,
    abstained rows."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    labels = [XSS_LABEL, 'quote " & <b>bold</b>', "cost $5 per $x$", "plain"]
    rng = np.random.default_rng(0)
    rows = []
    for i, src in enumerate(itertools.islice(itertools.cycle(example_images()), 40)):
        name = XSS_NAME if i == 0 else f"img {i:02d} <&>.png" if i == 1 else f"img_{i:02d}.png"
        shutil.copy(src, imgs / name)
        ids, sc = _softmax_row(rng, len(labels))
        rows.append({"path": str(imgs / name), "labels": [labels[j] for j in ids], "scores": sc,
                     "abstained": sc[0] < 0.5, "width": 64, "height": 64})
    rows.append({"path": str(imgs / "deleted_since.png"), "labels": [labels[0], labels[1]], "scores": [0.9, 0.1],
                 "abstained": False})
    rows.append({"path": str(imgs / "broken <script>.png"), "error": "unidentified_image: <script>alert(1)</script>"})
    rows.append({"path": "s3://bucket/never.jpg", "error": "read_error: NoSuchKey"})
    return write_output(tmp_path / "out", rows, labels, abstained=True)


def test_report_escapes_names_and_labels_and_uses_placeholders(weird_output, tmp_path):
    from zslabel.review import build_report

    rep = tmp_path / "rep"
    result = build_report(str(weird_output), str(rep), seed=1, per_label=4, progress=False)
    html = (rep / "index.html").read_text()
    assert "<script" not in html.lower()           # no script at all: every "<script>" is text
    assert "&lt;script&gt;window.__zslabel_xss = 1&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=window.__zslabel_xss=2&gt;.png" in html
    assert "quote &#34; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch from the network
    # the deleted file and the error rows are placeholders; every other picture is real
    assert result.placeholders >= 1 and result.thumbnails >= 10
    srcs = [s.split('"', 1)[0] for s in html.split('<img src="')[1:]]
    assert all((rep / s).is_file() for s in srcs)
    assert "thumbs/placeholder.png" in srcs
    assert result.bytes < 5_000_000


def test_report_is_reproducible_with_a_seed(weird_output, tmp_path):
    from zslabel.review import build_report

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    build_report(str(weird_output), str(tmp_path / "a"), seed=5, per_label=3, progress=False)
    build_report(str(weird_output), str(tmp_path / "b"), seed=5, per_label=3, progress=False)
    build_report(str(weird_output), str(tmp_path / "c"), seed=6, per_label=3, progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a["index.html"] != c["index.html"]  # another seed, another random sample


def test_ground_truth_numbers_are_evals_and_calibration_titles_the_reliability_diagram(tmp_path):
    """Ground truth matched by full path and by unique file name (a table in another folder):
    the report's numbers equal ``zslabel.evaluate`` on the whole output, although only rows with
    a ground-truth file name were kept; a run with a calibration gets the calibrated reliability
    diagram."""
    from zslabel.evaluate import evaluate
    from zslabel.review import build_report

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    labels = ["cat", "dog", "bird"]
    rng = np.random.default_rng(1)
    rows, truth_rows = [], []
    for i, src in enumerate(itertools.islice(itertools.cycle(example_images()), 120)):
        shutil.copy(src, imgs / f"im_{i:03d}.png")
        ids, sc = _softmax_row(rng, len(labels))
        rows.append({"path": str(imgs / f"im_{i:03d}.png"), "labels": [labels[j] for j in ids], "scores": sc,
                     "abstained": sc[0] < 0.5})
        if i % 3 == 0:  # by full path
            truth_rows.append(f"{imgs / f'im_{i:03d}.png'},{labels[i % 3 if i % 2 else ids[0]]}")
        elif i % 3 == 1:  # by file name only
            truth_rows.append(f"elsewhere/im_{i:03d}.png,{labels[(i + 1) % 3]}")
    rows.append({"path": str(imgs / "im_003.png"), "error": "read_error: a second row for the same path"})
    truth_rows.append("elsewhere/not_labeled.png,cat")
    gt = tmp_path / "gt" / "truth.csv"
    gt.parent.mkdir()
    gt.write_text("path,label\n" + "\n".join(truth_rows) + "\n")
    calib = {"id": "c0ffee", "kind": "temperature", "temperature": 1.7, "held_out_ece": {"before": 0.2, "after": 0.05}}
    out = write_output(tmp_path / "out", rows, labels, abstained=True, files=2,
                       manifest_extra={"calibration": calib})
    result = build_report(str(out), str(tmp_path / "rep"), ground_truth=str(gt), progress=False)
    got = json.loads((tmp_path / "rep" / "report.json").read_text())["evaluation"]
    want = evaluate(str(out), str(gt)).to_dict()
    for key in ("matched", "matched_by_basename", "unmatched_ground_truth", "errored", "errors_by_code", "labeled",
                "top1_correct", "top5_correct", "top1_including_errors", "per_label", "macro_precision",
                "macro_recall", "confusions", "abstained", "coverage", "top1_accuracy_answered",
                "ground_truth_labels_not_candidates", "max_labels_per_row"):
        assert got[key] == want[key], key
    assert want["matched_by_basename"] > 0 and want["confusions"]
    html = Path(result.index).read_text()
    assert "Reliability of the calibrated top-1 score (calibration c0ffee)" in html
    assert "held-out ECE 0.200 -&gt; 0.050" in html
    assert (tmp_path / "rep" / "figures" / "reliability.png").is_file()
    assert (tmp_path / "rep" / "figures" / "confusion.png").is_file()


def test_report_reads_tar_members_and_parquet_image_bytes(tmp_path):
    """Rows of tar shards and Parquet image-bytes files: bytes found through the run manifest's
    ``input_files`` and ``input_index`` with the sources' own readers; a member that is not
    in the shard any more gets the placeholder."""
    from zslabel.review import build_report
    from zslabel.sources import FILE_INDEX_STRIDE

    images = example_images()[:6]
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in images[:5]:
            tar.add(p, arcname=p.name)
    rows = [{"path": f"{shard}#{p.name}", "input_index": i, "labels": ["a", "b"], "scores": [0.6, 0.4],
             "width": 64, "height": 64} for i, p in enumerate(images)]  # the 6th is not in the tar
    out = write_output(tmp_path / "tar_out", rows, ["a", "b"], manifest_extra={"input_files": [str(shard)]})
    result = build_report(str(out), str(tmp_path / "tar_rep"), per_label=6, progress=False)
    assert (result.thumbnails, result.placeholders) == (5, 1)

    table = pa.table({"jpg": [p.read_bytes() for p in images[:4]], "url": [f"http://example.invalid/{p.name}"
                                                                          for p in images[:4]]})
    pq.write_table(table, tmp_path / "img2dataset-0.parquet")
    pq.write_table(table, tmp_path / "img2dataset-1.parquet")
    files = [str(tmp_path / "img2dataset-0.parquet"), str(tmp_path / "img2dataset-1.parquet")]
    rows = [{"path": f"http://example.invalid/{p.name}", "input_index": f * FILE_INDEX_STRIDE + i,
             "labels": ["a", "b"], "scores": [0.7, 0.3]} for f in (0, 1) for i, p in enumerate(images[:4])]
    rows[0]["path"] = f"{files[0]}#0"  # a row without url is named FILE#ROW
    out = write_output(tmp_path / "pq_out", rows, ["a", "b"], manifest_extra={"input_files": files})
    result = build_report(str(out), str(tmp_path / "pq_rep"), per_label=8, progress=False)
    # the url is never fetched (offline): the bytes come from the Parquet input
    assert (result.thumbnails, result.placeholders) == (8, 0)


def test_report_thumbnails_of_tars_with_skipped_and_repeated_members_and_hf_path_rows(tmp_path):
    """A shard made by plain ``tar -cf`` (a directory entry, which the reader counts as a skip),
    two members of one name (two images), and Hugging Face Image rows that hold only a path:
    every labeled row gets its own picture, none a placeholder."""
    import io

    from zslabel.review import build_report

    images = example_images()[:4]
    shard = tmp_path / "plain.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("img")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for p in images[:2]:
            tar.add(p, arcname=f"img/{p.name}")
        for p in images[2:4]:  # the same member name twice
            data = p.read_bytes()
            info = tarfile.TarInfo("img/dup.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # input_index: the skipped directory entry takes no index; members in shard order
    names = [f"img/{images[0].name}", f"img/{images[1].name}", "img/dup.png", "img/dup.png"]
    rows = [{"path": f"{shard}#{n}", "input_index": i, "labels": ["a", "b"], "scores": [0.6, 0.4]}
            for i, n in enumerate(names)]
    out = write_output(tmp_path / "tar_out", rows, ["a", "b"], manifest_extra={"input_files": [str(shard)]})
    result = build_report(str(out), str(tmp_path / "tar_rep"), per_label=6, progress=False)
    assert (result.thumbnails, result.placeholders) == (4, 0)
    thumbs = sorted((tmp_path / "tar_rep" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 4  # the two dup.png members are two pictures

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = tmp_path / "train-0.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": str(p)} for p in images], struct)}), hf)
    rows = [{"path": str(p), "input_index": i, "labels": ["a", "b"], "scores": [0.6, 0.4]}
            for i, p in enumerate(images)]
    out = write_output(tmp_path / "hf_out", rows, ["a", "b"], manifest_extra={"input_files": [str(hf)]})
    result = build_report(str(out), str(tmp_path / "hf_rep"), per_label=6, progress=False)
    assert (result.thumbnails, result.placeholders) == (4, 0)


def test_report_of_an_output_on_s3_with_images_on_s3(s3, tmp_path):
    """Output files, run manifest and images all in a bucket (moto's S3 API): the scan reads the
    output through fsspec, thumbnails come through ``fetch_bytes``; a deleted object is a
    placeholder."""
    from zslabel.review import build_report

    images = example_images()[:5]
    rows = [{"path": s3.put(f"imgs/{p.name}", p.read_bytes()), "labels": ["a", "b"], "scores": [0.8, 0.2],
             "width": 64, "height": 64} for p in images]
    rows.append({"path": s3.uri("imgs/deleted.png"), "labels": ["b", "a"], "scores": [0.9, 0.1]})
    local = write_output(tmp_path / "out", rows, ["a", "b"])
    for f in local.iterdir():
        s3.put(f"out/{f.name}", f.read_bytes())
    result = build_report(s3.uri("out"), str(tmp_path / "rep"), storage_options=s3.storage_options,
                          progress=False)
    assert result.rows == 6 and (result.thumbnails, result.placeholders) == (5, 1)
    assert "test/model" in Path(result.index).read_text()  # the manifest was read from the bucket


def test_report_is_ray_and_torch_free(weird_output, tmp_path):
    code = ("import sys; from zslabel.cli import main; "
            f"rc = main(['report', {str(weird_output)!r}, '--output', {str(tmp_path / 'r')!r}, '-q']); "
            "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_missing_report_extra_exits_2_with_the_install_hint(tmp_path):
    # matplotlib made unimportable in a child process (None in sys.modules makes import fail)
    code = ("import sys; sys.modules['matplotlib'] = None; from zslabel.cli import main; "
            f"sys.exit(main(['report', {str(tmp_path)!r}, '--output', {str(tmp_path / 'r')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "zslabel[report]" in proc.stderr and "matplotlib" in proc.stderr and "Traceback" not in proc.stderr


def test_report_cli_refuses_a_non_output_and_a_used_folder(tmp_path, capsys):
    from zslabel.cli import main

    assert main(["report", str(tmp_path / "nothing"), "--output", str(tmp_path / "r"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))  # nothing written
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")
    out = write_output(tmp_path / "out", [{"path": "/a.png", "labels": ["a"], "scores": [1.0]}], ["a"])
    assert main(["report", str(out), "--output", str(tmp_path / "used"), "-q"]) == 2
    assert main(["report", str(out), "--output", str(tmp_path / "used"), "-q", "--overwrite"]) == 2
    assert (tmp_path / "used" / "mine.txt").read_text() == "keep me"
    # an earlier report is replaced only with --overwrite, and only once the new one is complete
    assert main(["report", str(out), "--output", str(tmp_path / "rep"), "-q"]) == 0
    assert main(["report", str(out), "--output", str(tmp_path / "rep"), "-q"]) == 2
    assert main(["report", str(out), "--output", str(tmp_path / "rep"), "-q", "--overwrite", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # A file the user put into an earlier report (notes, a copy of a figure) is never deleted
    # with it: --overwrite replaces a report only while it holds nothing but what it wrote.
    for mine in ("notes.md", "figures/annotated.png"):
        (tmp_path / "rep" / mine).write_text("mine")
        capsys.readouterr()
        assert main(["report", str(out), "--output", str(tmp_path / "rep"), "-q", "--overwrite"]) == 2
        assert f"holds files the earlier report did not write ({mine})" in capsys.readouterr().err
        assert (tmp_path / "rep" / mine).read_text() == "mine" and (tmp_path / "rep" / "index.html").exists()
        (tmp_path / "rep" / mine).unlink()
    assert main(["report", str(out), "--output", str(tmp_path / "rep"), "-q", "--overwrite"]) == 0


# --------------------------------------------------------------------------- real browser

class Chromium:
    """Debian's headless chromium driven over the DevTools protocol (websocket-client).

    One page; ``open(url)`` navigates and waits for the load event, recording console errors,
    uncaught exceptions, log errors and every request URL.
    """

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-quic", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "--window-size=1280,900"]

    def __init__(self, executable: str, profile: str):
        import websocket

        self.proc = subprocess.Popen([executable, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start: " + self.proc.stderr.read().decode()[-2000:])
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the last ``open``."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, height: int | None = None, selector: str | None = None) -> None:
        """A PNG of the page from its top, or from the element ``selector`` (``height`` CSS
        pixels, default to the end of the page)."""
        full = self.evaluate("document.documentElement.scrollHeight")
        top = self.evaluate(f"document.querySelector({json.dumps(selector)}).offsetTop") if selector else 0
        clip = {"x": 0, "y": top, "width": 1280, "height": min(full - top, height or full), "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_executable()
    if exe is None:
        pytest.skip("Chromium is not installed (scripts/ci_chromium.sh installs Debian's chromium)")
    pytest.importorskip("websocket", reason="websocket-client (a test dependency) is not installed")
    profile = tempfile.mkdtemp(prefix="zslabel-chromium-")
    b = Chromium(exe, profile)
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(profile, ignore_errors=True)


def check_page(browser: Chromium, index: Path, screenshot: Path | None = None) -> dict:
    """Open ``index`` and assert what a person would see: no console error, every image
    decoded, no request leaving the report folder, no script run. Returns page facts."""
    browser.open(index.resolve().as_uri())
    # every <img> has finished loading (no lazy images: all are requested at once)
    facts = browser.evaluate("""new Promise(done => {
        const check = () => {
          const imgs = Array.from(document.images);
          if (imgs.every(i => i.complete)) {
            done({images: imgs.map(i => [i.getAttribute('src'), i.naturalWidth]),
                  xss: window.__zslabel_xss === undefined ? null : window.__zslabel_xss,
                  scripts: document.scripts.length, text: document.body.innerText});
          } else { setTimeout(check, 50); }
        };
        check();
      })""")
    assert not browser.problems(), browser.problems()
    bad = [src for src, w in facts["images"] if not w]
    assert facts["images"] and not bad, f"images that did not decode: {bad[:10]}"
    assert facts["xss"] is None and facts["scripts"] == 0
    folder = index.resolve().parent.as_uri()
    outside = [u for u in browser.requests() if not u.startswith(folder)]
    assert not outside, outside
    if screenshot is not None:
        browser.screenshot(screenshot, height=1700)
        assert screenshot.stat().st_size > 10_000
    return facts


def test_hostile_names_show_as_text_in_the_browser(weird_output, tmp_path, browser):
    from zslabel.review import build_report

    build_report(str(weird_output), str(tmp_path / "rep"), per_label=4, progress=False)
    facts = check_page(browser, tmp_path / "rep" / "index.html", tmp_path / "weird.png")
    assert XSS_LABEL in facts["text"] and XSS_NAME in facts["text"]


def test_report_of_the_bundled_example_in_the_browser(tmp_path, browser, capsys):
    """``zslabel label`` on examples/shapes (abstention on), then ``zslabel report`` with the
    ground truth: eval's numbers, every section present, a clean page; its screenshots are the
    README's (ZSLABEL_REPORT_SCREENSHOT=docs/report_shapes.png keeps copies)."""
    from zslabel.cli import main
    from zslabel.evaluate import evaluate

    out, rep = tmp_path / "out", tmp_path / "report"
    # The label run in its own process with its own embedded Ray (this module needs no shared
    # Ray instance); exit 3 = Ray's fixed node-start window missed on a loaded machine: retry.
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "zslabel", "label", str(EXAMPLE), "--labels-file",
                               str(EXAMPLE / "labels.txt"), "--model", str(MODEL), "--top-k", "3", "--min-score",
                               "0.5", "--output", str(out), "--overwrite", "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 3:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    gt = str(EXAMPLE / "ground_truth.csv")
    assert main(["report", str(out), "--output", str(rep), "--ground-truth", gt, "--seed", "0", "-q"]) == 0
    assert "report of 24 rows" in capsys.readouterr().out

    saved = json.loads((rep / "report.json").read_text())
    want = evaluate(str(out), gt)
    got = saved["evaluation"]
    for key in ("matched", "top1_correct", "top5_correct", "top1_accuracy", "top5_accuracy", "per_label",
                "confusions", "abstained", "coverage"):
        assert got[key] == want.to_dict()[key], key
    html = (rep / "index.html").read_text()
    for needle in ("Run at a glance", "Labels to review first", "most confident", "least confident",
                   "random sample", "Abstained", "Confusion matrix", "Most frequent confusions", "Reliability",
                   "-bound (decode needs"):
        assert needle in html, needle
    assert (rep / "figures" / "confusion.png").is_file() and (rep / "figures" / "reliability.png").is_file()

    shot = tmp_path / "shapes_report.png"
    facts = check_page(browser, rep / "index.html", shot)
    assert len(facts["images"]) >= 24 + 3
    grids = tmp_path / "shapes_report_grids.png"
    browser.screenshot(grids, height=1500, selector="#grids")
    if os.environ.get("ZSLABEL_REPORT_SCREENSHOT"):  # docs/report_shapes.png and ..._grids.png
        target = Path(os.environ["ZSLABEL_REPORT_SCREENSHOT"])
        shutil.copy(shot, target)
        shutil.copy(grids, target.with_name(target.stem + "_grids.png"))
    from PIL import Image

    with Image.open(io.BytesIO(shot.read_bytes())) as im:
        assert im.width == 1280 and im.height > 800
