"""Bounded time per input (issue 23): real HTTP servers on 127.0.0.1 that stall, trickle, fail
transiently, reset connections and redirect; fetched through ``fetch.fetch_many`` and the
decode stage, and once end to end through Ray. The inputs' own files (manifests, tar shards,
Parquet files) are read within the job's ``--io-timeout`` too (``sources.plan_inputs(io=...)``).

Each wall-time bound is generous (the machine running the suite is shared) but far below what
one-after-another fetching or aiohttp's 300 s default would take.
"""

from __future__ import annotations

import collections
import io
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import photo

from zslabel import storage
from zslabel.decode import PreprocessSpec
from zslabel.errors import error_code
from zslabel.io_policy import IOPolicy
from zslabel.sources import fetch
from zslabel.stages import decode_batch, decode_block

SPEC = PreprocessSpec(resize_mode="shortest_edge", shortest_edge=32, crop_hw=(32, 32))
FAST = dict(backoff=0.05)  # short backoff: the tests count attempts, not wait


def jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    photo(40, 30, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Server:
    """A threaded HTTP server whose behaviour is chosen by the first path segment:

    ``/ok/X`` the image; ``/stall/X`` reads the request and never answers; ``/stall-body/X``
    answers HEAD (4096 bytes) and GET's status line and headers, sends 16 bytes of the body and
    then nothing (a manifest that passes the existence check, then stalls); ``/endless/X``
    streams JPEG frames as fast as it can, forever (multipart, no length); ``/huge/X`` declares
    a 50 GiB body; ``/trickle/X``
    sends headers then one body byte every 0.2 s, never finishing; ``/fail-N-CODE/X`` answers
    CODE (with ``Retry-After: 0`` for 429) to the first N requests of that path, then the image;
    ``/reset-N/X`` resets the connection (RST) N times, then the image; ``/redirect/X`` 302 to
    ``/ok/X``; ``/loop/X`` 302 to itself; ``/missing/X`` 404.
    """

    def __init__(self):
        self.hits: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.body = jpeg()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    hit = server.hits[self.path]
                kind = self.path.split("/")[1]
                if kind == "stall":
                    server.stop.wait(60)
                    return
                if kind == "stall-body":
                    self.send_response(200)
                    self.send_header("Content-Length", "4096")
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(b"path\n00000.jpg\n")
                        self.wfile.flush()
                        server.stop.wait(60)
                    return
                if kind == "endless":  # an IP camera's MJPEG stream: frames forever, fast, no length
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                    self.end_headers()
                    part = b"--frame\r\nContent-Type: image/jpeg\r\n\r\n" + server.body + b"\r\n"
                    while not server.stop.is_set():
                        try:
                            self.wfile.write(part * 16)
                        except OSError:
                            return
                    return
                if kind == "huge":  # declares a length far beyond any image
                    self.send_response(200)
                    self.send_header("Content-Length", str(50 << 30))
                    self.end_headers()
                    return
                if kind == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    while not server.stop.wait(0.2):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                if kind.startswith("fail-"):
                    _, n, code = kind.split("-")
                    if hit <= int(n):
                        self.send_response(int(code))
                        if code == "429":
                            self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                if kind.startswith("reset-") and hit <= int(kind.split("-")[1]):
                    # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if kind == "redirect":
                    return self._redirect(self.path.replace("/redirect/", "/ok/", 1))
                if kind == "loop":
                    return self._redirect(self.path)
                if kind == "missing":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(server.body)

            def _redirect(self, to):
                self.send_response(302)
                self.send_header("Location", to)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class HTTPServer(ThreadingHTTPServer):
            request_queue_size = 128  # listen backlog: the default 5 drops concurrent connects

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http():
    server = Server()
    try:
        yield server
    finally:
        server.close()


def test_stalled_urls_are_fetched_at_once_each_within_the_timeout(http):
    n = 12
    urls = [f"{http.url}/stall/{i}.jpg" for i in range(n)] + [f"{http.url}/ok/a.jpg"]
    t0 = time.perf_counter()
    out = fetch.fetch_many(urls, io=IOPolicy(timeout=1.0, retries=3, **FAST))
    took = time.perf_counter() - t0
    # One after another this is n timeouts (12 s); aiohttp's default would wait 300 s each.
    assert took < 6, took
    assert [d for d, _ in out[-1:]] == [http.body]
    for data, err in out[:n]:
        assert data is None and error_code(err) == "read_error" and "Timeout" in err, err
    # A timeout is not retried: one request per stalled URL.
    assert all(http.hits[f"/stall/{i}.jpg"] == 1 for i in range(n))


def test_transient_failures_are_retried_with_backoff(http):
    urls = [f"{http.url}/fail-2-503/a.jpg", f"{http.url}/fail-2-429/b.jpg", f"{http.url}/fail-1-502/c.jpg",
            f"{http.url}/reset-2/d.jpg", f"{http.url}/redirect/e.jpg"]
    out = fetch.fetch_many(urls, io=IOPolicy(timeout=5, retries=3, **FAST))
    assert [err for _, err in out] == [None] * len(urls)
    assert all(data == http.body for data, _ in out)
    assert http.hits["/fail-2-503/a.jpg"] == 3 and http.hits["/fail-2-429/b.jpg"] == 3
    assert http.hits["/reset-2/d.jpg"] == 3


def test_retries_are_bounded_and_permanent_errors_not_retried(http):
    io_policy = IOPolicy(timeout=5, retries=2, **FAST)
    urls = [f"{http.url}/fail-99-503/a.jpg", f"{http.url}/missing/b.jpg", f"{http.url}/fail-9-403/c.jpg",
            f"{http.url}/loop/d.jpg"]
    t0 = time.perf_counter()
    out = fetch.fetch_many(urls, io=io_policy)
    assert time.perf_counter() - t0 < 10
    errs = [err for _, err in out]
    assert all(error_code(e) == "read_error" for e in errs), errs
    assert "503" in errs[0] and "(after 3 attempts)" in errs[0]
    assert http.hits["/fail-99-503/a.jpg"] == 3             # 1 + retries
    assert "FileNotFoundError" in errs[1] and http.hits["/missing/b.jpg"] == 1
    assert "403" in errs[2] and http.hits["/fail-9-403/c.jpg"] == 1
    assert "Redirect" in errs[3]                              # aiohttp's TooManyRedirects: not retried


def test_a_trickling_server_is_cut_after_the_attempt_limit(http):
    # A byte every 0.2 s never trips a 0.3 s read timeout; the attempt limit (10 x 0.3 s) ends it.
    policy = IOPolicy(timeout=0.3, retries=3, **FAST)
    t0 = time.perf_counter()
    (data, err), = fetch.fetch_many([f"{http.url}/trickle/a.jpg"], io=policy)
    took = time.perf_counter() - t0
    assert data is None and error_code(err) == "read_error" and "gave up after 3 s" in err, err
    assert policy.attempt_limit <= took < policy.attempt_limit + 5
    assert http.hits["/trickle/a.jpg"] == 1


def test_endless_and_huge_responses_are_cut_at_the_byte_limit(http):
    policy = IOPolicy(timeout=5, retries=3, max_bytes=8 << 20, **FAST)
    t0 = time.perf_counter()
    out = fetch.fetch_many([f"{http.url}/endless/cam.jpg", f"{http.url}/huge/a.jpg", f"{http.url}/ok/b.jpg"],
                             io=policy)
    assert time.perf_counter() - t0 < 20
    (d0, e0), (d1, e1), (d2, e2) = out
    assert d0 is None and e0.startswith("read_error: InputTooLarge: more than 8,388,608 bytes and still sending"), e0
    assert d1 is None and e1.startswith("read_error: InputTooLarge: Content-Length 53,687,091,200 bytes"), e1
    assert d2 == http.body and e2 is None
    assert http.hits["/endless/cam.jpg"] == 1 and http.hits["/huge/a.jpg"] == 1  # not transient


def test_decode_stage_gives_one_row_per_stalled_url_in_bounded_time(http):
    stalled = [f"{http.url}/stall/{i}.jpg" for i in range(20)]
    good = [f"{http.url}/ok/{i}.jpg" for i in range(5)]
    paths = np.array(stalled + good + ["inline.eps"], dtype=object)
    data = np.array([None] * (len(paths) - 1) + [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"], dtype=object)
    block = {"path": paths, "input_index": np.arange(len(paths)), "data": data}
    t0 = time.perf_counter()
    # batches of 8: three slices of stalled URLs, the next fetched while the previous decodes
    out = list(decode_block(block, SPEC, io=IOPolicy(timeout=1.0, retries=3), batch_size=8))
    took = time.perf_counter() - t0
    errors = np.concatenate([o["error"] for o in out])
    assert len(errors) == len(paths)
    assert [error_code(e) for e in errors[:20]] == ["read_error"] * 20
    assert list(errors[20:25]) == [""] * 5
    assert errors[25].startswith("unsupported_format: EPS")
    assert took < 10, took  # one after another: 20 s; unbounded: 20 x 300 s


def test_decode_batch_without_a_started_fetch_fetches_itself(http):
    batch = {"path": np.array([f"{http.url}/ok/a.jpg", f"{http.url}/missing/b.jpg"], dtype=object),
             "input_index": np.arange(2)}
    out = decode_batch(batch, SPEC, io=IOPolicy(timeout=5))
    assert out["error"][0] == "" and out["pixels"][0].any()
    assert error_code(out["error"][1]) == "read_error"


# ------------------------------------------------------------------------------------------
# the inputs' own files: manifests, tar shards and Parquet files are read within --io-timeout


@pytest.mark.parametrize("name", ["photos/", "urls.txt"])
def test_an_input_that_never_answers_is_called_unreachable_not_missing(http, name):
    """fsspec's HTTP ``exists``/``info`` turn a server that answers neither HEAD nor GET in time
    into "not found": the check must say that the server did not answer, and name the setting."""
    from zslabel.errors import InputError
    from zslabel.options import check_input_exists

    url = f"{http.url}/stall/{name}"
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        check_input_exists(url, io=IOPolicy(timeout=1.0, retries=0))
    took, text = time.perf_counter() - t0, str(info.value)
    assert took < 15, took
    assert "does not exist" not in text and url in text and "--io-timeout" in text, text
    check_input_exists(f"{http.url}/ok/a.jpg", io=IOPolicy(timeout=1.0, retries=0))  # an answer: it exists
    with pytest.raises(InputError, match="does not exist"):
        check_input_exists(f"{http.url}/missing/a.jpg", io=IOPolicy(timeout=1.0, retries=0))


@pytest.mark.parametrize("name", ["urls.txt", "urls.csv", "urls.jsonl", "parts.parquet"])
def test_a_stalled_manifest_fails_within_the_jobs_io_timeout(http, name):
    from zslabel.config import JobConfig
    from zslabel.errors import InputError
    from zslabel.options import check_input_exists
    from zslabel.sources import plan_inputs

    url = f"{http.url}/stall-body/{name}"
    config = JobConfig(input=url, io_timeout=1.0, io_retries=3)
    check_input_exists(url, config.storage_options, io=config.io_policy())  # it exists: the check passes
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        # As the job plans it, within its I/O policy; fails while reading, before any Ray call.
        plan_inputs(config.input, storage_options=config.storage_options, io=config.io_policy(), cluster_cpus=2.0)
    took = time.perf_counter() - t0
    text = str(info.value)
    print(f"stalled {name}, --io-timeout 1: InputError after {took:.1f} s: {text}")
    # ~1 s of waiting; with the default policy (the sources' only one before) 30 s or more.
    assert took < 15, took
    assert text.startswith("cannot ") and url in text and "\n" not in text, text
    assert "Timeout" in text and text.endswith("(no answer within --io-timeout 1 s)"), text


def test_a_stalled_s3_manifest_fails_within_the_jobs_io_timeout(http):
    """s3fs retries a stalled read in nested loops of its own (25 tries): they must not multiply
    the job's --io-timeout. The loopback server plays an S3 endpoint whose object answers HEAD
    and the GET's headers, then stalls."""
    from zslabel.config import JobConfig
    from zslabel.errors import InputError
    from zslabel.sources import plan_inputs

    config = JobConfig(input="s3://stall-body/urls.txt", io_timeout=1.0, io_retries=0,
                       storage_options={"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": http.url}})
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        plan_inputs(config.input, storage_options=config.storage_options, io=config.io_policy(), cluster_cpus=2.0)
    took = time.perf_counter() - t0
    print(f"stalled S3 manifest, --io-timeout 1 --io-retries 0: InputError after {took:.1f} s: {info.value}")
    assert took < 15, took  # 40 s with s3fs's own retries
    text = str(info.value)
    assert "s3://stall-body/urls.txt" in text and text.endswith("(no answer within --io-timeout 1 s)"), text


def test_stalled_tar_shards_become_error_rows_within_the_io_timeout(http):
    import pickle

    from zslabel import sources

    policy = IOPolicy(timeout=1.0, retries=3)
    # /stall-body/: status and headers, then nothing; /stall/: no answer to HEAD or GET, which
    # fsspec reports as FileNotFoundError raised from the timeout: still named a timeout here.
    for kind in ("stall-body", "stall"):
        uri = f"{http.url}/{kind}/a.tar"
        t0 = time.perf_counter()
        rows = sources.plan_inputs(uri, io=policy, use_ray=False).read_locally()
        took = time.perf_counter() - t0
        print(f"{kind} tar, --io-timeout 1: error row after {took:.1f} s: {rows[0]['read_error']}")
        assert took < 15, took  # one or two waits of 1 s; 30 s each by default
        assert [r["path"] for r in rows] == [uri]
        err = rows[0]["read_error"]
        assert err.startswith("read_error: tar ") and "Timeout" in err, err
        assert err.endswith("(no answer within --io-timeout)"), err
    # With Ray the options travel to the read tasks pickled: the timeout must survive that.
    options = storage.io_storage_options(uri, {}, policy)
    assert pickle.loads(pickle.dumps(options))["client_kwargs"]["timeout"].sock_read == 1.0


def test_timeouts_reach_each_filesystem_in_its_own_form():
    import aiohttp

    policy = IOPolicy(timeout=7, retries=2)
    http_opts = storage.io_storage_options("https://h/x.jpg", {"headers": {"a": "b"}}, policy)
    assert http_opts["headers"] == {"a": "b"}
    t = http_opts["client_kwargs"]["timeout"]
    assert isinstance(t, aiohttp.ClientTimeout) and (t.sock_connect, t.sock_read, t.total) == (7, 7, None)
    s3 = storage.io_storage_options("s3://b/k", {"config_kwargs": {"read_timeout": 99}}, policy)
    assert s3["config_kwargs"] == {"connect_timeout": 7, "read_timeout": 99,  # the user's value wins
                                   "retries": {"max_attempts": 2, "mode": "standard"}}
    assert storage.io_storage_options("gs://b/k", {}, policy)["session_kwargs"]["timeout"].sock_read == 7
    assert storage.io_storage_options("az://c/k", {}, policy) == {"connection_timeout": 7, "read_timeout": 7}
    assert storage.io_storage_options("/local/x", {"a": 1}, policy) == {"a": 1}
    # the real filesystems accept them
    fs, _ = storage.url_to_fs("http://127.0.0.1:1/x.jpg", io=policy)
    assert fs.client_kwargs["timeout"].sock_read == 7
    fs, _ = storage.url_to_fs("s3://bucket/x", {"key": "k", "secret": "s"}, io=policy)
    assert fs.config_kwargs["connect_timeout"] == 7
    # A chain (simplecache::s3://...): fsspec gives the remote link only the options keyed by its
    # protocol, so the timeouts go there, beside the user's own for that link.
    chain = storage.io_storage_options("simplecache::s3://b/k", {"s3": {"key": "k"}, "simplecache": {"x": 1}}, policy)
    assert chain["s3"]["key"] == "k" and chain["s3"]["config_kwargs"]["connect_timeout"] == 7
    assert chain["simplecache"] == {"x": 1}
    fs, _ = storage.url_to_fs("simplecache::s3://bucket/x", {"s3": {"key": "k", "secret": "s"}}, io=policy)
    assert fs.fs.config_kwargs["read_timeout"] == 7 and fs.fs.retries == 1


def test_a_stalled_server_behind_a_cache_chain_is_cut_within_the_io_timeout(http, tmp_path):
    url = f"simplecache::{http.url}/stall/a.jpg"
    so = {"simplecache": {"cache_storage": str(tmp_path)}}
    t0 = time.perf_counter()
    (data, err), (good, err2) = fetch.fetch_many([url, f"simplecache::{http.url}/ok/b.jpg"], so,
                                                   io=IOPolicy(timeout=1.0, retries=0))
    took = time.perf_counter() - t0
    assert data is None and error_code(err) == "read_error", err
    assert good == http.body and err2 is None
    # the link's own read timeout (1 s; 10 s, the attempt limit, when the chain's link had none)
    assert "--io-timeout 1 s" in err and took < 8, (took, err)


def test_backoff_doubles_with_jitter_and_honours_a_short_retry_after():
    p = IOPolicy(timeout=1, retries=5, backoff=1.0)
    for n, d in enumerate([1, 2, 4, 8, 10, 10]):
        assert d / 2 <= p.delay(n) <= d
    assert p.delay(3, retry_after=0.0) == 0.0 and p.delay(0, retry_after=7) == 7
    assert p.delay(0, retry_after=3600) <= 1  # a long Retry-After falls back to our own backoff
    with pytest.raises(ValueError):
        IOPolicy(timeout=0)


def test_label_job_over_stalled_urls_is_bounded(tiny_clip, ray_local, tmp_path, http):
    import pyarrow.parquet as pq

    from zslabel import JobConfig, run_label_job

    stalled = [f"{http.url}/stall/{i}.jpg" for i in range(16)]
    good = [f"{http.url}/ok/{i}.jpg" for i in range(3)] + [f"{http.url}/fail-1-503/x.jpg"]
    manifest = tmp_path / "urls.txt"
    manifest.write_text("\n".join(stalled + good) + "\n")
    t0 = time.perf_counter()
    summary = run_label_job(JobConfig(input=str(manifest), output=str(tmp_path / "out"), labels=["a", "b"],
                                      model=str(tiny_clip), io_timeout=1.0, io_retries=2, batch_size=8))
    took = time.perf_counter() - t0
    rows = {r["path"]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert summary.rows == len(rows) == 20
    assert all(error_code(rows[u]["error"]) == "read_error" for u in stalled)
    assert all(rows[u]["error"] is None for u in good)
    # The fetching itself takes ~1-2 s; the rest is Ray and the model starting on a shared machine.
    print(f"label job over {len(stalled)} stalled + {len(good)} good URLs: {took:.1f} s "
          f"(timings {getattr(summary, 'timings', {})})")
    assert took < 240, took
