"""Token files are private from the moment they exist (issue 22, class 5), and a command line's
URI credentials do not outlive the start of the run.

- every `ray get-auth-token --generate` the yamls and docs tell an operator to run, run as
  written against an empty HOME with `chmod` made a no-op: the file is 600 without it;
- the token a local `ray.init()` makes (``dermray.stages.raysession``): 600, the folder 700;
- a token file readable by others is made private, with a warning.

Subprocesses: Ray's token loader caches the token per process.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ("cluster/p3.yaml", "cluster/g6.yaml", "docs/cluster.md", "README.md")
VENV_BIN = Path(sys.executable).parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def token_commands() -> dict[str, list[str]]:
    """command -> the files that give it (a yaml's `#   $ ...` header line, a docs line)."""
    found: dict[str, list[str]] = {}
    for name in DOCS:
        for line in (REPO / name).read_text().splitlines():
            if "get-auth-token --generate" in line and "ray get-auth-token" in line:
                command = re.sub(r"^#?\s*\$?\s*", "", line).split("  #")[0].strip()
                if command.startswith(("ray ", "(")):
                    found.setdefault(command, []).append(name)
    return found


def test_every_documented_token_command_makes_a_private_file(tmp_path):
    commands = token_commands()
    # each file that tells the operator to make a token says it once, in one form
    assert sorted(n for names in commands.values() for n in names) == sorted(DOCS)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "chmod").write_text("#!/bin/sh\nexit 0\n")  # what matters is the file as made
    (shim / "chmod").chmod(0o755)
    for i, command in enumerate(commands):
        home = tmp_path / f"home{i}"
        home.mkdir()
        env = clean_env(home, PATH=f"{shim}:{VENV_BIN}:{os.environ['PATH']}")
        done = subprocess.run(["bash", "-c", f"umask 022; {command}"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        token = home / ".ray" / "auth_token"
        assert token.read_text().strip(), command
        assert (mode(token), mode(token.parent)) == (0o600, 0o700), command


SCRIPT = """
import os, stat, sys
from dermray.stages.raysession import hide_credentials_in_cmdline, make_private_token, token_path
os.umask(0o022)
make_private_token()
path = token_path()
print(oct(stat.S_IMODE(path.stat().st_mode)), oct(stat.S_IMODE(path.parent.stat().st_mode)),
      oct(os.umask(0o022)))
hide_credentials_in_cmdline()
print(open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip())
print(" ".join(sys.argv))
"""


def test_the_token_a_local_ray_makes_is_private_and_argv_loses_its_secret(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    script = tmp_path / "start.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), "--out", "s3://AKIAX:hush42@b/o"],
                          env=clean_env(home), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    modes, cmdline, argv = done.stdout.splitlines()[-3:]
    assert modes.split() == ["0o600", "0o700", "0o22"]  # and the umask is back as it was
    assert "hush42" not in cmdline + argv and "AKIAX" not in cmdline + argv
    assert "s3://***@b/o" in cmdline and argv.endswith("--out s3://***@b/o")


def test_a_token_file_readable_by_others_is_made_private(tmp_path, caplog):
    from dermray.stages.raysession import check_token_private

    token = tmp_path / "auth_token"
    token.write_text("t")
    token.chmod(0o644)
    check_token_private(token)
    assert mode(token) == 0o600
    check_token_private(tmp_path / "absent")  # no file (a token in the environment): nothing


@pytest.mark.slow
def test_ray_init_inside_dermray_leaves_a_private_token(tmp_path):
    """The real `ray.init()` of a local run, with an empty HOME: 600 (Ray alone: 644). About
    15 s (a local Ray starts and stops)."""
    home = tmp_path / "home"
    home.mkdir()
    script = ("import ray, stat; from dermray.stages.raysession import ensure_ray, token_path\n"
              "ensure_ray(); p = token_path(); print(oct(stat.S_IMODE(p.stat().st_mode)))\n"
              "ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(home),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "0o600"
