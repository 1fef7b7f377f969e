"""Issue 23, input side: every listed entry, tar member and manifest line ends as exactly one
of a row, a counted skip with a reason, or a counted duplicate. One test per kind of input that
used to vanish, double or be refused; planned without Ray (``plan_inputs(..., use_ray=False)``,
tars and Parquet read in this process by the kind's own reader), except the HTTP tar test,
which reads through a real ``http.server`` on 127.0.0.1.
"""

from __future__ import annotations

import logging
import io
import json
import os
import tarfile
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from source_files import check_plan, jpeg, serving, write

from zslabel.errors import InputError, error_code
from zslabel.sources import fetch_bytes, plan_inputs
from zslabel.sources.common import new_counts
from zslabel.sources.webdataset import MAX_MEMBER_BYTES, read_tar


def planned(uri: str, **kwargs) -> tuple[object, list[dict]]:
    """(finalized plan, rows) planned and read without Ray; asserts the invariant."""
    plan = plan_inputs(uri, use_ray=False, **kwargs)
    rows = plan.read_locally()
    check_plan(plan, rows)
    return plan, rows


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    return name, data, kind, link


def build_tar(path: Path, members: list[tuple]) -> Path:
    """A tar of (name, data, tarfile type, linkname) members."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


# ------------------------------------------------------------------------------------------
# tars


def test_tar_links_resolve_inside_the_tar_and_other_types_are_counted(tmp_path):
    a, g = jpeg(1), jpeg(2)
    shard = build_tar(tmp_path / "s.tar", [
        member("d", kind=tarfile.DIRTYPE),
        member("d/a.jpg", a), member("d/a.cls", b"7"),
        member("d/hard.jpg", kind=tarfile.LNKTYPE, link="d/a.jpg"),      # hard link: earlier member
        member("d/soft.jpg", kind=tarfile.SYMTYPE, link="a.jpg"),        # relative to its folder
        member("d/later.jpg", kind=tarfile.SYMTYPE, link="../g.jpg"),    # target comes later
        member("d/chain.jpg", kind=tarfile.SYMTYPE, link="soft.jpg"),    # link to a link
        member("d/out.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),   # outside the tar
        member("d/loop.jpg", kind=tarfile.SYMTYPE, link="loop.jpg"),     # itself
        member("d/meta.json", kind=tarfile.SYMTYPE, link="a.cls"),       # a link, not an image
        member("fifo", kind=tarfile.FIFOTYPE), member("dev", kind=tarfile.CHRTYPE),
        member("g.jpg", g)])
    plan, rows = planned(str(shard))
    by = {r["path"].split("#", 1)[1]: r for r in rows}
    assert list(by) == ["d/a.jpg", "d/hard.jpg", "d/soft.jpg", "d/later.jpg", "d/chain.jpg", "d/out.jpg",
                        "d/loop.jpg", "g.jpg"]  # tar order, each once
    assert [by[n]["data"] for n in ("d/a.jpg", "d/hard.jpg", "d/soft.jpg", "d/chain.jpg")] == [a] * 4
    assert by["d/later.jpg"]["data"] == g and by["d/a.jpg"]["cls"] == "7"
    for name in ("d/out.jpg", "d/loop.jpg"):
        assert by[name]["data"] is None and error_code(by[name]["read_error"]) == "read_error"
    assert plan.skipped_by_reason == {"tar_directory": 1, "tar_link_not_image": 1, "tar_special": 2}


def test_tar_member_above_the_size_limit_is_an_error_row_not_the_shard(tmp_path):
    big, small = b"B" * 4096, jpeg(3)
    shard = build_tar(tmp_path / "s.tar", [member("0.jpg", small), member("1.jpg", big), member("2.jpg", small),
                                           member("3.jpg", kind=tarfile.LNKTYPE, link="1.jpg")])
    counts = new_counts()
    rows = [r for t in read_tar(str(shard), 0, {}, counts, max_member_bytes=1000) for r in t.to_pylist()]
    rows.sort(key=lambda r: r["input_index"])
    assert [r["data"] for r in rows] == [small, None, small, None]
    assert [error_code(r["read_error"]) for r in rows] == [None, "too_many_pixels", None, "too_many_pixels"]
    assert counts["listed"] == 4 and counts["skipped"] == 0


def test_tar_member_header_claiming_more_than_2_gib(tmp_path):
    """A real 3 GiB member, written as a sparse file (no disk used): its row is too_many_pixels,
    its bytes are never read into memory, and the member after it is labeled."""
    assert MAX_MEMBER_BYTES == 2**31 - 1
    size = 3 * 2**30
    info = tarfile.TarInfo("huge.jpg")
    info.size = size
    after = tarfile.TarInfo("after.jpg")
    data = jpeg(4)
    after.size = len(data)
    path = tmp_path / "huge.tar"
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT))
        f.seek(512 + size)  # a hole: the member's (zero) bytes take no disk
        f.write(after.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512) + b"\0" * 1024)
    if os.stat(path).st_blocks * 512 > 2**30:
        pytest.skip("this filesystem does not keep sparse files sparse")
    counts = new_counts()
    rows = [r for t in read_tar(str(path), 0, {}, counts) for r in t.to_pylist()]
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["huge.jpg", "after.jpg"]
    assert error_code(rows[0]["read_error"]) == "too_many_pixels" and "3,221,225,472 bytes" in rows[0]["read_error"]
    assert rows[1]["data"] == data and counts["listed"] == 2


def test_tar_sidecars_not_next_to_their_image_and_cls_are_carried(tmp_path):
    shard = build_tar(tmp_path / "s.tar", [
        member("a.json", b'{"k": "a"}'), member("b.jpg", jpeg(1)), member("a.jpg", jpeg(2)),  # a's json before b
        member("c.jpg", jpeg(3)), member("d.jpg", jpeg(4)), member("c.txt", b"late"),  # after another key
        member("e.cls", b"5"), member("e.npy", b"\x93NUMPY")])
    plan, rows = planned(str(shard))
    by = {r["key"]: r for r in rows}
    assert json.loads(by["a"]["json"]) == {"k": "a"} and by["b"]["json"] is None
    assert by["c"]["txt"] is None  # its image was emitted before the caption came
    assert plan.skipped_by_reason == {"sidecar_not_adjacent": 1, "sidecar_without_image": 1, "not_an_image": 1}
    assert plan.carried_columns == ["key", "json", "txt", "cls"]


def test_concatenated_and_damaged_tars_lose_no_member_silently(tmp_path):
    one = build_tar(tmp_path / "1.tar", [member("a.jpg", jpeg(1)), member("b.jpg", jpeg(2))]).read_bytes()
    two = build_tar(tmp_path / "2.tar", [member("c.jpg", jpeg(3))]).read_bytes()
    write(tmp_path / "cat.tar", one + two)  # `cat 1.tar 2.tar`: GNU tar needs -i to see c.jpg
    _, rows = planned(str(tmp_path / "cat.tar"))
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"]
    import gzip  # the same, compressed: read as a stream
    write(tmp_path / "cat.tar.gz", gzip.compress(one + two))
    _, rows = planned(str(tmp_path / "cat.tar.gz"))
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"]
    # a damaged header in the middle: the members after it are still read, and one error row says so
    raw = bytearray(one + two)
    header_b = 512 + len(jpeg(1)) + (-len(jpeg(1)) % 512)
    raw[header_b + 148: header_b + 156] = b"garbage!"  # checksum field of b.jpg's header
    write(tmp_path / "bad.tar", bytes(raw))
    _, rows = planned(str(tmp_path / "bad.tar"))
    names = [r["path"].rsplit("#", 1)[-1] for r in rows]
    assert names[:1] == ["a.jpg"] and "c.jpg" in names
    shard_rows = [r for r in rows if r["path"] == str(tmp_path / "bad.tar")]
    assert len(shard_rows) == 1 and "tar damaged" in shard_rows[0]["read_error"]
    # a text file named .tar: nothing was read, so no "the rest were read" (new-user trial)
    write(tmp_path / "notatar.tar", b"just some notes, not an archive\n" * 40)
    _, rows = planned(str(tmp_path / "notatar.tar"))
    assert len(rows) == 1 and rows[0]["read_error"].startswith(
        "read_error: not a tar archive (or damaged from its start): no member header could be read"), rows
    # cut short exactly after a member: no end-of-archive blocks
    write(tmp_path / "cut.tar", one[: 512 + len(jpeg(1)) + (-len(jpeg(1)) % 512)])
    _, rows = planned(str(tmp_path / "cut.tar"))
    assert rows[0]["data"] == jpeg(1) and "cut short" in rows[1]["read_error"]


def _split_compress(compress, parts: list[bytes]) -> bytes:
    return b"".join(compress(p) for p in parts)


@pytest.mark.parametrize("name, layout", [
    ("cat.tar.gz", "two tars"),     # `cat a.tar.gz b.tar.gz`: one gzip member per tar
    ("bgz.tar.gz", "split"),        # bgzip / pigz --independent: one tar in many gzip members
    ("pb.tar.bz2", "split"),        # pbzip2 / lbzip2: one tar in many bzip2 streams
    ("x.tar.xz", "split"),          # xz streams concatenated (xz reads them as one)
])
@pytest.mark.parametrize("over_http", [False, True])
def test_a_compressed_shard_of_several_members_is_read_whole(tmp_path, name, layout, over_http):
    """A gzip file is a series of members (RFC 1952 2.2), bzip2 and xz files may be several
    streams, and `gzip -dc` / `bzip2 -dc` / `xz -dc` read them all as one. tarfile's stream
    mode stopped after the first: the images after it were silently never listed (the
    concatenated case: exit 0, counts balanced) or became a "unexpected end of data" row
    (libarchive#145). Local files and a non-seekable HTTP stream alike."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, "bz2": bz2.compress, ".xz": lzma.compress}[name[-3:]]
    images = [jpeg(i, size=(40, 30)) for i in range(4)]
    one = build_tar(tmp_path / "1.tar", [member("a.jpg", images[0]), member("b.jpg", images[1])]).read_bytes()
    two = build_tar(tmp_path / "2.tar", [member("c.jpg", images[2]), member("d.jpg", images[3])]).read_bytes()
    if layout == "two tars":
        data = _split_compress(compress, [one, two])
    else:
        whole = build_tar(tmp_path / "w.tar", [member(f"{k}.jpg", d) for k, d in zip("abcd", images)]).read_bytes()
        data = _split_compress(compress, [whole[i: i + 1500] for i in range(0, len(whole), 1500)])
    write(tmp_path / "site" / name, data)
    if over_http:
        with serving(partial(_NoRangeHandler, directory=str(tmp_path / "site"))) as base:
            _, rows = planned(f"{base}/{name}")
    else:
        _, rows = planned(str(tmp_path / "site" / name))
    assert [r["path"].rsplit("#", 1)[-1] for r in rows] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [r["data"] for r in rows] == images and all(r["read_error"] is None for r in rows)


def test_a_compressed_shard_cut_short_keeps_its_members_and_says_so(tmp_path):
    import gzip

    images = [jpeg(i, size=(40, 30)) for i in range(3)]
    whole = build_tar(tmp_path / "w.tar", [member(f"{k}.jpg", d) for k, d in zip("abc", images)]).read_bytes()
    data = gzip.compress(whole)
    write(tmp_path / "cut.tar.gz", data[: len(data) * 2 // 3])
    _, rows = planned(str(tmp_path / "cut.tar.gz"))
    good = [r for r in rows if r["read_error"] is None]
    assert good and [r["data"] for r in good] == images[: len(good)]
    assert "cut short" in rows[-1]["read_error"] or "end" in rows[-1]["read_error"], rows[-1]["read_error"]


class _NoRangeHandler(SimpleHTTPRequestHandler):
    """The standard library's file server: it ignores Range, answering every GET with 200 and
    the whole file, and sends no Accept-Ranges."""

    def log_message(self, *args) -> None:
        pass


def test_tar_over_http_without_range_support_reads_the_whole_shard(tmp_path, monkeypatch):
    import zslabel.sources.blocks as blocks

    images = [jpeg(i, size=(64, 48)) for i in range(6)]
    build_tar(tmp_path / "s.tar", [member(f"{i}.jpg", d) for i, d in enumerate(images)])
    # blocks smaller than the tar, so fsspec's ranged reading would need a second request
    monkeypatch.setattr(blocks, "STREAM_BLOCK_SIZE", 2048)
    with serving(partial(_NoRangeHandler, directory=str(tmp_path))) as base:
        _, rows = planned(f"{base}/s.tar")
    assert [r["data"] for r in rows] == images and all(r["read_error"] is None for r in rows)


# ------------------------------------------------------------------------------------------
# folders


def test_folder_symlink_back_to_an_ancestor_labels_each_image_once(tmp_path):
    root = tmp_path / "photos"
    write(root / "a.jpg", jpeg(1))
    write(root / "sub" / "b.jpg", jpeg(2))
    outside = write(tmp_path / "elsewhere" / "c.jpg", jpeg(3)).parent
    os.symlink(root, root / "sub" / "loop")            # back to an ancestor
    os.symlink(root / "sub", root / "alias")           # into the input itself
    os.symlink(outside, root / "ext")                  # elsewhere: followed, once
    os.symlink(outside, root / "sub" / "ext2")         # the same folder again: not followed
    plan, rows = planned(str(root))
    assert [r["path"] for r in rows] == [str(root / "a.jpg"), str(root / "ext" / "c.jpg"), str(root / "sub" / "b.jpg")]
    assert plan.skipped_by_reason == {"folder_link": 3}


# ------------------------------------------------------------------------------------------
# manifests


def test_csv_quoted_newlines_commas_and_malformed_rows(tmp_path):
    manifest = write(tmp_path / "laion.csv", (
        'url,caption,id\r\n'
        '"a.jpg","A caption\nover two lines, with ""quotes""",1\r\n'
        'b.jpg,plain,2\r\n'
        'c.jpg,too,many,fields\r\n'
        '"d.jpg","multi\r\n\r\nparagraph",4\r\n').encode())
    plan, rows = planned(str(manifest), id_column="id")
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "d.jpg")]
    assert [r["id"] for r in rows] == ["1", "2", "4"]
    assert plan.skipped_by_reason == {"malformed_row": 1} and "c.jpg,too" in plan.skipped_examples[0]


@pytest.mark.parametrize("name, sep", [("cat.csv", ","), ("cat.tsv", "\t")])
def test_a_repeated_header_row_is_a_counted_skip(tmp_path, name, sep):
    """Two manifests joined with ``cat`` carry the second's header as a data row: a counted
    ``repeated_header`` skip, not an unreadable image row; a row that only partly matches the
    header is an entry."""
    # Again after a BOM (files exported with one) or in another case; "path,other" is an entry.
    lines = ["path,label", "a.jpg,cat", "\ufeffpath,label", "b.jpg,dog", "path,other", "Path,Label"]
    manifest = write(tmp_path / name, ("\n".join(ln.replace(",", sep) for ln in lines) + "\n").encode())
    plan, rows = planned(str(manifest))
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "path")]
    assert plan.listed == 5 and plan.skipped_by_reason == {"repeated_header": 2}
    assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed


