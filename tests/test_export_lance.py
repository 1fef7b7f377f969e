"""zslabel export --format lance: every row and column in a Lance dataset, the embedding as a
vector column, a vector index whose nearest neighbour for an image's own embedding is that
image; index parameters for small and large tables; refusals."""

import json

import lance
import numpy as np
import pyarrow as pa
import pytest
from test_export import LABELS, write_run, zslabel

from zslabel.errors import ConfigError
from zslabel.exports.lance import export_lance, index_params


def rows_for(n, errors_every=0):
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        if errors_every and i % errors_every == 3:
            rows.append((f"/imgs/{i:06d}.jpg", None, None, "truncated: image file is truncated"))
            continue
        s = np.sort(rng.dirichlet(np.ones(len(LABELS))))[::-1][:3]
        rows.append((f"/imgs/{i:06d}.jpg", list(rng.permutation(LABELS)[:3]), [float(x) for x in s], None))
    return rows


def nearest(ds, vector, k=3, **extra):
    return ds.to_table(nearest={"column": "embedding", "q": vector, "k": k, **extra},
                       columns=["path", "input_index"]).column("input_index").to_pylist()


def test_lance_table_with_index_finds_each_image_first(tmp_path):
    rows = rows_for(300, errors_every=10)
    out, emb = write_run(tmp_path / "out", rows, dim=32, files=3, carried=("key",))
    table = tmp_path / "t.lance"
    proc = zslabel("export", out, "--format", "lance", "--output", table, "--index")
    assert proc.returncode == 0, proc.stderr
    assert "exported 300 of 300 rows" in proc.stdout and "30 error rows included" in proc.stdout
    assert "index_type=IVF_FLAT" in proc.stdout and "num_partitions=1" in proc.stdout  # 270 vectors: exact, one list
    ds = lance.dataset(str(table))
    assert ds.count_rows() == 300
    schema = ds.schema
    assert schema.field("embedding").type == pa.list_(pa.float16(), 32)
    assert schema.names == ["path", "input_index", "labels", "scores", "error", "width", "height", "key", "embedding"]
    got = ds.to_table().sort_by("input_index").to_pylist()
    for r, want in zip(got, rows):
        assert (r["path"], r["labels"], r["error"]) == (want[0], want[1], want[3])
        assert r["key"] == f"key-{r['input_index']}"
        assert (r["embedding"] is None) == (want[3] is not None)
    assert [i.field_names for i in ds.describe_indices()] == [["embedding"]]
    for i in (0, 1, 57, 299):
        assert nearest(ds, emb[i])[0] == i
    # the vector column round-trips the stored float16 values
    assert np.array(got[57]["embedding"], np.float32) == pytest.approx(emb[57])


def test_large_table_uses_pq_and_refine_finds_self(tmp_path):
    rows = rows_for(12_000)
    out, emb = write_run(tmp_path / "out", rows, dim=16, files=2)
    res = export_lance(str(out), str(tmp_path / "t.lance"), index=True)
    assert "index_type=IVF_PQ" in res.notes[-1] and "num_partitions=46" in res.notes[-1]  # 12,000 // 256
    ds = lance.dataset(str(tmp_path / "t.lance"))
    for i in (5, 7777):
        assert nearest(ds, emb[i], refine_factor=10, nprobes=4)[0] == i


def test_index_parameters():
    assert index_params(20, 512) == {"index_type": "IVF_FLAT", "metric": "cosine", "num_partitions": 1}
    assert index_params(5_000, 512)["num_partitions"] == 19                         # 5,000 // 256
    big = index_params(1_000_000, 512)
    assert big == {"index_type": "IVF_PQ", "metric": "cosine", "num_partitions": 1000, "num_sub_vectors": 32}
    assert index_params(1_000_000, 768)["num_sub_vectors"] == 48
    assert index_params(50_000, 12)["num_sub_vectors"] == 3                         # 12 / 4
    assert index_params(50_000, 7)["num_sub_vectors"] == 1
    with pytest.raises(ConfigError, match="must divide the embedding dimension 512"):
        index_params(50_000, 512, num_sub_vectors=30)
    with pytest.raises(ConfigError, match="--index-type must be one of"):
        index_params(50, 8, "HNSW")


