"""Any file name, for every input kind (issue 11 "Names"): names that are not UTF-8, ``./`` tar
members, glob characters in existing names, single http(s) inputs, counts that add up, and the
per-input safety net. Planning is checked with ``plan_inputs`` on local Ray; the rules that
need the whole job (a row per input, exit 2) run ``run_label_job`` with the tiny CLIP.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import photo
from source_files import rows_of, serving

from zslabel import JobConfig, run_label_job
from zslabel.errors import InputError, error_code
from zslabel.sources import fetch_bytes, plan_inputs, webdataset
from zslabel.sources.blocks import read_file
from zslabel.sources.common import new_counts

pytest_plugins = ["s3_server"]

LATIN1 = b"caf\xe9.png"  # "café.png" saved by a Latin-1 system: not valid UTF-8


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    photo(10, 8, seed=seed).save(buf, "PNG")
    return buf.getvalue()


def tar_of(path: Path, members: list[tuple[str | bytes, bytes]]) -> Path:
    """A tar; bytes names are written raw (GNU format keeps them as they are); "x/" is a folder."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
            info.size = len(data)
            if info.name.endswith("/"):
                info.type = tarfile.DIRTYPE
            tar.addfile(info, io.BytesIO(data))
    return path


def counts_add_up(plan, rows) -> None:
    plan.finalize()
    assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed, (plan, len(rows))


def latin1_folder(root: Path) -> Path:
    root.mkdir()
    for name, seed in ((b"a.png", 1), (LATIN1, 2), (b"z.png", 3)):
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(png(seed))
    return root


# ------------------------------------------------------------------------------------------
# names that are not UTF-8


def test_folder_with_a_latin1_name_plans_every_file_and_reads_it(ray_local, tmp_path):
    root = latin1_folder(tmp_path / "in")
    plan = plan_inputs(str(root))
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [str(root / n) for n in ("a.png", "caf%E9.png", "z.png")]
    counts_add_up(plan, rows)
    # The escaped path finds the real file, and a manifest line copied from it does too.
    assert fetch_bytes(rows[1]["path"]) == (png(2), None)
    manifest = tmp_path / "list.txt"
    manifest.write_text("in/caf%E9.png\n")
    assert fetch_bytes(rows_of(plan_inputs(str(manifest)))[0]["path"]) == (png(2), None)
    # a real file named with a literal escape is read as itself
    (root / "lit%41.png").write_bytes(png(4))
    assert fetch_bytes(str(root / "lit%41.png")) == (png(4), None)


