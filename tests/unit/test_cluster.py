"""cluster/p3.yaml and cluster/g6.yaml against Ray's own launcher code, and `ray up`'s AWS side
offline with moto, with the security group and IAM profiles made by cluster/*.py first."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "p3.yaml"
CONFIGS = {"p3.yaml": ("p3.2xlarge",), "g6.yaml": ("g6.xlarge", "g5.xlarge")}  # worker types
GPU_FAMILIES = ("p2.", "p3.", "p4", "p5", "g3", "g4", "g5", "g6")
BUCKET = "dermray-test-bucket"


def load_config(name: str = "p3.yaml") -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def cluster_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def security_group_module():
    return cluster_module("security_group")


@pytest.mark.parametrize("name", CONFIGS)
def test_passes_ray_launcher_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_config(name))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_choices(name):
    config = load_config(name)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]["InstanceType"]
    assert not head.startswith(GPU_FAMILIES), "the head must be a CPU instance"
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert any(w["node_config"]["InstanceType"] in CONFIGS[name] for w in workers)
    assert all(w["max_workers"] >= w["min_workers"] for w in workers)
    assert config["idle_timeout_minutes"] > 0
    [setup] = config["setup_commands"]
    assert setup.endswith('DERMRAY_ENV_CACHE="" bash ~/dermray/cluster/setup_node.sh')
    # a P3 needs the proprietary driver installed (Canonical's image has none); g6's DLAMI has one
    assert ("DERMRAY_NVIDIA_DRIVER=580-server" in setup) == (name == "p3.yaml")
    # every node: its own profile from cluster/iam.py, never the launcher's default
    assert {n["node_config"]["IamInstanceProfile"]["Name"] for n in nodes.values()} \
        == {"dermray-head", "dermray-worker"}
    # the token travels with the yaml; every Ray command runs from ~/dermray-env
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1 and "RAY_AUTH_MODE=token" in starts[0]
        assert starts[0].startswith("PATH=$HOME/dermray-env/bin:$PATH ")
        assert not any(re.search(r"(^|\s)ray\s", c) for c in config[key]), "a bare `ray`"
        assert all("~/dermray-env/bin/ray " in c for c in config[key] if re.search(r"\bray ", c))
        assert "chmod 600 ~/.ray/auth_token" in config[key]
    text = (REPO / "cluster" / name).read_text()
    assert "0.0.0.0/0" not in text.replace("(without it, the launcher would open SSH to 0.0.0.0/0)", "")
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text


def test_g6_differs_from_p3_only_in_images_worker_type_and_driver():
    def strip(config: dict) -> dict:
        for node in config["available_node_types"].values():
            node["node_config"].pop("ImageId")
        config["available_node_types"]["gpu_worker"]["node_config"].pop("InstanceType")
        config["setup_commands"] = [c.replace("DERMRAY_NVIDIA_DRIVER=580-server ", "")
                                    for c in config["setup_commands"]]
        return config

    assert strip(load_config("g6.yaml")) == strip(load_config("p3.yaml"))


@pytest.fixture()
def aws(monkeypatch, tmp_path):
    moto = pytest.importorskip("moto")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    import ray.autoscaler._private.aws.config as aws_config

    monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)  # IAM propagation waits
    aws_config._get_subnets_or_die.cache_clear()
    with moto.mock_aws(config={"iam": {"load_aws_managed_policies": True}}):
        yield aws_config


def _ingress(config: dict, region: str = "us-east-1") -> list[dict]:
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    ids = {g for n in config["available_node_types"].values()
           for g in n["node_config"]["SecurityGroupIds"]}
    groups = ec2.describe_security_groups(GroupIds=sorted(ids))["SecurityGroups"]
    return [p for g in groups for p in g["IpPermissions"]]


def _open(perms: list[dict]) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for p in perms for r in p.get("IpRanges", []))


def test_ray_up_aws_side_with_security_group_command(aws):
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

    sg = security_group_module()
    assert sg.main(["--cidr", "203.0.113.7/32", "--region", "us-east-1",
                    "--config", str(CONFIG)]) == 0
    assert sg.main(["--cidr", "198.51.100.9/32", "--region", "us-east-1",
                    "--config", str(CONFIG)]) == 0  # the operator moved: old address revoked
    assert cluster_module("iam").main(["--bucket", BUCKET, "--region", "us-east-1",
                                       "--config", str(CONFIG)]) == 0
    config = aws.bootstrap_aws(prepare_config(load_config()))
    for node in config["available_node_types"].values():
        assert node["node_config"]["SubnetIds"] and node["node_config"]["SecurityGroupIds"]
        assert node["node_config"]["KeyName"]
    # the launcher used the yaml's profiles: it made and attached no default one
    assert "IamInstanceProfile" not in config["head_node"]
    iam = boto3.client("iam")
    assert {p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]} \
        == {"dermray-head", "dermray-worker"}
    assert "ray-autoscaler-v1" not in {r["RoleName"] for r in iam.list_roles()["Roles"]}
    perms = _ingress(config)
    assert not _open(perms), "an ingress rule is open to 0.0.0.0/0"
    ssh = [p for p in perms if p.get("FromPort") == 22]
    assert [r["CidrIp"] for p in ssh for r in p["IpRanges"]] == ["198.51.100.9/32"]

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    worker = copy.deepcopy(config["available_node_types"]["gpu_worker"]["node_config"])
    provider.create_node(worker, {TAG_RAY_NODE_KIND: "worker", "ray-user-node-type": "gpu_worker"}, 1)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert [i["InstanceType"] for i in instances] == ["p3.2xlarge"]
    assert instances[0]["IamInstanceProfile"]["Arn"].endswith("instance-profile/dermray-worker")
    tags = {t["Key"]: t["Value"] for t in instances[0]["Tags"]}
    assert tags[TAG_RAY_CLUSTER_NAME] == "dermray" and tags[TAG_RAY_NODE_KIND] == "worker"
    assert {g["GroupName"] for g in instances[0]["SecurityGroups"]} == {"dermray-sg"}


def test_without_the_command_ray_opens_ssh_to_the_world(aws):
    """The check above can fail: Ray's own default group is open to 0.0.0.0/0."""
    from ray.autoscaler._private.util import prepare_config

    config = aws.bootstrap_aws(prepare_config(load_config()))
    assert _open(_ingress(config))


