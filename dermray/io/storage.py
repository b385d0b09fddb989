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
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dermray.errors import StorageError
from dermray.io import faults

logger = logging.getLogger(__name__)

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
    uri = strip_credentials(uri)  # the filesystem reads them from the credential chain
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"Cannot open {display(uri)}: {redact(exc)}. Use s3://bucket/prefix, "
                           "optionally with ?region=...&endpoint_override=host:port&scheme=http."
                           ) from None
    if isinstance(fs, pafs.S3FileSystem):
        _, (options,) = fs.__reduce__()  # every option from_uri parsed (region, credentials...)
        timeouts, attempts = s3_settings()
        options.update(connect_timeout=timeouts["DERMRAY_S3_CONNECT_TIMEOUT"],
                       request_timeout=timeouts["DERMRAY_S3_REQUEST_TIMEOUT"])
        fs = pafs.S3FileSystem(**options,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return fs, path


# the user-info of a URI at its start: scheme, then KEY[:SECRET]@ (a secret may hold '/')
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<key>[^@\s/?#:]*)"
                       r"(?::(?P<secret>[^@\s]*))?@")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_adopted: dict[str, str] = {}  # the credentials this process took from a URI, by variable


def strip_credentials(value: Any) -> Any:
    """``value`` (a string, or a list, tuple or dict of them) with the credentials of every
    ``s3://KEY:SECRET@bucket/...`` URI taken out and adopted (``adopt_credentials``).

    This is where a URI's credentials are read, once, at the edge (the CLI's arguments, every
    config section, ``open_fs`` and ``join``), so that everything made from a URI after it (a
    record, a log or stdout line, Tune's pickled state, a Ray task's arguments) holds none. The
    credentials of another scheme's URI (an MLflow server's, say) are refused with a message:
    they would be stored with the run.
    """
    if isinstance(value, str):
        return _strip(value)
    if isinstance(value, (list, tuple)):
        return type(value)(strip_credentials(v) for v in value)
    if isinstance(value, dict):
        return {k: strip_credentials(v) for k, v in value.items()}
    return value


def _strip(text: str) -> str:
    match = _USERINFO.match(text)
    if not match:
        return text
    scheme = match["scheme"].lower()
    if scheme != "s3":
        raise StorageError(
            f"{redact(text)} carries credentials, which would be stored with the run (records, "
            "logs, Tune's state). Leave them out of the URI and give them in the environment "
            "(an MLflow server: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD).")
    adopt_credentials(unquote(match["key"]), unquote(match["secret"] or ""), text)
    return f"{match['scheme']}://" + text[match.end():]


def adopt_credentials(key: str, secret: str, uri: str = "") -> None:
    """Make ``key`` and ``secret`` this process's AWS credentials: the environment's
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, which every S3 filesystem reads through the
    default credential chain, and which a local Ray started after this inherits.

    Why the environment and not the filesystem object: an S3FileSystem given explicit keys
    pickles them (Tune stores its storage filesystem in tuner.pkl and ships it to every trial);
    one on the default chain pickles none. Two different pairs in one run are refused: every S3
    access would use the last one.
    """
    pair = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    if _adopted == pair:
        return
    if _adopted and all(os.environ.get(k) == v for k, v in _adopted.items()):
        raise StorageError(
            f"{redact(uri)} carries other credentials than an earlier s3:// URI of this run; "
            "one run uses one pair. Leave them out of the URIs and set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead.")
    if os.environ.get("AWS_ACCESS_KEY_ID", key) != key:
        logger.info("using the credentials of %s in place of $AWS_ACCESS_KEY_ID", display(uri))
    os.environ.update(pair)
    os.environ.pop("AWS_SESSION_TOKEN", None)  # a token belongs to the keys it came with
    _adopted.clear()
    _adopted.update(pair)


def adopted_credentials() -> bool:
    """Whether this process took its S3 credentials from a URI (and they are still in force)."""
    return bool(_adopted) and all(os.environ.get(k) == v for k, v in _adopted.items())


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
    """Append path segments to a path or URI, keeping a URI's query on the result.

    A segment is a name: an empty one, ``.`` or ``..`` is refused (StorageError), so that a
    joined path never climbs out of ``base`` nor names ``base`` itself."""
    path, sep, query = strip_credentials(str(base)).partition("?")
    for name in names:
        parts = str(name).strip("/").split("/")
        if any(part in _NOT_NAMES for part in parts):
            raise StorageError(f"Cannot use {str(name)!r} under {display(base)}: each part of a "
                               "path must be a name (not empty, '.' or '..'), so that it stays "
                               "inside that folder.")
        path = path.rstrip("/") + "/" + "/".join(parts)
    return path + (sep + query if sep else "")


_NOT_NAMES = ("", ".", "..")


def parent(uri: str | Path) -> str:
    """The folder holding a path or URI (a URI keeps its query)."""
    if not is_remote(uri):
        return str(Path(uri).parent)
    path, sep, query = str(uri).partition("?")
    return path.rstrip("/").rpartition("/")[0] + sep + query


def is_component(name: str) -> bool:
    """Whether ``name`` is one folder name: not empty, '.' or '..', without '/', '\\' or NUL."""
    return (isinstance(name, str) and name not in _NOT_NAMES
            and not any(c in name for c in "/\\\0"))


def inside(target: str | Path, root: str | Path) -> str:
    """``target`` resolved (a local absolute path, or ``s3://bucket/key``), after checking that
    it lies strictly inside ``root`` (resolved the same way); StorageError otherwise.

    Locally the parent folders are resolved (links, ``..``) and the last name kept as it is, so
    that a link inside ``root`` is itself inside (deleting it never follows it)."""
    if is_remote(target) != is_remote(root):
        raise StorageError(f"{display(target)} is not inside {display(root)} (one is local, the "
                           "other a URI); dermray deletes and creates only inside its output.")
    if is_remote(target):
        where, base = _remote_key(target), _remote_key(root)
        ok = (where[0] == base[0] and where[1] != base[1]
              and where[1].startswith(base[1] + "/" if base[1] else ""))
        resolved = f"{where[0]}/{where[1]}"
    else:
        path = Path(target).expanduser()
        if path.name in _NOT_NAMES:
            resolved = str(path.resolve())
        else:
            resolved = str(path.parent.resolve() / path.name)
        base_dir = Path(root).expanduser().resolve()
        ok = Path(resolved).is_relative_to(base_dir) and Path(resolved) != base_dir
    if not ok:
        raise StorageError(f"Refusing to touch {display(target)}: it is not inside "
                           f"{display(root)}, the folder this run writes to. Check the paths in "
                           "the config (search.storage_path, search.experiment, --out).")
    return resolved


def _remote_key(uri: str | Path) -> tuple[str, str]:
    """(``scheme://bucket`` with the URI's query, the key without '/' at its ends); '.' and
    '..' parts are refused, never interpreted."""
    text, _, query = str(uri).partition("?")
    scheme, _, rest = redact(text).partition("://")
    bucket, _, key = rest.partition("/")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{display(uri)} has a '.' or '..' part; name the object directly.")
    return f"{scheme}://{bucket}?{query}", "/".join(parts)


def remove(target: str | Path, root: str | Path, why: str, level: int = logging.WARNING,
           best_effort: bool = False) -> bool:
    """Delete a file or a whole folder, if it exists, after checking that it lies strictly
    inside ``root`` (``inside``), logging what is deleted and why. Every deletion dermray makes
    goes through here. A local link made by ``replace_dir`` goes with the versioned folders it
    names. Returns whether anything was deleted. ``best_effort`` (temporary files, leftovers):
    a deletion that fails is a warning, not an error; a target outside ``root`` is always one.
    """
    inside(target, root)
    try:
        return _delete(target, why, level)
    except OSError as exc:
        if not best_effort:
            raise
        logger.warning("could not delete %s (%s): %s", display(target), why, redact(exc)[:200])
        return False


def _delete(target: str | Path, why: str, level: int) -> bool:
    if not is_remote(target):
        path = str(Path(target).expanduser())
        if not os.path.lexists(path):
            return False
        logger.log(level, "deleting %s (%s)", path, why, extra={"deleted": path})
        if os.path.islink(path):
            os.unlink(path)
            for folder in _versions(Path(path)):
                shutil.rmtree(folder, ignore_errors=True)
        elif os.path.isdir(path):  # rmtree removes the links below it, never their targets
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    fs, path = open_fs(target)
    kind = fs.get_file_info(path).type
    if kind not in (pafs.FileType.Directory, pafs.FileType.File):
        return False
    logger.log(level, "deleting %s (%s)", display(target), why,
               extra={"deleted": display(target)})
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    else:
        fs.delete_dir(path)
    return True


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


def write_parquet(table: pa.Table, uri: str | Path, **options: Any) -> str:
    """Write a Parquet file atomically (parent folders are created); ``options`` go to
    ``pyarrow.parquet.write_table`` (encodings, statistics)."""
    fs, path = open_fs(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        tmp = _tmp_name(path)
        pq.write_table(table, tmp, **options)
        faults.point("replace:" + path.rpartition("/")[2])
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs, **options)
    return str(uri)


def check_writable(uri: str | Path) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder in its place,
    a parent folder that cannot be made or written to, a bucket that refuses a write. A probe
    file is written beside it and deleted."""
    if is_remote(uri):
        folder = parent(uri)
        probe = join(folder, f".dermray-probe.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with storage_errors(uri):
                write_bytes(probe, b"")
        except OSError as exc:
            raise StorageError(f"Cannot write {display(uri)}: {redact(exc)[:300]}. Check the "
                               "bucket, the URI and the credentials.") from None
        remove(probe, folder, "write probe", logging.DEBUG, best_effort=True)
        return
    target = Path(uri).expanduser()
    if target.is_dir():
        raise StorageError(f"Cannot write {target}: it is a folder; name a file.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe",
                                     dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise StorageError(f"Cannot write {target}: {exc.strerror or exc}. Choose a folder "
                           "you can write to.") from None
    remove(probe, target.parent, "write probe", logging.DEBUG, best_effort=True)


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
        remove(folder, tempfile.gettempdir(), "staging folder", logging.DEBUG, best_effort=True)


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
    why = "left by a run that was killed"
    gone = []
    left = [p for p in Path(out).rglob(".*.tmp")
            if _LEFTOVER_FILE.fullmatch(p.name) and (p.is_file() or p.is_symlink())]
    left += [p for p in Path(out).iterdir() if _LEFTOVER_TOP.fullmatch(p.name)]
    for path in left:
        if remove(path, out, why, best_effort=True):
            gone.append(str(path))
    return gone


def _versions(target: Path) -> list[Path]:
    """The hidden versioned folders ``replace_dir(..., link=True)`` made beside ``target``."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}")
    return [p for p in target.parent.iterdir()
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def replace_dir(local: str | Path, uri: str | Path, marker: str, link: bool = False,
                root: str | Path | None = None) -> str:
    """Put a locally built folder at ``uri``, replacing what was there.

    Locally, without ``link``: the old folder is renamed out and the new one in (never half of
    each, but for a moment neither). With ``link``: ``uri`` is a symbolic link to a hidden versioned folder beside it; the new folder
    is renamed to its own version and the link replaced in one atomic rename, so a reader finds
    the old folder or the new one, never none (a real folder at ``uri`` is not one of ours:
    refused, untouched); the previous version is kept until the next replacement, so a file open that
    resolved the old link still finds its file (unless two replacements happen within it). On S3: upload every file with ``marker`` last, then delete objects of the old
    folder that the new one lacks. ``uri`` must lie inside ``root`` (default: its own folder),
    checked before anything is moved; what is deleted is deleted through ``remove``.
    """
    local = Path(local)
    if root is None:
        root = parent(uri)
    inside(uri, root)
    if not is_remote(uri) and not link:
        target = Path(uri)
        old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(old)
        local.rename(target)
        remove(old, root, "the folder it replaced", logging.DEBUG, best_effort=True)
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
                remove(folder, root, "an older version", logging.DEBUG, best_effort=True)
        return str(target)
    keep = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    fs, path = open_fs(uri)
    stale = [info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                      allow_not_found=True))
             if info.type == pafs.FileType.File and info.path[len(path):].lstrip("/") not in keep]
    upload_dir(local, uri, last=marker)
    for item in stale:
        remove(join(uri, item[len(path):].lstrip("/")), uri, "not in the new folder",
               logging.DEBUG)
    return str(uri)
