"""Manifest kinds (``manifest``, ``jsonl``): txt/csv/Parquet manifests locally and on S3, text
encodings by zslabel.textfiles rules, the JSON-lines example kind, and the registry as the only
list of kinds (CLI, config, README)."""

from __future__ import annotations

import codecs
import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from source_files import jpeg, list_requests, rows_of, write

from zslabel import cli, config
from zslabel.errors import ConfigError, InputError, error_code
from zslabel.labels import merge_labels_file
from zslabel.sources import INPUT_FORMATS, KINDS, blocks, detect_kind, fetch_bytes, plan_inputs
from zslabel.textfiles import TextDecodeError

pytest_plugins = ["s3_server"]  # the `s3` fixture: moto S3 server on 127.0.0.1

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_a_chain_entry_reads_the_archive_beside_the_manifest(tmp_path, monkeypatch):
    """``zip://photos/a.jpg::imgs.zip`` in a manifest names the ``imgs.zip`` beside it, as a
    plain relative entry would: it was read from the working folder of whichever process read
    the row (``read_error ... /cwd/imgs.zip``; on a cluster, each worker's)."""
    import zipfile

    base = tmp_path / "m"
    base.mkdir()
    with zipfile.ZipFile(base / "imgs.zip", "w") as z:
        z.writestr("photos/a.jpg", jpeg(5))
    manifest = write(base / "list.txt", b"zip://photos/a.jpg::imgs.zip\nzip://photos/a.jpg::./imgs.zip\n"
                     + f"zip://photos/a.jpg::{base / 'imgs.zip'}\n".encode())
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    plan = plan_inputs(str(manifest), use_ray=False)
    rows = plan.read_locally()
    want = f"zip://photos/a.jpg::{base / 'imgs.zip'}"
    assert [r["path"] for r in rows] == [want] * 3
    assert fetch_bytes(rows[0]["path"]) == (jpeg(5), None)


def test_an_output_rows_tar_member_name_in_a_manifest_says_what_it_is(tmp_path):
    """Error rows retried by copying the output's ``path`` values into a manifest: a tar
    member's row name (``shard.tar#a.png``) is no file, and the row said only
    ``FileNotFoundError``; it now says what the name is and what to do instead."""
    import tarfile

    write(tmp_path / "a.png", jpeg(1))
    with tarfile.open(tmp_path / "shard.tar", "w") as t:
        t.add(tmp_path / "a.png", "a.png")
    manifest = write(tmp_path / "retry.txt", f"{tmp_path / 'shard.tar'}#a.png\n{tmp_path}/missing.jpg\n".encode())
    rows = plan_inputs(str(manifest), use_ray=False).read_locally()
    (_, tar_error), (_, plain_error) = (fetch_bytes(r["path"]) for r in rows)
    assert error_code(tar_error) == "read_error" and "FileNotFoundError" in tar_error
    assert "NAME#MEMBER names a member of a tar" in tar_error and tar_error.endswith("the file itself: shard.tar")
    assert "--resume --retry-errors" in tar_error and "NAME#MEMBER" not in plain_error


def test_a_name_holding_double_colons_in_a_manifest_stays_whole(tmp_path):
    """An absolute local name or an S3 key holding ``::`` is no chain (``storage.is_chain``):
    the chain rule made ``/d/run::1/a.jpg`` into ``/d/run::/d/1/a.jpg`` (what followed the last
    ``::`` was taken for a relative archive), a row naming another file."""
    (tmp_path / "run::1").mkdir()
    image = write(tmp_path / "run::1" / "a.jpg", jpeg(3))
    manifest = write(tmp_path / "list.txt", f"{image}\ns3://b/k/a::b.png\nrun::1/a.jpg\n".encode())
    rows = plan_inputs(str(manifest), use_ray=False).read_locally()
    assert [r["path"] for r in rows] == [str(image), "s3://b/k/a::b.png", str(image)]
    assert fetch_bytes(rows[0]["path"]) == (jpeg(3), None)