def test_refusals_and_overwrite(tmp_path):
    out, _ = write_run(tmp_path / "out", rows_for(20))                             # no --store-embeddings
    table = tmp_path / "t.lance"
    proc = zslabel("export", out, "--format", "lance", "--output", table, "--index")
    assert proc.returncode == 2
    assert "--index needs image embeddings" in proc.stderr and "--store-embeddings" in proc.stderr
    assert not table.exists()
    # without --index the rows still export
    assert zslabel("export", out, "--format", "lance", "--output", table).returncode == 0
    assert lance.dataset(str(table)).count_rows() == 20
    proc = zslabel("export", out, "--format", "lance", "--output", table)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    proc = zslabel("export", out, "--format", "lance", "--output", table, "--overwrite")
    assert proc.returncode == 0 and lance.dataset(str(table)).count_rows() == 20
    proc = zslabel("export", out, "--format", "lance", "--output", table, "--overwrite", "--limit", "3")
    assert proc.returncode == 2 and "--limit is an option of --format label-studio, not lance" in proc.stderr
    manifest = json.loads((out / "_run_manifest.json").read_text())
    assert manifest["run_id"]


def test_overwrite_never_writes_into_a_folder_of_other_files(tmp_path):
    """--overwrite replaces a Lance dataset or fills an empty folder; a folder holding a user's
    files (or the run itself, or a plain file) is refused and left as it was."""
    out, _ = write_run(tmp_path / "out", rows_for(5))
    before = sorted(p.name for p in out.iterdir())
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.txt").write_text("mine")
    plain = tmp_path / "notes.lance"
    plain.write_text("not a dataset")
    refusals = {photos: "--overwrite replaces only an earlier Lance dataset or an empty folder",
                plain: "--overwrite replaces only an earlier Lance dataset or an empty folder",
                out: "is inside the zslabel output"}
    for target, message in refusals.items():
        proc = zslabel("export", out, "--format", "lance", "--output", target, "--overwrite")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert sorted(p.name for p in photos.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in out.iterdir()) == before and plain.read_text() == "not a dataset"
    proc = zslabel("export", out, "--format", "lance", "--output", plain / "t.lance")   # under a plain file
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot write Lance dataset" in proc.stderr and ".rs:" not in proc.stderr, proc.stderr
    empty = tmp_path / "empty.lance"
    empty.mkdir()
    proc = zslabel("export", out, "--format", "lance", "--output", empty, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert lance.dataset(str(empty)).count_rows() == 5


def test_unreadable_run_file_fails_cleanly(tmp_path):
    """A damaged Parquet file half-way: exit 2 naming it, and no half-written table left behind."""
    out, _ = write_run(tmp_path / "out", rows_for(40), dim=8, files=4)
    victim = sorted(out.glob("*.parquet"))[2]
    victim.write_bytes(victim.read_bytes()[:100])
    table = tmp_path / "t.lance"
    proc = zslabel("export", out, "--format", "lance", "--output", table)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"zslabel: error: cannot read {victim}")
    assert not table.exists()
    proc = zslabel("export", out, "--format", "label-studio", "--output", tmp_path / "t.json")
    assert proc.returncode == 2 and f"cannot read {victim}" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_carried_columns_with_a_dot_are_renamed_for_lance(tmp_path):
    """Lance refuses a top-level name holding '.' (lance#816): a JSONL key ``a.b`` carried to
    the output failed the export after the whole run. It is written as ``a_b`` (``a_b_2`` when
    ``a_b`` is taken), and the summary says so."""
    out, _ = write_run(tmp_path / "out", rows_for(5), carried=("a.b", "a_b"))
    table = tmp_path / "t.lance"
    proc = zslabel("export", out, "--format", "lance", "--output", table)
    assert proc.returncode == 0, proc.stderr
    assert "columns renamed for Lance: 'a.b' -> 'a_b_2'" in proc.stdout
    got = lance.dataset(str(table)).to_table().sort_by("input_index").to_pylist()
    assert [(r["a_b_2"], r["a_b"]) for r in got] == [(f"a.b-{i}", f"a_b-{i}") for i in range(5)]
