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
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Range")))
                if self.path.startswith("/api/datasets/"):
                    return self._send(200, json.dumps(outer.listing()).encode())
                file_id = int(self.path.split("/api/access/datafile/")[1].split("?")[0])
                body = outer.files[file_id][1]
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.split("=")[1].rstrip("-"))
                    if start >= len(body):
                        return self._send(416, b"")
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
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
            if tabular:
                data.update(filename=name.replace(".csv", ".tab"), originalFileName=name,
                            originalFileSize=len(body), filesize=len(body) + 7)
            else:
                data.update(filename=name, filesize=len(body))
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