def test_security_group_refuses_the_whole_internet():
    sg = security_group_module()
    with pytest.raises(SystemExit, match="must not be the whole internet"):
        sg.check_cidr("0.0.0.0/0")


def _policy(iam, role: str) -> list[dict]:
    return iam.get_role_policy(RoleName=role, PolicyName="dermray-cluster")["PolicyDocument"][
        "Statement"]


def _s3_resources(statements: list[dict]) -> set[str]:
    return {r for s in statements if any(a.startswith("s3:") for a in s["Action"])
            for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}


def test_iam_profiles_reach_one_bucket_only_and_are_idempotent(aws):
    import boto3

    iam_py = cluster_module("iam")
    args = ["--region", "us-east-1", "--config", str(CONFIG)]
    assert iam_py.main(["--bucket", BUCKET, "--prefix", "runs/", *args]) == 0
    assert iam_py.main(["--bucket", BUCKET, "--prefix", "runs/", *args]) == 0  # idempotent
    iam = boto3.client("iam")
    roles = {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert roles == {"dermray-head", "dermray-worker"}
    for role in roles:
        assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["dermray-cluster"]
        assert not iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]
    worker, head = _policy(iam, "dermray-worker"), _policy(iam, "dermray-head")
    for statements in (worker, head):
        assert _s3_resources(statements) == {f"arn:aws:s3:::{BUCKET}",
                                             f"arn:aws:s3:::{BUCKET}/runs/*"}
        listing = [s for s in statements if "s3:ListBucket" in s["Action"]]
        assert listing[0]["Condition"]["StringLike"]["s3:prefix"] == ["runs", "runs/*"]
    assert not any(a.startswith(("ec2:", "iam:")) for s in worker for a in s["Action"])
    # the head: EC2 on this cluster's tagged instances, and it may pass the worker role only
    worker_arn = iam.get_role(RoleName="dermray-worker")["Role"]["Arn"]
    assert [s["Resource"] for s in head if s["Action"] == "iam:PassRole"] == [worker_arn]
    ending = [s for s in head if "ec2:TerminateInstances" in s["Action"]]
    assert ending[0]["Condition"] == {
        "StringEquals": {"aws:ResourceTag/ray-cluster-name": load_config()["cluster_name"]}}
    assert "*" not in json.dumps([s["Action"] for s in head + worker])

    # another bucket: the same roles, the access moved
    assert iam_py.main(["--bucket", "other-bucket", *args]) == 0
    assert _s3_resources(_policy(iam, "dermray-worker")) == {
        "arn:aws:s3:::other-bucket", "arn:aws:s3:::other-bucket/*"}
    assert {r["RoleName"] for r in iam.list_roles()["Roles"]} == roles


