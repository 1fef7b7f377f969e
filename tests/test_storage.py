"""zslabel.storage: URIs back from filesystem paths, names that are not UTF-8, glob-or-literal."""

from __future__ import annotations

import os

import fsspec
import pytest
from s3_server import s3, s3_endpoint  # noqa: F401  (fixtures)
from source_files import serving

from zslabel import io_policy, storage
from zslabel.errors import InputError, OutputError
from zslabel.sources import fetch


def test_uri_maker_keeps_the_users_protocol_and_full_http_urls():
    local = fsspec.filesystem("file")
    assert storage.uri_maker("/data/x", local)("/data/x/a.jpg") == "/data/x/a.jpg"
    memory = fsspec.filesystem("memory")
    assert storage.uri_maker("memory://b/x", memory)("/b/x/a.jpg") == "memory:///b/x/a.jpg"
    # A chain: the path lives in the last link's filesystem.
    assert storage.uri_maker("simplecache::memory://b/x", memory)("/b/a.jpg") == "memory:///b/a.jpg"
    # fsspec's HTTP filesystem keeps full URLs as its paths: never "http://http://...".
    http = fsspec.filesystem("http")
    url = "http://127.0.0.1:8000/img.jpg"
    assert storage.uri_maker(url, http)(url) == url
    assert storage.uri_maker("https://h/a/", fsspec.filesystem("https"))("https://h/a/b.jpg") == "https://h/a/b.jpg"


def test_undecodable_name_bytes_round_trip_through_percent_escapes(tmp_path):
    raw = os.fsdecode(b"caf\xe9 100%.png")  # Latin-1 e-acute: not UTF-8
    assert storage.display_name(raw) == "caf%E9 100%.png"  # only the bad byte is escaped
    assert storage.display_name("plain ü #1 %41.png") == "plain ü #1 %41.png"
    assert storage.real_local_path("/d/caf%E9 100%.png") == "/d/" + raw
    assert storage.real_local_path("/d/plain %41.png") is None  # ASCII escapes are literal
    assert storage.real_local_path("/d/caf%C3%A9.png") == "/d/café.png"  # valid UTF-8, as in a URL
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9 100%.png")
    with open(path, "wb") as fh:
        fh.write(b"x")
    assert os.path.exists(storage.real_local_path(str(tmp_path / "caf%E9 100%.png")))


def test_open_path_finds_the_other_unicode_normalisation(tmp_path):
    import unicodedata

    local = fsspec.filesystem("file")
    nfd = tmp_path / unicodedata.normalize("NFD", "café.png")  # as macOS writes it
    nfd.write_bytes(b"x")
    nfc = str(tmp_path / unicodedata.normalize("NFC", "café.png"))  # as a manifest spells it
    assert nfc != str(nfd) and local.exists(str(nfd)) and not local.exists(nfc)
    assert storage.open_path(local, nfc) == str(nfd)
    assert storage.open_path(local, str(tmp_path / "absent é.png")) == str(tmp_path / "absent é.png")


def test_existing_names_with_glob_characters_are_not_patterns(tmp_path):
    (tmp_path / "photos [2021]").mkdir()
    assert not storage.is_pattern(str(tmp_path / "photos [2021]"))
    assert storage.is_pattern(str(tmp_path / "photos [2022]"))  # absent: a pattern
    assert storage.is_pattern(str(tmp_path / "*.jpg"))
    assert not storage.is_pattern(str(tmp_path / "plain"))  # no metacharacters: no call at all


def test_unknown_protocol_is_the_callers_error_type():
    with pytest.raises(InputError, match="cannot open nosuchproto://x"):
        storage.url_to_fs("nosuchproto://x")
    with pytest.raises(OutputError):
        storage.url_to_fs("nosuchproto://x", error=OutputError)