def test_tsv_is_not_quoted(tmp_path):
    manifest = write(tmp_path / "cc3m.tsv", b'caption\turl\n"quoted start\ta.jpg\nb "c\tb.jpg\n')
    _, rows = planned(str(manifest))
    assert [r["path"] for r in rows] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_jsonl_any_documented_key_per_line(tmp_path):
    lines = [{"url": "a.jpg", "n": 1}, {"path": "b.jpg"}, {"URI": "c.jpg"}, {"file_name": "d.jpg"},
             {"path": "", "url": "e.jpg"}, {"n": 6}]
    manifest = write(tmp_path / "m.jsonl", "\n".join(map(json.dumps, lines)).encode())
    plan, rows = planned(str(manifest))
    assert [r["path"] for r in rows] == [str(tmp_path / f"{c}.jpg") for c in "abcde"]
    assert plan.carried_columns == ["n"] and plan.skipped_by_reason == {"empty_path": 1}


def test_txt_entries_are_the_lines_as_written(tmp_path):
    text = ("\ufeffpath\r\n#1.jpg\r\n# a comment\r\n#\n  spaced name.jpg \t\r\n\ufeffconcatenated.jpg\r"
            "a,b.jpg\n\"quoted\".jpg\nx\x1fy.jpg\nform\x0cfeed.jpg\nhttp://h/a.jpg?x=1&y=2#frag\n"
            "file:/abs%20olute.jpg\n100%.jpg\n")
    manifest = write(tmp_path / "m.txt", text.encode())
    plan, rows = planned(str(manifest))
    rel = ["#1.jpg", "spaced name.jpg", "concatenated.jpg", "a,b.jpg", '"quoted".jpg', "x\x1fy.jpg",
           "form\x0cfeed.jpg"]
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in rel] + [
        "http://h/a.jpg?x=1&y=2#frag", "file:/abs%20olute.jpg", str(tmp_path / "100%.jpg")]
    assert plan.listed == 10 and plan.skipped == 0


