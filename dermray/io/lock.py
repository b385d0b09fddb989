"""One writer per output folder: the holder of ``OUT/.dermray.lock`` holds an exclusive
``flock`` on it, and the file records who that is.

A second run on the same local ``OUT`` is refused (exit 2) with the holder's pid, host, command
and start time. The kernel releases a lock when its holder dies (kill -9 included), so a
killed run's lock is never "stale": the next run simply takes it, whatever the file says, and
no reading of a record decides who holds the lock (a record read half-written, or damaged, is
only a worse message). The holder removes the file while it still holds the lock; a competitor
that locked a file just removed sees that it is no longer the one at the path, and tries again.

S3 has no atomic create-if-absent through pyarrow, so an ``s3://`` OUT is not locked: run one
job per prefix.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dermray.errors import DermrayError
from dermray.io import storage

logger = logging.getLogger(__name__)

NAME = ".dermray.lock"
_held: dict[str, int] = {}  # lock path -> the pid that holds it in this process (reentrancy)


class LockedError(DermrayError):
    """Another live process writes to this output folder."""


def _record(data: bytes) -> dict[str, Any] | None:
    """A holder's record, or None when it is not one (empty, half-written, damaged)."""
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    pid = record.get("pid") if isinstance(record, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return record


def _refusal(out: str, path: Path, fd: int) -> LockedError:
    """Who holds the lock, from the record in the locked file (read through our descriptor of
    it: the holder may have removed the path since); read again for up to a second while the
    holder may still be writing it. A record that never becomes readable is named as such."""
    data = b""
    for _ in range(100):
        data = os.pread(fd, 4096, 0)
        record = _record(data)
        if record:
            return LockedError(
                f"{out} is in use by another dermray run: pid {record['pid']} on "
                f"{record.get('host')}, `{record.get('command')}`, started "
                f"{record.get('started')}. Wait for it to finish, or write to another --out.")
        time.sleep(0.01)
    return LockedError(
        f"{out} is in use by another process (its lock {path} holds no readable record: "
        f"{data[:80]!r}). Wait for it to finish, or write to another --out.")


def _acquire(out: str, path: Path, me: dict[str, Any]) -> int:
    """The lock's file descriptor, locked, with ``me`` written in the file; LockedError when a
    live process holds it."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raise _refusal(out, path, fd) from None
            finally:
                os.close(fd)
        except OSError as exc:
            os.close(fd)
            raise LockedError(f"Cannot lock {path} ({exc.strerror}): this filesystem does not "
                              "support file locks; write to a local --out.") from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if not current:  # a holder removed this file as it let go: lock the one there now
            os.close(fd)
            continue
        left = os.pread(fd, 4096, 0)
        if left:  # a killed run's record (the kernel let its lock go), or a damaged one
            logger.warning("taking over the lock %s (its holder is gone: %s)", path,
                           _record(left) or f"unreadable record {left[:80]!r}")
        record = json.dumps(me).encode()
        os.pwrite(fd, record, 0)  # then cut what is left of an old record: never empty
        os.ftruncate(fd, len(record))
        return fd
    raise LockedError(f"Could not take the lock {path}; other runs keep taking it.")


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (so a competitor that locks the removed
    file sees that and tries again), then let the lock go."""
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            storage.remove(path, path.parent, "lock released", logging.DEBUG, best_effort=True)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


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
    key = str(path.resolve())
    if _held.get(key) == os.getpid():  # this process holds it already (a stage of `dermray run`)
        yield
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    fd = _acquire(out, path, me)
    _held[key] = os.getpid()
    try:
        storage.sweep_leftovers(folder)  # what killed runs left; only we write here now
        yield
    finally:
        _held.pop(key, None)
        _release(path, fd)
