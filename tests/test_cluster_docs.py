"""docs/cluster.md's "Try it locally first" commands, run as written, with Ray's default auth.

Ray >= 2.59 turns token authentication on for a cluster that ``ray start --head`` starts while a
token exists (``~/.ray/auth_token``, which the first embedded ``ray.init`` creates); the ``ray``
client commands then need ``RAY_AUTH_MODE=token`` too, which the guide exports. This test runs
the guide's sequence in a fresh ``HOME`` (no token yet, nothing shared with other Ray users on
the machine): ``ray get-auth-token --generate``, ``ray start --head``, a worker node joining,
``ray job submit --working-dir . -- python jobs/label_job.py ...``, ``ray job list``,
``ray status``. It also checks the failure the guide prevents: without the mode, ``ray job
list`` is refused.

Loopback only (head 127.0.0.2, worker 127.0.0.3), free ports and a private ``--temp-dir``; the
nodes run with ``--block`` in their own process groups and are stopped by PID (``ray stop``
would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_cluster import HEAD_IP, RAY, WORKER_IP, LoopbackCluster, _free_port, _wait_until, make_images

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cluster.md"

pytestmark = pytest.mark.slow


def _doc_env(home: Path) -> dict[str, str]:
    """The shell of a user following the guide: a fresh HOME, the guide's RAY_AUTH_MODE export,
    none of the test session's Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def stop(proc: subprocess.Popen) -> None:
    """Stop one node we started: SIGTERM to its process group (``ray start --block`` stops its
    node's processes), then SIGKILL to whatever is left in the group."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # its children (GCS, raylet) may outlive it briefly
            continue


def test_guide_exports_the_token_mode_before_starting_ray():
    text = DOC.read_text()
    local = text[text.index("### Try it locally first"):text.index("### One-time AWS setup")]
    assert "export RAY_AUTH_MODE=token" in local
    assert "ray get-auth-token --generate" in local
    assert local.index("export RAY_AUTH_MODE=token") < local.index("ray start --head")
    assert "ray job submit --working-dir ." in local


def test_guide_commands_work_with_default_auth(tiny_clip, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _doc_env(home)
    temp_dir = Path(tempfile.mkdtemp(prefix="zsdoc", dir="/tmp"))  # short: AF_UNIX path limit
    gcs_port, dash_port = _free_port(HEAD_IP), _free_port(HEAD_IP)
    gcs, dashboard = f"{HEAD_IP}:{gcs_port}", f"http://{HEAD_IP}:{dash_port}"
    images = make_images(tmp_path / "images", 24)
    out = tmp_path / "out"
    procs: list[subprocess.Popen] = []

    def ray(*args: str, timeout: float = 120, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], cwd=ROOT, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check:
            assert proc.returncode == 0, f"ray {' '.join(args)}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start(name: str, ip: str, *args: str) -> None:
        log = open(tmp_path / f"{name}.log", "ab")
        node_env = {**env, "RAY_NODE_IP_ADDRESS": ip}
        procs.append(subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--node-ip-address={ip}",
             "--num-cpus=2", "--object-store-memory=150000000", f"--dashboard-agent-listen-port={_free_port(ip)}",
             *args], cwd=ROOT, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp_path.glob("*.log")))

    try:
        # The guide's first step: a token in ~/.ray/auth_token (the first local run makes one too).
        ray("get-auth-token", "--generate")
        assert (home / ".ray" / "auth_token").is_file()
        def start_head() -> int:
            start("head", HEAD_IP, "--head", f"--port={gcs_port}", "--include-dashboard=true",
                  f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dash_port}",
                  f"--ray-client-server-port={_free_port(HEAD_IP)}")
            return len(procs) - 1

        start_head()
        status = {}

        def nodes_in_status() -> int:
            status["last"] = ray("status", f"--address={gcs}", check=False)
            return len(re.findall(r"\bnode_[0-9a-f]+", status["last"].stdout))

        try:
            # The worker gives up at once if the head's node is not registered yet (the GCS port
            # opens before that), so wait for `ray status` to show it.
            def head_up() -> bool:
                # On a loaded machine a node can miss Ray's fixed 30 s registration window and
                # exit ("timed out during startup"); clear what it left and start it again.
                if procs[0].poll() is not None and len(procs) < 4:
                    stop(procs.pop(0))
                    procs.insert(0, procs.pop(start_head()))
                return LoopbackCluster._port_open(HEAD_IP, gcs_port) and nodes_in_status() >= 1

            _wait_until(head_up, 360, "the head in `ray status`", interval=2)
            start("worker", WORKER_IP, f"--address={gcs}")

            def two_nodes() -> bool:
                # On a loaded machine a node can miss Ray's fixed 30 s registration window and
                # exit ("timed out during startup"); start it again, as a person would.
                if procs[-1].poll() is not None and len(procs) < 5:
                    start("worker", WORKER_IP, f"--address={gcs}")
                return nodes_in_status() >= 2

            _wait_until(two_nodes, 360, "two nodes in `ray status`", interval=2)
        except TimeoutError as exc:
            last = status.get("last")
            raise AssertionError(f"{exc}\nlast ray status: {last and (last.stdout[-2000:], last.stderr[-2000:])}"
                                 f"\n{logs()}") from None

        # What the guide prevents: a client without the token mode is refused.
        refused = ray("job", "list", f"--address={dashboard}", check=False, RAY_AUTH_MODE="")
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr, refused

        submit = ["job", "submit", f"--address={dashboard}", "--working-dir", ".", "--",
                  "python", "jobs/label_job.py", images[0].rsplit("/", 1)[0], "--labels", "cat,dog,bird",
                  "--model", str(tiny_clip), "--output", str(out), "--batch-size", "8"]
        for _ in range(30):  # the head's job agent registers a few seconds after the dashboard answers
            submitted = ray(*submit, timeout=400, check=False)
            if "No available agent" not in submitted.stdout + submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, f"{submitted.stdout[-4000:]}\n{submitted.stderr[-3000:]}"
        assert "succeeded" in submitted.stdout.lower(), submitted.stdout[-3000:]
        assert "labeled 24 of 24 images" in submitted.stdout
        listed = ray("job", "list", f"--address={dashboard}")
        assert "SUCCEEDED" in listed.stdout
        assert pq.read_table(str(out)).num_rows == 24
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(temp_dir, ignore_errors=True)