def test_a_column_flag_the_input_kind_has_no_use_for_is_refused(tmp_path):
    """``--id-column``/``--path-column`` on a folder, a tar or a Parquet file of images, and
    ``--image-column`` on a manifest, were ignored without a word: the run lacked the id column
    the user asked for. Each is refused in one line naming the flag and the kind."""
    import tarfile

    write(tmp_path / "imgs" / "a.jpg", jpeg(1))
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        t.add(tmp_path / "imgs" / "a.jpg", "a.jpg")
    pq.write_table(pa.table({"jpg": [jpeg(2)], "key": ["k"]}), tmp_path / "images.parquet")
    manifest = write(tmp_path / "list.csv", b"path,id\nimgs/a.jpg,7\n")
    for uri, flags, kind in [(tmp_path / "imgs", {"id_column": "id"}, "folder"),
                             (tmp_path / "imgs" / "*.jpg", {"path_column": "path"}, "glob"),
                             (tmp_path / "s.tar", {"id_column": "key"}, "webdataset"),
                             (tmp_path / "images.parquet", {"id_column": "key"}, "parquet"),
                             (manifest, {"image_column": "jpg"}, "manifest")]:
        flag = "--" + next(iter(flags)).replace("_", "-")
        with pytest.raises(InputError, match=f"{flag} .* is read as {kind} input, which has none"):
            plan_inputs(str(uri), use_ray=False, **flags)
    assert plan_inputs(str(manifest), use_ray=False, id_column="id").read_locally()[0]["id"] == "7"


def test_jsonl_id_column_must_name_a_key(tmp_path):
    """``--id-column id`` on a JSONL manifest whose lines have no ``id`` key ran to the end
    without the column and without a word (a CSV is refused); now the same one-line refusal."""
    manifest = write(tmp_path / "list.jsonl", b'{"path": "a.jpg", "key": "7"}\n{"path": "b.jpg", "key": "8"}\n')
    with pytest.raises(InputError, match="id column 'id' not found in .*list.jsonl; columns: path, key"):
        plan_inputs(str(manifest), use_ray=False, id_column="id")
    rows = plan_inputs(str(manifest), use_ray=False, id_column="KEY").read_locally()
    assert [r["key"] for r in rows] == ["7", "8"]


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


def test_blocks_are_sized_by_the_cluster_cpus(ray_local, tmp_path):
    """A small cluster gets ~BLOCKS_PER_CPU blocks per CPU (long decode tasks, few scheduling
    gaps), a large one keeps small blocks to fan out, and no CPU count makes a block exceed
    MAX_ROWS_PER_CPU_BLOCK rows (what a retried task redoes) unless the row count alone does."""
    assert blocks.rows_per_block(20_000, cluster_cpus=2) == 1024  # 1,250 capped
    assert blocks.rows_per_block(8_000, cluster_cpus=2) == 500
    assert blocks.rows_per_block(20_000, cluster_cpus=1000) == blocks.MIN_ROWS_PER_BLOCK
    assert blocks.rows_per_block(20_000) == blocks.MIN_ROWS_PER_BLOCK
    assert blocks.rows_per_block(10**6, cluster_cpus=2) == blocks.MAX_ROWS_PER_CPU_BLOCK
    assert blocks.rows_per_block(10**9, cluster_cpus=2) == blocks.MAX_ROWS_PER_BLOCK
    assert blocks.rows_per_block(10, cluster_cpus=2) == blocks.MIN_ROWS_PER_BLOCK
    n = 20_000
    manifest = write(tmp_path / "big.txt", "".join(f"/d/{i}.jpg\n" for i in range(n)).encode())
    done = plan_inputs(str(manifest), cluster_cpus=4).dataset.materialize()
    assert done.num_blocks() == 32  # 625 rows each
    table = pa.concat_tables(ray.get(ref) for ref in done.to_arrow_refs()).sort_by("input_index")
    assert table.column("path").to_pylist() == [f"/d/{i}.jpg" for i in range(n)]




