"""zslabel.sources on real files: local folders, globs, manifests, tars, Parquet, and S3 (moto).

Every dataset is read through the session's local Ray (``ray_local``); S3 goes over HTTP to a
moto server on 127.0.0.1 (``s3`` fixture from ``tests/s3_server.py``), whose server-side request
log counts the calls planning makes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import photo

from zslabel.errors import InputError, error_code
from zslabel.sources import (
    FILE_INDEX_STRIDE,
    IMAGE_EXTENSIONS,
    detect_kind,
    expand_braces,
    fetch_bytes,
    plan_inputs,
)

pytest_plugins = ["s3_server"]  # the `s3` fixture: moto S3 server on 127.0.0.1

def jpeg(seed: int = 0, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    photo(*size, seed=seed).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def rows_of(plan) -> list[dict]:
    """All rows of the plan's dataset in input order."""
    return sorted(plan.dataset.take_all(), key=lambda r: r["input_index"])


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------
# pure helpers (no Ray)


def test_expand_braces_ranges_lists_and_padding():
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("keep{literal}") == ["keep{literal}"]


def test_detect_kind_from_uri():
    assert detect_kind("/data/images") == "folder"
    assert detect_kind("s3://b/images/") == "folder"
    assert detect_kind("s3://b/images/*.jpg") == "glob"
    assert detect_kind("gs://b/list.txt") == "manifest"
    assert detect_kind("/x/list.CSV") == "manifest"
    assert detect_kind("/x/list.tsv.gz") == "manifest"
    assert detect_kind("s3://b/shards-{000..009}.tar") == "webdataset"
    assert detect_kind("/x/*.tar") == "webdataset"
    assert detect_kind("/x/part-0.parquet") == "parquet"