def test_file_uris_with_percent_escapes_are_found(tmp_path):
    img = write(tmp_path / "a b" / "caf\u00e9 #1.jpg", jpeg(5))
    escaped = "file://" + str(tmp_path).replace(" ", "%20") + "/a%20b/caf%C3%A9%20%231.jpg"
    assert fetch_bytes(escaped) == (jpeg(5), None)
    assert fetch_bytes("file://localhost" + escaped[len("file://"):]) == (jpeg(5), None)
    assert fetch_bytes(f"file://{img}") == (jpeg(5), None)  # fsspec's unescaped form still works
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.png")
    latin1.write_bytes(jpeg(6))
    assert fetch_bytes(f"file://{tmp_path}/caf%E9.png") == (jpeg(6), None)
    _, rows = planned("file://" + str(tmp_path).replace(" ", "%20") + "/a%20b")
    assert [r["path"] for r in rows] == [str(img)]


# ------------------------------------------------------------------------------------------
# Parquet


def test_hugging_face_image_structs_bytes_or_path(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    write(tmp_path / "imgs" / "b.png", jpeg(2))
    table = pa.table({"image": pa.array([{"bytes": jpeg(1), "path": "a.jpg"}, {"bytes": None, "path": "imgs/b.png"},
                                         {"bytes": None, "path": None}, None], struct),
                      "label": [0, 1, 2, 3]})
    # the metadata `datasets` writes, which names the Image column
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "train-00000-of-00001.parquet")
    plan, rows = planned(str(tmp_path / "train-00000-of-00001.parquet"))
    f = str(tmp_path / "train-00000-of-00001.parquet")
    assert plan.kind == "parquet"
    assert [r["path"] for r in rows] == [f"{f}#0", str(tmp_path / "imgs" / "b.png"), f"{f}#2", f"{f}#3"]
    assert rows[0]["data"] == jpeg(1) and rows[1]["data"] is None and rows[1]["read_error"] is None
    assert fetch_bytes(rows[1]["path"]) == (jpeg(2), None)
    assert [error_code(r["read_error"]) for r in rows[2:]] == ["read_error", "read_error"]
    # the same without metadata: found by its shape under another name
    pq.write_table(table.rename_columns(["picture", "label"]), tmp_path / "plain.parquet")
    _, rows = planned(str(tmp_path / "plain.parquet"))
    assert rows[0]["data"] == jpeg(1) and len(rows) == 4


