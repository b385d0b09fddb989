"""cluster/p3.yaml against Ray's own launcher code, and `ray up`'s AWS side offline with moto."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "p3.yaml"
GPU_FAMILIES = ("p2.", "p3.", "p4", "p5", "g3", "g4", "g5", "g6")


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def security_group_module():
    spec = importlib.util.spec_from_file_location("security_group", REPO / "cluster" / "security_group.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passes_ray_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_config())
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_config_choices():
    config = load_config()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]["InstanceType"]
    assert not head.startswith(GPU_FAMILIES), "the head must be a CPU instance"
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert any(w["node_config"]["InstanceType"] == "p3.2xlarge" for w in workers)
    assert all(w["max_workers"] >= w["min_workers"] for w in workers)
    assert config["idle_timeout_minutes"] > 0
    assert any("dermray[gpu" in c and "pip install" in c for c in config["setup_commands"])
    text = CONFIG.read_text()
    assert "0.0.0.0/0" not in text.replace("(without it, the launcher would open SSH to 0.0.0.0/0)", "")
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text


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
    config = aws.bootstrap_aws(prepare_config(load_config()))
    for node in config["available_node_types"].values():
        assert node["node_config"]["SubnetIds"] and node["node_config"]["SecurityGroupIds"]
        assert node["node_config"]["KeyName"]
    assert config["head_node"]["IamInstanceProfile"]["Arn"].endswith("ray-autoscaler-v1")
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