def test_image_extensions_are_lowercase_with_dot():
    assert {".jpg", ".jpeg", ".png", ".webp", ".heic", ".avif"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_fetch_bytes_reads_and_reports_missing_as_read_error(tmp_path):
    data = jpeg(1)
    p = write(tmp_path / "a b #ü.jpg", data)
    assert fetch_bytes(str(p)) == (data, None)
    assert fetch_bytes(f"file://{p}") == (data, None)  # fsspec URIs are not %-encoded
    got, err = fetch_bytes(str(tmp_path / "missing.jpg"))
    assert got is None and error_code(err) == "read_error" and "missing.jpg" in err
    got, err = fetch_bytes(str(tmp_path))  # a directory is not a readable file
    assert got is None and error_code(err) == "read_error"


def fetch_as_nobody(paths: list[str]) -> list[tuple[bytes | None, str | None]]:
    """fetch_bytes in a forked child running as uid/gid 65534 (root ignores file modes)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, read, report, exit without running any cleanup
        try:
            os.close(read_fd)
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write_fd, "wb") as out:
                pickle.dump([fetch_bytes(p) for p in paths], out)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        result = pickle.load(f)
    os.waitpid(pid, 0)
    return result


def test_fetch_bytes_permission_denied_is_read_error():
    folder = Path(tempfile.mkdtemp(prefix="zs-perm-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        readable = write(folder / "ok.jpg", jpeg(1))
        readable.chmod(0o644)
        secret = write(folder / "secret.jpg", jpeg(2))
        secret.chmod(0)
        if os.geteuid() == 0:
            results = fetch_as_nobody([str(readable), str(secret)])
        else:
            results = [fetch_bytes(str(readable)), fetch_bytes(str(secret))]
        assert results[0] == (jpeg(1), None)  # same folder, so the mode is what denies
        assert results[1][0] is None
        assert results[1][1].startswith("read_error: PermissionError"), results[1]
    finally:
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------
# folder and glob


@pytest.fixture
def tree(tmp_path) -> Path:
    """Images with awkward names and extension cases, plus files that must be skipped."""
    root = tmp_path / "tree"
    for rel in ["b.JPG", "a.jpeg", "sub/c.png", "sub/deep/d.WebP", "x/same.jpg", "y/same.jpg",
                "odd names/with space #1 ü.jpg", "phone/e.HEIC"]:
        write(root / rel, jpeg(len(rel)))
    for rel in [".hidden.jpg", ".git/obj.jpg", "sub/.cache/t.png", "notes.txt", "sub/meta.json",
                "noext"]:
        write(root / rel, b"skip me")
    return root


def test_folder_lists_images_recursively_sorted_and_counts_skips(ray_local, tree):
    plan = plan_inputs(str(tree))
    expected = sorted(str(tree / rel) for rel in [
        "b.JPG", "a.jpeg", "sub/c.png", "sub/deep/d.WebP", "x/same.jpg", "y/same.jpg",
        "odd names/with space #1 ü.jpg", "phone/e.HEIC"])
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == expected
    assert [r["input_index"] for r in rows] == list(range(len(expected)))
    assert all(r["data"] is None and r["read_error"] is None for r in rows)
    assert plan.kind == "folder"
    assert plan.listed == 14 and plan.skipped == 6
    assert sorted(plan.skipped_examples) == sorted(str(tree / r) for r in [
        ".hidden.jpg", ".git/obj.jpg", "sub/.cache/t.png", "notes.txt", "sub/meta.json", "noext"])
    assert plan.carried_columns == [] and plan.duplicates_removed == 0
    assert plan.planning_seconds > 0
    # every listed path is readable as-is by the decode task
    data, err = fetch_bytes(rows[-1]["path"])
    assert err is None and data == (Path(rows[-1]["path"])).read_bytes()


def test_folder_file_uri_gives_plain_paths(ray_local, tree):
    plan = plan_inputs(f"file://{tree}", input_format="folder")
    paths = [r["path"] for r in rows_of(plan)]
    assert str(tree / "x" / "same.jpg") in paths and len(paths) == 8


def test_glob_matches_pattern_only(ray_local, tree):
    plan = plan_inputs(str(tree / "*" / "*.jpg"))
    assert plan.kind == "glob"
    assert [r["path"] for r in rows_of(plan)] == [
        str(tree / "odd names/with space #1 ü.jpg"), str(tree / "x/same.jpg"),
        str(tree / "y/same.jpg")]
    # fsspec's "*" also matches ".git": hidden paths are skipped and counted there too
    assert plan.listed == 4 and plan.skipped_examples == [str(tree / ".git/obj.jpg")]


def test_empty_or_imageless_input_raises(ray_local, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        plan_inputs(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        plan_inputs(str(tmp_path / "nowhere"))
    write(tmp_path / "docs" / "a.txt")
    write(tmp_path / "docs" / "b.csv")
    with pytest.raises(InputError, match=r"2 files skipped: .*a\.txt"):
        plan_inputs(str(tmp_path / "docs"))
    with pytest.raises(InputError, match="unknown input format"):
        plan_inputs(str(tmp_path), input_format="zip")


# ------------------------------------------------------------------------------------------
# manifests


def test_txt_manifest_relative_comments_duplicates(ray_local, tmp_path):
    base = tmp_path / "m"
    write(base / "imgs" / "a.jpg", jpeg(3))
    other = write(tmp_path / "other" / "b.jpg", jpeg(4))
    manifest = write(base / "list.txt", "\n".join([
        "# a comment", "", "   ", "imgs/a.jpg", "  ../other/b.jpg  ", str(other), "imgs/a.jpg",
        "s3://bucket/key with space.jpg", "./imgs/a.jpg", ""]).encode())
    plan = plan_inputs(str(manifest))
    a, b = str(base / "imgs" / "a.jpg"), str(other)
    assert plan.kind == "manifest"
    assert [r["path"] for r in rows_of(plan)] == [a, b, b, a, "s3://bucket/key with space.jpg", a]
    assert [r["input_index"] for r in rows_of(plan)] == list(range(6))
    assert plan.listed == 6 and plan.skipped == 0  # blank and comment lines are not entries
    assert plan.duplicates_removed == 0
    assert fetch_bytes(rows_of(plan)[0]["path"]) == (jpeg(3), None)

    deduped = plan_inputs(str(manifest), dedupe=True)
    assert [r["path"] for r in rows_of(deduped)] == [a, b, "s3://bucket/key with space.jpg"]
    assert [r["input_index"] for r in rows_of(deduped)] == [0, 1, 2]
    assert deduped.duplicates_removed == 3


def test_csv_manifest_path_and_id_columns(ray_local, tmp_path):
    manifest = write(tmp_path / "list.csv", (
        b'id,URL,caption\n007,a.jpg,"a cat, sitting"\n008,s3://b/c.jpg,x\n009,,empty\n'
        b'007,a.jpg,again\n'))
    plan = plan_inputs(str(manifest), id_column="id")
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [str(tmp_path / "a.jpg"), "s3://b/c.jpg",
                                        str(tmp_path / "a.jpg")]
    assert [r["id"] for r in rows] == ["007", "008", "007"]  # strings: leading zeros kept
    assert plan.carried_columns == ["id"]
    assert plan.listed == 4 and plan.skipped == 1 and plan.skipped_examples == [
        f"{manifest} row 2"]
    assert plan.dataset.schema().types[plan.dataset.schema().names.index("id")] == pa.string()

    with pytest.raises(InputError, match="columns: id, URL, caption"):
        plan_inputs(str(manifest), path_column="file")
    with pytest.raises(InputError, match="id column 'nope' not found"):
        plan_inputs(str(manifest), id_column="nope")
    no_path = write(tmp_path / "bad.tsv", b"name\tlabel\nx\ty\n")
    with pytest.raises(InputError, match=r"no path column .*columns: name, label"):
        plan_inputs(str(no_path))
    tsv = write(tmp_path / "ok.tsv", b"name\tlabel\nx.png\ty\n")
    assert [r["path"] for r in rows_of(plan_inputs(str(tsv), path_column="name"))] == [
        str(tmp_path / "x.png")]


def test_parquet_manifest_and_unreadable_manifest(ray_local, tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["/abs/a.jpg", "rel/b.png", "/abs/a.jpg"],
                             "sample": [1, 2, 3]}), manifest)
    plan = plan_inputs(str(manifest), id_column="sample", dedupe=True)
    assert plan.kind == "manifest"
    rows = rows_of(plan)
    assert [(r["path"], r["sample"]) for r in rows] == [
        ("/abs/a.jpg", "1"), (str(tmp_path / "rel/b.png"), "2")]
    assert plan.duplicates_removed == 1 and plan.listed == 3

    broken = write(tmp_path / "broken.parquet", b"PAR1 not really")
    with pytest.raises(InputError, match="cannot read"):
        plan_inputs(str(broken), input_format="manifest")
    with pytest.raises(InputError, match="cannot read manifest"):
        plan_inputs(str(tmp_path / "absent.txt"))


def test_large_manifest_is_split_into_many_blocks(ray_local, tmp_path):
    n = 20_000
    manifest = write(tmp_path / "big.txt", "".join(f"/d/{i}.jpg\n" for i in range(n)).encode())
    plan = plan_inputs(str(manifest))
    done = plan.dataset.materialize()
    assert done.num_blocks() >= 100  # decode can fan out across a cluster
    table = pa.concat_tables(ray.get(ref) for ref in done.to_arrow_refs())
    assert table.column_names == ["path", "input_index", "data", "read_error"]
    table = table.sort_by("input_index")
    assert table.column("input_index").to_pylist() == list(range(n))
    assert table.column("path").to_pylist() == [f"/d/{i}.jpg" for i in range(n)]


# ------------------------------------------------------------------------------------------
# WebDataset tars


def test_webdataset_brace_range_sidecars_and_skips(ray_local, tmp_path):
    imgs = {f"{s}-{k}": jpeg(10 * s + k) for s in range(3) for k in range(2)}
    for s in range(3):
        members = []
        for k in range(2):
            key = f"sample{s}{k}"
            if k == 0:  # sidecars before and after the image, an unknown member, and
                # macOS "._" junk between members of the sample (must not split it)
                members.append((f"{key}.json", json.dumps({"s": s}).encode()))
                members.append((f"._{key}.jpg", b"mac junk"))
            members.append((f"{key}.jpg", imgs[f"{s}-{k}"]))
            if k == 0:
                members += [(f"{key}.txt", f"caption {s}".encode()), (f"{key}.cls", b"3")]
        make_tar(tmp_path / f"shards-{s:03d}.tar", members)
    plan = plan_inputs(str(tmp_path / "shards-{000..002}.tar"))
    assert plan.kind == "webdataset" and plan.listed is None
    assert plan.carried_columns == ["key", "json", "txt"]
    rows = rows_of(plan)
    assert len(rows) == 6
    for s in range(3):
        tar_uri = str(tmp_path / f"shards-{s:03d}.tar")
        first, second = [r for r in rows if r["path"].startswith(tar_uri + "#")]
        assert first["path"] == f"{tar_uri}#sample{s}0.jpg"
        assert first["data"] == imgs[f"{s}-0"] and second["data"] == imgs[f"{s}-1"]
        assert first["key"] == f"sample{s}0" and json.loads(first["json"]) == {"s": s}
        assert first["txt"] == f"caption {s}" and second["json"] is None
        assert first["input_index"] == s * FILE_INDEX_STRIDE
        assert second["input_index"] == s * FILE_INDEX_STRIDE + 1
        assert first["read_error"] is None
    plan.finalize()
    # sidecars belong to their image's row and are not listed on their own
    assert plan.listed == 3 * 4 and plan.skipped == 3 * 2 and plan.listed == len(rows) + plan.skipped
    assert f"{tmp_path / 'shards-000.tar'}#sample00.cls" in plan.skipped_examples


def test_corrupt_and_missing_tars_give_one_error_row_each(ray_local, tmp_path):
    good = make_tar(tmp_path / "p-0.tar", [("a.jpg", jpeg(1)), ("b.png", jpeg(2))])
    whole = good.read_bytes()
    write(tmp_path / "p-1.tar", whole[: 512 + 100])  # header of a.jpg, then data cut short
    write(tmp_path / "p-2.tar", b"this is not a tar archive" * 50)
    plan = plan_inputs(str(tmp_path / "p-{0..3}.tar"))  # p-3.tar does not exist
    rows = rows_of(plan)
    assert [r["path"] for r in rows[:2]] == [f"{good}#a.jpg", f"{good}#b.png"]
    errors = {r["path"]: r for r in rows[2:]}
    assert set(errors) == {str(tmp_path / f"p-{i}.tar") for i in (1, 2, 3)}
    for r in errors.values():
        assert r["data"] is None and error_code(r["read_error"]) == "read_error"
    assert "FileNotFoundError" in errors[str(tmp_path / "p-3.tar")]["read_error"]


def test_folder_of_tars_is_read_as_webdataset(ray_local, tmp_path):
    make_tar(tmp_path / "b.tar", [("k1.jpg", jpeg(1))])
    make_tar(tmp_path / "a.tar", [("k0.png", jpeg(0)), ("k0.json", b"{}")])
    write(tmp_path / "_stats.json", b"{}")
    for fmt in ("auto", "webdataset"):
        plan = plan_inputs(str(tmp_path), input_format=fmt)
        assert plan.kind == "webdataset"
        assert [r["path"] for r in rows_of(plan)] == [f"{tmp_path / 'a.tar'}#k0.png",
                                                    f"{tmp_path / 'b.tar'}#k1.jpg"]
    with pytest.raises(InputError, match="no images found"):
        plan_inputs(str(tmp_path), input_format="folder")


# ------------------------------------------------------------------------------------------
# Parquet with image bytes


def test_parquet_image_bytes_img2dataset_layout(ray_local, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({
        "key": ["000", "001", "002"], "url": ["http://x/a.jpg", None, "http://x/c.jpg"],
        "caption": ["a", "b", "c"], "jpg": [jpeg(1), jpeg(2), None],
        "width": [12, 12, None]}), folder / "00000.parquet")
    pq.write_table(pa.table({"key": ["100"], "url": ["http://x/d.jpg"], "caption": ["d"],
                             "jpg": [jpeg(4)], "width": [12]}), folder / "00001.parquet")
    write(folder / "00000_stats.json", b"{}")
    plan = plan_inputs(str(folder))  # auto: a folder of shards, no loose images
    assert plan.kind == "parquet" and plan.carried_columns == ["key", "url", "caption"]
    rows = rows_of(plan)
    f0 = str(folder / "00000.parquet")
    assert [r["path"] for r in rows] == ["http://x/a.jpg", f"{f0}#1", "http://x/c.jpg",
                                        "http://x/d.jpg"]
    assert [r["input_index"] for r in rows] == [0, 1, 2, FILE_INDEX_STRIDE]
    assert rows[0]["data"] == jpeg(1) and rows[1]["data"] == jpeg(2)
    assert rows[2]["data"] is None and error_code(rows[2]["read_error"]) == "read_error"
    assert [r["key"] for r in rows] == ["000", "001", "002", "100"]
    assert rows[3]["caption"] == "d" and rows[1]["url"] is None
    assert plan.finalize().listed == 4

    single = plan_inputs(str(folder / "00001.parquet"))
    assert single.kind == "parquet" and rows_of(single)[0]["data"] == jpeg(4)
    with pytest.raises(InputError, match="image column 'png' not found"):
        plan_inputs(str(folder / "00001.parquet"), image_column="png")


def test_corrupt_parquet_shard_is_an_error_row(ray_local, tmp_path):
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), tmp_path / "a.parquet")
    write(tmp_path / "b.parquet", b"PAR1 garbage PAR1")
    rows = rows_of(plan_inputs(str(tmp_path / "*.parquet"), input_format="parquet"))
    assert rows[0]["path"] == f"{tmp_path / 'a.parquet'}#0" and rows[0]["data"] == jpeg(1)
    assert rows[1]["path"] == str(tmp_path / "b.parquet")
    assert error_code(rows[1]["read_error"]) == "read_error"


# ------------------------------------------------------------------------------------------
# S3 (moto server on 127.0.0.1)


def list_requests(log: list[dict]) -> list[dict]:
    return [r for r in log if "list-type=2" in r["url"]]


def test_s3_folder_one_listing_call_and_full_uris(ray_local, s3):
    names = ["img/a.jpg", "img/sub/b #1 ü.PNG", "img/x/same.jpg", "img/y/same.jpg",
             "img/.hidden/h.jpg", "img/readme.md", "imgs-other/z.jpg"]
    for i, key in enumerate(names):
        s3.put(key, jpeg(i))
    with s3.requests() as log:
        plan = plan_inputs(s3.uri("img"), storage_options=s3.storage_options)
    assert len(log) == 1 and len(list_requests(log)) == 1, log  # no per-file HEAD/GET
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [s3.uri(k) for k in [
        "img/a.jpg", "img/sub/b #1 ü.PNG", "img/x/same.jpg", "img/y/same.jpg"]]
    assert plan.listed == 6 and plan.skipped == 2
    assert fetch_bytes(rows[1]["path"], s3.storage_options) == (jpeg(1), None)
    data, err = fetch_bytes(s3.uri("img/missing.jpg"), s3.storage_options)
    assert data is None and error_code(err) == "read_error"
    with pytest.raises(InputError, match="no images found"):
        plan_inputs(s3.uri("nothing-here/"), storage_options=s3.storage_options)


def test_s3_manifest_makes_no_per_file_calls(ray_local, s3):
    s3.put("m/a.jpg", jpeg(1))
    uri = s3.put("m/list.txt", b"a.jpg\nsub/b.jpg\ns3://elsewhere/c.jpg\n")
    with s3.requests() as log:
        plan = plan_inputs(uri, storage_options=s3.storage_options)
    assert list_requests(log) == [] and all(s3.bucket + "/m/list.txt" in r["url"] for r in log)
    assert [r["path"] for r in rows_of(plan)] == [
        s3.uri("m/a.jpg"), s3.uri("m/sub/b.jpg"), "s3://elsewhere/c.jpg"]


def test_s3_tars_are_read_in_ray_tasks(ray_local, s3, tmp_path):
    for s in range(2):
        tar = make_tar(tmp_path / f"t{s}.tar", [(f"k{s}.jpg", jpeg(s)), (f"k{s}.txt", b"hi")])
        s3.put(f"wds/t{s}.tar", tar.read_bytes())
    plan = plan_inputs(s3.uri("wds/t{0..1}.tar"), storage_options=s3.storage_options)
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [s3.uri("wds/t0.tar#k0.jpg"), s3.uri("wds/t1.tar#k1.jpg")]
    assert [r["data"] for r in rows] == [jpeg(0), jpeg(1)] and rows[0]["txt"] == "hi"