def test_a_name_ending_in_white_space_keeps_its_image_extension(ray_local, tmp_path):
    """"a.png " (Linux and macOS allow it; a copy from a spreadsheet makes it) was skipped as
    not_an_image in folders and tars; it is an image whose bytes are read as they are."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.png ").write_bytes(png(1))
    (root / "b.txt ").write_bytes(b"not an image")
    plan = plan_inputs(str(root))
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [str(root / "a.png ")] and plan.skipped_by_reason == {"not_an_image": 1}
    assert fetch_bytes(rows[0]["path"]) == (png(1), None)
    shard = tar_of(tmp_path / "shard.tar", [("k1.png\t", png(2)), ("k2.jpg ", png(3))])
    plan = plan_inputs(str(shard))
    rows = rows_of(plan)
    assert [r["data"] for r in rows] == [png(2), png(3)]
    counts_add_up(plan, rows)


def test_tar_members_not_utf8_and_dot_slash_prefixes(ray_local, tmp_path):
    # `tar -C dir -cf shard.tar .` writes "./" before every member name
    shard = tar_of(tmp_path / "shard.tar", [
        ("./", b""), ("./0000.png", png(1)), ("./0000.json", b'{"k": 0}'), ("./0001.png", png(2)),
        (b"./" + LATIN1, png(3)), ("/abs/0002.png", png(4)), ("../up/0003.png", png(5)),
        ("./.hidden.png", b"junk"),
        # dots in folder names and base names (webdataset#237, datasets#7150): key = up to the
        # first dot of the base name, so 22.05.json is the sidecar of 22.05.png
        ("train.v1/0004.png", png(6)), ("22.05.png", png(7)), ("22.05.json", b'{"d": 1}')])
    plan = plan_inputs(str(shard))
    rows = rows_of(plan)
    assert [r["path"].split("#", 1)[1] for r in rows] == [
        "0000.png", "0001.png", "caf%E9.png", "abs/0002.png", "../up/0003.png", "train.v1/0004.png",
        "22.05.png"]
    assert rows[0]["key"] == "0000" and json.loads(rows[0]["json"]) == {"k": 0}
    assert [r["key"] for r in rows[5:]] == ["train.v1/0004", "22"] and json.loads(rows[6]["json"]) == {"d": 1}
    assert [r["data"] for r in rows] == [png(1), png(2), png(3), png(4), png(5), png(6), png(7)]
    counts_add_up(plan, rows)
    # the "./" folder member is a directory: listed and skipped with its reason, like .hidden.png
    assert plan.skipped == 2 and plan.skipped_by_reason == {"tar_directory": 1, "hidden": 1}
    assert plan.skipped_examples == [f"{shard}#.", f"{shard}#.hidden.png"]


def test_tar_sidecars_count_and_a_tar_of_sidecars_only_has_no_images(ray_local, tmp_path):
    tar_of(tmp_path / "s-0.tar", [("0000.txt", b"a caption"), ("0000.json", b"{}"),
                                  ("0001.jpg", png(1)), ("0001.txt", b"b")])
    tar_of(tmp_path / "s-1.tar", [("dup.png", png(2)), ("dup.png", png(3))])  # one name twice
    plan = plan_inputs(str(tmp_path / "s-{0..1}.tar"))
    rows = rows_of(plan)
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["0001.jpg", "dup.png", "dup.png"]
    assert rows[0]["txt"] == "b"
    counts_add_up(plan, rows)
    assert plan.skipped == 2  # the sidecars of 0000, which has no image

    only = tar_of(tmp_path / "only.tar", [("0000.txt", b"x"), ("0000.json", b"{}")])
    plan = plan_inputs(str(only))
    assert rows_of(plan) == []
    plan.finalize()
    with pytest.raises(InputError, match=r"no images found in .*only\.tar.*2 skipped"):
        plan.check_has_inputs(str(only))


def test_shard_and_manifest_files_whose_own_names_are_not_utf8(ray_local, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    tar = tar_of(tmp_path / "t.tar", [("k.png", png(1))])
    os.rename(tar, os.path.join(os.fsencode(shards), b"caf\xe9.tar"))
    rows = rows_of(plan_inputs(str(shards)))  # a folder of shards, one not UTF-8 named
    assert [(r["path"], r["data"], r["read_error"]) for r in rows] == [(f"{shards}/caf%E9.tar#k.png", png(1), None)]
    manifest = os.path.join(os.fsencode(tmp_path), b"list\xe9.txt")
    with open(manifest, "wb") as fh:
        fh.write(b"shards/caf%E9.tar\n")
    rows = rows_of(plan_inputs(os.fsdecode(manifest)))
    assert [r["path"] for r in rows] == [f"{shards}/caf%E9.tar"]


# ------------------------------------------------------------------------------------------
# glob characters in names that exist


def test_existing_folder_or_file_with_glob_characters_is_itself(ray_local, tmp_path):
    folder = tmp_path / "photos [2021]"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    (tmp_path / "photos 2").mkdir()
    (tmp_path / "photos 2" / "b.png").write_bytes(png(2))  # "[2021]" as a pattern matches "photos 2"
    plan = plan_inputs(str(folder))
    assert plan.kind == "folder" and [r["path"] for r in rows_of(plan)] == [str(folder / "a.png")]
    single = plan_inputs(str(folder / "a.png"))
    assert [r["path"] for r in rows_of(single)] == [str(folder / "a.png")]
    globbed = plan_inputs(str(folder) + "/*.png", input_format="glob")  # "[2021]" is a class here
    assert globbed.kind == "glob" and [r["path"] for r in rows_of(globbed)] == [str(tmp_path / "photos 2/b.png")]
    shard = tar_of(tmp_path / "shard [1].tar", [("k.png", png(3))])
    assert [r["data"] for r in rows_of(plan_inputs(str(shard)))] == [png(3)]


# ------------------------------------------------------------------------------------------
# object keys (moto S3 on 127.0.0.1)


def test_s3_keys_with_spaces_hash_question_percent_and_folder_markers(ray_local, s3):
    keys = ["k/a b.png", "k/#1.png", "k/what?.png", "k/100%.png", "k/caf%E9.png", "k/ü/é.png"]
    for i, key in enumerate(keys):
        s3.put(key, png(i))
    s3.put("k/empty-folder/", b"")  # console-made folder marker: not a file
    plan = plan_inputs(s3.uri("k"), storage_options=s3.storage_options)
    rows = rows_of(plan)
    assert sorted(r["path"] for r in rows) == sorted(s3.uri(k) for k in keys)
    counts_add_up(plan, rows)
    assert plan.skipped == 0
    for r in rows:
        data, err = fetch_bytes(r["path"], s3.storage_options)
        assert err is None and data == png(keys.index(r["path"][len(s3.uri()):])), r["path"]


# ------------------------------------------------------------------------------------------
# the safety net


def test_a_bug_while_reading_one_tar_member_costs_that_member(ray_local, tmp_path, monkeypatch, caplog):
    shard = tar_of(tmp_path / "t.tar", [("a.png", png(1)), ("b.png", png(2)), ("c.png", png(3))])
    real = webdataset.storage.display_name

    def broken(name: str) -> str:
        if name == "b.png":
            raise RuntimeError("injected bug")
        return real(name)

    monkeypatch.setattr(webdataset.storage, "display_name", broken)
    counts = new_counts()
    rows = [r for t in read_file(webdataset.read_tar, str(shard), 0, {}, counts, webdataset.CARRIED)
            for r in t.to_pylist()]
    assert [error_code(r["read_error"]) for r in rows] == [None, "internal_error", None]
    assert "injected bug" in rows[1]["read_error"] and rows[1]["path"] == f"{shard}#b.png"
    assert counts["listed"] == 3 and "Traceback" in caplog.text

    # A bug that escapes a reader altogether costs one row for the file, not the job.
    def reader_bug(*args, **kwargs):
        yield from ()
        raise KeyError("reader bug")

    counts = new_counts()
    rows = [r for t in read_file(reader_bug, "x.tar", 2, {}, counts, ["key"]) for r in t.to_pylist()]
    assert len(rows) == 1 and error_code(rows[0]["read_error"]) == "internal_error"
    assert counts["listed"] == 1 and rows[0]["input_index"] == 3 * 10**9 - 1


# ------------------------------------------------------------------------------------------
# through the whole job


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server serving ``tmp_path/www``; stopped after the test."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    with serving(handler) as base:
        yield www, base


def job(tiny_clip, input: str, out: Path) -> JobConfig:
    return JobConfig(input=input, output=str(out), labels=["red", "blue"], model=str(tiny_clip), batch_size=4)


def test_names_through_the_job(ray_local, tiny_clip, tmp_path, http_server):
    root = latin1_folder(tmp_path / "in")
    summary = run_label_job(job(tiny_clip, str(root), tmp_path / "out1"))
    rows = pq.read_table(str(tmp_path / "out1")).to_pylist()
    assert sorted(r["path"] for r in rows) == [str(root / n) for n in ("a.png", "caf%E9.png", "z.png")]
    assert all(r["error"] is None for r in rows) and summary.listed == summary.rows + summary.skipped

    www, base = http_server
    (www / "img.png").write_bytes(png(5))
    url = f"{base}/img.png?v=1"  # a query string (signed URLs) is not part of the extension
    summary = run_label_job(job(tiny_clip, url, tmp_path / "out2"))
    rows = pq.read_table(str(tmp_path / "out2")).to_pylist()
    assert [(r["path"], r["error"]) for r in rows] == [(url, None)]

    tar_of(tmp_path / "sidecars.tar", [("0000.txt", b"x"), ("0000.json", b"{}")])
    with pytest.raises(InputError, match="no images found"):
        run_label_job(job(tiny_clip, str(tmp_path / "sidecars.tar"), tmp_path / "out3"))


def test_a_latin1_name_through_the_label_studio_export(ray_local, tiny_clip, tmp_path, caplog):
    """HumanSignal/label-studio#4874, #1266: b'caf\\xe9.png' is stored as 'caf%E9.png', and its task
    URL ``?d=.../caf%25E9.png`` named the literal 'caf%E9.png', a file that does not exist: a
    broken task, exported with "left out: none". Label Studio reads ``?d=`` as UTF-8, so no
    local-files URL names such a file: the row is left out, counted, with a warning saying how to
    fix it. A literal '100%E9.png' is a name of its own and keeps its task; with --url-prefix the
    Latin-1 name's bytes are percent-encoded and the URL names the file."""
    from urllib.parse import unquote_to_bytes, urlsplit

    from zslabel.exports.label_studio import NOT_UTF8, export_label_studio

    root = latin1_folder(tmp_path / "in")
    (root / "100%E9.png").write_bytes(png(4))                    # literal '%': not an escape
    run_label_job(job(tiny_clip, str(root), tmp_path / "out"))
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert sorted(r["path"] for r in rows) == [str(root / n) for n in ("100%E9.png", "a.png", "caf%E9.png", "z.png")]

    def files_named(tasks_json, prefix):
        tasks = json.loads(Path(tasks_json).read_text())
        named = []
        for t in tasks:
            ref = t["data"]["image"]
            assert ref.startswith(prefix), ref
            rel = unquote_to_bytes(urlsplit(ref).query.split("=", 1)[1] if prefix.startswith("/data") else
                                   ref[len(prefix):])
            path = os.path.join(os.fsencode(root), rel)
            assert os.path.isfile(path), (ref, path)             # the URL names an existing file
            named.append(os.path.basename(path))
        return sorted(named)

    caplog.set_level("WARNING")
    res = export_label_studio(str(tmp_path / "out"), str(tmp_path / "tasks.json"), image_root=str(root))
    assert (res.rows, res.source_rows, res.left_out.get(NOT_UTF8)) == (3, 4, 1)
    assert f"left out: 1 {NOT_UTF8};" in res.line()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "1 rows left out" in warning and "caf%E9.png" in warning and "convmv" in warning
    assert files_named(tmp_path / "tasks.json", "/data/local-files/?d=") == [b"100%E9.png", b"a.png", b"z.png"]

    prefix = "http://127.0.0.1:8081/images/"
    res = export_label_studio(str(tmp_path / "out"), str(tmp_path / "http.json"), image_root=str(root),
                              url_prefix=prefix)
    assert (res.rows, res.left_out[NOT_UTF8]) == (4, 0)
    assert files_named(tmp_path / "http.json", prefix) == [b"100%E9.png", b"a.png", LATIN1, b"z.png"]


