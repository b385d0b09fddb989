"""End to end on a simulated autoscaling GPU cluster: Ray's ``fake_multinode`` provider
(tests/e2e/fake_cluster/cluster.yaml) starts with a head of 2 CPUs and no GPU; the pipeline job,
submitted with ``ray job submit``, reads its images from and writes every output to moto's S3
server on 127.0.0.1. Its GPU embedding actors are what make the autoscaler add GPU worker nodes
(raylets on this machine advertising one fake GPU each); the test checks that two came up from
zero, that the actors ran on them and nowhere else, that the rows reconcile exactly, and that the
outputs are in the bucket.

Token auth is on, as on the real cluster: the token is generated before the head starts
(``ray get-auth-token --generate`` into an empty HOME), and the fake workers, started by the
head's autoscaler, read the same one.

Every Ray process the test starts is in the session of its ``ray start --head``; teardown stops
that session by its id (never ``ray stop`` or names: other tests may run Ray on this machine).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from raytools import (
    DONE,
    NO_DRAIN,
    RAY,
    REPO,
    auth_token,
    dashboard_get,
    free_port,
    ray_cli,
    wait_for_job,
    wait_for_job_api,
)

from dermray.io import faults

CLUSTER_YAML = Path(__file__).with_name("fake_cluster") / "cluster.yaml"
JOB_CONFIG = REPO / "ray_jobs" / "configs" / "fake_cluster.yaml"
HEAD_NODE_ID = "f" * 51 + "00000"  # the id the fake provider gives the head (RAY_FAKE_CLUSTER=1)
BUCKET = "dermray-fake"
N_IMAGES = 80
pytestmark = pytest.mark.e2e

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


def session_pids(sid: int) -> list[int]:
    """The processes in one session (the head's `ray start`, everything it started, the fake
    worker raylets and their workers, which make process groups of their own inside it)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and int(stat[3]) == sid:  # state, session (zombies are already gone)
            pids.append(int(entry))
    return pids


def stop_session(sid: int, grace_s: float = 5) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and session_pids(sid):
            time.sleep(0.5)


def cluster_nodes(address: str, env: dict) -> list[dict]:
    """The cluster's nodes, alive or dead, from the head's state API (GET /api/v0/nodes, as
    `ray list nodes` reads it; this process stays Ray-free and starts no driver). The job API can
    answer a moment before the head's own node is listed: an empty list is asked again."""
    deadline = time.time() + 60
    while True:
        code, body = dashboard_get(address, "/api/v0/nodes?detail=1&limit=1000", auth_token(env))
        assert code == 200, body[-3000:]
        nodes = json.loads(body)["data"]["result"]["result"]
        if nodes or time.time() > deadline:
            break
        time.sleep(0.5)
    return [{"id": n["node_id"], "alive": n["state"] == "ALIVE",
             "resources": n["resources_total"], "start_ms": n.get("start_time_ms")}
            for n in nodes]


def gpu_nodes(nodes: list[dict]) -> set[str]:
    """Nodes with a GPU, alive or not (an idle one may already have been scaled down)."""
    return {n["id"] for n in nodes if n["resources"].get("GPU", 0) >= 1}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one bucket; yields (client, the URI query)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield client, f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