def test_s3_manifest_makes_no_per_file_calls(ray_local, s3):
    s3.put("m/a.jpg", jpeg(1))
    uri = s3.put("m/list.txt", b"a.jpg\nsub/b.jpg\ns3://elsewhere/c.jpg\n")
    with s3.requests() as log:
        plan = plan_inputs(uri, storage_options=s3.storage_options)
    assert list_requests(log) == [] and all(s3.bucket + "/m/list.txt" in r["url"] for r in log)
    assert [r["path"] for r in rows_of(plan)] == [
        s3.uri("m/a.jpg"), s3.uri("m/sub/b.jpg"), "s3://elsewhere/c.jpg"]


# ------------------------------------------------------------------------------------------
# text manifests: one reading rule


@pytest.mark.parametrize("encoding,newline", [("utf-8", "\n"), ("utf-8-sig", "\r\n"), ("utf-16", "\r\n"),
                                              ("utf-8", "\r")])
def test_text_manifests_read_with_bom_and_any_line_ends(ray_local, tmp_path, encoding, newline):
    txt = tmp_path / "list.txt"
    txt.write_bytes(newline.join(["/d/café.jpg", "# comment", "", "/d/b.jpg"]).encode(encoding))
    assert [r["path"] for r in rows_of(plan_inputs(str(txt)))] == ["/d/café.jpg", "/d/b.jpg"]
    # A header line as csv manifests have it is not an entry (a fresh user's UTF-16 list.txt).
    txt.write_bytes(newline.join(["path", "/d/café.jpg", "/d/b.jpg"]).encode(encoding))
    plan = plan_inputs(str(txt))
    assert [r["path"] for r in rows_of(plan)] == ["/d/café.jpg", "/d/b.jpg"] and plan.listed == 2
    csv = tmp_path / "list.csv"
    csv.write_bytes(newline.join(["path,id", "/d/café.jpg,007", "/d/b.jpg,8"]).encode(encoding))
    rows = rows_of(plan_inputs(str(csv), id_column="id"))
    assert [(r["path"], r["id"]) for r in rows] == [("/d/café.jpg", "007"), ("/d/b.jpg", "8")]


@pytest.mark.parametrize("name", ["list.txt", "list.csv", "list.jsonl", "list.txt.gz"])
def test_manifest_not_utf8_names_the_file_and_byte_offset(tmp_path, name):
    body = {"list.jsonl": '{"path": "/d/café.jpg"}\n'}.get(name, "path\n/d/café.jpg\n").encode("cp1252")
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    offset = body.index(b"\xe9")
    with pytest.raises(TextDecodeError, match=rf"{re.escape(str(path))}: not valid utf-8 text at byte offset {offset}"):
        plan_inputs(str(path))
    assert issubclass(TextDecodeError, ConfigError)  # exit 2, like every input error


# ------------------------------------------------------------------------------------------
# jsonl: the example of a kind added with one module and one registry line


