"""A new user's first minutes: progress display, a clean stderr, Ray start failures, --version,
and the install lock (scripts/check_lock.py)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_lock  # noqa: E402

# Lines a clean run may print to stderr that match the "bad words" below, and why:
ALLOWED_STDERR = [
    # Ray core (C++, printed by the driver's core worker; no Python logger or setting reaches it)
    # logs this for every Ray Data actor pool with max_restarts > 0, because Ray Data itself
    # passes object refs to its actors' constructors (ray-project/ray#57733, open). Harmless
    # here: Ray Data holds those refs for the whole run.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\(Labeler\)\)'.*"
               r"constructor arguments in the object store and max_restarts > 0"),
    # Ray's GCS, now and then at the end of a run when Ray Data's actor pool is torn down and an
    # actor's worker has already exited: the kill RPC finds its socket closed, which is the kill
    # succeeding (ray-project/ray#53412, #58544 demote the same log in another call site).
    re.compile(r"\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: Invalid: "
               r"KillActor RPC failed for actor \w+: RpcError: RPC error: Socket closed"),
    # Ray Data, when the machine is so loaded that the local node has not yet reported its CPUs
    # (seen at load average > 10): a real resource message, not noise, so it is never hidden.
    re.compile(r"WARNING resource_manager\.py:\d+ -- Cluster resources are not enough to run any task"),
]
BAD = re.compile(r"WARNING|Warning|Error|ERROR|Deprecat|Traceback|Loading weights|Total Progress")


def unexpected_stderr(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if BAD.search(line) and not any(a.search(line) for a in ALLOWED_STDERR)]


# --------------------------------------------------------------------------- progress, unit

def test_progress_log_lines_end_with_the_totals():
    from zslabel.progress import Progress

    out = io.StringIO()  # not a terminal: plain lines
    with Progress(10, stream=out, interval_s=0.0) as p:
        p.update(4, 1)
        time.sleep(0.01)
        p.update(6, 0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("labeling: 4/10 images (40%), ") and "1 errors, ETA " in lines[0], lines
    assert re.fullmatch(r"labeling: 10/10 images \(100%\), [\d.]+ images/s, 1 errors, took \d+s", lines[-1]), lines
    assert len(lines) == 2  # the last update leaves the final line to close()

    out = io.StringIO()
    with Progress(None, stream=out, interval_s=3600) as p:  # total unknown (tars): no percentage or ETA
        p.update(5, 2)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("labeling: 5 images, ") and "2 errors, took" in out.getvalue()

    out = io.StringIO()
    with Progress(3, stream=out, interval_s=0.0, enabled=False) as p:
        p.update(3, 0)
    assert out.getvalue() == "" and p.done == 3


def test_progress_is_one_tqdm_bar_on_a_terminal():
    from zslabel.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with Progress(8, stream=out) as p:
        p.update(8, 3)
    text = out.getvalue()
    assert "8/8" in text and "3 errors" in text and "labeling" in text
    assert "\n" not in text.rstrip("\n")  # one bar redrawn in place (carriage returns), not lines


# --------------------------------------------------------------------------- CLI

def _cli(args: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zslabel", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=timeout, check=False)


def test_clean_cli_run_prints_progress_and_no_library_noise(image_folder, tiny_clip, tmp_path):
    """Embedded Ray with Ray's default auth in a fresh HOME (Ray creates a token and turns token
    auth on: the token warning is what a first run used to print), stdout/stderr not a TTY."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    for _ in range(3):  # exit 3 = Ray's fixed 30 s node start window missed on a loaded machine: retry
        proc = _cli(["label", str(image_folder), "--labels", "cat,dog", "--model", str(tiny_clip),
                     "--output", str(tmp_path / "out"), "--batch-size", "4"], env)
        if not (proc.returncode == 3 and "timed out during startup" in proc.stderr):
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    progress = [line for line in proc.stderr.splitlines() if line.startswith("labeling: ")]
    assert progress, proc.stderr[-3000:]
    assert re.fullmatch(r"labeling: 12/12 images \(100%\), [\d.]+ images/s, 0 errors, took .+", progress[-1])
    assert "labeled 12 of 12 images" in proc.stdout
    assert not unexpected_stderr(proc.stderr), "\n".join(unexpected_stderr(proc.stderr))


