"""The one fault mechanism (dermray.io.faults): a named crash point kills the process that reaches
it with SIGKILL, at most once per DERMRAY_FAULT_ONCE marker across processes, and a fault
variable left in the environment is announced on stderr once per process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from dermray.io import faults

REPO = Path(__file__).resolve().parents[2]
REACH = "from dermray.io import faults; faults.point('other'); faults.point('embed'); print('ok')"


def reach(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh process that passes the point 'other', then reaches the point 'embed'."""
    clean = {k: v for k, v in os.environ.items() if k not in faults.VARIABLES}
    env = {**clean, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", REACH], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_point_kills_once_per_marker_and_is_announced(tmp_path: Path):
    marker, ready = tmp_path / "fired", tmp_path / "ready"
    armed = {faults.ENV: "embed", faults.ONCE_ENV: str(marker), faults.READY_ENV: str(ready)}
    first = reach(armed)
    assert first.returncode == -signal.SIGKILL and first.stdout == ""
    assert marker.read_text().strip() == ready.read_text().split()[0]  # the pid that fired
    assert first.stderr.count("DERMRAY_FAULT='embed'") == 1  # named once, before the kill
    second = reach(armed)  # the marker exists: a restarted actor passes
    assert second.returncode == 0 and second.stdout == "ok\n"
    assert reach({}).stderr == ""  # unset: nothing happens, nothing is printed


def test_the_cli_warns_before_anything_runs(tmp_path: Path, monkeypatch, capsys):
    from dermray.cli import main

    monkeypatch.setattr(faults, "_warned", False)
    monkeypatch.setenv(faults.ENV, "search")
    assert main(["report", str(tmp_path / "missing")]) == 2  # it still runs (and fails here)
    assert "DERMRAY_FAULT='search'" in capsys.readouterr().err
