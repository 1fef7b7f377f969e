"""Input kind webdataset: tar shards read in Ray tasks, locally and from S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
from source_files import jpeg, make_tar, rows_of, write

from zslabel.errors import InputError, error_code
from zslabel.sources import FILE_INDEX_STRIDE, plan_inputs

pytest_plugins = ["s3_server"]  # the `s3` fixture: moto S3 server on 127.0.0.1


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
    # One member per 512 bytes at most: a bound of the rows from the sizes alone (sizes the labeler pool).
    assert plan.rows_at_most == sum((tmp_path / f"shards-{s:03d}.tar").stat().st_size for s in range(3)) // 512 + 3
    assert plan.carried_columns == ["key", "json", "txt", "cls"]
    rows = rows_of(plan)
    assert len(rows) == 6
    for s in range(3):
        tar_uri = str(tmp_path / f"shards-{s:03d}.tar")
        first, second = [r for r in rows if r["path"].startswith(tar_uri + "#")]
        assert first["path"] == f"{tar_uri}#sample{s}0.jpg"
        assert first["data"] == imgs[f"{s}-0"] and second["data"] == imgs[f"{s}-1"]
        assert first["key"] == f"sample{s}0" and json.loads(first["json"]) == {"s": s}
        assert first["txt"] == f"caption {s}" and second["json"] is None
        assert first["cls"] == "3" and second["cls"] is None  # WebDataset's class label sidecar
        assert first["input_index"] == s * FILE_INDEX_STRIDE
        assert second["input_index"] == s * FILE_INDEX_STRIDE + 1
        assert first["read_error"] is None
    plan.finalize()
    # sidecars (.json/.txt/.cls) belong to their image's row and are not listed on their own
    assert plan.listed == 3 * 3 and plan.skipped == 3 and plan.listed == len(rows) + plan.skipped
    assert plan.skipped_by_reason == {"hidden": 3} and plan.expected_rows() == len(rows)
    assert f"{tmp_path / 'shards-000.tar'}#._sample00.jpg" in plan.skipped_examples


def test_corrupt_and_missing_tars_give_one_error_row_each(ray_local, tmp_path):
    good = make_tar(tmp_path / "p-0.tar", [("a.jpg", jpeg(1)), ("b.png", jpeg(2))])
    whole = good.read_bytes()
    write(tmp_path / "p-1.tar", whole[: 512 + 100])  # header of a.jpg, then data cut short
    write(tmp_path / "p-2.tar", b"this is not a tar archive" * 50)
    plan = plan_inputs(str(tmp_path / "p-{0..3}.tar"))  # p-3.tar does not exist
    rows = rows_of(plan)
    assert [r["path"] for r in rows[:2]] == [f"{good}#a.jpg", f"{good}#b.png"]
    errors = {r["path"]: r for r in rows[2:]}
    # p-1.tar listed a.jpg (its header is whole) before its bytes ran out: a.jpg's own row,
    # then the shard's, as for the unreadable and the missing shard.
    cut_member = f"{tmp_path / 'p-1.tar'}#a.jpg"
    assert set(errors) == {str(tmp_path / f"p-{i}.tar") for i in (1, 2, 3)} | {cut_member}
    for r in errors.values():
        assert r["data"] is None and error_code(r["read_error"]) == "read_error"
    assert "tar member cut short" in errors[cut_member]["read_error"]
    assert "FileNotFoundError" in errors[str(tmp_path / "p-3.tar")]["read_error"]
    plan.finalize()
    assert plan.listed == len(rows) + plan.skipped  # every listed member has its row


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




def _live_tally_actors() -> int:
    # Ray's GCS actor table (ray.util.state needs the dashboard, which the test Ray runs without).
    from ray._private import state

    return sum(1 for a in state.actors().values() if a["ActorClassName"] == "_Tally" and a["State"] == "ALIVE")


def test_a_tar_job_leaves_no_actor_behind_and_starts_one_labeler(ray_local, tiny_clip, tmp_path):
    """Each tar (or Parquet) input's counts are collected by a small Ray actor. It outlived its
    run: Ray Data keeps the dataset's task arguments, which hold its handle, so a process that
    runs many jobs (the Python API, this test suite: 119 near its end) kept one idle actor
    process per job, each a few % of a core. And a 2-image tar started a labeler per free CPU
    (its size was not known); now a few uncompressed shards bound their images by their size."""
    from zslabel import JobConfig
    from zslabel.pipeline import run_label_job

    make_tar(tmp_path / "s.tar", [("k0.jpg", jpeg(0)), ("k1.jpg", jpeg(1))])
    before = _live_tally_actors()
    summary = run_label_job(JobConfig(input=str(tmp_path / "s.tar"), output=str(tmp_path / "out"),
                                      labels=["a", "b"], model=str(tiny_clip), address=ray_local), progress=False)
    assert summary.labeled == 2 and summary.timings["model_actors"] == 1
    assert _live_tally_actors() <= before


def test_s3_tars_are_read_in_ray_tasks(ray_local, s3, tmp_path):
    for s in range(2):
        tar = make_tar(tmp_path / f"t{s}.tar", [(f"k{s}.jpg", jpeg(s)), (f"k{s}.txt", b"hi")])
        s3.put(f"wds/t{s}.tar", tar.read_bytes())
    plan = plan_inputs(s3.uri("wds/t{0..1}.tar"), storage_options=s3.storage_options)
    rows = rows_of(plan)
    assert [r["path"] for r in rows] == [s3.uri("wds/t0.tar#k0.jpg"), s3.uri("wds/t1.tar#k1.jpg")]
    assert [r["data"] for r in rows] == [jpeg(0), jpeg(1)] and rows[0]["txt"] == "hi"


def test_relative_shards_and_parquet_files_give_absolute_paths(tmp_path, monkeypatch):
    """Inputs named relative to the working folder: rows (``shard.tar#member``, ``file#row``)
    and the recorded input files are absolute, so report and relabel find them from anywhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "wds").mkdir()
    make_tar(tmp_path / "wds" / "a-000.tar", [("s1.jpg", jpeg(0))])
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), tmp_path / "t.parquet")
    monkeypatch.chdir(tmp_path)
    for given, path in (("wds/a-00{0..0}.tar", f"{tmp_path}/wds/a-000.tar#s1.jpg"),
                        ("./wds/a-000.tar", f"{tmp_path}/wds/a-000.tar#s1.jpg"),
                        ("t.parquet", f"{tmp_path}/t.parquet#0")):
        plan = plan_inputs(given, use_ray=False)
        rows = plan.read_locally()
        assert [r["path"] for r in rows] == [path]
        assert all(f.startswith(str(tmp_path)) for f in plan.planned_files)


