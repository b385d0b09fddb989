"""What the e2e tests share: the repository, this venv's `ray` command, free ports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 120,
            cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    """This venv's `ray` with its output captured (never raises on a non-zero exit)."""
    return subprocess.run([RAY, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def wait_for_job_api(address: str, env: dict, head: subprocess.Popen, log: Path) -> None:
    """Wait (up to 120 s) until the head's job API answers; fail with its log if it dies."""
    import pytest

    deadline = time.time() + 120
    while time.time() < deadline:
        if ray_cli("job", "list", "--address", address, env=env, timeout=60).returncode == 0:
            return
        assert head.poll() is None, log.read_text()[-3000:]
        time.sleep(2)
    pytest.fail("the Ray head did not answer: " + log.read_text()[-3000:])
