"""The cluster yamls' own commands on fresh nodes, played on this machine as Ray's launcher would.

Operator, head and worker each get an empty HOME. The operator runs the yaml's documented
token command; the yaml's file_mounts are applied (local paths against the operator's HOME,
remote paths against the node's, modes kept as rsync -a keeps them; the head passes its copies on
to the worker, as its autoscaler does); then the yaml's head_start_ray_commands and
worker_start_ray_commands run in bash, taken from the yaml, changed only where two nodes share
this machine: `ray stop` dropped (it would stop every Ray here), ports made free, the autoscaling
config dropped. `~/dermray-env` in each HOME links to this test's venv, so the
yaml's own paths work; setup_commands (the real install) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from raytools import NO_DRAIN, REPO, auth_token, dashboard_get, free_port, ray_cli

# p3.yaml only: tests/unit/test_cluster.py checks that g6.yaml differs from it only in the
# images, the worker instance type and the driver line, so its start commands and file mounts
# are these very ones (running them twice cost ~45 s of `make test`)
CONFIGS = [REPO / "cluster" / "p3.yaml"]
VENV = Path(sys.prefix)
CHECKOUT_MOUNT = "~/dermray"  # the repository itself; setup_commands, not run here, use it
pytestmark = pytest.mark.e2e

# The job checks where it runs: both nodes alive, and its `python` is the node's ~/dermray-env.
JOB = ("import ray, sys, time; ray.init(); t = time.time()\n"
       "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.time() - t < 60: time.sleep(1)\n"
       "print('ALIVE', sum(n['Alive'] for n in ray.nodes()), 'PREFIX', sys.prefix)")


def operator_lines(config_path: Path) -> list[str]:
    """The `#   $ command` lines of the yaml's header: what the operator runs."""
    return [m.group(1) for m in re.finditer(r"^#\s+\$ (.+)$", config_path.read_text(),
                                                re.MULTILINE)]


def clean_env(home: Path, with_venv: bool) -> dict[str, str]:
    """This machine's environment less any Ray setting (its HOME may hold a token that hides
    bugs), with ``home`` as HOME; the venv's bin on PATH only for the operator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    paths = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin"]
    if with_venv:
        paths.insert(0, str(VENV / "bin"))
    env.update(HOME=str(home), PATH=os.pathsep.join(paths), RAY_USAGE_STATS_ENABLED="0")
    return env


def apply_file_mounts(mounts: dict[str, str], src_home: Path, dst_home: Path, local: bool) -> None:
    """Copy each mount as the launcher's rsync -a would; ``local``: the operator's side, where
    the source path is the yaml's local path, else the head's, where it is the remote path."""
    for remote, source in mounts.items():
        if remote == CHECKOUT_MOUNT:
            continue
        source = source if local else remote
        src = Path(source.replace("~", str(src_home), 1)) if source.startswith("~") \
            else REPO / source
        dst = Path(remote.replace("~", str(dst_home), 1))
        side = "operator" if local else "head"
        assert src.exists(), f"file_mounts: {source} does not exist on the {side}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)  # content and mode bits, like rsync -a


def localize(cmd: str, ports: dict[str, int], head: bool) -> str:
    """One `ray start` line made to share this machine: free ports instead of the fixed ones,
    no autoscaler, and --block so that its process group owns the node. (The node IP is this
    machine's: Ray replaces 127.0.0.1 by it anyway.)"""
    cmd = re.sub(r"--autoscaling-config=\S+", "", cmd)
    cmd = cmd.replace("--port=6379", f"--port={ports['gcs']}").replace(":6379", f":{ports['gcs']}")
    cmd = re.sub(r"--object-manager-port=\d+", f"--object-manager-port={free_port()}", cmd)
    extra = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
             "--block"]
    if head:
        extra += [f"--dashboard-port={ports['dashboard']}",
                  f"--ray-client-server-port={free_port()}"]
    return f"{cmd} {' '.join(extra)}"