def test_every_store_cuts_an_image_read_at_the_byte_limit(tmp_path, s3):
    """A file far larger than any image (a video or disk image named .jpg) is a read_error row
    as soon as its size is known, on every kind of filesystem, never read whole into a decode
    task's memory: local files by their size, object stores by a ranged read of limit + 1 bytes
    (one request, as many as a whole read), sync filesystems likewise. Files at the limit, and
    empty ones, are read as they are."""
    from zslabel.errors import error_code

    limit = 1000
    io = io_policy.IOPolicy(timeout=5, retries=0, max_bytes=limit)
    sizes = {"big.jpg": limit + 1, "at_limit.jpg": limit, "empty.jpg": 0}
    local, memory = [], []
    mem = fsspec.filesystem("memory")
    for name, n in sizes.items():
        body = bytes(range(256)) * (n // 256) + bytes(n % 256)
        (tmp_path / name).write_bytes(body)
        local.append(str(tmp_path / name))
        s3.put(name, body)
        mem.pipe(f"/capped/{name}", body)
        memory.append(f"memory:///capped/{name}")
    huge = tmp_path / "sparse.jpg"  # 8 GiB on paper, no disk: reading it whole would exhaust memory
    with open(huge, "wb") as fh:
        fh.truncate(8 << 30)
    for paths, options in ((local + [str(huge)], None), ([s3.uri(n) for n in sizes], s3.storage_options),
                           (memory, None)):
        out = fetch.fetch_many(paths, options, io=io)
        (d0, e0), (d1, e1), (d2, e2) = out[:3]
        assert d0 is None and error_code(e0) == "read_error" and "InputTooLarge" in e0 and "1,000" in e0, (paths[0], e0)
        assert e1 is None and len(d1) == limit, paths[1]
        assert e2 is None and d2 == b"", paths[2]
        if len(out) > 3:
            assert out[3][0] is None and "8,589,934,592 bytes" in out[3][1], out[3]


def test_special_files_named_like_images_are_read_errors_never_read(tmp_path):
    """A named pipe blocks whoever opens it for reading until a writer comes (a decode task
    hung for good on one); /dev/zero and /dev/urandom never end (1 GiB was read before the byte
    limit cut it, and the row said unidentified_image). Each is a read_error naming what it is,
    unread, next to a normal image that still reads."""
    import os
    import socket
    import threading

    from zslabel.errors import error_code

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "random.png").symlink_to("/dev/urandom")
    (tmp_path / "folder.jpg").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.jpg"))
    (tmp_path / "ok.jpg").write_bytes(b"\xff\xd8 jpeg bytes")
    names = ["pipe.jpg", "zero.jpg", "random.png", "folder.jpg", "sock.jpg", "ok.jpg"]
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(fetch.fetch_many([str(tmp_path / n) for n in names])),
                              daemon=True)
    reader.start()
    reader.join(30)
    sock.close()
    assert not reader.is_alive(), "fetching hung on a special file"
    errors = dict(zip(names, (e for _, e in out)))
    for name, kind in (("pipe.jpg", "named pipe (FIFO)"), ("zero.jpg", "character device"),
                       ("random.png", "character device"), ("folder.jpg", "directory")):
        assert error_code(errors[name]) == "read_error" and f"NotARegularFile: a {kind}" in errors[name], errors[name]
    assert error_code(errors["sock.jpg"]) == "read_error"  # a socket cannot even be opened (ENXIO)
    assert out[-1] == (b"\xff\xd8 jpeg bytes", None)


def test_file_uris_name_the_local_file_they_percent_encode(tmp_path):
    """RFC 8089 file URIs in a manifest (file:///a%20b.png, file:/..., file://localhost/...) read
    the file they name; one whose name, as written, exists (a literal %20) reads that file."""
    (tmp_path / "b c.png").write_bytes(b"space")
    (tmp_path / "a.png").write_bytes(b"plain a")
    (tmp_path / "lit%20eral.png").write_bytes(b"literal")
    base = str(tmp_path)
    uris = [f"file://{base}/b%20c.png", f"file:{base}/b%20c.png", f"file://localhost{base}/b%20c.png",
            f"file://{base}/%61.png", f"file://{base}/b c.png", f"file://{base}/lit%20eral.png"]
    assert fetch.fetch_many(uris) == [(b"space", None)] * 3 + [(b"plain a", None), (b"space", None),
                                                               (b"literal", None)]


def test_file_uris_name_their_rfc_8089_path_for_outputs_and_models(tmp_path):
    """--output and --model given as file: URIs are read as inputs are (percent-decoded): an
    output file:///…/out%20sp is the folder 'out sp', not one literally named out%20sp."""
    from zslabel.model import resolve_checkpoint
    from zslabel.storage import url_to_fs

    fs, path = url_to_fs(f"file://{tmp_path}/out%20sp")
    assert path == f"{tmp_path}/out sp"
    (tmp_path / "my model").mkdir()
    (tmp_path / "my model" / "config.json").write_text('{"model_type": "clip"}')
    assert str(resolve_checkpoint(f"file://{tmp_path}/my%20model")) == f"{tmp_path}/my model"


def test_an_upper_case_scheme_names_the_same_filesystem():
    """``HTTP://host/x.jpg`` in a manifest was a read_error ("Protocol not known: HTTP"):
    schemes are case-insensitive (RFC 3986 3.1)."""
    import fsspec

    from zslabel.sources import fetch_bytes
    from zslabel.storage import url_to_fs

    fs, path = url_to_fs("HTTP://127.0.0.1:9/x.jpg")
    assert "http" in fs.protocol and path == "http://127.0.0.1:9/x.jpg"
    fsspec.filesystem("memory").pipe("/upper-scheme/a.bin", b"abc")
    assert fetch_bytes("MEMORY://upper-scheme/a.bin") == (b"abc", None)
    assert fetch_bytes("Memory://upper-scheme/a.bin") == (b"abc", None)


