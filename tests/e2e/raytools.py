"""What the e2e tests share: the repository, this venv's `ray` command, free ports, and the
head's job API over plain HTTP for polling (each `ray` CLI call costs ~2 CPU-seconds of start-up
on a 2-core machine that is also running the job; a GET costs milliseconds)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
DONE = ("SUCCEEDED", "FAILED", "STOPPED")
# The environment of the nodes a test starts: on SIGTERM, `ray start --block` first drains its
# node for Ray Serve (up to 30 s by default, and here it never finishes: the SIGTERM has reached
# the GCS too) and only then stops its processes. No test runs Serve; 0 skips the drain, so a
# node stops at once on SIGTERM instead of waiting out the test's grace period to its SIGKILL.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 120,
            cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    """This venv's `ray` with its output captured (never raises on a non-zero exit)."""
    return subprocess.run([RAY, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def auth_token(env: dict) -> str:
    """The token `ray get-auth-token --generate` wrote into the env's HOME."""
    return (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()


def dashboard_get(address: str, path: str, token: str | None,
                  timeout: float = 30) -> tuple[int, str]:
    """GET ``address + path`` with the token as Ray's clients send it (``Authorization: Bearer``);
    returns (HTTP status, body), status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(address + path, headers=headers),
                                    timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:  # refused, reset, timed out: not up (yet)
        return 0, str(err)


def wait_for_job_api(address: str, env: dict, head: subprocess.Popen, log: Path) -> None:
    """Wait (up to 120 s) until the head's job API answers an authorised job list; fail with
    its log if it dies."""
    import pytest

    token = auth_token(env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if dashboard_get(address, "/api/jobs/", token, timeout=10)[0] == 200:
            return
        assert head.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail("the Ray head did not answer: " + log.read_text()[-3000:])


def wait_for_job(address: str, job_id: str, env: dict, timeout: float) -> str:
    """Poll the job's status (once a second) until it ends or ``timeout`` seconds pass; returns
    the last status seen (SUCCEEDED, FAILED, STOPPED, or a running one on timeout)."""
    token = auth_token(env)
    status = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        code, body = dashboard_get(address, f"/api/jobs/{job_id}", token)
        if code == 200:
            status = json.loads(body)["status"]
            if status in DONE:
                break
        time.sleep(1)
    return status
