"""The real pipeline reading from and writing to a real S3 API (moto's server on 127.0.0.1):
folder, manifest and WebDataset inputs, a checkpoint loaded from S3, output written to S3."""

import io
import json
import tarfile

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import photo
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures)

from zslabel import JobConfig, run_label_job
from zslabel.store import MANIFEST_NAME

LABELS = ["cat", "dog", "bird"]


def png_bytes(seed, w=30, h=20):
    buf = io.BytesIO()
    photo(w, h, seed).save(buf, "PNG")
    return buf.getvalue()


def read_output(s3, prefix):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    root = f"{s3.bucket}/{prefix}"
    table = pq.read_table(root, filesystem=fs)
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST_NAME}"))
    return table.to_pylist(), manifest


@pytest.fixture
def s3_model(s3, tiny_clip):
    for f in tiny_clip.iterdir():
        s3.put(f"models/tiny/{f.name}", f.read_bytes())
    return s3.uri("models/tiny")


def test_folder_on_s3_with_model_and_output_on_s3(s3, s3_model, ray_local):
    for i in range(6):
        s3.put(f"images/{'a' if i % 2 else 'b'}/img {i}.png", png_bytes(i))
    s3.put("images/a/img 1.png".replace("img 1", "same_name"), png_bytes(9))
    s3.put("images/b/same_name.png", png_bytes(10))
    s3.put("images/broken.jpg", b"not a jpeg")
    s3.put("images/notes.txt", b"skip me")
    summary = run_label_job(JobConfig(
        input=s3.uri("images/"), output=s3.uri("out/"), labels=LABELS, model=s3_model,
        storage_options=s3.storage_options, top_k=2))
    rows, manifest = read_output(s3, "out")
    paths = sorted(r["path"] for r in rows)
    assert len(rows) == 9 == summary.rows and summary.skipped == 1
    assert s3.uri("images/a/same_name.png") in paths and s3.uri("images/b/same_name.png") in paths
    assert s3.uri("images/a/img 1.png") in paths
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert list(errors) == [s3.uri("images/broken.jpg")]
    assert manifest["model"]["id"] == s3_model and manifest["counts"]["rows"] == 9
    # Storage credentials never reach the run manifest.
    assert set(manifest["config"]["storage_options"].values()) == {"<redacted>"}


def test_manifest_and_tars_on_s3(s3, s3_model, ray_local):
    uris = [s3.put(f"pool/{i}.png", png_bytes(i)) for i in range(4)]
    s3.put("lists/manifest.txt", ("\n".join(uris + [uris[0], s3.uri("pool/missing.png")]) + "\n").encode())
    summary = run_label_job(JobConfig(
        input=s3.uri("lists/manifest.txt"), output=s3.uri("out_manifest/"), labels=LABELS,
        model=s3_model, storage_options=s3.storage_options))
    rows, _ = read_output(s3, "out_manifest")
    assert summary.rows == 6 and len({r["input_index"] for r in rows}) == 6  # duplicate URI: two rows
    assert summary.errors_by_code == {"read_error": 1}

    for shard in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k in range(3):
                for name, data in ((f"s{shard}_{k}.png", png_bytes(shard * 3 + k)),
                                   (f"s{shard}_{k}.json", json.dumps({"k": k}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        s3.put(f"shards/train-{shard:03d}.tar", buf.getvalue())
    summary = run_label_job(JobConfig(
        input=s3.uri("shards/train-{000..001}.tar"), output=s3.uri("out_tars/"), labels=LABELS,
        model=s3_model, storage_options=s3.storage_options))
    rows, _ = read_output(s3, "out_tars")
    assert summary.rows == 6 == summary.labeled
    assert s3.uri("shards/train-001.tar") + "#s1_2.png" in {r["path"] for r in rows}