def test_jsonl_manifest_carries_other_keys(ray_local, tmp_path, caplog):
    lines = [{"url": "https://h/a.jpg", "id": 7, "caption": "a cat", "labels": ["x"]},
             {"url": "rel/b.jpg", "id": "08", "meta": {"w": 3}},
             {"url": "", "id": 9},
             {"url": "https://h/a.jpg", "id": 10}]
    path = tmp_path / "list.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(map(json.dumps, lines)).encode() + b"\r\n\r\n")
    assert detect_kind(str(path)) == "jsonl" and detect_kind("s3://b/x.ndjson.gz") == "jsonl"
    plan = plan_inputs(str(path), dedupe=True)
    assert plan.kind == "jsonl" and plan.carried_columns == ["id", "caption", "meta"]
    rows = rows_of(plan)
    assert [(r["path"], r["id"], r["caption"], r["meta"]) for r in rows] == [
        ("https://h/a.jpg", "7", "a cat", None), (str(tmp_path / "rel/b.jpg"), "08", None, '{"w": 3}')]
    assert (plan.listed, plan.skipped, plan.duplicates_removed) == (4, 1, 1)
    assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed

    # A line that is no JSON object is a counted malformed_row skip (a whole job failed on one),
    # with a warning naming the first; a file of nothing else has no images.
    bad = tmp_path / "bad.jsonl"
    for second, problem in (("[1, 2]", "expected a JSON object, got list"), ('{"path": ', "not JSON")):
        bad.write_text(f'{{"path": "a.jpg"}}\n{second}\n{{"path": "b.jpg"}}\n')
        with caplog.at_level("WARNING", logger="zslabel.sources.jsonl"):
            plan = plan_inputs(str(bad))
        assert [r["path"] for r in rows_of(plan)] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
        assert plan.listed == 3 and plan.skipped_by_reason == {"malformed_row": 1}
        assert f"bad.jsonl line 2: {problem}" in caplog.text
        caplog.clear()
    bad.write_text("{1}\nnot json\n")
    with pytest.raises(InputError, match="no JSON objects; 2 lines are not: the first, line 1: \\{1\\}"):
        plan_inputs(str(bad))
    bad.write_text("[1]\nnot json\n")
    with pytest.raises(InputError, match="starts as a JSON array but is not one \\(Extra data at line 2 column 1"):
        plan_inputs(str(bad))
    bad.write_text('{"file": "a.jpg"}\n')
    with pytest.raises(InputError, match="no path column"):
        plan_inputs(str(bad))


# ------------------------------------------------------------------------------------------
# the registry is the only list of kinds


def test_registry_is_the_only_list_of_kinds():
    names = [k.name for k in KINDS]
    assert len(set(names)) == len(names) and INPUT_FORMATS == ("auto", *names)
    assert config.INPUT_FORMATS == INPUT_FORMATS
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["label"]._actions
                  if "--input-format" in a.option_strings)
    assert tuple(action.choices) == INPUT_FORMATS
    assert all(k.summary in " ".join(action.help.split()) for k in KINDS)
    # README "Inputs" table: one row per kind, exactly the registry's kinds.
    section = README.read_text().split("### Input kinds", 1)[1].split("\n#", 1)[0]
    in_table = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert sorted(in_table) == sorted(names)
    with pytest.raises(InputError, match="unknown input format 'zip'"):
        plan_inputs("x", input_format="zip")


def test_dedupe_knows_spellings_of_one_local_file(tmp_path):
    """--dedupe removes the other spellings of a local file too: its file: URI (percent-encoded
    or not), a doubled slash, ``x/..``; the first spelling is the row's path. Remote URIs and
    distinct files stay."""
    a = write(tmp_path / "im gs" / "a.jpg", jpeg(1))
    b = write(tmp_path / "im gs" / "b.jpg", jpeg(2))
    d = str(tmp_path / "im gs")
    manifest = write(tmp_path / "list.txt", "\n".join([
        str(a), f"file://{d.replace(' ', '%20')}/a.jpg", f"file:{d}/a.jpg", f"{d}//a.jpg", f"{d}/x/../a.jpg",
        str(b), "s3://bucket/a.jpg", "s3://bucket//a.jpg"]).encode())
    plan = plan_inputs(str(manifest), dedupe=True, use_ray=False)
    rows = plan.read_locally()
    assert [r["path"] for r in rows] == [str(a), str(b), "s3://bucket/a.jpg", "s3://bucket//a.jpg"]
    assert plan.duplicates_removed == 4 and plan.listed == 8


