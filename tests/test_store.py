"""The output store on its own, without Ray or a model: the claim (one run per output, on a
local folder and on a real S3 API), --overwrite deleting only the store's own files, the commit's
ownership and accounting checks, and the lifecycle as a command runs it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures)

from zslabel.errors import OutputError
from zslabel.store import (
    MANIFEST_NAME,
    Accounting,
    AccountingError,
    OutputInUse,
    OutputStore,
    fingerprint_digest,
    is_store_file,
    write_block,
)
from zslabel.store.claim import CLAIM_RECORD, acquire, claim_is_stale
from zslabel.store.layout import inspect_output

FIELDS = {"labels": ["cat", "dog"], "top_k": 1}


def rows(idx, errors=None):
    return pa.table({"path": [f"img{i}.png" for i in idx], "input_index": pa.array(idx, pa.int64()),
                     "error": pa.array(errors or [None] * len(idx), pa.string())})


def run_once(uri, idx, mode="error", fields=FIELDS, storage_options=None, listed=None):
    """A whole run through the store: check, claim, begin, one write, counts, commit."""
    store = OutputStore.open(uri, storage_options)
    store.check(mode)
    try:
        session = store.begin(mode, fields)
        if len(idx):
            write_block(rows(idx), session.target)
        counts = session.counts()
        Accounting(len(idx) if listed is None else listed).check(uri, counts.rows)
        session.commit({"counts": {"rows": counts.rows}})
    finally:
        store.release()
    return session


def test_a_second_run_is_refused_in_one_line_naming_the_first(tmp_path):
    out = str(tmp_path / "out")
    first = OutputStore.open(out)
    first.check("error")
    first.claim("error")
    try:
        second = OutputStore.open(out)
        with pytest.raises(OutputInUse) as err:
            second.check("error")
        assert first.run_id in str(err.value) and "\n" not in str(err.value)
        # Also for the modes that take over an unfinished run: a live one is never taken over.
        for mode in ("resume", "overwrite"):
            with pytest.raises(OutputInUse, match=first.run_id):
                OutputStore.open(out).check(mode)
        # Racing past the first look (both saw an empty output): the exclusive create decides.
        with pytest.raises(OutputInUse, match=first.run_id):
            second.claim("error")
    finally:
        first.release()
    assert not os.path.exists(out)  # a claim that wrote nothing leaves nothing behind


def test_a_second_ctrl_c_during_the_clean_up_still_gives_up_the_claim(tmp_path, monkeypatch):
    """Ctrl-C pressed on ``timeout ... zslabel label`` reaches the job twice (the terminal's and
    the one ``timeout`` forwards): the second one, delivered while the first unwinds the job,
    cut the claim's release short; the output kept its claim.json (the next run "took over a
    stale claim", another host waited out the lease) and the command said "committed files are
    kept". The second SIGINT here is a real one, sent as the release starts."""
    from zslabel import job
    from zslabel.store.claim import Claim

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the CLI's process
    real_release = Claim.release

    def second_ctrl_c_then_release(self):
        os.kill(os.getpid(), signal.SIGINT)
        real_release(self)

    monkeypatch.setattr(Claim, "release", second_ctrl_c_then_release)
    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.claim("error")
    try:
        with pytest.raises(KeyboardInterrupt, match="the first"):
            with job.claim_held(store):
                raise KeyboardInterrupt("the first")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not out.exists()  # claim given up, and the folder the claim made removed


def _claim_in_child(out, ready, results):
    store = OutputStore.open(out)
    ready.wait()
    try:
        store.claim("error")
        results.put(("claimed", store.run_id))
        time.sleep(2)
        store.release()
    except OutputInUse as exc:
        results.put(("refused", str(exc)))


def test_exactly_one_of_many_simultaneous_claims_wins(tmp_path):
    """Eight processes claim one empty output at the same instant: one wins, seven are refused."""
    out = str(tmp_path / "out")
    ctx = multiprocessing.get_context("fork")
    ready, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(out, ready, results)) for _ in range(8)]
    for p in procs:
        p.start()
    ready.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(kind for kind, _ in got) == ["claimed"] + ["refused"] * 7