@pytest.fixture(scope="module")
def images_on_s3(s3, tmp_path_factory) -> tuple[str, str, set[str]]:
    """A small synthetic HAM10000 layout with two broken JPEGs, uploaded to the bucket; returns
    (metadata URI, images URI, the broken image ids)."""
    from dermray.data.synth import write_synth_dataset

    client, query = s3
    local = tmp_path_factory.mktemp("synth")
    write_synth_dataset(local, n=N_IMAGES, seed=0, size=(48, 36))
    files = sorted(local.glob("HAM10000_images_part_*/*.jpg"))
    files[0].write_bytes(np.random.default_rng(0).bytes(400))  # not a JPEG at all
    files[1].write_bytes(files[1].read_bytes()[:200])  # truncated
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(local)}")
    return (f"s3://{BUCKET}/data/HAM10000_metadata.csv?{query}", f"s3://{BUCKET}/data?{query}",
            {files[0].stem, files[1].stem})


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """A head (2 CPUs, 0 GPUs) with the fake_multinode autoscaler; yields (job API address, GCS
    address, env). The GCS port is free-picked: the yaml's provider.gcs_address is set to it, so
    the fake workers need not find the head on 6379."""
    tmp = tmp_path_factory.mktemp("fake_cluster")
    home = tmp / "home"
    home.mkdir()
    gcs_port, dashboard, agent, client = (free_port() for _ in range(4))
    gcs = f"127.0.0.1:{gcs_port}"
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["provider"]["gcs_address"] = gcs
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(config))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "HOME": str(home), "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", **NO_DRAIN,
           # every node's credentials for the bucket (an instance profile on AWS)
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "CUDA_VISIBLE_DEVICES",
                "AWS_PROFILE", *faults.VARIABLES):
        env.pop(key, None)  # the cluster's own settings, not this test session's
    generated = ray_cli("get-auth-token", "--generate", env=env)
    assert generated.returncode == 0, generated.stderr[-2000:]
    with open(tmp / "head.log", "w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             # fixed by default (52365, 10001): free ones, so that another head can run beside
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             "--num-cpus=2", "--num-gpus=0", f"--autoscaling-config={tmp / 'cluster.yaml'}",
             "--include-dashboard=true", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_api(address, env, head, tmp / "head.log")
        yield address, gcs, env
    finally:
        stop_session(head.pid)
        head.wait(timeout=30)


def test_pipeline_scales_gpu_workers_from_zero(fake_cluster, s3, images_on_s3, tmp_path):
    address, _, env = fake_cluster
    client, query = s3
    metadata, images, broken = images_on_s3

    nodes = cluster_nodes(address, env)
    assert [n["id"] for n in nodes if n["alive"]] == [HEAD_NODE_ID], nodes
    assert gpu_nodes(nodes) == set()  # no GPU anywhere before the job

    config = yaml.safe_load(JOB_CONFIG.read_text())
    config["data"] = {"metadata": metadata, "images": [images], "seed": 0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    out = f"s3://{BUCKET}/{prefix}?{query}"
    job_id = f"dermray-fake-{uuid.uuid4().hex[:8]}"
    # the code is used in place (local://): every fake node shares this machine's disk, and an
    # uploaded working_dir would be unpacked again (rmtree + unzip) into the one shared session
    # folder by each new node's agent, pulling the running driver's cwd out from under it
    command = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
               "--runtime-env", "ray_jobs/runtime_env.yaml", "--working-dir", f"local://{REPO}",
               "--", "python", "ray_jobs/pipeline.py", "--config", str(tmp_path / "job.yaml"),
               "--out", out]
    for _ in range(20):  # the job agent may not have registered yet
        submitted = ray_cli(*command, env=env)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    submitted_ms = time.time() * 1000
    # token auth is on: no token, no job API (asked while the job runs, not before it)
    refused = ray_cli("job", "list", "--address", address, env={**env, "RAY_AUTH_MODE": "disabled"})
    assert refused.returncode != 0
    status = wait_for_job(address, job_id, env, timeout=420)
    if status != "SUCCEEDED":
        if status not in DONE:
            ray_cli("job", "stop", "--address", address, job_id, env=env)
        logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
        (tmp_path / "job.log").write_text(logs)
        pytest.fail(f"{status}: {tmp_path / 'job.log'}\n{logs[-6000:]}")

    # the autoscaler brought (at least) two GPU workers, none of them the head
    nodes = cluster_nodes(address, env)
    workers = gpu_nodes(nodes)
    assert len(workers) >= 2 and HEAD_NODE_ID not in workers, workers
    print("GPU workers up, seconds after the submission:",  # for the record, not asserted
          sorted(round((n["start_ms"] - submitted_ms) / 1000, 1) for n in nodes
                 if n["id"] in workers and n["start_ms"]))

    # every output is in the bucket
    keys = {o["Key"][len(prefix) + 1:] for page in client.get_paginator("list_objects_v2")
            .paginate(Bucket=BUCKET, Prefix=prefix + "/") for o in page.get("Contents", [])}
    for name in ("manifest.parquet", "extract_run.json", "quarantine.parquet", "trials.csv",
                 "metrics.json", "model/bundle.json", "report.html"):
        assert name in keys, sorted(keys)
    for folder in ("embeddings/backbone=resnet50/", "tune/"):  # the Tune experiment too
        assert any(k.startswith(folder) for k in keys), sorted(keys)

    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(out)

    def read(name: str):  # the part files hold their partition columns (split) themselves
        return pads.dataset(f"{root}/{name}", filesystem=fs, format="parquet",
                            partitioning=None).to_table().to_pandas()

    # rows are exact: every image embedded once, except the two broken ones, quarantined
    manifest = read("manifest.parquet")
    quarantine = read("quarantine.parquet")
    emb = read("embeddings/backbone=resnet50")
    assert len(manifest) == N_IMAGES
    assert set(quarantine["image_id"]) == broken
    assert len(emb) == len(manifest) - len(quarantine)
    assert not emb.duplicated(["image_id", "aug_index"]).any()
    assert set(emb["image_id"]) == set(manifest["image_id"]) - broken

    # the embedding actors ran on the GPU workers only, on at least two of them
    record = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/extract_run.json")
                        ["Body"].read())
    actors = record["actors"]
    assert actors and {a["node_id"] for a in actors} <= workers, (actors, workers)
    assert len({a["node_id"] for a in actors}) >= 2, actors
    assert all(str(a["gpu_ids"]) for a in actors), actors  # each held a (fake) GPU
    assert sum(a["views"] for a in actors) == len(manifest)  # embedded + quarantined

    metrics = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/metrics.json")
                         ["Body"].read())
    bundle = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/model/bundle.json")
                        ["Body"].read())
    assert metrics["family"] == bundle["family"] == "logistic"
