"""Input kind parquet: img2dataset-style Parquet files of image bytes, read in Ray tasks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from source_files import check_plan, jpeg, rows_of, serving, silently_short_parquet, write

from zslabel.errors import InputError, error_code
from zslabel.sources import FILE_INDEX_STRIDE, plan_inputs

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
    # the stats file beside the shards is listed and skipped; every Parquet row is a row
    assert plan.finalize().listed == 5 and plan.skipped_by_reason == {"not_a_shard": 1}
    assert plan.expected_rows() == len(rows)
    assert plan.rows_at_most == len(rows)  # the footers' counts: they size the labeler pool

    single = plan_inputs(str(folder / "00001.parquet"))
    assert single.kind == "parquet" and rows_of(single)[0]["data"] == jpeg(4)
    with pytest.raises(InputError, match="image column 'png' not found"):
        plan_inputs(str(folder / "00001.parquet"), image_column="png")


def test_corrupt_parquet_shard_is_an_error_row(ray_local, tmp_path):
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), tmp_path / "a.parquet")
    write(tmp_path / "b.parquet", b"PAR1 garbage PAR1")
    plan = plan_inputs(str(tmp_path / "*.parquet"), input_format="parquet")
    rows = rows_of(plan)
    assert plan.rows_at_most == 2  # one row in a's footer, one read_error row for b
    assert rows[0]["path"] == f"{tmp_path / 'a.parquet'}#0" and rows[0]["data"] == jpeg(1)
    assert rows[1]["path"] == str(tmp_path / "b.parquet")
    assert error_code(rows[1]["read_error"]) == "read_error"


def test_spark_style_folder_named_like_a_parquet_file(ray_local, tmp_path):
    folder = tmp_path / "table.parquet"  # Spark / Dask write datasets as "name.parquet/" folders
    folder.mkdir()
    pq.write_table(pa.table({"jpg": [jpeg(1)]}), folder / "part-00000.parquet")
    pq.write_table(pa.table({"jpg": [jpeg(2)]}), folder / "part-00001.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    plan = plan_inputs(str(folder))
    assert plan.kind == "parquet"
    assert [r["data"] for r in rows_of(plan)] == [jpeg(1), jpeg(2)]


def test_a_folder_mixing_image_columns_reads_each_files_own(tmp_path):
    """img2dataset's ``jpg`` column in one file, a Hugging Face ``image`` struct in the next: the
    column picked from the first file's schema was applied to every file, and each row of the
    second became an internal_error (KeyError). Each file now finds its own image column; a
    file with none is one read_error row naming its columns; a column the user named is never
    swapped for another."""
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"jpg": [jpeg(0), jpeg(1)], "caption": ["a", "b"]}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"image": pa.array([{"bytes": jpeg(2), "path": "x.jpg"}], struct)}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"other": [1, 2, 3]}), tmp_path / "2.parquet")
    plan = plan_inputs(str(tmp_path), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert [r["data"] for r in rows[:3]] == [jpeg(0), jpeg(1), jpeg(2)]
    assert [r["caption"] for r in rows[:3]] == ["a", "b", None]
    assert all(r["read_error"] is None for r in rows[:3])
    assert rows[3]["path"] == str(tmp_path / "2.parquet") and rows[3]["data"] is None
    assert error_code(rows[3]["read_error"]) == "read_error" and "no image column 'jpg' (columns: other)" in rows[3]["read_error"]
    assert plan.listed == len(rows) == 4

    named = plan_inputs(str(tmp_path), use_ray=False, image_column="jpg")
    rows = named.read_locally()
    assert [r["data"] for r in rows[:2]] == [jpeg(0), jpeg(1)]
    assert [error_code(r["read_error"]) for r in rows[2:]] == ["read_error", "read_error"]
    assert "no image column 'jpg'" in rows[2]["read_error"]


def test_a_damaged_row_group_costs_only_its_own_rows(tmp_path):
    """A page of the middle row group overwritten (a bad disk block, a partial upload of a
    part): its two rows are read_error rows, named and counted from the footer, and the row
    groups after it are read (before, the rest of the file after the damage was one file-level
    error row, and the images of the later row groups were never labeled)."""
    f = tmp_path / "x.parquet"
    pq.write_table(pa.table({"jpg": [jpeg(i) for i in range(6)], "caption": [str(i) for i in range(6)]}), f,
                   row_group_size=2, compression="zstd")
    chunk = pq.ParquetFile(f).metadata.row_group(1).column(0)  # the image column's pages
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    damaged = bytearray(f.read_bytes())
    damaged[start + 20: start + chunk.total_compressed_size - 5] = b"\xab" * (chunk.total_compressed_size - 25)
    f.write_bytes(bytes(damaged))
    plan = plan_inputs(str(f), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert [r["path"] for r in rows] == [f"{f}#{i}" for i in range(6)]
    assert [r["input_index"] for r in rows] == list(range(6)) and plan.listed == 6
    assert [r["data"] for r in rows] == [jpeg(0), jpeg(1), None, None, jpeg(4), jpeg(5)]
    assert [r["caption"] for r in rows] == ["0", "1", None, None, "4", "5"]
    for r in rows[2:4]:
        assert error_code(r["read_error"]) == "read_error" and "parquet row group 1: " in r["read_error"]


def test_the_schema_comes_from_the_first_readable_file(tmp_path):
    """A folder whose first file is cut short: that file is one read_error row and the others
    are labeled (its schema used to decide the job, and the whole job failed). A folder of
    nothing but unreadable files is refused up front, naming how many."""
    pq.write_table(pa.table({"jpg": [jpeg(0), jpeg(1)]}), tmp_path / "b.parquet")
    cut = tmp_path / "a.parquet"
    cut.write_bytes((tmp_path / "b.parquet").read_bytes()[:-30])
    plan = plan_inputs(str(tmp_path), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert [r["path"] for r in rows] == [str(cut), f"{tmp_path / 'b.parquet'}#0", f"{tmp_path / 'b.parquet'}#1"]
    assert error_code(rows[0]["read_error"]) == "read_error" and [r["data"] for r in rows[1:]] == [jpeg(0), jpeg(1)]
    assert plan.listed == 3
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="none of the 2 Parquet files can be read; the first: cannot read Parquet "
                                         f"file {cut}"):
        plan_inputs(str(tmp_path), use_ray=False)


def test_a_file_whose_image_column_holds_no_bytes_is_its_read_error_row(tmp_path):
    """A folder where one file's ``jpg`` column is list<binary>: that file is one read_error
    row naming the type (it was an internal_error row, "please report it"), the others are read."""
    pq.write_table(pa.table({"jpg": [jpeg(0)]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"jpg": pa.array([[jpeg(1)]], pa.list_(pa.binary()))}), tmp_path / "b.parquet")
    plan = plan_inputs(str(tmp_path), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert rows[0]["data"] == jpeg(0) and rows[0]["read_error"] is None
    assert rows[1]["path"] == str(tmp_path / "b.parquet")
    assert error_code(rows[1]["read_error"]) == "read_error" and "is list<element: binary>, not binary" in rows[1]["read_error"]
    assert plan.listed == 2


def test_carried_columns_and_paths_of_every_file(tmp_path):
    """Parts written with and without ``url``/``caption`` (img2dataset runs that differ): the
    columns came from the first file's schema only, so the later files' urls and captions were
    dropped and their rows' path changed (``FILE#ROW`` instead of the url) with the company a
    file kept. Now every file's columns are carried (null where a file lacks one) and a row's
    path is the same as when its file is read alone."""
    pq.write_table(pa.table({"jpg": [jpeg(0)], "key": ["000"]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"jpg": [jpeg(1)], "key": ["001"], "url": ["http://x/1.jpg"],
                             "caption": ["a red circle"]}), tmp_path / "00001.parquet")
    plan = plan_inputs(str(tmp_path), use_ray=False)
    rows = plan.read_locally()
    assert plan.carried_columns == ["key", "url", "caption"]
    assert [(r["path"], r["key"], r["url"], r["caption"]) for r in rows] == [
        (f"{tmp_path / '00000.parquet'}#0", "000", None, None), ("http://x/1.jpg", "001", "http://x/1.jpg", "a red circle")]
    alone = plan_inputs(str(tmp_path / "00001.parquet"), use_ray=False).read_locally()
    assert alone[0]["path"] == rows[1]["path"]


def test_an_image_struct_path_is_relative_to_its_files_folder_even_with_a_hash(tmp_path):
    """A Hugging Face image struct with null bytes and a relative path, in a folder named with
    ``#``: the folder was cut at the ``#``, so the row read another file of the same name in
    the parent folder (a wrong label, no error), or none."""
    folder = tmp_path / "p#h"
    folder.mkdir()
    write(folder / "side.jpg", jpeg(1))
    write(tmp_path / "side.jpg", jpeg(2))  # the look-alike in the parent folder
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "side.jpg"}], struct)}), folder / "hf.parquet")
    rows = plan_inputs(str(folder / "hf.parquet"), use_ray=False).read_locally()
    assert rows[0]["path"] == str(folder / "side.jpg")


@pytest.mark.parametrize("layout", ["dictionary", "fixed_size"])
def test_image_bytes_in_a_dictionary_or_fixed_size_column_are_read(tmp_path, layout):
    """A ``jpg`` column written from a pandas Categorical (dictionary of binary) or as
    ``fixed_size_binary``: one read_error row for the whole file ("not binary"); each image is
    its own row now, as with plain binary."""
    images = [jpeg(0), jpeg(0), jpeg(1)] if layout == "dictionary" else [jpeg(0)] * 3
    column = (pa.array(images).dictionary_encode() if layout == "dictionary"
              else pa.array(images, pa.binary(len(jpeg(0)))))
    pq.write_table(pa.table({"jpg": column, "caption": ["a", "b", "c"]}), tmp_path / "x.parquet")
    plan = plan_inputs(str(tmp_path / "x.parquet"), use_ray=False)
    rows = plan.read_locally()
    assert [r["data"] for r in rows] == images and all(r["read_error"] is None for r in rows)
    assert [r["caption"] for r in rows] == ["a", "b", "c"]


def test_a_row_group_that_ends_early_without_an_error_is_read_error_rows(tmp_path):
    """pyarrow can end a damaged group's batches without raising: the footer's row count still
    holds, the missing row is a read_error row naming its group, the next group is read."""
    f = silently_short_parquet(tmp_path / "x.parquet", [jpeg(0), jpeg(1)])
    plan = plan_inputs(str(f), use_ray=False)
    rows = plan.read_locally()
    check_plan(plan, rows)
    assert [r["path"] for r in rows] == [f"{f}#0", f"{f}#1"]
    assert error_code(rows[0]["read_error"]) == "read_error"
    assert "parquet row group 0: gave 0 of its 1 rows" in rows[0]["read_error"]
    assert rows[1]["read_error"] is None and rows[1]["data"] == jpeg(1)


@pytest.mark.parametrize("kind", [pa.large_binary(), pa.binary_view()])
def test_a_batch_of_more_image_bytes_than_one_binary_array_holds(tmp_path, monkeypatch, kind):
    """Polars writes large_binary: 64 images of 36 MB in one batch (2.3 GB, each image under
    the per-input limit) failed the cast to binary, and every row of the batch became an
    internal_error. Now the batch is cut into arrays that fit (the limit made small here)."""
    from zslabel.sources import parquet

    monkeypatch.setattr(parquet, "BINARY_ARRAY_BYTES", 3 * len(jpeg(0)))
    images = [jpeg(i % 3) for i in range(10)]
    pq.write_table(pa.table({"jpg": pa.array(images, kind)}), tmp_path / "x.parquet")
    plan = plan_inputs(str(tmp_path / "x.parquet"), use_ray=False)
    rows = plan.read_locally()
    check_plan(plan, rows)
    assert [r["data"] for r in rows] == images and all(r["read_error"] is None for r in rows)


def test_a_column_of_image_lists_says_what_to_do(tmp_path):
    """A Hugging Face Sequence(Image()) column (VLM datasets: several images per row) was read
    as a manifest and refused with "no path column ... --path-column"; the refusal now names the
    list column and says to flatten it."""
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"images": pa.array([[{"bytes": jpeg(0), "path": None}], []], pa.list_(struct)),
                      "question": ["q1", "q2"]})
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(InputError, match=r"column 'images' holds a list of images per row .*flatten that column"):
        plan_inputs(str(tmp_path / "train.parquet"), use_ray=False)


def _url(i: int) -> str:
    return f"http://example.invalid/{i}.jpg"


def test_a_first_shard_without_image_bytes_does_not_make_the_folder_a_manifest(tmp_path):
    """img2dataset shards whose first one had every download fail: pandas writes its all-None
    ``jpg`` column as type null (or a writer stored "" as string). The first file's schema
    alone made the whole folder a manifest of ``url``: the later shards' stored bytes were
    ignored and every row re-downloaded. Now each file is read from its own image column; a
    shard whose image column holds no bytes gives one read_error row per row (as null cells of
    a binary column do), path = its url; a file alone with a null-typed ``jpg`` is no manifest."""
    for first in (pa.table({"jpg": pa.array([None, None]), "url": [_url(0), _url(1)]}),
                  pa.table({"jpg": pa.array(["", None]), "url": [_url(0), _url(1)]})):
        folder = tmp_path / str(first.schema.field("jpg").type)
        folder.mkdir()
        pq.write_table(first, folder / "000.parquet")
        pq.write_table(pa.table({"jpg": [jpeg(2), jpeg(3)], "url": [_url(2), _url(3)]}), folder / "001.parquet")
        for uri in (str(folder), str(folder / "*.parquet")):
            plan = plan_inputs(uri, use_ray=False)
            rows = plan.read_locally()
            check_plan(plan, rows)
            assert plan.kind == "parquet" and [r["path"] for r in rows] == [_url(i) for i in range(4)]
            assert [r["data"] for r in rows] == [None, None, jpeg(2), jpeg(3)]
            assert [error_code(r["read_error"]) for r in rows[:2]] == ["read_error", "read_error"]
            assert "no bytes in column 'jpg'" in rows[0]["read_error"] and rows[2]["read_error"] is None
    alone = plan_inputs(str(tmp_path / "null" / "000.parquet"), use_ray=False)
    rows = alone.read_locally()
    assert alone.kind == "parquet" and [error_code(r["read_error"]) for r in rows] == ["read_error"] * 2
    # a first file without any image column: the others are still read from their own bytes
    folder = tmp_path / "missing"
    folder.mkdir()
    pq.write_table(pa.table({"url": [_url(0), _url(1)], "status": ["failed", "failed"]}), folder / "000.parquet")
    pq.write_table(pa.table({"jpg": [jpeg(2)], "url": [_url(2)]}), folder / "001.parquet")
    plan = plan_inputs(str(folder), use_ray=False)
    rows = plan.read_locally()
    assert plan.kind == "parquet" and rows[-1]["path"] == _url(2) and rows[-1]["data"] == jpeg(2)


@pytest.mark.parametrize("columns", [
    {"img_bytes": "image", "url": [_url(0)]},
    {"image_bytes": "image", "label": [1]},
    {"JPG": "image"},
    {"jpg": "list<uint8>"},
    {"Photo": "image", "url": [_url(0)], "md5": ["x"]},
])
def test_an_image_column_is_found_by_any_case_hint_or_byte_list(tmp_path, columns):
    """A binary column named ``img_bytes``/``image_bytes``/``JPG``, or bytes stored as
    ``list<uint8>`` (HF ``Sequence(Value('uint8'))``): beside a ``url`` column the file was read
    as a manifest of its URLs (stored bytes ignored), else refused with "--path-column". Now
    such a column is the image column; a lone binary column beside url is refused (not a
    manifest) unless its name says images."""
    table = {}
    for name, value in columns.items():
        if value == "image":
            table[name] = pa.array([jpeg(0)])
        elif value == "list<uint8>":
            table[name] = pa.array([list(jpeg(0))], pa.list_(pa.uint8()))
        else:
            table[name] = value
    pq.write_table(pa.table(table), tmp_path / "x.parquet")
    if "Photo" in columns:  # no name hint: in doubt, refused naming the flag and the column
        with pytest.raises(InputError, match=r"binary column.*'Photo'.*--image-column"):
            plan_inputs(str(tmp_path / "x.parquet"), use_ray=False)
        rows = plan_inputs(str(tmp_path / "x.parquet"), use_ray=False, image_column="photo").read_locally()
    else:
        plan = plan_inputs(str(tmp_path / "x.parquet"), use_ray=False)
        assert plan.kind == "parquet"
        rows = plan.read_locally()
    assert [r["data"] for r in rows] == [jpeg(0)] and rows[0]["read_error"] is None


def test_unclear_image_columns_are_refused_naming_the_flag(tmp_path):
    """Two binary columns whose names both say images, or no image column and no path column:
    the refusal names --image-column (and the binary columns), not only --path-column."""
    pq.write_table(pa.table({"image_bytes": [jpeg(0)], "thumb_bytes": [jpeg(1)]}), tmp_path / "two.parquet")
    with pytest.raises(InputError, match=r"'image_bytes', 'thumb_bytes'.*--image-column"):
        plan_inputs(str(tmp_path / "two.parquet"), use_ray=False)
    rows = plan_inputs(str(tmp_path / "two.parquet"), use_ray=False, image_column="thumb_bytes").read_locally()
    assert rows[0]["data"] == jpeg(1)
    pq.write_table(pa.table({"name": ["a"], "label": [1]}), tmp_path / "none.parquet")
    with pytest.raises(InputError, match=r"--image-column.*--path-column"):
        plan_inputs(str(tmp_path / "none.parquet"), use_ray=False)


def test_each_row_takes_its_image_from_the_extension_column_holding_it(tmp_path):
    """WebDataset converted to Parquet keeps one column per extension (``jpg``, ``png``), each
    row's bytes in the column of its format: every PNG row was "no bytes in column 'jpg'". A
    row now takes the first non-null of the file's extension columns; a row with none is a
    read_error row."""
    pq.write_table(pa.table({"jpg": pa.array([jpeg(0), None, None]), "png": pa.array([None, jpeg(1), None]),
                             "__key__": ["a", "b", "c"]}), tmp_path / "mixed.parquet")
    plan = plan_inputs(str(tmp_path / "mixed.parquet"), use_ray=False)
    rows = plan.read_locally()
    check_plan(plan, rows)
    assert [r["data"] for r in rows] == [jpeg(0), jpeg(1), None]
    assert rows[1]["read_error"] is None and error_code(rows[2]["read_error"]) == "read_error"
    # a column the user names is the only one read
    named = plan_inputs(str(tmp_path / "mixed.parquet"), use_ray=False, image_column="jpg").read_locally()
    assert [r["data"] for r in named] == [jpeg(0), None, None]


def test_parquet_files_named_otherwise_are_read(tmp_path):
    """``.parq`` and ``.pq`` are Parquet names too (fastparquet, modin), and Athena writes its
    output without any extension: they were "no images found ... not_an_image", and even
    ``--input-format parquet`` said "no Parquet files found". Now the names are detected, and
    with ``--input-format parquet`` any file (or a folder's files) is read as Parquet; a
    manifest without an extension is told to be Parquet by its magic bytes, not read as text."""
    table = pa.table({"jpg": [jpeg(0), jpeg(1)], "key": ["a", "b"]})
    (tmp_path / "named").mkdir()
    for name in ("a.parq", "b.pq"):
        pq.write_table(table, tmp_path / "named" / name)
    plan = plan_inputs(str(tmp_path / "named"), use_ray=False)
    assert plan.kind == "parquet" and len(plan.read_locally()) == 4
    assert plan_inputs(str(tmp_path / "named" / "b.pq"), use_ray=False).kind == "parquet"
    athena = tmp_path / "athena"
    athena.mkdir()
    pq.write_table(table, athena / "20261205_123456_00001_abcde")
    for uri in (athena, athena / "20261205_123456_00001_abcde"):
        rows = plan_inputs(str(uri), use_ray=False, input_format="parquet").read_locally()
        assert [r["data"] for r in rows] == [jpeg(0), jpeg(1)]
    (tmp_path / "img.jpg").write_bytes(jpeg(2))
    pq.write_table(pa.table({"url": [str(tmp_path / "img.jpg")]}), tmp_path / "list")  # no extension, no images
    rows = plan_inputs(str(tmp_path / "list"), use_ray=False, input_format="manifest").read_locally()
    assert [r["path"] for r in rows] == [str(tmp_path / "img.jpg")]


def _save_to_disk_split(folder, images: list[bytes], labels: list[int], batch_rows: int = 2) -> None:
    """One split as Hugging Face ``datasets``' ``save_to_disk`` writes it: an Arrow IPC *stream*
    ``data-00000-of-00001.arrow`` whose schema carries the ``huggingface`` features metadata
    (``image``: ``Image()``, stored as ``struct<bytes, path>``), beside ``dataset_info.json`` and
    ``state.json``."""
    import json

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
    schema = pa.schema([("image", struct), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], struct),
                      "label": labels}, schema=schema)
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_a_hugging_face_save_to_disk_folder_is_read_row_by_row(tmp_path):
    """``DatasetDict.save_to_disk(DIR)`` (a folder per split of Arrow IPC streams): it was "no
    images found" with a hint to convert it to Parquet. Each row of each split is one input,
    named ``FILE#ROW``; the JSON files beside them are counted as skipped, not lost."""
    import json

    root = tmp_path / "ds"
    _save_to_disk_split(root / "train", [jpeg(i) for i in range(5)], [0, 1, 0, 1, 1])
    _save_to_disk_split(root / "test", [jpeg(10), jpeg(11)], [1, 0])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    plan = plan_inputs(str(root), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    test_file, train_file = (root / s / "data-00000-of-00001.arrow" for s in ("test", "train"))
    assert [r["path"] for r in rows] == [f"{test_file}#{i}" for i in range(2)] + [f"{train_file}#{i}" for i in range(5)]
    assert [r["data"] for r in rows] == [jpeg(10), jpeg(11)] + [jpeg(i) for i in range(5)]
    assert all(r["read_error"] is None for r in rows)
    assert plan.kind == "parquet" and plan.listed == 7 + 5 and plan.skipped_by_reason == {"not_a_shard": 5}
    # One split's file named alone: the same rows.
    alone = plan_inputs(str(train_file), use_ray=False).read_locally()
    assert [r["data"] for r in alone] == [jpeg(i) for i in range(5)]


def test_an_arrow_file_in_the_ipc_file_format_and_one_cut_short(tmp_path):
    """The IPC *file* format (``pyarrow.feather``/``ipc.new_file``) reads as the stream does. A
    stream cut mid-batch (a partial copy) keeps the rows of the batches before the cut and makes
    the rest of the file one ``read_error`` row: its row count is unknown (no footer)."""
    table = pa.table({"jpg": [jpeg(i) for i in range(6)], "key": [f"k{i}" for i in range(6)]})
    as_file = tmp_path / "f.arrow"
    with pa.OSFile(str(as_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    rows = plan_inputs(str(as_file), use_ray=False).read_locally()
    assert [r["data"] for r in rows] == [jpeg(i) for i in range(6)] and [r["key"] for r in rows] == table["key"].to_pylist()

    stream = tmp_path / "cut.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    whole = stream.read_bytes()
    stream.write_bytes(whole[:len(whole) * 3 // 4])  # the last batch cut
    plan = plan_inputs(str(stream), use_ray=False)
    rows = plan.read_locally()
    plan.finalize()
    assert [r["data"] for r in rows[:4]] == [jpeg(i) for i in range(4)]
    assert len(rows) == 5 and rows[4]["path"] == str(stream) and rows[4]["input_index"] == 4
    assert error_code(rows[4]["read_error"]) == "read_error" and "arrow" in rows[4]["read_error"]
    assert plan.listed == 5


def test_an_arrow_file_without_image_column_is_refused_in_one_line(tmp_path):
    """An Arrow file of paths is no manifest kind: a refusal naming its columns and what to do,
    not a manifest parser reading Arrow bytes as text."""
    f = tmp_path / "paths.arrow"
    table = pa.table({"path": ["a.jpg", "b.jpg"]})
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(InputError, match=r"no image column in .*paths\.arrow .*columns: path; .*write it as Parquet or CSV"):
        plan_inputs(str(f), use_ray=False)


def test_a_parquet_file_served_gzip_encoded_says_why_it_cannot_be_read(tmp_path):
    """A server that sends a Parquet file with ``Content-Encoding: gzip`` (nginx ``gzip_types``
    set too widely): fsspec can only stream it (fsspec/filesystem_spec#1319) and Parquet needs
    seeks. The refusal said "ValueError: Cannot seek streaming HTTP file" and nothing more; it
    now says why and what to do. The same file served as is reads."""
    import gzip
    import http.server
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table({"jpg": [jpeg(1), jpeg(2)]}), buf)
    body = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, head: bool):
            data = gzip.compress(body) if self.path.startswith("/enc") else body
            self.send_response(200)
            if self.path.startswith("/enc"):
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def do_GET(self):
            self._answer(False)

        def do_HEAD(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    with serving(Handler) as base:
        rows = plan_inputs(f"{base}/plain.parquet", use_ray=False).read_locally()
        assert [r["data"] for r in rows] == [jpeg(1), jpeg(2)]
        with pytest.raises(InputError, match=r"cannot read Parquet file .*/enc\.parquet: ValueError: Cannot seek "
                                             r"streaming HTTP file \(the server sends this file compressed "
                                             r"\(Content-Encoding\) or without its size"):
            plan_inputs(f"{base}/enc.parquet", use_ray=False)


def test_strings_that_are_not_utf8_make_a_damaged_group_not_an_unreadable_output(tmp_path):
    """pyarrow reads Parquet string pages and Arrow IPC string buffers without checking their
    UTF-8: a damaged caption gave a carried string that no reader of the output could decode
    (``UnicodeDecodeError`` on reading the rows back; found by the damaged-Parquet property).
    Such a batch is a damaged one: its rows are ``read_error`` rows, the others intact."""
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\1\0\0\0"), pa.py_buffer(b"\x80")])
    good = pa.array(["fine"])
    tables = [pa.table({"jpg": [jpeg(i)], "caption": c}) for i, c in enumerate([good, bad])]
    for name in ("x.parquet", "x.arrow"):
        f = tmp_path / name
        if name.endswith(".parquet"):
            with pq.ParquetWriter(f, tables[0].schema) as w:
                for t in tables:
                    w.write_table(t)  # one row group each
        else:
            with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, tables[0].schema) as w:
                for t in tables:
                    w.write_table(t)  # one record batch each
        plan = plan_inputs(str(f), use_ray=False)
        rows = plan.read_locally()  # raised UnicodeDecodeError
        check_plan(plan, rows)
        assert rows[0]["caption"] == "fine" and rows[0]["data"] == jpeg(0), name
        assert error_code(rows[1]["read_error"]) == "read_error" and "UTF8" in rows[1]["read_error"], name