def test_list_and_nested_carried_columns_pass_as_json(tmp_path):
    pq.write_table(pa.table({
        "jpg": [jpeg(1), jpeg(2)], "key": pa.array([1, 2], pa.int64()),
        "caption": pa.array([["a cat", "a small cat"], []], pa.list_(pa.string())),
        "url": ["http://x/a.jpg", None]}), tmp_path / "coco.parquet")
    _, rows = planned(str(tmp_path / "coco.parquet"))
    assert [r["read_error"] for r in rows] == [None, None]
    assert [json.loads(r["caption"]) for r in rows] == [["a cat", "a small cat"], []]
    assert [r["key"] for r in rows] == ["1", "2"]
    # the same column in a Parquet manifest carried as an id
    pq.write_table(pa.table({"path": ["a.jpg"], "tags": pa.array([["x", "y"]], pa.list_(pa.string()))}),
                   tmp_path / "m.parquet")
    _, rows = planned(str(tmp_path / "m.parquet"), id_column="tags")
    assert json.loads(rows[0]["tags"]) == ["x", "y"]


def test_spark_folder_of_parquet_manifest_parts(tmp_path):
    folder = tmp_path / "urls"
    folder.mkdir()
    pq.write_table(pa.table({"url": ["a.jpg", "b.jpg"]}), folder / "part-00000-x.snappy.parquet")
    pq.write_table(pa.table({"url": ["c.jpg"]}), folder / "part-00001-x.snappy.parquet")
    write(folder / "_SUCCESS")
    write(folder / ".part-00000-x.snappy.parquet.crc", b"crc")
    for uri in (str(folder), str(folder) + "/"):
        plan, rows = planned(uri)
        assert plan.kind == "manifest"
        assert [r["path"] for r in rows] == [str(folder / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
        assert plan.skipped_by_reason == {"dataset_metadata": 1, "hidden": 1}  # _SUCCESS, the .crc
    renamed = tmp_path / "urls.parquet"  # Spark's "table.parquet/" folder name
    folder.rename(renamed)
    plan, rows = planned(str(renamed))
    assert len(rows) == 3 and plan.skipped_by_reason == {"dataset_metadata": 1, "hidden": 1}
    with pytest.raises(InputError, match="cannot read Parquet file"):
        plan_inputs(str(tmp_path / "nothing.parquet"), use_ray=False, input_format="parquet")


def test_a_spark_jobs_leftover_parts_are_no_warning(tmp_path, caplog):
    """Parts under ``_temporary/`` are skipped on purpose (``dataset_metadata``): no warning
    telling the user to "label them in a run of their own" (the double counting the rule
    prevents; trial of this stop's change)."""
    folder = tmp_path / "table"
    (folder / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"jpg": [jpeg(2)]}), folder / "_temporary" / "0" / "part-0.parquet")
    with caplog.at_level(logging.WARNING):
        plan, rows = planned(str(folder))
    assert len(rows) == 1 and plan.skipped_by_reason == {"dataset_metadata": 1}
    assert "run of their own" not in caplog.text, caplog.text


