"""Input kinds folder and glob on real files: local trees and S3 (moto on 127.0.0.1, request log counted)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from source_files import jpeg, list_requests, rows_of, write

from zslabel.errors import InputError, error_code
from zslabel.sources import fetch_bytes, plan_inputs

pytest_plugins = ["s3_server"]  # the `s3` fixture: moto S3 server on 127.0.0.1


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
    with pytest.raises(InputError, match=r"2 files skipped \(not_an_image: 2\): .*a\.txt.*; an image is a file "
                                         r"named with one of the extensions listed in README 'Formats'"):
        plan_inputs(str(tmp_path / "docs"))
    with pytest.raises(InputError, match="unknown input format"):
        plan_inputs(str(tmp_path), input_format="zip")




def output_files(out: Path) -> None:
    """What a zslabel output holds mid-run or after it: parts, manifest, state, a hidden temp file."""
    for rel in ["part-R1-a.parquet", "part-R1-b.parquet", "_run_manifest.json", "_zslabel/run.json",
                "_zslabel/claim.json", ".part-R1-c.parquet.0a1b.tmp", "_zslabel/staging/R2/part-R2-x.png"]:
        write(out / rel, b"zslabel's own")


def test_output_inside_a_folder_or_glob_input_is_one_counted_skip(tree, tmp_path):
    """`label /data --output /data/out`: the run's own files are never inputs; the output folder
    is one listed entry skipped as output_folder, however many files it holds (so a rerun's
    counts equal the first run's), named by any path that reaches it."""
    plain = plan_inputs(str(tree), use_ray=False)
    output_files(tree / "out")
    for output in [tree / "out", f"file://{tree}/out", tree / "sub" / ".." / "out"]:
        plan = plan_inputs(str(tree), use_ray=False, output=str(output))
        assert [r["path"] for r in plan.read_locally()] == [r["path"] for r in plain.read_locally()]
        assert (plan.listed, plan.skipped) == (plain.listed + 1, plain.skipped + 1)
        assert plan.skipped_by_reason == {**plain.skipped_by_reason, "output_folder": 1}
        assert str(tree / "out") in plan.skipped_examples
    (tree / "out" / "_zslabel" / "more.json").write_bytes(b"{}")  # more files: the same counts
    again = plan_inputs(str(tree), use_ray=False, output=str(tree / "out"))
    assert (again.listed, again.skipped_by_reason) == (plan.listed, plan.skipped_by_reason)

    # The input named through a link, the output by its real path (and the reverse).
    link = tmp_path / "tree_link"
    link.symlink_to(tree, target_is_directory=True)
    via_link = plan_inputs(str(link), use_ray=False, output=str(tree / "out"))
    assert (via_link.listed, via_link.skipped_by_reason) == (plan.listed, plan.skipped_by_reason)
    via_link = plan_inputs(str(tree), use_ray=False, output=str(link / "out"))
    assert (via_link.listed, via_link.skipped_by_reason) == (plan.listed, plan.skipped_by_reason)

    globbed = plan_inputs(str(tree / "**"), use_ray=False, output=str(tree / "out"))
    assert globbed.kind == "glob" and globbed.skipped_by_reason.get("output_folder") == 1
    assert not [r for r in globbed.read_locally() if "/out/" in r["path"]]

    # An output elsewhere, or a sibling whose name starts the same: tree/out is then an earlier
    # run's output, skipped the same way (by its manifest and state records).
    for output in [tmp_path / "elsewhere", tree / "ou", tree / "out2"]:
        other = plan_inputs(str(tree), use_ray=False, output=str(output))
        assert (other.listed, other.skipped_by_reason) == (plan.listed, plan.skipped_by_reason)
    # Not a zslabel output: a folder that only holds a folder named like the store's state.
    shutil.rmtree(tree / "out")
    write(tree / "mine" / "_zslabel" / "photo.jpg", b"not an output")
    other = plan_inputs(str(tree), use_ray=False, output=str(tmp_path / "elsewhere"))
    assert "output_folder" not in other.skipped_by_reason
    assert str(tree / "mine" / "_zslabel" / "photo.jpg") in [r["path"] for r in other.read_locally()]


def test_output_inside_a_folder_of_parquet_shards_is_not_read_as_shards(tmp_path):
    """The output's part-*.parquet files are Parquet too: inside a folder of shards they must not
    become shards of the input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "shards"
    root.mkdir()
    pq.write_table(pa.table({"jpg": [jpeg(1), jpeg(2)]}), root / "00000.parquet")
    output_files(root / "out")
    plan = plan_inputs(str(root), use_ray=False, output=str(root / "out"))
    assert plan.kind == "parquet" and plan.planned_files == [str(root / "00000.parquet")]
    assert len(plan.read_locally()) == 2
    plan.finalize()
    assert plan.skipped_by_reason == {"output_folder": 1} and plan.expected_rows() == 2


def test_output_inside_an_s3_folder_input_is_one_counted_skip(s3):
    for i, key in enumerate(["in/a.jpg", "in/b.jpg", "in/out/part-R1-a.parquet", "in/out/_run_manifest.json",
                             "in/out/_zslabel/run.json", "in/outer/c.jpg"]):
        s3.put(key, jpeg(i))
    plan = plan_inputs(s3.uri("in/"), storage_options=s3.storage_options, use_ray=False, output=s3.uri("in/out/"))
    assert [r["path"] for r in plan.read_locally()] == [s3.uri(k) for k in ["in/a.jpg", "in/b.jpg", "in/outer/c.jpg"]]
    assert (plan.listed, plan.skipped_by_reason) == (4, {"output_folder": 1})
    assert plan.skipped_examples == [s3.uri("in/out")]


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


def test_glob_under_a_folder_with_brackets_in_its_name(tmp_path):
    """``photos [2021]/*.jpg``: the folder exists under that name, so its brackets are literal
    (the pattern found nothing: "does not exist"); a bracket in a file name part that does not
    exist as written stays a character class."""
    d = tmp_path / "g [2021]"
    for name in ("a.jpg", "sub/b.jpg"):
        write(d / name, jpeg(1))
    for name in ("img1.jpg", "img7.jpg", "imgx.jpg"):
        write(tmp_path / name, jpeg(2))
    plan = plan_inputs(f"{d}/*.jpg", use_ray=False)
    assert [r["path"] for r in plan.read_locally()] == [str(d / "a.jpg")]
    plan = plan_inputs(f"{d}/**/*.jpg", use_ray=False)
    assert [r["path"] for r in plan.read_locally()] == [str(d / "a.jpg"), str(d / "sub" / "b.jpg")]
    plan = plan_inputs(f"{tmp_path}/img[0-9].jpg", use_ray=False)
    assert [r["path"] for r in plan.read_locally()] == [str(tmp_path / "img1.jpg"), str(tmp_path / "img7.jpg")]


@pytest.mark.parametrize("name", ["photos.tar", "imgs.jsonl", "list.csv", "shards.tgz"])
def test_a_folder_named_like_a_file_is_a_folder(tmp_path, name):
    """In auto mode a folder called photos.tar/ (or imgs.jsonl/, list.csv/) is listed as a
    folder: its images are labeled (it was one read_error row, or exit 2)."""
    folder = tmp_path / name
    write(folder / "a.jpg", jpeg(0))
    write(folder / "sub" / "b.png", jpeg(1))
    plan = plan_inputs(str(folder), use_ray=False)
    rows = plan.read_locally()
    assert plan.kind == "folder" and sorted(r["path"] for r in rows) == [str(folder / "a.jpg"),
                                                                         str(folder / "sub" / "b.png")]


def test_a_folder_of_hidden_files_only_says_so(tmp_path):
    from zslabel.options import check_input_exists

    write(tmp_path / "only" / ".x.png", jpeg(0))
    with pytest.raises(InputError, match="holds only hidden files"):
        check_input_exists(str(tmp_path / "only"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is an empty folder"):
        check_input_exists(str(tmp_path / "empty"))


def test_a_folder_mixing_kinds_names_the_files_it_does_not_read(tmp_path, caplog):
    """Loose images beside tar shards, or tar shards beside Parquet files: the folder is read one
    way and the other files are counted skips, which a summary line hides; a warning names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from source_files import jpeg, make_tar, write

    from zslabel.sources import plan_inputs

    mixed, shards = tmp_path / "mixed", tmp_path / "shards"
    shards.mkdir()
    write(mixed / "a.jpg", jpeg(0))
    make_tar(mixed / "s-000.tar", [("k.jpg", jpeg(1))])
    with caplog.at_level("WARNING", logger="zslabel.sources.folder"):
        plan = plan_inputs(str(mixed), use_ray=False)
    assert plan.kind == "folder" and plan.skipped_by_reason == {"not_an_image": 1}
    assert "holds 1 webdataset file(s) that this run does not read, as it is read as loose images" in caplog.text
    caplog.clear()
    make_tar(shards / "s-000.tar", [("k.jpg", jpeg(1))])
    pq.write_table(pa.table({"jpg": [jpeg(2)]}), shards / "p.parquet")
    with caplog.at_level("WARNING", logger="zslabel.sources.folder"):
        plan = plan_inputs(str(shards), use_ray=False)
    assert plan.kind == "webdataset"
    assert "holds 1 parquet file(s) that this run does not read, as it is read as webdataset files" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="zslabel.sources.folder"):
        plan_inputs(str(mixed / "a.jpg"), use_ray=False)
        write(tmp_path / "only" / "b.jpg", jpeg(3))
        write(tmp_path / "only" / "notes.txt", b"x")
        plan_inputs(str(tmp_path / "only"), use_ray=False)
    assert "does not read" not in caplog.text


def test_a_glob_ending_in_a_slash_reads_the_folders_it_matches(tmp_path):
    # POSIX glob(7) and bash: "photos/*/" names the sub-folders (`ls photos/*/` lists what is in
    # them), never the files beside them. fsspec drops the "/", so this read top.png only.
    root = tmp_path / "photos"
    for rel in ["top.png", "a/mid.png", "a/b/deep.png", "c d/e.jpg", "a/notes.txt"]:
        write(root / rel, jpeg(len(rel)))
    (root / "link").symlink_to(root / "a")  # the same tree under a second matched name

    def read(pattern: str):
        plan = plan_inputs(pattern, use_ray=False)
        rows = plan.read_locally()
        plan.finalize()
        assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed
        return sorted(r["path"][len(str(root)) + 1:] for r in rows), plan

    paths, plan = read(f"{root}/*/")
    assert paths == ["a/b/deep.png", "a/mid.png", "c d/e.jpg"]  # a's images once, no top.png
    assert plan.skipped_by_reason == {"not_an_image": 1, "folder_link": 1}
    assert read(f"file://{root}/*/")[0] == paths
    # "**/" also matches photos/ itself (bash globstar): every image once, each folder walked once.
    assert read(f"{root}/**/")[0] == ["a/b/deep.png", "a/mid.png", "c d/e.jpg", "top.png"]
    assert read(f"{root}/a/*/")[0] == ["a/b/deep.png"]
    # Without the "/" the pattern names files, as before.
    assert read(f"{root}/*")[0] == ["top.png"]
    with pytest.raises(InputError, match="no folder matches .*ending in '/' names folders"):
        plan_inputs(f"{root}/a/b/*/", use_ray=False)


def test_a_folder_of_a_json_array_says_to_name_the_file(tmp_path):
    """A folder of only a JSON array of records was "no images found ... not_an_image" with no
    word on what to do; the .json file named as the input is read (the jsonl kind reads JSON
    arrays)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "list.json").write_text('[{"path": "a.jpg"}]')
    with pytest.raises(InputError, match=re.escape("name the file itself as the input")):
        plan_inputs(str(tmp_path / "d"), use_ray=False)
    assert plan_inputs(str(tmp_path / "d" / "list.json"), use_ray=False).listed == 1


def test_a_glob_or_folder_inside_a_zip_chain_gives_rows_that_read_their_image(tmp_path, monkeypatch):
    """fsspec chains (``zip://*.jpg::imgs.zip``): each row keeps the archive after ``::``, made
    absolute (read tasks do not run in this folder); it was ``zip://a.jpg``, read as the working
    folder (IsADirectoryError on every row, exit 0)."""
    import zipfile

    images = {"a.jpg": jpeg(1), "b.jpg": jpeg(2), "sub/c.jpg": jpeg(3)}
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for name, data in images.items():
            z.writestr(name, data)
        z.writestr("notes.txt", b"skip me")
    monkeypatch.chdir(tmp_path)
    archive = str(tmp_path / "imgs.zip")
    for uri, names, kind in [("zip://*.jpg::imgs.zip", ["a.jpg", "b.jpg"], "glob"),
                             (f"zip://**::{archive}", ["a.jpg", "b.jpg", "sub/c.jpg"], "glob"),
                             (f"zip://*/::{archive}", ["sub/c.jpg"], "glob"),
                             (f"zip://::{archive}", ["a.jpg", "b.jpg", "sub/c.jpg"], "folder")]:
        plan = plan_inputs(uri)
        paths = plan.planned_paths.to_pylist()
        assert plan.kind == kind and paths == [f"zip://{n}::{archive}" for n in names], uri
        assert [fetch_bytes(p) for p in paths] == [(images[n], None) for n in names], uri
    # A pattern after "::" is opened as a name by fsspec: refused, saying where it goes.
    with pytest.raises(InputError, match=r"pattern after '::' is not expanded.*zip://\*\.jpg::ARCHIVE"):
        plan_inputs(f"zip://*.jpg::{tmp_path}/*.zip")
    with pytest.raises(InputError, match="cannot open .*FileNotFoundError"):
        plan_inputs(f"zip://*.jpg::{tmp_path}/missing.zip")


def test_an_http_folder_is_listed_at_the_name_its_server_answers(tmp_path):
    """An HTTP index page served only at ``/imgs/`` (no redirect from ``/imgs``: httpdirfs#94,
    webdav4#103): the listing asked for ``/imgs``, got a 404, and said "no images found ...
    (0 files skipped)"."""
    from http.server import BaseHTTPRequestHandler

    from source_files import serving

    pages = {"/imgs/": (b'<a href="a.jpg">a.jpg</a> <a href="b.jpg">b.jpg</a>', "text/html"),
             "/imgs/a.jpg": (jpeg(1), "image/jpeg"), "/imgs/b.jpg": (jpeg(2), "image/jpeg")}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body, kind = pages.get(self.path, (b"not found", "text/plain"))
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_HEAD = do_GET

    with serving(Handler) as base:
        plan = plan_inputs(f"{base}/imgs/", use_ray=False)
        rows = plan.read_locally()
        assert [r["path"] for r in rows] == [f"{base}/imgs/a.jpg", f"{base}/imgs/b.jpg"]
        assert [fetch_bytes(r["path"]) for r in rows] == [(jpeg(1), None), (jpeg(2), None)]


def test_a_folder_of_only_a_datasets_bookkeeping_says_so(tmp_path):
    """A folder whose only Parquet parts lie under Spark's ``_temporary/`` (a job that never
    committed) exits 2 with "no images found"; the message said only ``not_an_image``, not that
    such parts are never read as shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = tmp_path / "table" / "_temporary" / "0" / "part-0.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), part)
    (tmp_path / "table" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(InputError, match=r"no images found .*a dataset's bookkeeping and are never read as its shards"):
        plan_inputs(str(tmp_path / "table"), use_ray=False)

