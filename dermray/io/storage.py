"""Where outputs live: a local folder or an ``s3://bucket/prefix`` URI, in one place.

Every stage names its outputs as strings (``join(out, "embeddings", ...)``) and reads and writes
them through these helpers, so the same code writes to a laptop's disk and to S3. A URI may carry
pyarrow's S3 options as a query (``s3://b/p?region=us-east-1`` or
``?endpoint_override=127.0.0.1:9000&scheme=http``); ``join`` keeps the query on every child.

Writes are atomic: locally a file is written under a unique temporary name in the same folder
and renamed; an S3 object appears whole when its upload completes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dermray.errors import StorageError
from dermray.io import faults

# s3://KEY:SECRET@bucket/...: the user-info part of a URI (a secret may hold '/', never '@')
CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^@\s/?#]*(?::[^@\s]*)?@")
# a silent S3 endpoint fails after about attempts x (connect or request timeout), not the 100 s
# of pyarrow's from_uri defaults; each is settable in the environment
S3_TIMEOUTS = {"DERMRAY_S3_CONNECT_TIMEOUT": 3.0, "DERMRAY_S3_REQUEST_TIMEOUT": 3.0}
S3_ATTEMPTS = ("DERMRAY_S3_MAX_ATTEMPTS", 2)


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri)


def open_fs(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI.

    An S3 filesystem gets short timeouts and few attempts (``s3_settings``), so that an endpoint
    that does not answer is an error in seconds. A URI pyarrow cannot parse is a StorageError
    (with any credentials in it redacted).
    """
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        hint = (" Credentials in a URI must be percent-encoded ('/' as %2F, '+' as %2B); "
                "better, leave them out and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
                if CREDENTIALS.search(uri) else "")
        raise StorageError(f"Cannot open {display(uri)}: {redact(exc)}. Use s3://bucket/prefix, "
                           "optionally with ?region=...&endpoint_override=host:port&scheme=http."
                           + hint) from None
    if isinstance(fs, pafs.S3FileSystem):
        _, (options,) = fs.__reduce__()  # every option from_uri parsed (region, credentials...)
        timeouts, attempts = s3_settings()
        options.update(connect_timeout=timeouts["DERMRAY_S3_CONNECT_TIMEOUT"],
                       request_timeout=timeouts["DERMRAY_S3_REQUEST_TIMEOUT"])
        fs = pafs.S3FileSystem(**options,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return fs, path


def s3_settings() -> tuple[dict[str, float], int]:
    """The S3 timeouts (seconds) and attempts: the environment's, else the defaults."""
    timeouts = {}
    for name, default in S3_TIMEOUTS.items():
        timeouts[name] = _env_number(name, default, float)
    return timeouts, int(_env_number(S3_ATTEMPTS[0], S3_ATTEMPTS[1], int))


def _env_number(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise StorageError(f"${name} must be a positive number. Got {raw!r} instead.")
    return value


def redact(text: object) -> str:
    """The text with the credentials of any URI in it replaced by ***."""
    return CREDENTIALS.sub(r"\g<scheme>***@", str(text))


@contextmanager
def storage_errors(uri: str | Path) -> Iterator[None]:
    """Turn a remote store's failure (timeout, refused connection, access denied) into a
    StorageError naming the URI (credentials redacted) and what to check. A missing file stays
    FileNotFoundError; local errors pass through."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except OSError as exc:
        if not is_remote(uri):
            raise
        raise StorageError(describe_failure(uri, exc)) from None


def is_store_failure(exc: BaseException) -> bool:
    """Whether an error comes from the S3 client (pyarrow's messages carry 'AWS Error')."""
    return isinstance(exc, OSError) and "AWS Error" in str(exc)


def describe_failure(uri: str | Path | None, exc: BaseException) -> str:
    """What failed, with what to check; ``uri`` None when only the error is known."""
    text = redact(exc)
    where = display(uri) if uri else "S3"
    if any(s in text for s in ("curlCode: 28", "Timeout", "timed out", "NETWORK_CONNECTION",
                               "curlCode: 7")):
        timeouts, attempts = s3_settings()
        return (f"The storage endpoint of {where} did not answer ({attempts} attempt(s), "
                f"{timeouts['DERMRAY_S3_REQUEST_TIMEOUT']:g} s each): {text[:300]}. Check "
                "endpoint_override in the URI (or the region), the network and the "
                "credentials; on a slow link raise $DERMRAY_S3_REQUEST_TIMEOUT and "
                "$DERMRAY_S3_MAX_ATTEMPTS.")
    return f"Cannot access {where}: {text[:300]}. Check the URI and the credentials."


class RedactingFilter(logging.Filter):
    """A logging filter that removes URI credentials from every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def join(base: str | Path, *names: str) -> str:
    """Append path segments to a path or URI, keeping a URI's query on the result."""
    path, sep, query = str(base).partition("?")
    for name in names:
        path = path.rstrip("/") + "/" + str(name).strip("/")
    return path + (sep + query if sep else "")


def display(uri: str | Path) -> str:
    """A URI without its query and credentials (for messages and records)."""
    return redact(str(uri).partition("?")[0])


def is_file(uri: str | Path) -> bool:
    fs, path = open_fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str | Path) -> bytes:
    fs, path = open_fs(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def write_bytes(uri: str | Path, data: bytes) -> str:
    """Write a whole file atomically (parent folders are created)."""
    fs, path = open_fs(uri)
    if isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders to make (only empty markers)
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        tmp = _tmp_name(path)
        with open(tmp, "wb") as fh:
            fh.write(data)
        faults.point("replace:" + path.rpartition("/")[2])
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    return str(uri)


def write_text(uri: str | Path, text: str) -> str:
    return write_bytes(uri, text.encode())


def write_parquet(table: pa.Table, uri: str | Path) -> str:
    """Write a Parquet file atomically (parent folders are created)."""
    fs, path = open_fs(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        tmp = _tmp_name(path)
        pq.write_table(table, tmp)
        faults.point("replace:" + path.rpartition("/")[2])
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)
    return str(uri)


def list_files(uri: str | Path, suffix: str = "") -> list[str]:
    """Files below a folder (recursive, inner paths), skipping names that start with '.' or '_'
    (temporary files and private folders); empty if the folder does not exist."""
    fs, path = open_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = []
    for info in infos:
        rel = info.path[len(path):].lstrip("/")
        if info.type == pafs.FileType.File and info.path.endswith(suffix) and not any(
                part.startswith((".", "_")) for part in rel.split("/")):
            files.append(info.path)
    return sorted(files)


def delete(uri: str | Path) -> None:
    """Remove a file or a whole folder, if it exists (a local link made by ``replace_dir``: the
    link and the folder it names)."""
    if not is_remote(uri) and os.path.islink(uri):
        os.unlink(uri)
        for folder in _versions(Path(uri)):
            shutil.rmtree(folder, ignore_errors=True)
        return
    fs, path = open_fs(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local: str | Path, uri: str | Path, last: str | None = None) -> None:
    """Copy a local folder's files to ``uri`` (a folder); ``last`` (a relative name) is written
    after every other file, so that a reader that waits for it sees the whole folder."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
    for file in files:
        write_bytes(join(uri, file.relative_to(local).as_posix()), file.read_bytes())


def download_dir(uri: str | Path, local: str | Path) -> Path:
    """Copy every file below ``uri`` into the local folder ``local``."""
    fs, path = open_fs(uri)
    local = Path(local)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            target = local / info.path[len(path):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as stream:
                target.write_bytes(stream.read())
    return local


@contextmanager
def staged(uri: str | Path, last: str | None = None) -> Iterator[Path]:
    """A local folder standing for ``uri``: the folder itself when it is local; otherwise a
    temporary folder whose files are uploaded to ``uri`` (``last`` after the others) when the
    block ends without error."""
    if not is_remote(uri):
        folder = Path(uri)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="dermray-stage-"))
    try:
        yield folder
        upload_dir(folder, uri, last=last)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# what a killed writer leaves behind: a file written under its temporary name (_tmp_name), a
# model folder being built (select.export_bundle), a new link not yet swapped in (replace_dir)
_LEFTOVER_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")
_LEFTOVER_TOP = re.compile(r"\..+\.(build\.[a-z0-9_]+|link\.[0-9a-f]{8})")


def sweep_leftovers(out: str | Path) -> list[str]:
    """Delete what killed writers left in a local OUT, for the one writer that now holds OUT's
    lock (no other dermray writes there): temporary files anywhere below it, and half-built
    model folders and unswapped links at its top. Returns what was deleted."""
    if is_remote(out) or not Path(out).is_dir():
        return []
    gone = []
    for path in Path(out).rglob(".*.tmp"):
        if _LEFTOVER_FILE.fullmatch(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            gone.append(str(path))
    for path in Path(out).iterdir():
        if _LEFTOVER_TOP.fullmatch(path.name):
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
            gone.append(str(path))
    return gone


def _versions(target: Path) -> list[Path]:
    """The hidden versioned folders ``replace_dir(..., link=True)`` made beside ``target``."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}")
    return [p for p in target.parent.iterdir()
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def replace_dir(local: str | Path, uri: str | Path, marker: str, link: bool = False) -> str:
    """Put a locally built folder at ``uri``, replacing what was there.

    Locally, without ``link``: the old folder is renamed out and the new one in (never half of
    each, but for a moment neither). With ``link``: ``uri`` is a symbolic link to a hidden versioned folder beside it; the new folder
    is renamed to its own version and the link replaced in one atomic rename, so a reader finds
    the old folder or the new one, never none (a real folder at ``uri`` is not one of ours:
    refused, untouched); the previous version is kept until the next replacement, so a file open that
    resolved the old link still finds its file (unless two replacements happen within it). On S3: upload every file with ``marker`` last, then delete objects of the old
    folder that the new one lacks.
    """
    local = Path(local)
    if not is_remote(uri) and not link:
        target = Path(uri)
        old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(old)
        local.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return str(target)
    if not is_remote(uri):
        target = Path(uri)
        if target.exists() and not target.is_symlink():
            raise StorageError(f"{target} is a folder that dermray did not make (it keeps "
                               f"{target.name} as a link): move it away, or use another --out.")
        tag = uuid.uuid4().hex[:8]
        version = target.with_name(f".{target.name}.{tag}")
        local.rename(version)
        previous = target.resolve() if target.is_symlink() else None
        link = target.with_name(f".{target.name}.link.{tag}")
        link.symlink_to(version.name)  # relative: OUT can be moved or copied whole
        faults.point("replace:" + target.name)
        os.replace(link, target)
        # the previous version stays until the next swap: a reader that resolved the link just
        # before this one still finds its files; older versions go
        for folder in _versions(target):
            if folder not in (version, previous):
                shutil.rmtree(folder, ignore_errors=True)
        return str(target)
    keep = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    fs, path = open_fs(uri)
    stale = [info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                      allow_not_found=True))
             if info.type == pafs.FileType.File and info.path[len(path):].lstrip("/") not in keep]
    upload_dir(local, uri, last=marker)
    for item in stale:
        fs.delete_file(item)
    return str(uri)
