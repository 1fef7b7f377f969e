"""User text files: UTF-8 with/without BOM, UTF-16 with BOM, CRLF; other encodings refused (exit 2)."""

from __future__ import annotations

import codecs
import subprocess
import sys

import pytest

from zslabel.config import JobConfig, resolve_templates
from zslabel.errors import ConfigError
from zslabel.labels import merge_labels_file
from zslabel.textfiles import TextDecodeError, decode_text


@pytest.mark.parametrize("data", [
    b"red circle\nblue square\n",
    codecs.BOM_UTF8 + b"red circle\r\nblue square\r\n",
    b"red circle\rblue square",
    codecs.BOM_UTF16_LE + "red circle\r\nblue square\r\n".encode("utf-16-le"),
    codecs.BOM_UTF16_BE + "red circle\nblue square\n".encode("utf-16-be"),
])
def test_labels_file_encodings_read_the_same(tmp_path, data):
    f = tmp_path / "labels.txt"
    f.write_bytes(data)
    assert merge_labels_file([], str(f)) == ["red circle", "blue square"]


def test_cp1252_labels_file_names_file_and_offset(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes("tea\ncafé au lait\n".encode("cp1252"))
    with pytest.raises(TextDecodeError) as info:
        merge_labels_file([], str(f))
    assert info.value.offset == 7  # "tea\ncaf" is 7 bytes, then 0xe9
    assert str(f) in str(info.value) and "byte offset 7" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_decode_offset_counts_the_bom():
    with pytest.raises(TextDecodeError) as info:
        decode_text(codecs.BOM_UTF8 + b"ab\xff", "x.txt")
    assert info.value.offset == 5


def test_templates_and_yaml_config_with_bom_and_crlf(tmp_path):
    t = tmp_path / "templates.txt"
    t.write_bytes(codecs.BOM_UTF8 + b"a photo of a {}.\r\nart of the {}.\r\n")
    assert resolve_templates(str(t)) == ["a photo of a {}.", "art of the {}."]
    y = tmp_path / "job.yaml"
    y.write_bytes(codecs.BOM_UTF8 + b"top_k: 3\r\nlabels: [cat, dog]\r\n")
    cfg = JobConfig.from_yaml(str(y))
    assert cfg.top_k == 3 and cfg.labels == ["cat", "dog"]


def test_a_key_given_twice_in_a_yaml_config_is_refused_in_one_line(tmp_path):
    """PyYAML keeps the last of two equal keys (yaml/pyyaml#165): ``top_k: 1`` then ``top_k: 2``
    ran with 2 and said nothing. Now one line naming the key and its line; nested mappings
    (storage options) too; a key repeated in two different mappings is fine."""
    from zslabel.config import parse_storage_options

    y = tmp_path / "job.yaml"
    y.write_text("labels: [cat, dog]\ntop_k: 1\ntop_k: 2\n")
    with pytest.raises(ConfigError, match=r"^cannot read config .*job\.yaml: found the key 'top_k' twice "
                                          r"\(line 3, column 1\)$"):
        JobConfig.from_yaml(str(y))
    with pytest.raises(ConfigError, match=r"found the key 'key' twice"):
        parse_storage_options("client_kwargs: {endpoint_url: x}\nkey: a\nkey: b\n")
    assert parse_storage_options("a: {key: 1}\nb: {key: 2}\n") == {"a": {"key": 1}, "b": {"key": 2}}


def test_cli_refuses_cp1252_labels_file_with_exit_2(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes("café au lait\n".encode("cp1252"))
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, "-m", "zslabel", "label", str(tmp_path / "in"), "--labels-file", str(f),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "byte offset 3" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_files_read_lines_as_manifests_do(tmp_path):
    """One rule for every line-based file: lines end at LF, CRLF or CR only (a label may hold
    U+2028 or a form feed), comments are '# ...' or a lone '#', so '#1 pick' is a label."""
    f = tmp_path / "labels.txt"
    f.write_bytes("# my labels\n#1 pick\r\nline\u2028sep\rform\x0cfeed\n#\n\n  red circle  \n".encode())
    assert merge_labels_file([], str(f)) == ["#1 pick", "line\u2028sep", "form\x0cfeed", "red circle"]


def test_labels_and_templates_files_may_be_pipes(tmp_path):
    """``--labels-file <(grep ...)`` and ``--templates <(...)``: bash hands over a pipe, which
    cannot seek; it is read as a stream ("File or stream is not seekable" before)."""
    import os
    import threading

    for read, text, expected in ((lambda p: merge_labels_file([], p), "cat\ndog\n", ["cat", "dog"]),
                                 (resolve_templates, "a {}.\n", ["a {}."])):
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)  # never blocks the exit
        writer.start()
        assert read(str(fifo)) == expected
        writer.join(timeout=10)
        fifo.unlink()


def test_a_local_file_named_like_a_bundled_set_wins_for_labels_and_templates(tmp_path, monkeypatch, caplog):
    """`--labels-file imagenet-1k` read a local file of that name, but `--templates simple-4`
    silently used the bundled set although ./simple-4 held the user's templates. Both follow one
    rule now: an existing local file wins, with a warning that it shadows a named set; a folder
    of that name (an image folder called imagenet-1k) does not shadow it."""
    from zslabel.cli import build_parser
    from zslabel.labels import LABEL_SETS_DIR, TEMPLATE_SETS

    monkeypatch.chdir(tmp_path)
    caplog.set_level("WARNING")
    assert resolve_templates("simple-4") == TEMPLATE_SETS["simple-4"] and not caplog.records
    assert len(merge_labels_file([], "imagenet-1k")) == 1000 and not caplog.records

    (tmp_path / "simple-4").write_text("a sketch of {}\n")
    (tmp_path / "imagenet-1k").write_text("cat\ndog\ncar\n")
    assert resolve_templates("simple-4") == ["a sketch of {}"]
    args = build_parser().parse_args(["label", "in", "--labels", "x,y", "--templates", "simple-4", "-o", "out"])
    assert args.templates == ["a sketch of {}"]
    assert merge_labels_file([], "imagenet-1k") == ["cat", "dog", "car"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    assert "--templates simple-4 reads the local file" in warnings[0] and "named set 'simple-4'" in warnings[0]
    assert "--labels-file imagenet-1k reads the local file" in warnings[2] and "./imagenet-1k" in warnings[2]
    caplog.clear()
    assert resolve_templates("./simple-4") == ["a sketch of {}"] and not caplog.records  # a path: no set meant

    (tmp_path / "simple-4").unlink()
    (tmp_path / "imagenet-1k").unlink()
    (tmp_path / "simple-4").mkdir()
    (tmp_path / "imagenet-1k").mkdir()
    assert resolve_templates("simple-4") == TEMPLATE_SETS["simple-4"] and not caplog.records
    assert merge_labels_file([], "imagenet-1k") == merge_labels_file([], str(LABEL_SETS_DIR / "imagenet-1k.txt"))