def test_quiet_prints_no_progress(ray_local, image_folder, tiny_clip, tmp_path):
    proc = _cli(["label", str(image_folder), "--labels", "cat,dog", "--model", str(tiny_clip),
                 "--output", str(tmp_path / "out"), "--quiet", "--address", ray_local], dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "labeling:" not in proc.stderr and "Total Progress" not in proc.stderr
    assert "labeled 12 of 12 images" in proc.stdout
    # No INFO lines either, ours (input planned) or Ray Data's (execution plan, end).
    info = [line for line in proc.stderr.splitlines() if re.search(r"\bINFO\b|Starting execution|execution finished", line)]
    assert not info, "\n".join(info)


def test_unreachable_ray_address_exits_3_with_a_message(image_folder, tiny_clip, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli(["label", str(image_folder), "--labels", "cat,dog", "--model", str(tiny_clip),
                 "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"], dict(os.environ), timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"zslabel: error: cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_stale_ray_address_variable_fails_fast_naming_it(monkeypatch):
    """RAY_ADDRESS left by an earlier `ray start` whose head is gone: ray.init() joins it by
    itself and retried the dead GCS until the job was killed (240 s in the hunt's repro;
    ray-project/ray#43070). It is checked like --address: RayStartError (exit 3) at once,
    naming the variable and how to clear it, and Ray is never asked."""
    import socket

    import ray

    from zslabel.cluster import init_ray
    from zslabel.errors import RayStartError

    asked = []

    def no_ray(*args, **kwargs):  # the old code path: would hang for minutes on the dead address
        asked.append(kwargs)
        raise RuntimeError("ray.init was called")

    # Whatever Ray this test process holds (the session's ray_local) is neither used nor stopped.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.2", 0))
        address = f"127.0.0.2:{s.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        started = time.monotonic()
        with pytest.raises(RayStartError) as caught:
            init_ray(None)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert f"cannot reach a Ray cluster at {address} (from the RAY_ADDRESS environment variable" in message
    assert "unset RAY_ADDRESS" in message
    assert asked == []
    for value in ("auto", "local"):  # left to Ray, as for --address: no check, no refusal
        monkeypatch.setenv("RAY_ADDRESS", value)
        with pytest.raises(RayStartError, match="ray.init was called"):
            init_ray(None)


@pytest.mark.parametrize("kind", ["manifest", "folder"])
def test_an_input_that_cannot_be_planned_fails_before_the_model_and_ray(tmp_path, kind):
    """Planning the input needs neither the model nor Ray, so it comes first: a manifest whose
    quote never closes, or a folder holding no image, is exit 2 naming the input, although the
    model folder does not exist and no Ray cluster answers at --address (either of which was
    the error when planning came after them: the user waited for both, then fixed the input)."""
    import socket

    if kind == "manifest":
        source = tmp_path / "list.csv"
        source.write_text('path,caption\n/data/a.png,"never closed\n' + "".join(f"/data/{i}.png,x\n" for i in range(5)))
        expected = 'manifest ' + str(source) + ': a quote (") opened in data row 1 is never closed'
    else:
        source = tmp_path / "notes"
        source.mkdir()
        (source / "readme.txt").write_text("no images here")
        expected = f"no images found under {source} (1 files skipped (not_an_image: 1)"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli(["label", str(source), "--labels", "cat,dog", "--model", str(tmp_path / "no-such-model"),
                 "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"], dict(os.environ), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint" not in proc.stderr and "Ray cluster" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_version_and_exit_codes_in_help():
    from zslabel.cli import build_parser

    proc = _cli(["--version"], dict(os.environ), timeout=60)
    assert proc.returncode == 0 and re.fullmatch(r"zslabel \S+\n", proc.stdout), proc
    help_text = build_parser().format_help()
    for code in ("0 ", "1 ", "2 ", "3 ", "130", "143"):
        assert f"\n  {code}" in help_text
    readme = (ROOT / "README.md").read_text()
    assert "| 3 |" in readme and "| 143 |" in readme and "--version" in readme


# --------------------------------------------------------------------------- install lock

def test_lock_matches_pyproject_and_imports_match_declarations():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_check_lock_finds_a_pin_outside_the_range_and_a_missing_pin():
    pyproject = {"project": {"dependencies": ["numpy>=1.26,<3", "tqdm>=4.66"],
                             "optional-dependencies": {"s3": ["s3fs>=2024.2"], "test": [], "cluster": []}}}
    problems = check_lock.lock_problems(pyproject, {"numpy": "3.1.0", "s3fs": "2024.2.0"})
    assert len(problems) == 2
    assert "numpy==3.1.0, outside" in problems[0] and "tqdm>=4.66 is declared" in problems[1]
    with pytest.raises(ValueError, match="not an exact pin"):
        bad = Path(check_lock.__file__).parent / "__bad_lock.txt"
        try:
            bad.write_text("numpy>=1\n")
            check_lock.read_lock(bad)
        finally:
            bad.unlink()


@pytest.mark.parametrize("command", ["fit", "calibrate", "report"])
def test_a_negative_seed_is_a_usage_error_not_a_traceback(command, tmp_path):
    """numpy's SeedSequence raised ValueError (a traceback, exit 1) on --seed -1."""
    args = [command, str(tmp_path), "--seed", "-1"]
    args += {"fit": ["--ground-truth", "gt.csv", "--output", "h.safetensors"],
             "calibrate": ["--ground-truth", "gt.csv", "--output", "c.json"], "report": ["--output", "r"]}[command]
    proc = _cli(args, dict(os.environ))
    assert proc.returncode == 2 and "must be >= 0 (got -1)" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-1000:]
    # A bad value is one line, naming the way to the usage (the usage block above it buried it).
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.rstrip().endswith(f"(see zslabel {command} --help)")


def test_ctrl_c_while_ray_is_imported_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    """A Ctrl-C in the first seconds of `label -q` (Ray being imported) printed a
    KeyboardInterrupt traceback and could exit 1 (the error-budget code)."""
    from zslabel import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_quiet_ray", interrupted)
    assert cli.main(["label", str(tmp_path), "--labels", "a,b", "--output", str(tmp_path / "o"), "-q"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("zslabel: interrupted; nothing was written: rerun the same command")


def test_an_unknown_flag_is_refused_by_its_command_with_the_closest_flags(capsys):
    """``label ... --top_k 3`` showed zslabel's top-level usage ("zslabel [-h] [--version]
    COMMAND ...") with no word of the flag meant (new-user trial)."""
    from zslabel import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["label", "in", "--labels", "a", "-o", "out", "--top_k", "3", "--overwite"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: zslabel label" in err
    assert "zslabel label: error: unrecognized arguments: --top_k 3 --overwite (did you mean --top-k, --overwrite?)" in err


@pytest.mark.slow
def test_ctrl_c_while_the_local_ray_node_starts_leaves_no_process():
    """A Ctrl-C inside ``ray.init``, after the local node's processes started and before Ray
    recorded them, left its dashboard and runtime-env agents running for good, reparented to
    init (4 of 5 tries in that window). The Ctrl-C now waits for the start, stops Ray, and
    exits as an interrupt; nothing started for this run is left. The signal is sent at that
    exact point (Ray reading its new node's record)."""
    script = ("import os, signal, ray._private.services as s\n"
              "real = s.get_node\n"
              "def get_node(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    return real(*a, **k)\n"
              "s.get_node = get_node\n"
              "from zslabel.cluster import init_ray\n"
              "try:\n"
              "    init_ray(None)\n"
              "except KeyboardInterrupt:\n"
              "    raise SystemExit(130)\n")
    with own_ray_dir() as env:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert "stopping once Ray has started" in proc.stderr


@contextlib.contextmanager
def own_ray_dir():
    """The environment for a subprocess whose Ray keeps its files in a folder of its own (no
    ``RAY_ADDRESS``: it starts a local Ray there); after the block, asserts that no process
    started with it is left (Ray's agents notice their raylet is gone within seconds), then
    kills any such (only what the test started) and removes the folder."""
    import shutil
    import signal
    import tempfile

    ray_dir = tempfile.mkdtemp(prefix="zsr", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir)}
    env.pop("RAY_ADDRESS", None)
    try:
        yield env
        deadline = time.time() + 20
        while time.time() < deadline and _processes_under(ray_dir):
            time.sleep(1)
        assert not _processes_under(ray_dir), _processes_under(ray_dir)
    finally:
        for pid in _processes_under(ray_dir):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.slow
def test_more_ctrl_c_during_the_clean_up_are_no_traceback_and_leave_no_process(tiny_clip, image_folder, tmp_path):
    """A second Ctrl-C while an interrupted run reported what it kept, or while Ray shut down at
    exit, was a traceback (``KeyboardInterrupt`` in the handler, exit 1; "Exception ignored in
    atexit callback"). They are ignored for that second or so now: the run ends as an interrupt
    (exit 130, one line), and nothing started for it is left (ending at once instead left the
    local Ray's dashboard and runtime-env agents running for good). The signals are sent at
    those exact points: mid-run, in the report, in Ray's shutdown."""
    script = ("import os, signal, sys, ray\n"
              "from zslabel import cli, pipeline\n"
              "def ctrl_c(real):\n"
              "    def wrapper(*a, **k):\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        return real(*a, **k)\n"
              "    return wrapper\n"
              "class Progress(pipeline.Progress):\n"
              "    update = ctrl_c(pipeline.Progress.update)\n"
              "pipeline.Progress = Progress\n"
              "cli._after_interrupt = ctrl_c(cli._after_interrupt)\n"
              "ray.shutdown = ctrl_c(ray.shutdown)\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    args = ["label", str(image_folder), "--labels", "red,blue", "--model", str(tiny_clip), "--output",
            str(tmp_path / "out"), "--batch-size", "2", "--rows-per-file", "2", "-q"]
    with own_ray_dir() as env:
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert [line for line in proc.stderr.splitlines() if line.startswith("zslabel:")] == [
            "zslabel: interrupted; committed files are kept: rerun with --resume (in place of --overwrite, "
            "if given) to continue"], proc.stderr[-3000:]


def _processes_under(folder) -> list[int]:
    """PIDs of processes started with ``RAY_TMPDIR=folder`` in their environment: this test's
    Ray processes (their titles, such as ``ray::DashboardAgent``, do not show the folder)."""
    marker = f"RAY_TMPDIR={folder}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_a_first_ctrl_c_waits_for_the_ray_start_and_a_second_one_does_not():
    """The guard around ``ray.init``: a first SIGINT is held until the block ends (the block
    sees it, to stop Ray), then raised; a second one interrupts at once; a start that failed
    because Ray's own processes got the terminal's Ctrl-C is an interrupt, not a start error."""
    import signal

    from zslabel.cluster import _ctrl_c_after_start

    # What the guard must put back: the handler this process has (Python's default, or SIG_IGN
    # in a process started with Ctrl-C ignored, as a background job of a script is; a CI run
    # started so failed the comparison with the default below).
    before = signal.getsignal(signal.SIGINT)
    reached_end = []
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_after_start() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached_end.append(list(interrupted))
    assert reached_end == [[True]]
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_after_start():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached_end.append("second")  # not reached: the second Ctrl-C stops the block
    assert reached_end == [[True]]
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_after_start():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            raise ConnectionError("the raylet died")
    with _ctrl_c_after_start() as interrupted:
        pass
    assert interrupted == [] and signal.getsignal(signal.SIGINT) is before