def test_one_rule_for_the_local_path_a_value_names(tmp_path):
    """``storage.local_path`` is the one reading of "a local path or a file: URI": the input and
    model stamps read ``file:///a%20b`` as ``/a b`` (they kept ``%20`` and stamped nothing, so
    a --resume of a finished run reran it), and ``FILE:///x`` is a local model, not one to copy."""
    from zslabel.errors import ModelLoadError
    from zslabel.model import resolve_checkpoint
    from zslabel.storage import is_local_folder, local_path, local_spelling, local_stamp

    folder = tmp_path / "a b"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"x")
    uri = "file://" + str(folder).replace(" ", "%20")
    assert local_path(uri) == str(folder) and local_path("FILE://" + str(folder)) == str(folder)
    assert local_path("s3://b/x") is None and local_path("file://server/share/x") is None
    assert local_path("photos/x.jpg") == "photos/x.jpg"
    assert local_stamp(uri) == local_stamp(str(folder)) is not None
    assert is_local_folder(uri) and local_spelling(uri) == str(folder)
    assert local_path("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"  # a hub id: not copied
    with pytest.raises(ModelLoadError, match="model folder .*a b has no config.json"):  # read here, not copied
        resolve_checkpoint("FILE://" + str(folder))


def test_the_stamp_of_a_pattern_covers_every_file_it_matches(tmp_path):
    """A finished run's --resume returns without Ray only while the input's stamp is unchanged:
    for glob and brace patterns the stamp is over the matched files (brackets of an existing
    folder name taken literally, as the input kinds take them), so any change to one of them,
    or a new match, changes it; the output inside the input is left out."""
    from zslabel.storage import local_stamp

    root = tmp_path / "photos [2021]"
    root.mkdir()
    for i in range(3):
        (root / f"s-{i}.tar").write_bytes(b"x" * i)
    (root / "notes.txt").write_bytes(b"n")
    braces, glob = f"{root}/s-{{0..1}}.tar", f"{root}/s-*.tar"
    before = {p: local_stamp(p) for p in (braces, glob)}
    assert None not in before.values() and before[braces] != before[glob]
    (root / "notes.txt").write_bytes(b"changed")  # matched by neither
    assert {p: local_stamp(p) for p in (braces, glob)} == before
    os.utime(root / "s-1.tar", ns=(5, 5))
    assert local_stamp(braces) != before[braces] and local_stamp(glob) != before[glob]
    now = local_stamp(glob)
    (root / "s-3.tar").write_bytes(b"new")  # a new shard: the glob sees it, the range does not
    assert local_stamp(glob) != now
    assert local_stamp(f"{root}/nothing-*.tar") is None and local_stamp(f"{root}/s-{{7..8}}.tar") is None
    out = root / "out"
    out.mkdir()
    everything = local_stamp(f"{root}/**", exclude=str(out))
    (out / "part-0.parquet").write_bytes(b"p")
    assert local_stamp(f"{root}/**", exclude=str(out)) == everything


def test_an_http_input_that_fails_says_how_not_that_it_does_not_exist():
    """fsspec's HTTP filesystem calls every failed request "not found" (fsspec#873): a refused
    connection, a 403 (an expired signed URL) or a 500 was "no images found: URL does not
    exist". The check before Ray now names the failure; a 404 still says it does not exist."""
    import http.server

    from zslabel.options import check_input_exists

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(int(self.path.split("/")[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    with serving(Handler) as base:
        for status, message in ((403, r"access denied \(ClientResponseError: 403"),
                                (500, r"cannot read .*/500/list\.txt \(ClientResponseError: 500"),
                                (404, r"no images found: .*/404/list\.txt does not exist")):
            with pytest.raises(InputError, match=message):
                check_input_exists(f"{base}/{status}/list.txt")
    with pytest.raises(InputError, match=r"cannot reach http://127\.0\.0\.1:1/list\.txt \(ClientConnectorError.*"
                                         r"nothing accepts connections there: check the host and port"):
        check_input_exists("http://127.0.0.1:1/list.txt")


def test_an_http_url_is_fetched_as_written_escapes_and_all():
    """A ``%XX`` escape is not its character (RFC 3986 2.2): ``/a%3Bb`` and ``/a;b`` are two
    resources, as are ``/p%.png`` and ``/p%25.png``. The URL went out through yarl's requoting
    (``%3B %26 %3D %2C %40`` decoded, a bare ``%`` escaped), and a server that told them apart
    gave those rows another resource's bytes (aio-libs/yarl#223). What a URL may not hold
    (a space, non-ASCII) is still escaped, as UTF-8."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # answers with the request target exactly as it arrived
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    sent = {"/a%3Bb.png": "/a%3Bb.png", "/a;b.png": "/a;b.png", "/c%2Cd%40e%26f%3Dg.png": "/c%2Cd%40e%26f%3Dg.png",
            "/p%.png": "/p%.png", "/p%25.png": "/p%25.png", "/s%2Fx.png": "/s%2Fx.png",
            "/img?v=1&w=%26": "/img?v=1&w=%26", "/sp ace é.png": "/sp%20ace%20%C3%A9.png"}
    with serving(Handler) as base:
        got = fetch.fetch_many([base + p for p in sent])
    assert [(data.decode() if data else error) for data, error in got] == list(sent.values())


@pytest.mark.parametrize("pattern, names", [
    ("s-{000..004..2}.tar", ["s-000.tar", "s-002.tar", "s-004.tar"]),  # a step, padding kept
    ("s-{a..c}.tar", ["s-a.tar", "s-b.tar", "s-c.tar"]),  # letters
    ("{a..e..2}", ["a", "c", "e"]),
    ("{5..1..2}", ["5", "3", "1"]),  # descending; the step's sign is ignored, as bash ignores it
    ("{1..10..-3}", ["1", "4", "7", "10"]),
    ("{3..1}", ["3", "2", "1"]),
    ("{0..10}", [str(i) for i in range(11)]),  # "0" alone asks for no padding
    ("{010..8}", ["010", "009", "008"]),
    ("{-05..-3}", ["-05", "-04", "-03"]),
    ("{a,{b,c}}", ["a", "b", "c"]),  # nested lists, as bash
    ("x{a,}y", ["xay", "xy"]),
    ("a{b}c{1,2}", ["a{b}c1", "a{b}c2"]),  # a group with no comma and no range is text
])
def test_expand_braces_as_bash_expands_them(pattern, names):
    # These are bash's own expansions (`printf '%s\n' PATTERN`), WebDataset's braceexpand's too.
    assert storage.expand_braces(pattern) == names


@pytest.mark.parametrize("pattern", ["s-{a..5}.tar", "s-{1..}.tar", "s-{aa..cc}.tar", "s-{000..004.tar"])
def test_a_brace_range_that_cannot_be_expanded_is_refused(pattern):
    with pytest.raises(InputError, match="cannot expand the brace group"):
        storage.expand_braces(pattern)


def test_brace_step_and_letter_ranges_read_the_shards_they_name(tmp_path):
    from source_files import jpeg, make_tar

    from zslabel.sources import plan_inputs

    for name in ["s-a", "s-b", "s-c", "s-d", "s-000", "s-001", "s-002", "s-004"]:
        make_tar(tmp_path / f"{name}.tar", [("x.jpg", jpeg())])
    for pattern, shards in [("s-{a..c}.tar", ["s-a", "s-b", "s-c"]),
                            ("s-{000..004..2}.tar", ["s-000", "s-002", "s-004"]),
                            ("s-{d..b..2}.tar", ["s-d", "s-b"])]:
        plan = plan_inputs(f"{tmp_path}/{pattern}", use_ray=False)
        rows = plan.read_locally()
        plan.finalize()
        assert [r["path"] for r in rows] == [f"{tmp_path}/{s}.tar#x.jpg" for s in shards], pattern
        assert not any(r.get("read_error") for r in rows)
        assert plan.listed == len(rows) + plan.skipped + plan.duplicates_removed
    # A range that names nothing is refused while planning (before the model and Ray), never one
    # "No such file" row for its literal name.
    with pytest.raises(InputError, match=r"cannot expand the brace group \{a\.\.4\}"):
        plan_inputs(f"{tmp_path}/s-{{a..4}}.tar", use_ray=False)


def test_the_stamp_of_a_folder_follows_its_links_to_folders(tmp_path):
    """The folder input lists what a link to a folder holds, so the stamp that tells a finished
    run's --resume "nothing changed" reads it too: a new image behind ``photos/more -> /elsewhere``
    was never labeled (exit 0, "the model ran on 0"; hunt: os.walk follows no links by default).
    A link back up (a loop) is walked once, and the output is still left out."""
    from zslabel.storage import local_stamp

    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    (photos / "a.png").write_bytes(b"a")
    (elsewhere / "1.png").write_bytes(b"1")
    (photos / "more").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(tmp_path)  # loops back through photos/more/up/photos/more/...
    (photos / "out").mkdir()
    before = local_stamp(str(photos), exclude=str(photos / "out"))
    assert before is not None
    (photos / "out" / "part-0.parquet").write_bytes(b"p")
    assert local_stamp(str(photos), exclude=str(photos / "out")) == before
    (elsewhere / "2.png").write_bytes(b"2")
    assert local_stamp(str(photos), exclude=str(photos / "out")) != before
