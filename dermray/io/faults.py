"""Named crash points, for the fault-matrix tests: ``DERMRAY_FAULT=<point>`` makes this process
kill itself with SIGKILL (kill -9: no cleanup, no atexit, no finally) when it reaches that
point, so that a test can place a crash exactly where a power cut or an OOM kill would hurt
most, and then check that a rerun repairs it.

The points (each in the driver process):

- ``replace:<name>``: a file or folder named ``<name>`` has been written under a temporary name
  and is about to be renamed into place (``replace:manifest.parquet`` is the split's last step,
  ``replace:model`` the export's swap of OUT/model);
- ``extract``: the first batch of views has been embedded and written;
- ``search``: the first Tune trial has completed.

``DERMRAY_FAULT_ACTION=pause`` stops at the point instead (the process sleeps until killed),
after writing the file named by ``DERMRAY_FAULT_READY``: a test can then run a second writer
against the paused one, and kill -9 it itself. Unset, nothing here does anything.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "DERMRAY_FAULT"
ACTION_ENV = "DERMRAY_FAULT_ACTION"
READY_ENV = "DERMRAY_FAULT_READY"


def point(name: str) -> None:
    """Crash (or pause) here if ``$DERMRAY_FAULT`` names this point."""
    if not name or os.environ.get(ENV) != name:
        return
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).write_text(f"{os.getpid()} {name}\n")
    if os.environ.get(ACTION_ENV) == "pause":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