def test_a_dead_runs_claim_is_taken_over(tmp_path):
    """A driver killed mid-run (SIGKILL: no cleanup) leaves its claim; the next run takes it over
    at once on the same host (the pid is gone), or after the lease elsewhere."""
    out = tmp_path / "out"
    code = ("import sys, os; from zslabel.store import OutputStore; s = OutputStore.open(sys.argv[1]); "
            "s.claim('error'); print(s.run_id, flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    dead_run = proc.stdout.strip()
    claim = json.loads((out / CLAIM_RECORD).read_text())
    assert claim["run_id"] == dead_run and claim_is_stale(claim)
    # Not stale when only the pid is unknown: the heartbeat decides (another host's run).
    assert not claim_is_stale(dict(claim, host="elsewhere"))
    assert claim_is_stale(dict(claim, host="elsewhere"), now=claim["heartbeat"] + claim["lease_s"] + 1)
    store = OutputStore.open(str(out))
    store.check("error")  # a stale claim does not block
    store.claim("error")
    assert json.loads((out / CLAIM_RECORD).read_text())["run_id"] == store.run_id
    store.release()


def test_a_run_that_lost_its_claim_does_not_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSLABEL_CLAIM_LEASE_S", "1")
    out = str(tmp_path / "out")
    store = OutputStore.open(out)
    store.check("error")
    session = store.begin("error", FIELDS)
    write_block(rows([0, 1]), session.target)
    # Another run took over (e.g. this driver was suspended past its lease).
    state = inspect_output(out)
    with open(state.path(CLAIM_RECORD), "w") as fh:
        json.dump({"run_id": "OTHER", "heartbeat": time.time() + 3600, "lease_s": 3600, "host": "x"}, fh)
    time.sleep(0.6)  # a heartbeat notices
    with pytest.raises(OutputError, match="lost its claim.*OTHER"):
        session.commit({})
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    store.release()
    assert json.loads(open(state.path(CLAIM_RECORD)).read())["run_id"] == "OTHER"  # not ours to delete


def test_the_claim_on_s3_is_a_conditional_put(s3):  # noqa: F811
    """On a real S3 API the claim is created with If-None-Match: a second claim is refused by the
    server, not by a read-then-write race."""
    uri = f"s3://{s3.bucket}/out"
    first = OutputStore.open(uri, s3.storage_options)
    first.claim("error")
    try:
        assert first._claim.method == "conditional-put"
        state = inspect_output(uri, s3.storage_options)
        with pytest.raises(OutputInUse, match=first.run_id):
            acquire(state, "second-run")
    finally:
        first.release()
    session = run_once(uri, [0, 1, 2], storage_options=s3.storage_options)
    assert inspect_output(uri, s3.storage_options).manifest["run_id"] == session.run_id


def test_overwrite_deletes_only_what_the_store_wrote(tmp_path):
    out = tmp_path / "out"
    run_once(str(out), [0, 1, 2])
    (out / "notes.csv").write_text("a,b\n")
    (out / "plots").mkdir()
    (out / "plots" / "hist.png").write_bytes(b"png")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match="did not write.*notes.csv.*plots/hist.png"):
        OutputStore.open(str(out)).check("overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    # Resume deletes nothing of the user's and is not refused for them.
    OutputStore.open(str(out)).check("resume")
    (out / "notes.csv").unlink()
    (out / "plots" / "hist.png").unlink()
    (out / "plots").rmdir()
    new = run_once(str(out), [0, 1], mode="overwrite", fields={"labels": ["fox"]})
    assert all(p.name.startswith(f"part-{new.run_id}-") for p in out.glob("*.parquet"))
    assert pq.read_table(str(out)).num_rows == 2


def test_no_run_is_written_inside_another_run(tmp_path):
    """An output below a finished run, or below an unfinished one (its state folder only), is
    refused in every mode before anything is written: its part files would be read as the outer
    run's rows. Beside a run, and the run's own folder, are fine."""
    outer = tmp_path / "outer"
    run_once(str(outer), [0, 1])
    unfinished = tmp_path / "unfinished"
    (unfinished / "_zslabel").mkdir(parents=True)
    (tmp_path / "link").symlink_to(outer)
    for inner in (outer / "sub", outer / "a" / "b", unfinished / "sub", tmp_path / "link" / "sub"):
        for mode in ("error", "resume", "overwrite"):
            with pytest.raises(OutputError, match="is inside the zslabel output"):
                OutputStore.open(str(inner)).check(mode)
        assert not inner.exists()
    assert sorted(p.name for p in outer.iterdir() if not p.name.startswith("_")) == \
        sorted(p.name for p in outer.glob("part-*.parquet"))
    run_once(str(tmp_path / "beside"), [0])
    # The run itself, however spelled, is not inside itself.
    for same in (f"{outer}/.", f"{outer}/", f"{outer}//", f"{tmp_path}/x/../outer"):
        OutputStore.open(same).check("resume")
    run_once(str(outer), [0, 1, 2], mode="overwrite")
    assert pq.read_table(str(outer)).num_rows == 3


def test_no_run_is_written_above_another_run(tmp_path):
    """A folder holding an output one or more levels down (finished, or unfinished: its state
    folder only) is refused as an output in every mode, and by every reader, naming the inner
    output: its part files would be read as the outer folder's rows. Files are left as they were."""
    from zslabel.errors import InputError
    from zslabel.store.fsio import output_parquet_files

    parent = tmp_path / "parent"
    run_once(str(parent / "inner"), [0, 1])
    (parent / "a" / "b" / "_zslabel").mkdir(parents=True)
    (parent / "a" / "b" / "_zslabel" / "run.json").write_text("{}")
    before = sorted(str(p) for p in parent.rglob("*"))
    for mode in ("error", "resume", "overwrite"):
        with pytest.raises(OutputError, match=r"holds zslabel outputs in folders below it \(.*parent/a/b, "
                                              r".*parent/inner\)"):
            OutputStore.open(str(parent)).check(mode)
    with pytest.raises(InputError, match=r"below it.*parent/inner.*would be read as"):
        output_parquet_files(str(parent))
    assert sorted(str(p) for p in parent.rglob("*")) == before
    # The inner output itself reads and resumes as before; a run's own state folder is no inner output.
    assert len(output_parquet_files(str(parent / "inner"))[1]) == 1
    OutputStore.open(str(parent / "inner")).check("resume")
    run_once(str(parent / "inner"), [0, 1, 2], mode="overwrite")


def test_store_file_names():
    for name in ("part-20261205T000000-abcdef12-0123456789abcdef.parquet", "_run_manifest.json",
                 "_zslabel/run.json", "_zslabel/staging/R/part-R-1.parquet",
                 ".part-20261205T000000-abcdef12-0123456789abcdef.parquet.0123456789ab.tmp"):
        assert is_store_file(name), name
    for name in ("notes.csv", "plots/hist.png", "sub/part-R-1.parquet", "data.parquet", ".DS_Store",
                 "part-0.parquet", "part-R-1.parquet", ".part-R-1.parquet.0123456789ab.tmp"):
        assert not is_store_file(name), name


def test_commit_refuses_rows_that_do_not_account_for_the_inputs(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(AccountingError, match="5 inputs listed.*holds 3 rows.*2 inputs have no row"):
        run_once(out, [0, 1, 2], listed=5)
    state = inspect_output(out)
    assert state.manifest is None and state.run_record is not None  # not committed; --resume can finish
    assert Accounting(7, skipped=3, duplicates_removed=1).check(out, 3) is None
    with pytest.raises(AccountingError, match="1 rows too many"):
        Accounting(4, skipped=1).check(out, 4)


def test_commit_refuses_files_of_another_run(tmp_path):
    out = str(tmp_path / "out")
    store = OutputStore.open(out)
    store.check("error")
    try:
        session = store.begin("error", FIELDS)
        write_block(rows([0, 1]), session.target)
        # A writer of another run (another fingerprint) published into this output.
        pq.write_table(rows([2]).replace_schema_metadata({b"zslabel.fingerprint": b"other"}),
                       os.path.join(out, "part-OTHER-1.parquet"))
        with pytest.raises(OutputError, match="files of another run appeared.*part-OTHER-1"):
            session.counts()
    finally:
        store.release()


def test_fingerprint_is_the_digest_of_the_fields(tmp_path):
    session = run_once(str(tmp_path / "out"), [0])
    assert session.fingerprint == fingerprint_digest(FIELDS)


def test_readers_and_the_resume_short_cut_see_files_added_or_deleted_since_the_run(tmp_path):
    """A finished run's manifest records how many data files it committed. A Parquet file put
    there since (a copy, another tool's stats.parquet) was read as rows by show, report, export
    and relabel, and a deleted part file silently lost its rows; a --resume of such an output
    said 'nothing to do'. Now readers refuse the folder, naming both numbers, and the short-cut
    lets the run go ahead (it rescans and labels what is missing)."""
    import json
    import shutil

    from zslabel.errors import InputError
    from zslabel.store import output_parquet_files

    out = tmp_path / "out"
    run_once(str(out), [0, 1, 2])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    parts = sorted(out.glob("*.parquet"))
    manifest["counts"]["files"] = len(parts)
    manifest.update(input_stamp="in", model={"stamp": "ckpt"})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    stamps = {"input": "in", "model": "ckpt"}
    assert len(output_parquet_files(str(out))[1]) == len(parts) == 1
    assert OutputStore.open(str(out)).finished_unchanged("resume", False, stamps) is not None

    shutil.copy(parts[0], out / "extra.parquet")
    with pytest.raises(InputError, match="holds 2 Parquet files but its run manifest records 1: files were added"):
        output_parquet_files(str(out))
    assert OutputStore.open(str(out)).finished_unchanged("resume", False, stamps) is None
    assert output_parquet_files(str(out / "extra.parquet"))[1]  # one file named on its own is read

    (out / "extra.parquet").unlink()
    manifest["counts"]["files"] = 2  # as if a second part file had been deleted
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="records 2: files were deleted .* would lose rows.*--resume"):
        output_parquet_files(str(out))
    assert OutputStore.open(str(out)).finished_unchanged("resume", False, stamps) is None


def test_a_part_cut_short_after_the_run_is_named_not_taken_as_finished(tmp_path):
    """A finished output whose part file was cut short later (a copy or sync interrupted, a
    full disk): a --resume answered 'nothing to label' (the short-cut counted files, not their
    bytes), and a resume that scanned failed with Arrow's "Is this a 'parquet' file?". Now the
    manifest records each data file's size, the short-cut sees the change, and the scan names
    the damaged file and the way out; deleting it and resuming labels its inputs again."""
    out = tmp_path / "out"
    run_once(str(out), [0, 1, 2])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (part,) = sorted(out.glob("*.parquet"))
    assert manifest["data_files"] == {part.name: part.stat().st_size}
    manifest.update(counts={"files": 1}, input_stamp="in", model={"stamp": "ckpt"})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    stamps = {"input": "in", "model": "ckpt"}
    assert OutputStore.open(str(out)).finished_unchanged("resume", False, stamps) is not None

    with open(part, "r+b") as fh:
        fh.truncate(part.stat().st_size // 2)
    store = OutputStore.open(str(out))
    assert store.finished_unchanged("resume", False, stamps) is None
    store.check("resume")
    with pytest.raises(OutputError, match=f"committed file {part.name} cannot be read as Parquet .*Delete the "
                                          "damaged file.*--resume again") as err:
        store.begin("resume", FIELDS)
    store.release()
    assert "\n" not in str(err.value)
    assert (out / MANIFEST_NAME).exists() and part.exists()  # refused before anything changed

    part.unlink()
    session = run_once(str(out), [0, 1, 2], mode="resume")
    assert session.carried_rows == 0 and sorted(pq.read_table(str(out)).column("input_index").to_pylist()) == [0, 1, 2]


def test_overwrite_never_takes_a_users_part_file_for_its_own(tmp_path):
    """Ownership is the exact names the store writes: ``part-0.parquet`` (pyarrow's
    ``write_dataset`` default), ``part-x.parquet`` or a temp-like name dropped into an output are
    the user's, so --overwrite refuses, naming them, and deletes nothing."""
    out = tmp_path / "out"
    run_once(str(out), [0, 1])
    ours = sorted(p.name for p in out.iterdir())
    for name in ("part-0.parquet", "part-x.parquet", ".part-0.parquet.abc.tmp"):
        pq.write_table(pa.table({"my_notes": ["keep me"]}), out / name)
    with pytest.raises(OutputError, match="did not write.*part-0.parquet.*part-x.parquet"):
        OutputStore.open(str(out)).check("overwrite")
    assert pq.read_table(out / "part-0.parquet").column("my_notes").to_pylist() == ["keep me"]
    assert all(is_store_file(n) for n in ours) and not is_store_file("part-0.parquet")


def test_a_run_that_fails_before_writing_leaves_the_output_as_it_found_it(tmp_path):
    """No images found, a refused input, Ctrl-C before the first file: a fresh run leaves no
    folder and no run record (the next plain run is not refused as "an unfinished run"), an
    overwrite leaves the old output as it was; a run that wrote a file keeps its record for
    --resume."""
    def fail_after_begin(uri, mode, write=()):
        store = OutputStore.open(uri)
        store.check(mode)
        try:
            session = store.begin(mode, {"labels": ["x"]})
            if len(write):
                write_block(rows(list(write)), session.target)
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        finally:
            store.release()

    fresh = tmp_path / "fresh"
    fail_after_begin(str(fresh), "error")
    assert not fresh.exists()
    run_once(str(fresh), [0, 1])                                   # the next plain run goes ahead

    before = {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}
    fail_after_begin(str(fresh), "overwrite")
    assert {p.name: p.read_bytes() for p in fresh.iterdir()} == before   # no _zslabel/, old run intact
    assert pq.read_table(str(fresh)).num_rows == 2

    started = tmp_path / "started"
    fail_after_begin(str(started), "error", write=[0])
    assert (started / "_zslabel" / "run.json").exists()           # a row is committed: --resume finishes it
    with pytest.raises(OutputError, match="unfinished run"):
        OutputStore.open(str(started)).check("error")


def test_readers_of_output_files_hold_each_file_to_its_footer(tmp_path):
    """A file whose damaged row group pyarrow ends without a batch or an error is refused,
    naming it, by the reader every command uses on an output's files (relabel, export, report,
    eval, calibrate, fit); an intact file reads whole, a row group subset counts only its groups."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from source_files import jpeg, silently_short_parquet

    from zslabel.store import footer_checked_batches

    bad = silently_short_parquet(tmp_path / "bad.parquet", [jpeg(0), jpeg(1), jpeg(2)])
    with pytest.raises(pa.ArrowInvalid, match=r"bad\.parquet gave 2 rows where its footer gives 3"):
        list(footer_checked_batches(pq.ParquetFile(bad), str(bad), columns=["caption"]))
    got = list(footer_checked_batches(pq.ParquetFile(bad), str(bad), row_groups=[1, 2], columns=["caption"]))
    assert sum(b.num_rows for b in got) == 2
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"x": list(range(10))}), good, row_group_size=3)
    assert sum(b.num_rows for b in footer_checked_batches(pq.ParquetFile(good), str(good), batch_size=4)) == 10


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    """``-o /proc/zz`` (no such parent can be made) was a FileNotFoundError traceback and exit 1,
    the error-budget code; a parent that is a file the same. Now an OutputError naming it."""
    (tmp_path / "file").write_text("x")
    for uri in ("/proc/zslabel-test/out", str(tmp_path / "file" / "out")):
        store = OutputStore.open(uri)
        store.check("error")
        with pytest.raises(OutputError, match=r"cannot create the output folder .*out: (FileNotFound|NotADirectory)"):
            store.claim("error")


def test_a_resume_names_the_run_that_committed_its_rows(tmp_path, caplog):
    """The "resuming" line named the new run's id as the one that had committed the rows (new-user trial)."""
    out = str(tmp_path / "out")
    first = run_once(out, [0, 1])
    with caplog.at_level("INFO", logger="zslabel.store.session"):
        second = run_once(out, [2], mode="resume", listed=3)
    assert f"2 inputs already committed (by run {first.target.run_id}; this run is {second.target.run_id})" \
        in caplog.text


def test_a_write_failure_says_what_to_fix_before_resume():
    """The message a write task returns for an OSError (pipeline.consume raises it, exit 2)."""
    import errno

    from zslabel.store.files import write_failure

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert write_failure("/data/out", full) == (
        "cannot write the output /data/out: OSError: [Errno 28] No space left on device; the files committed "
        "so far are kept: free space and rerun with --resume")
    assert "make the output writable and rerun with --resume" in write_failure(
        "/data/out", PermissionError(errno.EROFS, os.strerror(errno.EROFS)))
