"""One writer per output folder: ``OUT/.dermray.lock`` names the process that holds it.

A second run on the same local ``OUT`` is refused (exit 2) with the holder's pid, host and start
time; a lock whose holder is gone (a killed run on this host) is taken over. S3 has no atomic
create-if-absent through pyarrow, so an ``s3://`` OUT is not locked: run one job per prefix.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dermray.errors import DermrayError
from dermray.io import storage

logger = logging.getLogger(__name__)

NAME = ".dermray.lock"


class LockedError(DermrayError):
    """Another live process writes to this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # half-written or gone: treated as stale


def _take(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    return True


@contextmanager
def hold(out: str, command: str = "dermray") -> Iterator[None]:
    """Hold OUT's lock for the block (nothing for an s3:// OUT)."""
    if storage.is_remote(out):
        logger.info("%s is on S3: not locked; run one job per prefix", storage.display(out))
        yield
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        if _take(path, me):
            break
        holder = _holder(path)
        if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            yield  # this process holds it already (a stage inside `dermray run`)
            return
        stale = holder is None or (holder.get("host") == me["host"]
                                   and not _alive(int(holder.get("pid", -1))))
        if not stale:
            raise LockedError(
                f"{out} is in use by another dermray run: pid {holder.get('pid')} on "
                f"{holder.get('host')}, `{holder.get('command')}`, started "
                f"{holder.get('started')}. Wait for it to finish, or write to another --out. "
                f"(If that process is gone, delete {path}.)")
        logger.warning("taking over the stale lock %s (%s)", path, holder)
        path.unlink(missing_ok=True)
    else:
        raise LockedError(f"Could not take the lock {path}; another run keeps taking it.")
    try:
        for gone in storage.sweep_leftovers(folder):  # what killed runs left; only we write
            logger.warning("deleted %s, left by a run that was killed", gone)
        yield
    finally:
        if _holder(path) == me:
            path.unlink(missing_ok=True)