def test_no_output_column_is_carried_from_the_input(tmp_path):
    """Every column of the widest output schema (hierarchy, abstention, embeddings) is the
    writer's: a JSONL key of that name is not carried, and an --id-column of that name is
    refused in one line. A carried ``hier_label`` used to collide with the roll-up column of
    that name and fail the job mid-run."""
    from zslabel.output import output_schema

    owned = [n for n in output_schema(["caption"], 4, abstained=True, hierarchy=True).names if n != "caption"]
    assert {"hier_label", "hier_score", "hier_path", "embedding", "abstained"} <= set(owned)
    line = {"path": "/d/a.jpg", "caption": "kept", **{n: "x" for n in owned if n != "path"}}
    write(tmp_path / "m.jsonl", (json.dumps(line) + "\n").encode())
    plan = plan_inputs(str(tmp_path / "m.jsonl"), use_ray=False)
    assert plan.carried_columns == ["caption"]
    for name in owned[1:]:  # "path" itself: a column named twice (below)
        write(tmp_path / "m.csv", f"path,{name}\n/d/a.jpg,x\n".encode())
        with pytest.raises(InputError, match="reserved"):
            plan_inputs(str(tmp_path / "m.csv"), use_ray=False, id_column=name)


@pytest.mark.parametrize("name, text", [
    ("dup.csv", "path,path\n/d/a.jpg,/d/b.jpg\n"),
    ("dup.tsv", "path\tcaption\tcaption\n/d/a.jpg\tx\ty\n"),
])
def test_a_column_named_twice_is_one_line_naming_it(tmp_path, name, text):
    write(tmp_path / name, text.encode())
    with pytest.raises(InputError, match=r"has the column '(path|caption)' more than once; rename one"):
        plan_inputs(str(tmp_path / name), use_ray=False)


def test_a_stray_quote_joining_entries_is_warned_about(tmp_path, caplog):
    """RFC 4180: an unbalanced quote in a caption joins the following lines into its value, so
    those entries are not entries. The reading stays RFC 4180 (a caption may hold line breaks),
    but a warning names the row, so the images do not vanish without a word."""
    text = ('url,caption\n/d/red.png,"Hello\n/d/blue.png,world\n/d/green.png,"quoted"\n/d/yellow.png,fine\n')
    write(tmp_path / "m.csv", text.encode())
    with caplog.at_level("WARNING", logger="zslabel.sources.manifest"):
        plan = plan_inputs(str(tmp_path / "m.csv"), use_ray=False)
    assert plan.listed == 2
    assert "1 rows have a value spanning several lines (the first: data row 1)" in caplog.text
    caplog.clear()
    write(tmp_path / "ok.csv", b"url,caption\n/d/red.png,fine\n/d/blue.png,also fine\n")
    with caplog.at_level("WARNING", logger="zslabel.sources.manifest"):
        plan_inputs(str(tmp_path / "ok.csv"), use_ray=False)
    assert "spanning" not in caplog.text


def test_json_arrays_and_json_lines_named_json(tmp_path):
    """A ``.json`` manifest is what Hugging Face datasets' JSON builder reads under that name:
    one JSON array (objects, or path strings) or JSON lines (BigQuery/Spark exports). It was
    "no images found" with a hint to convert it. An element that is neither an object nor a
    string is a counted ``malformed_row`` skip; one JSON object over several lines (COCO's
    annotation file) is refused naming its list-valued keys."""
    entries = [{"path": "/d/a.jpg", "caption": "a cat", "meta": {"w": 3}}, "/d/b.jpg", 7, None,
               {"url": "/d/c.jpg"}, {"path": ""}]
    for name, body in (("list.json", json.dumps(entries, indent=2)),
                       ("list.json.gz", "\ufeff" + json.dumps(entries)),
                       ("lines.json", "\n".join(json.dumps(e) for e in entries if isinstance(e, dict)))):
        write(tmp_path / name, gzip.compress(body.encode()) if name.endswith(".gz") else body.encode())
        assert detect_kind(str(tmp_path / name)) == "jsonl"
        plan = plan_inputs(str(tmp_path / name), use_ray=False)
        rows = plan.read_locally()
        array = not name.startswith("lines")
        expected = ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"] if array else ["/d/a.jpg", "/d/c.jpg"]
        assert [r["path"] for r in rows] == expected, name
        assert rows[0]["caption"] == "a cat" and rows[0]["meta"] == '{"w": 3}'
        assert plan.skipped_by_reason == ({"malformed_row": 2, "empty_path": 1} if array else {"empty_path": 1})
        assert plan.listed == len(rows) + plan.skipped
    coco = {"info": {"year": 2017}, "images": [{"file_name": "a.jpg"}], "annotations": [], "categories": []}
    write(tmp_path / "instances.json", json.dumps(coco, indent=2).encode())
    with pytest.raises(InputError, match="is one JSON object.*keys holding lists: images, annotations, categories"
                                         ".*jq -c '.images\\[\\]'"):
        plan_inputs(str(tmp_path / "instances.json"), use_ray=False)
    write(tmp_path / "cut.json", json.dumps(entries, indent=2)[:-20].encode())  # a download cut short
    with pytest.raises(InputError, match="starts as a JSON array but is not one"):
        plan_inputs(str(tmp_path / "cut.json"), use_ray=False)


