"""End to end: a real `ray start --head` with token auth, the smoke pipeline (smoke.yaml with a
two-family search) submitted with `ray job submit`, waited for until SUCCEEDED, its outputs
checked; the head is stopped by killing its own process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from raytools import NO_DRAIN, RAY, REPO, free_port, ray_cli, wait_for_job, wait_for_job_api

pytestmark = pytest.mark.e2e
SMOKE = REPO / "ray_jobs" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    logs = tmp_path_factory.mktemp("head")
    # as with an activated venv: the job's `python` must be the one that has dermray's packages
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # an empty HOME, as on a fresh machine: `ray start` does not create the token, so it is
    # generated first, as the README says
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PATH=path, HOME=str(tmp_path_factory.mktemp("home")), RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", **NO_DRAIN)
    token = ray_cli("get-auth-token", "--generate", env=env)
    assert token.returncode == 0 and token.stdout.strip(), token.stderr
    gcs, dashboard = free_port(), free_port()
    with open(logs / "head.log", "w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
             # ports that default to fixed numbers: another head on this machine (another
             # e2e test) would hold them, and this head's job agent would never come up
             f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}",
             "--include-dashboard=true", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    wait_for_job_api(address, env, head, logs / "head.log")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # the whole group the test started, never by name
    try:
        head.wait(timeout=5)  # NO_DRAIN: no 30 s drain first; it then mostly stops in time
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def job_config(tmp_path: Path) -> tuple[Path, list[str]]:
    """smoke.yaml with a smaller search: the job's data and extraction are smoke.yaml's own; its
    search tries two cheap families, one trial each. Every family's own search is covered by
    tests/integration/test_search_ray.py; what this test adds is the job around the pipeline
    (token auth, the uploaded working dir, the driver joining the head), which a Keras trial
    does not exercise any further (the extraction's actor already imports TensorFlow in the
    job's runtime env). Returns the config's path and its families."""
    config = yaml.safe_load(SMOKE.read_text())
    config["search"].update(families=["logistic", "xgboost"], num_samples=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config["search"]["families"]


def test_pipeline_job_succeeds(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    config, families = job_config(tmp_path)
    job_id = f"dermray-e2e-{uuid.uuid4().hex[:8]}"
    command = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
               "--runtime-env", "ray_jobs/runtime_env.yaml", "--working-dir", str(REPO), "--",
               "python", "ray_jobs/pipeline.py", "--config", str(config), "--out", str(out)]
    # the job API can answer before the node's job agent has registered ("No available agent
    # to submit job, please try again later"): that one answer is retried
    for _ in range(20):
        submitted = ray_cli(*command, env=env)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    # without the token, the head refuses the job API (asked while the job runs)
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    no_token.update(RAY_AUTH_MODE="disabled")
    refused = ray_cli("job", "list", "--address", address, env=no_token)
    assert refused.returncode != 0

    status = wait_for_job(address, job_id, env, timeout=600)
    if status != "SUCCEEDED":
        logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
        pytest.fail(f"{status}\n{logs[-4000:]}")

    manifest = pd.read_parquet(out / "manifest.parquet")
    emb = pd.read_parquet(out / "embeddings" / "backbone=resnet50")
    assert len(emb) == len(manifest) == 140
    trials = pd.read_csv(out / "trials.csv")
    assert set(trials["family"]) == set(families)  # every family of the job's search tried
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial_id"] in set(trials["trial_id"])
    bundle = json.loads((out / "model" / "bundle.json").read_text())
    assert bundle["family"] == metrics["family"] and (out / "model" / "head").is_dir()
