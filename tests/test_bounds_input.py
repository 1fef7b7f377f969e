"""Fail fast on a remote input that cannot work (issue 23): no credentials, refused credentials
or an unreachable store give exit 2 and one line naming the fix, before Ray starts.

The store is moto's S3 server (as ``tests/s3_server.py``), here started as its own process with
IAM authentication enforced (``INITIAL_NO_AUTH_ACTION_COUNT=0``), so that wrong credentials are
really refused by the server (the shared in-process server accepts any).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zslabel.errors import InputError
from zslabel.io_policy import IOPolicy
from zslabel.options import check_input_exists

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strict_s3():
    """An S3 endpoint URL (moto, authentication enforced) on 127.0.0.1."""
    import requests

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                requests.get(url, timeout=10)
                break
            except requests.RequestException:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere in botocore's chain (environment, files, instance metadata)."""
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def options(endpoint, **extra):
    return {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}, **extra}


QUICK = IOPolicy(timeout=3, retries=1)


def test_no_credentials_names_the_fix(strict_s3, no_aws_credentials):
    with pytest.raises(InputError) as info:
        check_input_exists("s3://photos/2024/", options(strict_s3), io=QUICK)
    text = str(info.value)
    assert "\n" not in text and text.startswith("cannot read s3://photos/2024/: no credentials for s3://")
    assert "AWS_ACCESS_KEY_ID" in text and '{"anon": true}' in text


def test_refused_credentials_and_unreachable_store(strict_s3, no_aws_credentials):
    with pytest.raises(InputError, match=r"^cannot read s3://photos/: access denied \(PermissionError"):
        check_input_exists("s3://photos/", options(strict_s3, key="AKIAWRONG", secret="wrong"), io=QUICK)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"^cannot reach s3://photos/ \(EndpointConnectionError.*endpoint_url"):
        check_input_exists("s3://photos/", options(dead, key="k", secret="s"), io=QUICK)
    assert time.perf_counter() - t0 < 30
    # brace patterns are checked through their first shard
    with pytest.raises(InputError, match="access denied"):
        check_input_exists("s3://photos/shard-{000..009}.tar", options(strict_s3, key="AKIAWRONG", secret="x"),
                           io=QUICK)


def test_cli_exits_2_with_one_line_before_ray_starts(strict_s3, tiny_clip, tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and not k.startswith("RAY_ADDRESS")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    cmd = [sys.executable, "-m", "zslabel", "label", "s3://photos/imgs/", "--labels", "cat,dog",
           "--model", str(tiny_clip), "--output", str(tmp_path / "out"), "--io-timeout", "3",
           "--storage-options", json.dumps(options(strict_s3))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zslabel: error: cannot read s3://photos/imgs/: no credentials for s3://")
    assert "ray" not in proc.stderr.lower() or "ray" in lines[0].lower()
    assert not (tmp_path / "out").exists()
    print(f"CLI failed fast in {took:.1f} s")


def test_a_pattern_without_a_match_says_so(tmp_path):
    """A glob that matches nothing said "<pattern> does not exist" (trial): it says that no
    file matches; a plain name that is not there still "does not exist"."""
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"no images found: no file matches the pattern .*/\*\.jpg$"):
        check_input_exists(str(tmp_path / "*.jpg"), {})
    with pytest.raises(InputError, match=r"no images found: .*/missing does not exist$"):
        check_input_exists(str(tmp_path / "missing"), {})