def test_files_beside_tar_shards_are_counted(tmp_path):
    build_tar(tmp_path / "00000.tar", [member("a.jpg", jpeg(1)), member("a.txt", b"cap")])
    write(tmp_path / "00000_stats.json", b"{}")
    write(tmp_path / ".DS_Store", b"x")
    for fmt in ("auto", "webdataset"):
        plan, rows = planned(str(tmp_path), input_format=fmt)
        assert plan.kind == "webdataset" and [r["txt"] for r in rows] == ["cap"]
        assert plan.skipped_by_reason == {"not_a_shard": 1, "hidden": 1}
        assert plan.listed == 3


def test_a_second_sidecar_of_one_kind_is_counted_not_absorbed(tmp_path):
    shard = build_tar(tmp_path / "s.tar", [
        member("a.jpg", jpeg(1)), member("a.txt", b"first"), member("a.caption.txt", b"other field"),
        member("a.txt", b"second"), member("a.seg.png", jpeg(2)), member("b.json", b"{}"),
        member("c.jpg", jpeg(3)), member("b.json", b"[]"), member("b.jpg", jpeg(4))])
    plan, rows = planned(str(shard))
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["a.jpg", "a.seg.png", "c.jpg", "b.jpg"]
    assert [r["txt"] for r in rows] == ["first", "first", None, None] and rows[3]["json"] == "{}"
    assert plan.skipped_by_reason == {"sidecar_repeated": 3}


