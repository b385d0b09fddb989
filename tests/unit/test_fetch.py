"""`dermray data fetch` against a local HTTP server that speaks the Dataverse API (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from dermray.data.fetch import DOI, fetch
from dermray.errors import FetchError


def _zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            img = io.BytesIO()
            Image.new("RGB", (8, 6), (100, 50, 25)).save(img, "JPEG")
            zf.writestr(name, img.getvalue())
    return buf.getvalue()


class FakeDataverse:
    """Serves the dataset JSON and three files; can cut the first download of a file short."""

    def __init__(self) -> None:
        self.files = {
            1: ("HAM10000_metadata.csv", (b"lesion_id,image_id,dx,dx_type,age,sex,localization\n"
                b"HAM_0000001,ISIC_0000001,nv,histo,40.0,male,back\n"), True),
            2: ("HAM10000_images_part_1.zip", _zip(["ISIC_0000001.jpg"] + [
                f"ISIC_{i:07d}.jpg" for i in range(10, 400)]), False),
            3: ("HAM10000_images_part_2.zip", _zip(["ISIC_0000002.jpg"]), False),
        }
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[int] = set()
        self.bad_md5 = False
        self.sizes = True  # False: the listing gives no sizes
        self.size_delta = 0  # the listing's sizes off by this many bytes
        self.extra = b""  # bytes sent after each file's own (Content-Length omitted then)
        self.endless: set[int] = set()  # files sent without end (no Content-Length)
        self.listing_text: bytes | None = None  # the API's answer, instead of the listing
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Range")))
                if self.path.startswith("/api/datasets/"):
                    if outer.listing_text is not None:
                        return self._send(200, outer.listing_text)
                    return self._send(200, json.dumps(outer.listing()).encode())
                file_id = int(self.path.split("/api/access/datafile/")[1].split("?")[0])
                body = outer.files[file_id][1]
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.split("=")[1].rstrip("-"))
                    if start >= len(body):
                        return self._send(416, b"")
                self.send_response(206 if start else 200)
                if not outer.extra and file_id not in outer.endless:
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:] + outer.extra
                if file_id in outer.endless:
                    try:
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    except OSError:  # the client stopped reading
                        return
                if file_id in outer.cut_once:
                    outer.cut_once.discard(file_id)
                    self.wfile.write(payload[: len(payload) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def listing(self) -> dict:
        files = []
        for file_id, (name, body, tabular) in self.files.items():
            md5 = hashlib.md5(body).hexdigest() if not self.bad_md5 else "0" * 32
            data = {"id": file_id, "md5": md5}
            size = len(body) + self.size_delta
            if tabular:
                data.update(filename=name.replace(".csv", ".tab"), originalFileName=name,
                            originalFileSize=size, filesize=size + 7)
            else:
                data.update(filename=name, filesize=size)
            if not self.sizes:
                data.pop("filesize"), data.pop("originalFileSize", None)
            files.append({"label": data["filename"], "dataFile": data})
        return {"status": "OK", "data": {"latestVersion": {"files": files}}}


@pytest.fixture()
def dataverse():
    server = FakeDataverse()
    yield server
    server.server.shutdown()


def test_fetch_layout_and_rerun_does_nothing(dataverse, tmp_path):
    result = fetch(tmp_path, base_url=dataverse.url)
    assert (tmp_path / "HAM10000_metadata.csv").read_bytes() == dataverse.files[1][1]
    assert len(list((tmp_path / "HAM10000_images_part_1").glob("*.jpg"))) == 391
    assert (tmp_path / "HAM10000_images_part_2" / "ISIC_0000002.jpg").is_file()
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob("*.part"))
    assert sorted(result["downloaded"]) == sorted(f[0] for f in dataverse.files.values())
    assert any(f"persistentId={DOI.replace(':', '%3A')}" in p for p, _ in dataverse.requests)
    assert any(p.endswith("/1?format=original") for p, _ in dataverse.requests)
    dataverse.requests.clear()
    again = fetch(tmp_path, base_url=dataverse.url)
    assert again["downloaded"] == [] and dataverse.requests == []


def test_interrupted_download_resumes_with_range(dataverse, tmp_path):
    dataverse.cut_once.add(2)
    with pytest.raises(FetchError, match="Run the same command again to resume"):
        fetch(tmp_path, base_url=dataverse.url)
    part = tmp_path / "HAM10000_images_part_1.zip.part"
    have = part.stat().st_size
    assert 0 < have < len(dataverse.files[2][1])
    dataverse.requests.clear()
    fetch(tmp_path, base_url=dataverse.url)
    assert ("/api/access/datafile/2", f"bytes={have}-") in dataverse.requests
    assert len(list((tmp_path / "HAM10000_images_part_1").glob("*.jpg"))) == 391


def test_checksum_mismatch_is_an_error(dataverse, tmp_path):
    dataverse.bad_md5 = True
    with pytest.raises(FetchError, match="MD5 mismatch"):
        fetch(tmp_path, base_url=dataverse.url)
    assert not (tmp_path / "HAM10000_metadata.csv").exists()


def test_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FetchError, match="Are you offline"):
        fetch(tmp_path, base_url="http://127.0.0.1:9")


def _no_extra_files(dest) -> bool:
    return not list(dest.glob("*.part")) and not list(dest.glob("*.zip"))


def _fewer(dataverse):
    dataverse.size_delta = -10


def _more_without_length(dataverse):
    dataverse.extra = b"x" * 5000


def _no_sizes_endless(dataverse):
    dataverse.sizes = False
    dataverse.endless.add(2)


def _listing(text):
    def setup(dataverse):
        dataverse.listing_text = text
    return setup


# (set the server up, a fragment of the message): a server that sends more than it announces,
# or than any HAM10000 file can be, or a listing dermray cannot read
FETCH_PROBES = [
    (_fewer, "the server announces"),  # the Content-Length says more than the listing
    (_more_without_length, "the server sent more than"),
    (_no_sizes_endless, ("HAM10000_images_part_1.zip: the server sent more than {ceiling} bytes "
                         "(the ceiling for this file, as the listing gives no size)")),
    (lambda d: setattr(d, "size_delta", 1 << 40),
     (f"HAM10000_metadata.csv: the listing says {(1 << 40) + 100} bytes, over the "
      f"{64 << 20} bytes this file can be; nothing was downloaded")),
    (_listing(b"<html>maintenance</html>"), "did not answer JSON"),
    (_listing(b'{"data": []}'), "answered a file list dermray cannot read"),
    (_listing(b'{"data": {"latestVersion": {"files": [{"dataFile": {"filename": "x"}}]}}}'),
     "answered a file list dermray cannot read (KeyError"),
    (_listing(b'{"data": {"latestVersion": {"files": [{"dataFile": {"id": "one"}}]}}}'),
     "answered a file list dermray cannot read (ValueError"),
    (_listing(b'{"data": {"latestVersion": {"files": [7]}}}'),
     "answered a file list dermray cannot read"),
    (_listing(b" " * 600), "answered more than 512 bytes for the file list"),
]


def test_fetch_is_bounded_by_size(monkeypatch, tmp_path):
    """Tried / ended exactly / ended in a message: without sizes a download stops at the
    ceiling of its file; with sizes, at the size; a listing is bounded and parsed to the last
    field. Each probe ends in a FetchError naming the file, nothing partial left; a listing
    without sizes from an honest server fetches exactly (the reference)."""
    from dermray.data import fetch as fetch_module

    server = FakeDataverse()  # one server (each costs 0.5 s to shut down), reset per probe
    knobs = {"sizes": True, "size_delta": 0, "extra": b"", "endless": set(), "listing_text": None}
    ceiling = 2 * max(len(body) for _, body, _ in server.files.values())
    monkeypatch.setattr(fetch_module, "MAX_OTHER_FILE_BYTES", ceiling)
    tried = exactly = messages = 0
    try:
        server.sizes = False  # an honest server whose listing gives no sizes: the reference
        fetch(tmp_path / "ref", base_url=server.url)
        assert (tmp_path / "ref" / "HAM10000_metadata.csv").read_bytes() == server.files[1][1]
        assert len(list((tmp_path / "ref" / "HAM10000_images_part_1").glob("*.jpg"))) == 391
        tried, exactly = 1, 1
        for i, (setup, fragment) in enumerate(FETCH_PROBES):
            if "512 bytes" in fragment:
                monkeypatch.setattr(fetch_module, "MAX_LISTING_BYTES", 512)
            for key, value in knobs.items():
                setattr(server, key, type(value)(value) if isinstance(value, set) else value)
            setup(server)
            dest = tmp_path / f"d{i}"
            tried += 1
            with pytest.raises(FetchError) as err:
                fetch(dest, base_url=server.url)
            assert fragment.format(ceiling=ceiling) in str(err.value), str(err.value)
            assert _no_extra_files(dest)
            messages += 1
    finally:
        server.server.shutdown()
    assert (tried, exactly, messages) == (len(FETCH_PROBES) + 1, 1, 10)
