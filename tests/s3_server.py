"""A real S3 API for tests: moto's threaded server on 127.0.0.1, one per test session.

Use from a test module with ``from s3_server import s3  # noqa: F401`` (``tests/`` is on
``sys.path`` because it holds the root conftest). The ``s3`` fixture yields an :class:`S3Server`
with a fresh bucket, fsspec ``storage_options`` pointing at the endpoint, a boto3 client and a
server-side request log (moto's recorder) to count the calls a piece of code makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    """A running moto S3 server and one bucket in it."""

    endpoint: str
    bucket: str
    recording: Path
    storage_options: dict = field(default_factory=dict)

    def client(self):
        """A boto3 S3 client for the server (for setup and checks, not the code under test)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def put(self, key: str, body: bytes = b"") -> str:
        """Upload ``body`` to ``key`` in the bucket; returns ``s3://bucket/key``."""
        self.client().put_object(Bucket=self.bucket, Key=key, Body=body)
        return f"s3://{self.bucket}/{key}"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def requests(self) -> Iterator[list[dict]]:
        """Record every request the server receives inside the block.

        Yields a list that is filled, on exit, with ``{"method", "url"}`` per request in arrival
        order (moto's recorder, server side: counts what really went over the wire).
        """
        import requests

        log: list[dict] = []
        base = f"{self.endpoint}/moto-api/recorder"
        requests.post(f"{base}/reset-recording", timeout=10).raise_for_status()
        requests.post(f"{base}/start-recording", timeout=10).raise_for_status()
        try:
            yield log
        finally:
            requests.post(f"{base}/stop-recording", timeout=10).raise_for_status()
            text = requests.get(f"{base}/download-recording", timeout=10).text
            log.extend({"method": e["method"], "url": e["url"]}
                       for e in map(json.loads, filter(None, text.splitlines())))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Start moto's S3 server on 127.0.0.1 (free port) for the session; stop it at the end.

    Yields ``(endpoint_url, recording_file)``. Sets the fake AWS credentials in the environment
    for the session and restores the previous values afterwards.
    """
    recording = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "MOTO_RECORDER_FILEPATH"]}
    os.environ.update(CREDENTIALS)
    # The recorder reads its file location when moto.moto_api is imported; keep it out of the
    # working tree even if another test imported moto first.
    os.environ["MOTO_RECORDER_FILEPATH"] = str(recording)
    from moto.moto_api import recorder
    from moto.server import ThreadedMotoServer

    recorder._location = str(recording)  # private: see comment above
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}", recording
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint) -> S3Server:
    """A fresh bucket on the session's moto server, with fsspec options to reach it."""
    endpoint, recording = s3_endpoint
    server = S3Server(
        endpoint=endpoint, bucket=f"zs-{uuid.uuid4().hex[:12]}", recording=recording,
        # s3fs: credentials as key/secret, endpoint through the botocore client kwargs.
        storage_options={"key": "testing", "secret": "testing",
                         "client_kwargs": {"endpoint_url": endpoint,
                                           "region_name": "us-east-1"}})
    server.client().create_bucket(Bucket=server.bucket)
    return server