def test_dotted_base_names_carry_their_own_sidecars(tmp_path):
    """Dates or versions in base names ("22.05.png", "22.06.png") put several images in one
    WebDataset key ("22"): each carries the sidecars of its own stem, never another image's
    (22.05.png got 22.06's caption and 22.06.png 22.05's json; with a json each, the second
    was dropped as repeated and 22.06.png got 22.05's). webdataset#237, datasets#6880."""
    shard = build_tar(tmp_path / "s.tar", [
        member("22.05.png", jpeg(1)), member("22.05.json", b'{"d": 5}'),
        member("22.06.png", jpeg(2)), member("22.06.txt", b"caption of 22.06"),
        member("23.01.png", jpeg(3)), member("23.01.json", b"1"), member("23.02.png", jpeg(4)),
        member("23.02.json", b"2"), member("23.txt", b"the key's")])
    plan, rows = planned(str(shard))
    got = {r["path"].rsplit("#", 1)[1]: (r["json"], r["txt"]) for r in rows}
    assert got == {"22.05.png": ('{"d": 5}', None), "22.06.png": (None, "caption of 22.06"),
                   "23.01.png": ("1", "the key's"), "23.02.png": ("2", "the key's")}
    assert plan.skipped == 0 and plan.listed == 4


@pytest.mark.timeout(60)
def test_a_fifo_or_device_named_like_a_shard_is_one_error_row(tmp_path):
    """A named pipe called b.tar or b.parquet, or a link b.tar -> /dev/zero, in a folder of
    shards: opening the pipe blocked until a writer came (planning and the read task hung for
    good), and /dev/zero spun tarfile over endless zero blocks. Each is a read_error row naming
    what it is, unread; the real shard beside it reads."""
    cases = {"tar_fifo": ("a.tar", "b.tar", None), "parquet_fifo": ("a.parquet", "b.parquet", None),
             "tar_zero": ("a.tar", "b.tar", "/dev/zero")}
    for case, (good, bad, target) in cases.items():
        d = tmp_path / case
        d.mkdir()
        if good.endswith(".tar"):
            build_tar(d / good, [member("x.jpg", jpeg(1))])
        else:
            pq.write_table(pa.table({"jpg": [jpeg(1)]}), d / good)
        if target is None:
            os.mkfifo(d / bad)
        else:
            (d / bad).symlink_to(target)
        plan, rows = planned(str(d))
        assert [r["read_error"] is None for r in rows] == [True, False], case
        kind = "character device" if target else "named pipe (FIFO)"
        assert error_code(rows[1]["read_error"]) == "read_error", case
        assert f"NotARegularFile: a {kind}, not a regular file" in rows[1]["read_error"], case


