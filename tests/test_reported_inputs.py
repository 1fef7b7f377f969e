"""Failure kinds found by a hunt through public bug reports (stop 37): messy real inputs, outputs

Each test builds the smallest real input on disk (Pillow, pyarrow, tarfile; no mocks), runs the
CLI (``zslabel.cli.main``) on the tiny offline checkpoint, and checks the README's contract.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import photo

from zslabel.cli import main

LABELS = "cat,dog"


def _label(inp, out, model, ray_local, *extra) -> int:
    return main(["label", str(inp), "--labels", LABELS, "--model", str(model), "--output", str(out),
                 "--quiet", "--address", ray_local, *extra])


def _jpg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(30, 20, seed).save(path, "JPEG")
    return path


def test_output_folder_with_double_colon_is_written_where_named(tiny_clip, ray_local, tmp_path, capsys):
    """fsspec/filesystem_spec#1782 ("Use of '::' in file's name", from scikit-hep/uproot5#1251):
    fsspec reads every ``::`` as a URL-chain separator, so a local name holding ``::`` (C++-style
    names, ``run::1``, ``model::v2``) opens another file. Seen here: ``--output .../out::y``
    exits 0, the summary says ``output: .../out::y``, but the rows went to ``.../out`` (the
    chain's first link) and ``out::y`` does not exist. An output must be written where it is
    named, or refused in one line before anything is written."""
    _jpg(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out::y"
    rc = _label(tmp_path / "in", out, tiny_clip, ray_local)
    err = capsys.readouterr().err
    if rc == 2:  # refused: one line, and nothing written anywhere
        assert err.strip().splitlines()[-1].startswith("zslabel: error:"), err[-2000:]
        assert not (tmp_path / "out").exists()
        return
    assert rc == 0, err[-2000:]
    assert not (tmp_path / "out").exists(), "rows written to .../out, not to the output named .../out::y"
    assert out.is_dir() and pq.read_table(str(out)).num_rows == 1


@pytest.mark.parametrize("kind", ["folder", "image_file", "tar_shard"])
def test_local_input_with_double_colon_that_exists_is_read(kind, tiny_clip, ray_local, tmp_path, capsys):
    """fsspec/filesystem_spec#1782 (``::`` in a local file's name read as a chain separator;
    scikit-hep/uproot5#1251). A local folder ``run::1`` holding a JPEG (or an image file
    ``a::b.jpg``, or a tar shard ``x::y.tar``) exists, yet ``zslabel label`` exits 2 with
    ``zslabel: error: no images found: .../run::1 does not exist``. The README: "An input that
    exists as a file or folder is that file or folder" (names with ``*``, ``?``, ``[`` are
    honoured so); the same should hold for ``::``. (The same name as a manifest entry or inside
    a listed folder is read fine.)"""
    if kind == "folder":
        inp = tmp_path / "run::1"
        _jpg(inp / "a.jpg")
        want = [str(inp / "a.jpg")]
    elif kind == "image_file":
        inp = _jpg(tmp_path / "in" / "a::b.jpg")
        want = [str(inp)]
    else:
        inp = tmp_path / "x::y.tar"
        data = _jpg(tmp_path / "k.jpg").read_bytes()
        with tarfile.open(inp, "w") as tf:
            info = tarfile.TarInfo("k.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        want = [f"{inp}#k.jpg"]
    rc = _label(inp, tmp_path / "out", tiny_clip, ray_local)
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert [r["path"] for r in rows] == want and rows[0]["error"] is None


def test_python_api_takes_pathlib_paths(tiny_clip, ray_local, tmp_path):
    """openmined/PySyft#3400, underchemist/nanonispy#9, huggingface/transformers#2062: passing a
    ``pathlib.Path`` where a library indexes a ``str`` ends in ``TypeError: 'PosixPath' object is
    not subscriptable``. Seen here: ``run_label_job(JobConfig(input=Path(...), ...))`` raises
    ``TypeError: 'PosixPath' object is not subscriptable`` (``storage.local_path``), and
    ``output=Path(...)`` raises ``AttributeError: 'PosixPath' object has no attribute 'strip'``
    (``options.validate``): raw tracebacks, no ``ConfigError``. Paths are what every pytest
    fixture and most notebooks hold; either accept them (``os.fspath``) or refuse them with a
    ``ConfigError``."""
    from zslabel import JobConfig, run_label_job
    from zslabel.errors import ConfigError

    _jpg(tmp_path / "in" / "a.jpg")
    # All three at once, as a notebook holding Paths passes them (one run: each field's own
    # failure showed in this run too, the first one met ending it).
    paths = dict(input=tmp_path / "in", output=tmp_path / "out", model=Path(tiny_clip))
    try:
        run_label_job(JobConfig(**paths, labels=["cat", "dog"], address=ray_local))
    except ConfigError as exc:
        assert any(field in str(exc) for field in paths), exc  # a clear refusal names the field
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"JobConfig(input=, output=, model=Path(...)): {type(exc).__name__}: {exc}") from exc
    assert pq.read_table(str(tmp_path / "out")).num_rows == 1


def test_python_api_labels_given_as_one_string_are_not_split_into_characters(tiny_clip, ray_local, tmp_path):
    """The CLI takes ``--labels cat,dog``, YAML takes ``labels: cat,dog`` (options.from_dict
    parses a string), and transformers' zero-shot pipelines accept ``candidate_labels`` as one
    comma-separated string (huggingface/transformers#5760, ``_parse_labels``). Seen here:
    ``JobConfig(labels="cat,dog")`` is taken as the characters of the string and the run exits
    successfully with rows labeled ``['d', 't', ',', 'a', 'g']``; ``labels="cat"`` labels every
    image with ``'c'``, ``'a'``, ``'t'``. Silent nonsense: split the string as the CLI does, or
    refuse it with a ``ConfigError``."""
    from zslabel import JobConfig, run_label_job
    from zslabel.errors import ConfigError

    _jpg(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    try:
        run_label_job(JobConfig(input=str(tmp_path / "in"), output=str(out), labels="cat,dog",
                                model=str(tiny_clip), address=ray_local))
    except ConfigError:
        return
    rows = pq.read_table(str(out)).to_pylist()
    assert sorted(rows[0]["labels"]) == ["cat", "dog"], rows[0]["labels"]


def test_an_earlier_output_inside_a_parquet_input_folder_is_not_read_as_input(tiny_clip, ray_local, tmp_path, capsys):
    """geoparquet/geoparquet-io#867 ("an output written inside the input directory is silently
    re-read as input on the next run"; also catalyst-cooperative/pudl#384). zslabel skips the
    run's own output inside its input (README: "a rerun counts what the first run counted"), but
    not an earlier run's output: label a Hugging Face Parquet folder ``ds/`` into ``ds/out_old``,
    then again with other labels into ``ds/out_new``. Seen here: the second run lists
    ``ds/out_old/part-*.parquet`` as an input shard and writes a row for it,
    ``read_error: parquet InputError: no image column 'image' (columns: path, input_index,
    labels, scores, ...``; the summary says ``labeled 3 of 4 images; errors: read_error=1`` for
    a dataset of 3 images (an output found by its ``_run_manifest.json`` is no input: a
    ``--max-error-fraction`` job can fail on it)."""
    import pyarrow as pa

    ds = tmp_path / "ds"
    ds.mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": _jpg(tmp_path / f"src{i}.jpg", i).read_bytes(), "path": f"{i}.jpg"} for i in range(3)]
    pq.write_table(pa.table({"image": pa.array(images, struct)}), ds / "train-00000.parquet")
    assert _label(ds, ds / "out_old", tiny_clip, ray_local) == 0
    capsys.readouterr()
    rc = main(["label", str(ds), "--labels", "cat,dog,bird", "--model", str(tiny_clip), "--output",
               str(ds / "out_new"), "--quiet", "--address", ray_local])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    rows = pq.read_table(str(ds / "out_new")).to_pylist()
    assert [(r["path"], r["error"]) for r in rows if r["error"] or "out_old" in r["path"]] == []
    assert len(rows) == 3
    # Also: 3 rows (the footers say so) load one model, not one per free CPU of the local Ray.
    assert json.loads((ds / "out_new" / "_run_manifest.json").read_text())["timings"]["model_actors"] == 1


@pytest.mark.parametrize("field,value", [("top_k", "2"), ("batch_size", "64"), ("max_error_fraction", "0.1"),
                                         ("io_timeout", "5")])
def test_python_api_numbers_given_as_strings_are_a_config_error_not_a_type_error(field, value, tiny_clip, tmp_path):
    """arabcoders/ytptube#547, google/compare_gan#30, deepbeepmeep/mmgp#28: a number that
    arrives as a string (an environment variable, ``sys.argv``, a notebook widget) ends in
    ``TypeError: '<' not supported between instances of 'str' and 'int'``. Seen here:
    ``run_label_job(JobConfig(..., top_k="2"))`` (likewise ``batch_size``,
    ``max_error_fraction``, ``io_timeout``) raises that raw ``TypeError`` from
    ``JobConfig.validate``, while the same value from YAML (``LabelingOptions.from_dict``) is a
    one-line ``ConfigError`` ("config key 'top_k' must be int"). Either convert or refuse with a
    ``ConfigError`` naming the setting."""
    from zslabel import JobConfig
    from zslabel.errors import ConfigError

    _jpg(tmp_path / "in" / "a.jpg")
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), labels=["cat", "dog"],
                    model=str(tiny_clip), **{field: value})
    try:
        cfg.validate()
    except ConfigError as exc:
        assert field in str(exc) or field.replace("_", "-") in str(exc), str(exc)
    except TypeError as exc:
        raise AssertionError(f"JobConfig({field}={value!r}).validate(): TypeError: {exc}") from exc
