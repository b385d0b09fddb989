"""Download HAM10000 from Harvard Dataverse (doi:10.7910/DVN/DBW86T) into the Dataverse layout.

The dataset's file list (ids, sizes, MD5s) comes from the Dataverse native API; each file is
downloaded to ``NAME.part`` with HTTP Range resume, checked for size and checksum, then renamed.
Zips are unpacked into a temporary folder and renamed into place, so a folder that exists is
complete. A rerun with everything in place downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermray.errors import FetchError
from dermray.io import storage

logger = logging.getLogger(__name__)

DATAVERSE = "https://dataverse.harvard.edu"
DOI = "doi:10.7910/DVN/DBW86T"
METADATA_NAME = "HAM10000_metadata.csv"
ZIP_NAMES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
CHUNK = 1 << 20
# what one answer may hold at most, so that no server (a listing without sizes, one sending more
# than it announced, one that never ends) streams without bound: the listing; each file where
# the listing gives no size (a file with a size is held to it, and a listed size over the
# ceiling is refused); the HAM10000 metadata is 0.56 MB, the two image zips a few GB together
MAX_LISTING_BYTES = 16 << 20
MAX_FILE_BYTES = {METADATA_NAME: 64 << 20}
MAX_OTHER_FILE_BYTES = 4 << 30


@dataclass(frozen=True)
class RemoteFile:
    """One file of the dataset as the Dataverse API lists it."""

    name: str  # the name we save it under (the original name for ingested tabular files)
    url: str
    size: int
    md5: str


def _open(url: str, headers: dict[str, str] | None = None, timeout: float = 60.0):
    request = urllib.request.Request(url, headers={"User-Agent": "dermray", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
        host = urllib.parse.urlsplit(url).netloc
        raise FetchError(
            f"Cannot reach {host} ({exc}). Are you offline? HAM10000 can also be downloaded by "
            "hand from Harvard Dataverse (doi:10.7910/DVN/DBW86T) or Kaggle; then pass its "
            "folder to --metadata/--images."
        ) from None


def list_files(base_url: str = DATAVERSE, doi: str = DOI) -> dict[str, RemoteFile]:
    """The dataset's files by name, from ``/api/datasets/:persistentId/?persistentId=DOI``."""
    api = f"{base_url.rstrip('/')}/api/datasets/:persistentId/?persistentId={urllib.parse.quote(doi)}"
    try:
        with _open(api) as response:
            body = response.read(MAX_LISTING_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"The Dataverse API at {api} answered HTTP {exc.code}.") from None
    if len(body) > MAX_LISTING_BYTES:
        raise FetchError(f"The Dataverse API at {api} answered more than {MAX_LISTING_BYTES} "
                         "bytes for the file list; that is not the HAM10000 listing.")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"The Dataverse API at {api} did not answer JSON.") from None
    try:
        return dict(_remote_file(entry, base_url)
                    for entry in payload["data"]["latestVersion"]["files"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FetchError(f"The Dataverse API at {api} answered a file list dermray cannot read "
                         f"({type(exc).__name__}: {str(exc)[:120]}); is it a Dataverse "
                         "server?") from None


def _remote_file(entry: dict, base_url: str) -> tuple[str, RemoteFile]:
    """One entry of the listing (KeyError, TypeError or ValueError where it is not one)."""
    data = entry.get("dataFile", {})
    original = data.get("originalFileName")
    name = str(original or data.get("filename") or entry.get("label"))
    suffix = "?format=original" if original else ""
    size = data.get("originalFileSize") if original else data.get("filesize")
    md5 = data.get("md5") or (data.get("checksum") or {}).get("value", "")
    file_id = int(data["id"])
    return name, RemoteFile(name=name, url=f"{base_url.rstrip('/')}/api/access/datafile/"
                            f"{file_id}{suffix}", size=int(size if size is not None else -1),
                            md5=str(md5))


def max_bytes(remote: RemoteFile) -> int:
    """The most bytes a download of ``remote`` may bring: its listed size, else the ceiling of
    its name (``MAX_FILE_BYTES``, ``MAX_OTHER_FILE_BYTES``)."""
    return remote.size if remote.size >= 0 else MAX_FILE_BYTES.get(remote.name,
                                                                    MAX_OTHER_FILE_BYTES)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(remote: RemoteFile, target: Path,
             on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Download ``remote`` to ``target``, resuming ``target.part`` with an HTTP Range request."""
    if target.exists() and (remote.size < 0 or target.stat().st_size == remote.size):
        return target
    part = target.with_name(target.name + ".part")
    limit = max_bytes(remote)
    ceiling = MAX_FILE_BYTES.get(remote.name, MAX_OTHER_FILE_BYTES)
    if limit > ceiling:
        raise FetchError(f"{remote.name}: the listing says {remote.size} bytes, over the "
                         f"{ceiling} bytes this file can be; nothing was downloaded. Is "
                         f"{remote.url} the HAM10000 dataset?")
    have = part.stat().st_size if part.exists() else 0
    if limit < have:
        storage.remove(part, target.parent, "longer than the file it resumes")
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = _open(remote.url, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have == remote.size:  # already complete
            response = None
        else:
            raise FetchError(f"Downloading {remote.name} from {remote.url} failed: HTTP "
                             f"{exc.code}.") from None
    if response is not None:
        with response:
            mode = "ab" if have and response.status == 206 else "wb"
            done = have if mode == "ab" else 0
            announced = response.headers.get("Content-Length")
            if announced and announced.isdigit() and done + int(announced) > limit:
                raise _too_much(remote, limit, f"announces {done + int(announced)} bytes, more")
            with part.open(mode) as out:
                while block := response.read(min(CHUNK, limit + 1 - done)):
                    out.write(block)
                    done += len(block)
                    if done > limit:
                        break
                    if on_progress:
                        on_progress(done, remote.size)
            if done > limit:
                storage.remove(part, target.parent, "longer than the file can be")
                raise _too_much(remote, limit, "sent more")
    size = part.stat().st_size
    if remote.size >= 0 and size != remote.size:
        raise FetchError(f"{remote.name}: got {size} bytes, expected {remote.size}. Run the "
                         "same command again to resume the download.")
    if remote.md5 and _md5(part) != remote.md5:
        storage.remove(part, target.parent, "MD5 mismatch")
        raise FetchError(f"{remote.name}: MD5 mismatch (expected {remote.md5}); the partial file "
                         "was removed, run the command again to download it afresh.")
    part.replace(target)
    return target


def _too_much(remote: RemoteFile, limit: int, what: str) -> FetchError:
    bound = ("the size the listing gives" if remote.size >= 0 else
             "the ceiling for this file, as the listing gives no size")
    return FetchError(f"{remote.name}: the server {what} than {limit} bytes ({bound}); the "
                      "download was stopped (nothing of this answer kept). Is "
                      f"{remote.url} the HAM10000 dataset? Run the command again later, or "
                      "download the files by hand.")


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack a zip into ``dest/<archive stem>/`` atomically (temporary folder, then rename)."""
    final = dest / archive.stem
    if final.is_dir():
        return final
    tmp = dest / f".{archive.stem}.unpacking"
    storage.remove(tmp, dest, "an unpacking left unfinished")
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                name = Path(member.filename)
                if member.is_dir() or name.is_absolute() or ".." in name.parts:
                    continue
                # flatten: the HAM10000 zips hold the JPEGs at their top level
                with zf.open(member) as src, (tmp / name.name).open("wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile:
        storage.remove(tmp, dest, "not a valid zip", logging.DEBUG)
        raise FetchError(f"{archive} is not a valid zip; delete it and fetch again.") from None
    return Path(storage.replace_dir(tmp, final, marker="", root=dest))


def fetch(dest: str | Path, base_url: str = DATAVERSE, doi: str = DOI,
          keep_zips: bool = False) -> dict[str, str]:
    """Bring ``dest`` to the complete Dataverse layout; returns what is where."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted_dirs = [dest / Path(z).stem for z in ZIP_NAMES]
    if (dest / METADATA_NAME).is_file() and all(d.is_dir() for d in wanted_dirs):
        logger.info("HAM10000 already complete in %s; nothing to do", dest)
        return {"metadata": str(dest / METADATA_NAME), "images": [str(d) for d in wanted_dirs],
                "downloaded": []}
    files = list_files(base_url, doi)
    missing = [n for n in (METADATA_NAME, *ZIP_NAMES) if n not in files]
    if missing:
        raise FetchError(f"The dataset {doi} at {base_url} does not list {', '.join(missing)}; "
                         f"it lists {', '.join(sorted(files)) or 'nothing'}.")
    downloaded = []
    if not (dest / METADATA_NAME).is_file():
        download(files[METADATA_NAME], dest / METADATA_NAME)
        downloaded.append(METADATA_NAME)
    for zip_name, folder in zip(ZIP_NAMES, wanted_dirs):
        if folder.is_dir():
            continue
        archive = download(files[zip_name], dest / zip_name)
        downloaded.append(zip_name)
        unpack(archive, dest)
        if not keep_zips:
            storage.remove(archive, dest, "unpacked (keep it with --keep-zips)", logging.INFO)
    return {"metadata": str(dest / METADATA_NAME), "images": [str(d) for d in wanted_dirs],
            "downloaded": downloaded}
