"""Named crash points, for the fault-matrix tests: ``DERMRAY_FAULT=<point>`` makes a process kill
itself with SIGKILL (kill -9: no cleanup, no atexit, no finally) when it reaches that point, so
that a test can place a crash exactly where a power cut, an OOM kill or a lost node would hurt
most, and then check that a rerun (or Ray's retry) repairs it.

The points:

- ``replace:<name>`` (driver): a file or folder named ``<name>`` has been written under a
  temporary name and is about to be renamed into place (``replace:manifest.parquet`` is the
  split's last step, ``replace:model`` the export's swap of OUT/model);
- ``extract`` (driver): the first batch of views has been embedded and written;
- ``search`` (driver): a Tune trial has completed (the search stage's own Tune callback);
- ``embed`` (an extraction actor): a batch is about to be embedded; Ray restarts the actor and
  retries the batch.

The variables, all ``DERMRAY_FAULT*``:

- ``DERMRAY_FAULT=<point>``: the point;
- ``DERMRAY_FAULT_ACTION=pause``: stop at the point instead (sleep until killed), so that a test
  can run a second writer against the paused one and kill -9 it itself;
- ``DERMRAY_FAULT_READY=<file>``: written (pid and point) when the point is reached;
- ``DERMRAY_FAULT_ONCE=<file>``: fire only once, across every process that inherits the setting
  (Ray's actors included): the first to reach the point creates the file, later ones pass.

Unset, nothing here does anything. Set, every process that reaches a point (and the CLI, on
start) first prints a warning to stderr naming the variables: one left in a shell must not kill
or hang a run without a word.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

ENV = "DERMRAY_FAULT"
ACTION_ENV = "DERMRAY_FAULT_ACTION"
READY_ENV = "DERMRAY_FAULT_READY"
ONCE_ENV = "DERMRAY_FAULT_ONCE"
VARIABLES = (ENV, ACTION_ENV, READY_ENV, ONCE_ENV)

_warned = False  # per process


def armed() -> dict[str, str]:
    """The fault variables set in this process's environment."""
    return {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}


def warn_if_armed() -> None:
    """Print, once per process, a loud warning to stderr when any fault variable is set."""
    global _warned
    found = armed()
    if _warned or not found:
        return
    _warned = True
    what = ", ".join(f"{k}={v!r}" for k, v in found.items())
    action = "pause until killed" if found.get(ACTION_ENV) == "pause" else "kill itself (kill -9)"
    print(f"dermray: WARNING: fault injection is armed ({what}): this process will {action} at "
          f"that point. These variables are for dermray's fault-matrix tests; unset them "
          f"(unset {' '.join(found)}) for a real run.", file=sys.stderr, flush=True)


def point(name: str) -> None:
    """Crash (or pause) here if ``$DERMRAY_FAULT`` names this point (and, with
    ``$DERMRAY_FAULT_ONCE``, no process has fired it yet)."""
    warn_if_armed()
    if not name or os.environ.get(ENV) != name or not _first(os.environ.get(ONCE_ENV)):
        return
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).write_text(f"{os.getpid()} {name}\n")
    if os.environ.get(ACTION_ENV) == "pause":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def _first(marker: str | None) -> bool:
    """Whether this process is the first to claim ``marker`` (always, without one)."""
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    return True