def start_node(commands: list[str], home: Path, ports: dict[str, int], head: bool,
               procs: list[subprocess.Popen]) -> None:
    """Run one node's start commands from the yaml in bash, as the launcher's updater does."""
    env = {**clean_env(home, with_venv=False), **NO_DRAIN}  # stop at once on SIGTERM
    if not head:
        env["RAY_HEAD_IP"] = "127.0.0.1"  # the launcher's with_head_node_ip()
    for cmd in commands:
        if re.search(r"\bray stop\b", cmd):
            continue
        wrapped = f"export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({cmd})"
        if re.search(r"\bray start\b", cmd):
            wrapped = wrapped.replace(cmd, localize(cmd, ports, head))
            with open(home / "ray-start.log", "w") as log:
                procs.append(subprocess.Popen(["bash", "-c", wrapped], cwd=home, env=env,
                                              stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            return
        done = subprocess.run(["bash", "-c", wrapped], check=False, cwd=home, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{cmd!r} failed: {done.stderr[-2000:]}"
    pytest.fail("no `ray start` among the node's start commands")


def ray_cli_home(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return ray_cli(*args, env=env, timeout=timeout, cwd=env["HOME"])


def wait_for_job_api(address: str, env: dict, procs: list[subprocess.Popen], homes) -> None:
    """Until the head answers an authorised job list (over HTTP: cheap to poll)."""
    token = auth_token(env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if dashboard_get(address, "/api/jobs/", token, timeout=10)[0] == 200:
            return
        for proc, home in zip(procs, homes):
            assert proc.poll() is None, (home / "ray-start.log").read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail("the head's job API did not answer: "
                + (homes[0] / "ray-start.log").read_text()[-3000:])


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.name)
def test_yaml_commands_start_a_cluster_that_takes_jobs_with_the_token(config_path, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    homes = {name: tmp_path / name for name in ("operator", "head", "worker", "stranger")}
    for home in homes.values():
        home.mkdir()
    for node in ("head", "worker"):  # where the yaml expects the env setup_node.sh builds
        (homes[node] / "dermray-env").symlink_to(VENV, target_is_directory=True)

    # the operator makes the token as the yaml's header says, with the project's venv on PATH
    operator = clean_env(homes["operator"], with_venv=True)
    [make_token] = [line for line in operator_lines(config_path) if "get-auth-token" in line]
    made = subprocess.run(["bash", "-c", make_token], check=False, cwd=REPO, env=operator,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    token = (homes["operator"] / ".ray" / "auth_token").read_text()
    assert token.strip()

    # `ray up` syncs file_mounts to the head; the head's autoscaler syncs its copies on
    apply_file_mounts(config["file_mounts"], homes["operator"], homes["head"], local=True)
    apply_file_mounts(config["file_mounts"], homes["head"], homes["worker"], local=False)

    ports = {"gcs": free_port(), "dashboard": free_port()}
    address = f"http://127.0.0.1:{ports['dashboard']}"
    submit_env = {**operator, "RAY_AUTH_MODE": "token"}
    assert any("RAY_AUTH_MODE=token" in line for line in operator_lines(config_path))
    procs: list[subprocess.Popen] = []
    try:
        start_node(config["head_start_ray_commands"], homes["head"], ports, True, procs)
        wait_for_job_api(address, submit_env, procs, [homes["head"]])
        start_node(config["worker_start_ray_commands"], homes["worker"], ports, False, procs)
        for node in ("head", "worker"):
            path = homes[node] / ".ray" / "auth_token"
            assert path.read_text() == token, f"the {node} has another token"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"the {node}'s token is not 600"

        job = ray_cli_home("job", "submit", "--address", address, "--", "python", "-c", JOB,
                      env=submit_env, timeout=180)
        for proc, home in zip(procs, (homes["head"], homes["worker"])):
            assert proc.poll() is None, (home / "ray-start.log").read_text()[-3000:]
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower(), job.stdout[-3000:]
        assert f"ALIVE 2 PREFIX {homes['head'] / 'dermray-env'}" in job.stdout, job.stdout[-3000:]

        # without the token (a HOME without the file, no RAY_AUTH_TOKEN*), the head refuses
        stranger = {**clean_env(homes["stranger"], with_venv=True), "RAY_AUTH_MODE": "token"}
        refused = ray_cli_home("job", "submit", "--address", address, "--", "echo", "hi", env=stranger)
        assert refused.returncode != 0
        jobs = ray_cli_home("job", "list", "--address", address, env=submit_env)
        assert jobs.returncode == 0 and jobs.stdout.count("submission_id=") == 1, jobs.stdout
    finally:
        for proc in reversed(procs):  # the groups this test started, never Ray's by name
            stop_group(proc)
        stop_stragglers(homes.values())


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the node's process group, SIGKILL what is left of it after ``grace`` seconds
    (`ray start --block` can hang in its shutdown)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + grace
        while group_alive(proc.pid) and time.time() < deadline:
            proc.poll()  # reap the group's leader, bash
            time.sleep(0.5)
        if not group_alive(proc.pid):
            break
    proc.wait(timeout=30)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_stragglers(homes) -> None:
    """Ray's worker processes run in sessions of their own: end those whose HOME is one of ours."""
    ours = {f"HOME={home}".encode() for home in homes}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if ours & set((proc / "environ").read_bytes().split(b"\0")):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