def test_jsonl_files_concatenated_with_their_boms(tmp_path):
    """``cat a.jsonl b.jsonl`` of two files saved with a BOM: the second BOM starts a line and
    is not part of the JSON (the whole manifest was refused)."""
    one = '\ufeff{"path": "/d/a.jpg"}\n'.encode()
    two = '\ufeff{"path": "/d/b.jpg"}\n'.encode()
    write(tmp_path / "m.jsonl", one + two)
    rows = plan_inputs(str(tmp_path / "m.jsonl"), use_ray=False).read_locally()
    assert [r["path"] for r in rows] == ["/d/a.jpg", "/d/b.jpg"]


def test_a_quote_never_closed_and_values_over_a_block_are_read(tmp_path):
    """pyarrow reads CSV in 1 MB blocks: a value longer than that (a data: URI, a long caption,
    quoted or not, CSV or TSV) failed the whole manifest ("straddles two block boundaries").
    Now it is read; and a quote never closed, which joined the rest of a 2.6 MB manifest into one
    caption, is a one-line refusal naming the row (apache/arrow#7835, datasets#836)."""
    big = "y" * 3_000_000
    for name, text in {"big.csv": 'path,caption\n/d/0.jpg,"%s"\n/d/1.jpg,b\n' % big,
                       "big_unquoted.csv": "path,caption\n/d/0.jpg,%s\n/d/1.jpg,b\n" % big,
                       "big.tsv": "path\tcaption\n/d/0.jpg\t%s\n/d/1.jpg\tb\n" % big}.items():
        write(tmp_path / name, text.encode())
        plan = plan_inputs(str(tmp_path / name), use_ray=False)
        rows = plan.read_locally()
        assert [r["path"] for r in rows] == ["/d/0.jpg", "/d/1.jpg"] and plan.skipped == 0
    lines = [f"/d/{i}.jpg,caption {i}\n" for i in range(60_000)]
    lines[9] = '/d/9.jpg,"Hello world\n'
    write(tmp_path / "stray.csv", ("path,caption\n" + "".join(lines)).encode())
    with pytest.raises(InputError, match=r'stray\.csv: a quote \(\"\) opened in data row 10 is never closed'):
        plan_inputs(str(tmp_path / "stray.csv"), use_ray=False)


