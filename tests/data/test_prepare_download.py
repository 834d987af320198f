"""Downloads against a local HTTP server (Range, cut transfers, corrupt partial files, wrong
checksums, HTTP errors), safe extraction of hostile tar archives, and `protopnet data --download`
end to end from a file:// URL."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from protopnet.cli import main
from protopnet.data import download as dl
from protopnet.data.download import (
    ChecksumError,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download_file,
    extract_archive,
    fetch_dataset,
    with_base_url,
)
from conftest import make_cub

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB, not a multiple of the chunk size
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A local HTTP server with knobs: serve files, honour or ignore Range, cut a transfer short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        self.cut_next_after: int | None = None
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next_after is not None:
                    body, server.cut_next_after = body[: server.cut_next_after], None
                    self.close_connection = True
                # Counted before the write: once the body is out the client may return, and the
                # test read the count, before this thread runs again.
                server.sent += len(body)
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    s.files["/data.bin"] = PAYLOAD
    yield s
    s.close()


def fetch(server, dest, **kw):
    kw.setdefault("md5", MD5)
    return download_file(f"{server.url}/data.bin", dest, retry_wait=0, timeout=10, chunk_size=50_000, **kw)


def test_downloads_verifies_and_reports_progress(server, tmp_path):
    seen = []
    path = fetch(server, tmp_path / "d" / "data.bin", sha256=SHA256, progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "d" / "data.bin.part").exists()
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert server.requests == [("/data.bin", None)]
    fetch(server, tmp_path / "d" / "data.bin")  # verified file already there: no request
    assert len(server.requests) == 1


def test_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:100_000])
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", "bytes=100000-")]
    assert server.sent == len(PAYLOAD) - 100_000  # only the rest travelled


def test_a_transfer_cut_short_is_resumed(server, tmp_path):
    server.cut_next_after = 120_000
    dest = fetch(server, tmp_path / "data.bin")
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0] == ("/data.bin", None)
    assert server.requests[1][1] is not None and server.requests[1][1].startswith("bytes=")
    assert 0 < int(server.requests[1][1][6:-1]) <= 120_000


def test_a_corrupt_partial_file_is_deleted_and_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"\xff" * 100_000)  # wrong bytes, right length
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", "bytes=100000-"), ("/data.bin", None)]


def test_a_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:50_000])
    assert fetch(server, tmp_path / "data.bin").read_bytes() == PAYLOAD  # not 50 KB + the whole file


def test_a_complete_partial_file_answered_416_is_accepted(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    assert fetch(server, tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.sent == 0


def test_a_wrong_checksum_deletes_the_file_and_says_so(server, tmp_path):
    with pytest.raises(ChecksumError, match="MD5 .* does not match the published 0{32}.*deleted"):
        fetch(server, tmp_path / "data.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "data.bin").write_bytes(b"stale")  # a wrong complete file is replaced
    assert fetch(server, tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_http_errors_are_one_line_and_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*--url") as error:
        download_file(f"{server.url}/missing.tgz", tmp_path / "x.tgz", md5=MD5, retry_wait=0)
    assert "\n" not in str(error.value) and len(server.requests) == 1
    with pytest.raises(DownloadError, match="attempts"):
        download_file("http://127.0.0.1:9/nothing", tmp_path / "y.tgz", attempts=2, retry_wait=0, timeout=2)


def test_file_urls_work(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    assert download_file(source.as_uri(), tmp_path / "out.bin", md5=MD5).read_bytes() == PAYLOAD


def test_official_files_and_mirrors():
    (cub,) = dl.CUB_200_2011
    assert cub.url.startswith("https://data.caltech.edu/") and cub.filename == "CUB_200_2011.tgz"
    assert cub.md5 == "97eceeb196236b17998738112f37df78"
    assert {f.filename for f in dl.STANFORD_CARS} == {"car_devkit.tgz", "cars_train.tgz", "cars_test.tgz", "cars_test_annos_withlabels.mat"}
    mirrored = with_base_url(dl.STANFORD_CARS, "https://mirror.example/cars")
    assert [f.url for f in mirrored] == [f"https://mirror.example/cars/{f.filename}" for f in dl.STANFORD_CARS]
    assert [f.md5 for f in mirrored] == [f.md5 for f in dl.STANFORD_CARS]
    assert with_base_url(dl.CUB_200_2011, "https://m.example/x/CUB_200_2011.tgz")[0].url == "https://m.example/x/CUB_200_2011.tgz"
    assert with_base_url(dl.CUB_200_2011, "https://m.example/x/")[0].url == "https://m.example/x/CUB_200_2011.tgz"


# -- extraction -------------------------------------------------------------------------------

def make_tar(path: Path, members: list[tuple[str, bytes | None, dict]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_extracts_a_normal_archive(tmp_path):
    archive = make_tar(tmp_path / "ok.tgz", [
        ("top/", None, {"type": tarfile.DIRTYPE}),
        ("top/a.txt", b"hello", {}),
        ("top/sub/b.txt", b"world", {}),
        ("top/link", None, {"type": tarfile.SYMTYPE, "linkname": "a.txt"}),
        ("extra.txt", b"!", {}),
    ])
    target = tmp_path / "out"
    assert extract_archive(archive, target) == ["extra.txt", "top"]
    assert (target / "top/sub/b.txt").read_bytes() == b"world" and (target / "top/link").read_bytes() == b"hello"


@pytest.mark.parametrize("member", [
    ("../evil.txt", b"x", {}),
    ("ok/../../evil.txt", b"x", {}),
    ("/tmp/evil.txt", b"x", {}),
    ("link", None, {"type": tarfile.SYMTYPE, "linkname": "../../etc/passwd"}),
    ("link", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
    ("hard", None, {"type": tarfile.LNKTYPE, "linkname": "../outside"}),
    ("dev", None, {"type": tarfile.CHRTYPE}),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out", "device"])
def test_refuses_unsafe_archives_before_writing_anything(tmp_path, member):
    archive = make_tar(tmp_path / "bad.tgz", [("fine.txt", b"ok", {}), member])
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=repr(member[0])[1:-1]):
        extract_archive(archive, target)
    assert list(target.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tgz").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        extract_archive(tmp_path / "x.tgz", tmp_path / "out")


# -- the whole path: download, extract, prepare -------------------------------------------------

def cub_archive(tmp_path: Path) -> Path:
    tree = make_cub(tmp_path / "build" / "CUB_200_2011")
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="CUB_200_2011")
        tar.addfile(tarfile.TarInfo("attributes.txt"), io.BytesIO(b""))  # the official archive has one too
    return archive


def test_fetch_dataset_downloads_extracts_once_and_resumes(server, tmp_path):
    archive = cub_archive(tmp_path)
    server.files["/CUB_200_2011.tgz"] = archive.read_bytes()
    files = (RemoteFile(f"{server.url}/CUB_200_2011.tgz", "CUB_200_2011.tgz", md5=hashlib.md5(archive.read_bytes()).hexdigest()),)
    target = tmp_path / "datasets"
    server.cut_next_after = 2000
    fetch_dataset(files, target)
    assert (target / "CUB_200_2011" / "images.txt").is_file() and (target / "CUB_200_2011.tgz").is_file()
    assert len(server.requests) == 2 and server.requests[1][1] is not None  # cut, then resumed
    fetch_dataset(files, target)  # extracted before: nothing to do
    assert len(server.requests) == 2


def test_cli_download_then_prepare(tmp_path, monkeypatch, capsys):
    archive = cub_archive(tmp_path)
    official = RemoteFile("https://data.caltech.edu/unused/CUB_200_2011.tgz", "CUB_200_2011.tgz",
                          md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(dl, "CUB_200_2011", (official,))
    src, out = tmp_path / "datasets", tmp_path / "prepared"
    argv = ["-q", "data", "cub200", str(src), "--out", str(out), "--size", "16", "--augment", "1", "--download",
            "--url", archive.as_uri(), "--delete-archives"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["train_augmented"] == 18
    assert (src / "CUB_200_2011" / "classes.txt").is_file() and not (src / "CUB_200_2011.tgz").exists()
    monkeypatch.setattr(dl, "CUB_200_2011", (RemoteFile(official.url, official.filename, md5="0" * 32),))
    assert main(["-q", "data", "cub200", str(tmp_path / "again"), "--out", str(tmp_path / "o2"), "--download",
                 "--url", archive.as_uri()]) == 1
    err = capsys.readouterr().err
    assert "MD5" in err and len(err.strip().splitlines()) == 1
