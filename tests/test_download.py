"""asirra.download against a local Range-capable HTTP server (never the real URL): a whole download,
resuming a partial file, a server that ignores Range, size and checksum mismatches, and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import write_image
from typer.testing import CliRunner

from asirra import data
from asirra.cli import app
from asirra.download import DownloadError, download


def _petimages_zip(workdir) -> bytes:
    """A small stand-in for Microsoft's archive: PetImages/Cat, PetImages/Dog, Thumbs.db, a readme."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (folder, color) in enumerate([("Cat", (200, 90, 40))] * 3 + [("Dog", (40, 90, 200))] * 2):
            image = write_image(workdir / f"{i}.jpg", color=color, seed=i)
            archive.write(image, f"PetImages/{folder}/{i}.jpg")
        archive.writestr("PetImages/Cat/Thumbs.db", b"\x00" * 64)
        archive.writestr("readme[1].txt", "test archive")
    return buffer.getvalue()


@dataclass
class Server:
    """What the handler serves and what it saw."""

    payload: bytes = b""
    honour_range: bool = True
    stop_after: int | None = None  # send only this many body bytes, then hang up
    status: int = 200
    ranges: list = field(default_factory=list)  # the Range header of each request (None if absent)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kagglecatsanddogs.zip"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        state: Server = self.server.state
        requested = self.headers.get("Range")
        state.ranges.append(requested)
        body, start = state.payload, 0
        if state.status != 200:
            self.send_error(state.status)
            return
        if requested and state.honour_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:][: state.stop_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path_factory):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    payload = _petimages_zip(tmp_path_factory.mktemp("archive-images"))
    httpd.state = Server(payload=payload, port=httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def _get(server: Server, dest, **kwargs):
    return download(server.url, dest, progress=False, timeout=10, **kwargs)


def test_download_writes_the_file_atomically_and_it_scans_in_place(server, tmp_path):
    path = _get(server, tmp_path / "data")
    assert path == tmp_path / "data" / "kagglecatsanddogs.zip"
    assert path.read_bytes() == server.payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["kagglecatsanddogs.zip"]
    assert data.detect_layout(path) == "zip:petimages"
    assert [(ref.label, ref.name) for ref in data.scan(path)][0] == (0, "PetImages/Cat/0.jpg")
    assert data.check(data.scan(path), progress=False).per_class == {"cat": 3, "dog": 2, "unlabelled": 0}


def test_partial_file_on_disk_is_resumed_with_a_range_request(server, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    half = len(server.payload) // 2
    (dest / "kagglecatsanddogs.zip.part").write_bytes(server.payload[:half])
    path = _get(server, dest)
    assert server.ranges == [f"bytes={half}-"]
    assert path.read_bytes() == server.payload


def test_interrupted_download_keeps_its_part_and_the_next_run_finishes_it(server, tmp_path):
    server.stop_after = 1000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        _get(server, tmp_path)
    part = tmp_path / "kagglecatsanddogs.zip.part"
    assert 0 < part.stat().st_size <= 1000
    assert not (tmp_path / "kagglecatsanddogs.zip").exists()
    got = part.stat().st_size

    server.stop_after = None
    assert _get(server, tmp_path).read_bytes() == server.payload
    assert server.ranges == [None, f"bytes={got}-"]


def test_server_ignoring_range_restarts_from_the_first_byte(server, tmp_path):
    server.honour_range = False
    (tmp_path / "kagglecatsanddogs.zip.part").write_bytes(b"stale bytes from somewhere else")
    assert _get(server, tmp_path).read_bytes() == server.payload


def test_part_that_already_holds_the_whole_file_is_just_renamed(server, tmp_path):
    (tmp_path / "kagglecatsanddogs.zip.part").write_bytes(server.payload)
    assert _get(server, tmp_path).read_bytes() == server.payload
    assert server.ranges == [f"bytes={len(server.payload)}-"]


def test_size_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="size mismatch"):
        _get(server, tmp_path, expected_size=len(server.payload) + 1)
    assert list(tmp_path.iterdir()) == []


def test_checksum_is_verified(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        _get(server, tmp_path / "a", sha256="0" * 64)
    good = hashlib.sha256(server.payload).hexdigest()
    assert _get(server, tmp_path / "b", sha256=good, expected_size=len(server.payload)).exists()


def test_a_finished_file_is_not_fetched_again(server, tmp_path):
    _get(server, tmp_path)
    _get(server, tmp_path)
    assert len(server.ranges) == 1


def test_html_page_instead_of_the_archive_is_refused(server, tmp_path):
    server.payload = b"<html><body>Sorry, this download is no longer available.</body></html>"
    with pytest.raises(DownloadError, match="not a zip archive"):
        _get(server, tmp_path)


def test_http_error_is_reported(server, tmp_path):
    server.status = 404
    with pytest.raises(DownloadError, match="HTTP 404"):
        _get(server, tmp_path)


def test_download_command_then_data_check_on_the_archive(server, tmp_path):
    runner = CliRunner()
    fetched = runner.invoke(app, ["download", "--dest", str(tmp_path), "--url", server.url])
    assert fetched.exit_code == 0, fetched.output
    archive = tmp_path / "kagglecatsanddogs.zip"
    assert str(archive) in fetched.stdout

    checked = runner.invoke(app, ["data", "check", str(archive), "--json"])
    assert checked.exit_code == 0
    report = json.loads(checked.stdout)
    assert report["layout"] == "zip:petimages"
    assert report["per_class"]["cat"] == 3 and report["per_class"]["dog"] == 2


def test_download_command_failure_is_one_line_with_exit_2(server, tmp_path):
    server.status = 503
    result = CliRunner().invoke(app, ["download", "--dest", str(tmp_path), "--url", server.url])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: HTTP 503 from {server.url}"]