def test_a_zstd_shard_named_tar_says_what_it_is(tmp_path):
    """zstd data under a .tar name was "tar damaged: invalid header"; it is one read_error row
    saying it is zstd and what to do (the tar beside it reads)."""
    build_tar(tmp_path / "a.tar", [member("x.jpg", jpeg(1))])
    write(tmp_path / "b.tar", b"\x28\xb5\x2f\xfd" + bytes(range(200)))
    plan, rows = planned(str(tmp_path))
    assert rows[0]["read_error"] is None and error_code(rows[1]["read_error"]) == "read_error"
    assert "zstd-compressed data" in rows[1]["read_error"] and "zstd -d" in rows[1]["read_error"]


def test_many_images_of_one_key_are_read_in_linear_time(tmp_path):
    """A video's frames "clip.000001.jpg" + "clip.000001.json" all share WebDataset key
    "clip": matching each image with its sidecars compared every image with every sidecar, so
    a shard of 20,000 frames took minutes (3 s now, here). Each frame carries its own json."""
    n = 20_000
    members = []
    for i in range(n):
        members += [member(f"clip.{i:06d}.jpg", b"\xff\xd8" + i.to_bytes(4, "big")),
                    member(f"clip.{i:06d}.json", str(i).encode())]
    shard = build_tar(tmp_path / "s.tar", members)
    counts = new_counts()
    rows = [r for t in read_tar(str(shard), 0, {}, counts) for r in t.to_pylist()]
    assert len(rows) == n and counts["skipped"] == 0
    assert all(r["json"] == str(int(r["path"].rsplit(".", 2)[1])) for r in rows)