def test_a_csv_or_tsv_without_a_header_keeps_its_first_entry(tmp_path, caplog):
    # The Conceptual Captions TSV has no header: "caption<TAB>url" from the first line. Its first
    # row was read as the header: refused ("name one with --path-column"), and naming the first
    # row's value as the column, as that advice led to, dropped the first entry uncounted.
    tsv = write(tmp_path / "Train_GCC-training.tsv",
                b"a very typical bus station\t0.png\nsierra looked stunning\t1.png\nyoung girl\thttps://h/2.jpg?s=1\n")
    expected = [str(tmp_path / "0.png"), str(tmp_path / "1.png"), "https://h/2.jpg?s=1"]

    def planned(path, **kw):
        plan = plan_inputs(str(path), use_ray=False, **kw)
        assert plan.listed == len(plan.planned_paths) + plan.skipped + plan.duplicates_removed
        return plan

    with caplog.at_level("WARNING"):
        plan = planned(tsv)
    assert plan.planned_paths.to_pylist() == expected and plan.listed == 3 and plan.skipped == 0
    assert "no header row" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        plan = planned(tsv, path_column="0.png")  # a first-row value: that column, the row kept
    assert plan.planned_paths.to_pylist() == expected and plan.listed == 3
    assert "is a value of the first row" in caplog.text
    plan = planned(tsv, path_column="column_2", id_column="column_1")
    assert plan.planned_paths.to_pylist() == expected and plan.carried_columns == ["column_1"]
    assert [r["column_1"] for r in plan.read_locally()][0] == "a very typical bus station"
    with pytest.raises(InputError, match=r"no header row .*columns are column_1, column_2"):
        plan_inputs(str(tsv), path_column="url", use_ray=False)

    # A CSV (BOM, quoted caption) whose first field is the entry; a malformed row still counted.
    csv_file = write(tmp_path / "list.csv", b'\xef\xbb\xbfs3://b/a.jpg,"cap, one"\nb.png,two\nc.png,3,extra\n')
    plan = planned(csv_file)
    assert plan.planned_paths.to_pylist() == ["s3://b/a.jpg", str(tmp_path / "b.png")]
    assert plan.listed == 3 and plan.skipped_by_reason == {"malformed_row": 1}
    # A header stays a header: a column named path/url/uri, or no first-row value like an entry.
    for text in (b"url,alt.png\nx.jpg,y\n", b"file,label\nx.jpg,y\n"):
        headed = write(tmp_path / "headed.csv", text)
        assert planned(headed, path_column=text.split(b",")[0].decode()).planned_paths.to_pylist() == [
            str(tmp_path / "x.jpg")]


def zstd_frame(data: bytes) -> bytes:
    """A real Zstandard frame (RFC 8878) holding ``data`` as one raw block, written by hand:
    no zstd codec is a dependency. Single-segment header, 2-byte content size (256 + n)."""
    assert 256 <= len(data) < 256 + 65536
    header = b"\x28\xb5\x2f\xfd" + bytes([0x60]) + (len(data) - 256).to_bytes(2, "little")
    return header + ((len(data) << 3) | 1).to_bytes(3, "little") + data


@pytest.mark.parametrize("name", ["list.txt.zst", "list.jsonl.zst", "labels.txt.zst"])
def test_a_zstd_file_is_decompressed_or_refused_naming_the_package(tmp_path, name):
    """``.zst`` is a manifest suffix, but fsspec knows zstd only when a codec imports; without
    one the compressed bytes were read as text ("not valid UTF-8 ... iconv")."""
    from fsspec.utils import infer_compression

    images = [str(write(tmp_path / f"img{i:03d}.jpg", jpeg(i))) for i in range(12)]
    body = "\n".join(json.dumps({"path": p}) if ".jsonl" in name else p for p in images) + "\n"
    path = write(tmp_path / name, zstd_frame(body.encode()))
    codec = infer_compression(name) == "zstd"
    if name.startswith("labels"):
        if codec:
            assert merge_labels_file([], str(path)) == images
        else:
            with pytest.raises(ConfigError, match=r"zstd-compressed .*pip install zstandard"):
                merge_labels_file([], str(path))
        return
    if codec:
        assert plan_inputs(str(path)).planned_paths.to_pylist() == images
    else:
        with pytest.raises(InputError, match=r"^cannot read .*zstd-compressed \(\.zst\).*pip install zstandard"):
            plan_inputs(str(path))