@pytest.mark.parametrize("name, mode", [("s.tar.bz2", "w:bz2"), ("s.tbz2", "w:bz2"), ("s.tar.xz", "w:xz"),
                                        ("s.txz", "w:xz")])
def test_every_compression_tarfile_streams_is_a_shard(tmp_path, name, mode):
    """A folder of bzip2 or xz shards: read as shards (they were skipped as not_a_shard)."""
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / name, mode) as tar:
        info = tarfile.TarInfo("k1.jpg")
        info.size = len(jpeg(0))
        tar.addfile(info, io.BytesIO(jpeg(0)))
    plan = plan_inputs(str(tmp_path / "shards"), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert [r["data"] for r in rows] == [jpeg(0)] and plan.skipped == 0
    assert plan.rows_at_most is None  # a compressed shard's size bounds nothing


@pytest.mark.parametrize("pattern", ["s-{000,001,000}.tar", "s-00{0..1}{,}.tar", "s-00{0,0}.tar"])
def test_a_shard_the_pattern_names_twice_is_read_once(tmp_path, pattern, caplog):
    """``{000,001,000}`` names shard 000 twice: its members were read twice and counted once,
    so every run (and every --resume) failed the accounting check with exit 4. Each shard is
    read once, with a warning; the counts add up."""
    for i in range(2):
        make_tar(tmp_path / f"s-00{i}.tar", [(f"k{i}.jpg", jpeg(i))])
    with caplog.at_level("WARNING", logger="zslabel.sources.webdataset"):
        plan = plan_inputs(str(tmp_path / pattern), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert len({r["path"] for r in rows}) == len(rows) and plan.listed == len(rows)
    assert "more than once; each is read once" in caplog.text


def test_the_size_bound_of_an_empty_tar_holds_its_error_row(tmp_path):
    """An empty file named .tar is one read_error row; the bound from its size (0 bytes) was 0."""
    write(tmp_path / "empty.tar", b"")
    plan = plan_inputs(str(tmp_path / "empty.tar"), use_ray=False)
    rows = plan.read_locally()
    assert len(rows) == 1 and error_code(rows[0]["read_error"]) == "read_error"
    assert plan.rows_at_most is not None and plan.rows_at_most >= len(rows)