@pytest.mark.parametrize("sep", [",", "\t"])
def test_manifest_entries_and_values_spelled_like_nulls_are_kept(tmp_path, sep):
    """pyarrow reads NA, N/A, null, nan, None, #N/A ... as null by default (arrow#4184): an
    entry of that name was skipped as ``empty_path`` and a caption "NA" or "null" carried as
    null. Only an empty field is missing."""
    names = ["NA", "null", "nan", "N/A", "None", "#N/A", "a"]
    captions = ["x", "NA", "null", "None", "n/a", "NaN", ""]
    manifest = write(tmp_path / ("m.csv" if sep == "," else "m.tsv"),
                     ("path" + sep + "caption\n" + "".join(f"{n}{sep}{c}\n" for n, c in zip(names, captions))
                      + sep + "empty path\n").encode())
    plan, rows = planned(str(manifest), id_column="caption")
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in names]
    assert [r["caption"] for r in rows] == captions[:-1] + [None]
    assert plan.skipped_by_reason == {"empty_path": 1}


def test_http_inputs_with_a_query_string_are_told_by_their_path(tmp_path):
    """A presigned URL (``shard.tar?X-Amz-Signature=..``) or a hub file's ``?download=true``:
    the kind was told from the whole URL, so a tar, Parquet file or manifest was "no images
    found ... not_an_image", and ``?`` made it a glob pattern even with --input-format. The
    kind, the glob check and a manifest's compression now read the URL's path."""
    import gzip

    site = tmp_path / "site"
    site.mkdir()
    build_tar(site / "s.tar", [member("a.jpg", jpeg(1)), member("b.jpg", jpeg(2))])
    pq.write_table(pa.table({"jpg": [jpeg(3)], "key": ["k"]}), site / "p.parquet")
    query = "?X-Amz-Signature=abc&X-Amz-Expires=3600"
    with serving(partial(_NoRangeHandler, directory=str(site))) as base:
        write(site / "img.jpg", jpeg(4))
        write(site / "m.csv.gz", gzip.compress(f"url\n{base}/img.jpg?v=1\n".encode()))
        write(site / "l.jsonl", f'{{"url": "{base}/img.jpg"}}\n'.encode())
        found = {}
        for name in ("s.tar", "p.parquet", "m.csv.gz", "l.jsonl", "img.jpg"):
            plan, rows = planned(f"{base}/{name}{query}")
            found[name] = (plan.kind, [r["data"] or fetch_bytes(r["path"])[0] for r in rows])
        plan, _ = planned(f"{base}/s.tar{query}", input_format="webdataset")
        assert plan.kind == "webdataset"
    assert found == {"s.tar": ("webdataset", [jpeg(1), jpeg(2)]), "p.parquet": ("parquet", [jpeg(3)]),
                     "m.csv.gz": ("manifest", [jpeg(4)]), "l.jsonl": ("jsonl", [jpeg(4)]),
                     "img.jpg": ("folder", [jpeg(4)])}


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.parquet"])
def test_an_imagefolder_metadata_file_names_its_images_by_file_name(tmp_path, name):
    """Hugging Face ``imagefolder`` metadata names images in a ``file_name`` column, relative
    to the metadata's folder: ``metadata.jsonl`` was read, ``metadata.csv`` and
    ``metadata.parquet`` were "no path column"."""
    write(tmp_path / "train" / "a.jpg", jpeg(1))
    write(tmp_path / "train" / "b.jpg", jpeg(2))
    table = pa.table({"file_name": ["a.jpg", "b.jpg"], "label": ["cat", "dog"]})
    if name.endswith(".csv"):
        write(tmp_path / "train" / name, b"file_name,label\na.jpg,cat\nb.jpg,dog\n")
    else:
        pq.write_table(table, tmp_path / "train" / name)
    _, rows = planned(str(tmp_path / "train" / name), id_column="label")
    assert [(r["path"], r["label"]) for r in rows] == [(str(tmp_path / "train" / "a.jpg"), "cat"),
                                                        (str(tmp_path / "train" / "b.jpg"), "dog")]
