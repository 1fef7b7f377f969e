"""Manifest kinds (``manifest``, ``jsonl``): text encodings by zslabel.textfiles rules, the
JSON-lines example kind, and the registry as the only list of kinds (CLI, config, README)."""

from __future__ import annotations

import codecs
import gzip
import json
import re
from pathlib import Path

import pytest

from zslabel import cli, config
from zslabel.errors import ConfigError, InputError
from zslabel.sources import INPUT_FORMATS, KINDS, detect_kind, plan_inputs
from zslabel.textfiles import TextDecodeError

README = Path(__file__).resolve().parents[1] / "README.md"


def rows_of(plan) -> list[dict]:
    return sorted(plan.dataset.take_all(), key=lambda r: r["input_index"])


# ------------------------------------------------------------------------------------------
# text manifests: one reading rule


@pytest.mark.parametrize("encoding,newline", [("utf-8", "\n"), ("utf-8-sig", "\r\n"), ("utf-16", "\r\n"),
                                              ("utf-8", "\r")])
def test_text_manifests_read_with_bom_and_any_line_ends(ray_local, tmp_path, encoding, newline):
    txt = tmp_path / "list.txt"
    txt.write_bytes(newline.join(["/d/café.jpg", "# comment", "", "/d/b.jpg"]).encode(encoding))
    assert [r["path"] for r in rows_of(plan_inputs(str(txt)))] == ["/d/café.jpg", "/d/b.jpg"]
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


def test_jsonl_manifest_carries_other_keys(ray_local, tmp_path):
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

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.jpg"}\n[1, 2]\n')
    with pytest.raises(InputError, match="bad.jsonl line 2: expected a JSON object"):
        plan_inputs(str(bad))
    bad.write_text('{"path": "a.jpg"}\n{"path": \n')
    with pytest.raises(InputError, match="bad.jsonl line 2: not JSON"):
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