def listed_and_read(s3, objects: dict[str, bytes], prefix: str) -> dict[str, tuple]:
    """Put ``objects`` (key -> bytes), plan the prefix (counts checked), read every row:
    ``{row path: (bytes, error)}``."""
    for key, data in objects.items():
        s3.put(key, data)
    plan = plan_inputs(s3.uri(prefix), storage_options=s3.storage_options)
    rows = rows_of(plan)
    counts_add_up(plan, rows)
    return {r["path"]: fetch_bytes(r["path"], s3.storage_options) for r in rows}


def test_s3_keys_holding_double_colons_are_keys_not_chains(ray_local, s3):
    """fsspec#1782 on an object store (public-report hunt): fsspec splits ``s3://b/k/a::b.png`` into
    a chain to a local file ``b.png``; listed under a prefix the row was ``read_error: TypeError:
    AioSession.__init__() got an unexpected keyword argument 'target_options'``, and the key as
    the input was "cannot read". Only a name whose first link reads through another filesystem
    (zip://, simplecache, ...) is a chain."""
    assert listed_and_read(s3, {"cc/a::b.png": png(1), "cc/x::y::z.png": png(2)}, "cc") == {
        s3.uri("cc/a::b.png"): (png(1), None), s3.uri("cc/x::y::z.png"): (png(2), None)}
    one = plan_inputs(s3.uri("cc/a::b.png"), storage_options=s3.storage_options)  # the key itself
    assert [r["path"] for r in rows_of(one)] == [s3.uri("cc/a::b.png")]


def test_s3_empty_path_component_in_a_key(ray_local, s3):
    """s3fs#771: keys such as ``k//e.png`` (an empty folder name) exist on real buckets."""
    assert listed_and_read(s3, {"dbl//e.png": png(1), "dbl/f.png": png(2)}, "dbl") == {
        s3.uri("dbl//e.png"): (png(1), None), s3.uri("dbl/f.png"): (png(2), None)}