def test_iam_refuses_a_url_for_the_bucket():
    with pytest.raises(SystemExit, match="must be a bucket name"):
        cluster_module("iam").main(["--bucket", "s3://b/p", "--region", "us-east-1"])


FAKE_UV = """#!/bin/bash
echo "$*" >> "$HOME/uv.log"
case "$1" in
  --version) grep -o 'UV_VERSION=[0-9.]*' "$HOME/dermray/cluster/setup_node.sh" | sed 's/UV_VERSION=/uv /';;
  venv) mkdir -p "${@: -1}/bin"
        printf '#!/bin/bash\\nexec %s "$@"\\n' "$PYTHON" > "${@: -1}/bin/python"
        chmod +x "${@: -1}/bin/python";;
esac
"""
FAKE_AWS = """#!/bin/bash
# aws s3 ls|cp, with s3://bucket/ mapped to the folder $BUCKET_DIR
shift; cmd=$1; shift; paths=()
for a in "$@"; do [[ $a == --* ]] || paths+=("${a/s3:\\/\\/bucket/$BUCKET_DIR}"); done
case $cmd in
  ls) test -e "${paths[0]}";;
  cp) if [ "${paths[0]}" = - ]; then mkdir -p "$(dirname "${paths[1]}")"; cat > "${paths[1]}"
      else cat "${paths[0]}"; fi;;
esac
"""


def test_setup_node_builds_once_then_unpacks_the_env_cache(tmp_path):
    """cluster/setup_node.sh with fake uv and aws: the first node builds and uploads, a fresh
    node with the same key unpacks instead of installing, a rerun does nothing."""
    import subprocess
    import sys

    home, fakes = tmp_path / "home", tmp_path / "bin"
    (home / "dermray" / "cluster").mkdir(parents=True)
    fakes.mkdir()
    for name in ("pyproject.toml", "cluster/setup_node.sh"):
        (home / "dermray" / name).write_bytes((REPO / name).read_bytes())
    for name, text in (("uv", FAKE_UV), ("aws", FAKE_AWS)):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{fakes}:/usr/bin:/bin", "PYTHON": sys.executable,
           "BUCKET_DIR": str(tmp_path / "bucket"), "DERMRAY_ENV_CACHE": "s3://bucket/cache"}

    def setup() -> list[str]:
        (home / "uv.log").write_text("")
        done = subprocess.run(["bash", "dermray/cluster/setup_node.sh"], cwd=home, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return (home / "uv.log").read_text().split("\n")

    built = setup()
    assert any(c.startswith("pip install") and "dermray[gpu,aws]" in c for c in built)
    assert len(list((tmp_path / "bucket" / "cache").glob("dermray-env-*.tar.gz"))) == 1
    assert not any(c.startswith(("pip", "venv", "python")) for c in setup())  # up to date
    for path in ("dermray-env", ".local/share/uv"):  # a fresh node: the same key, no env
        subprocess.run(["rm", "-rf", str(home / path)], check=True)
    assert not any(c.startswith(("pip", "venv", "python")) for c in setup())  # unpacked
    assert (home / "dermray-env" / ".dermray-env-key").exists()
    assert 'export PATH="$HOME/dermray-env/bin:$PATH"' in (home / ".bashrc").read_text()
