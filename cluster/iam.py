"""Create or update the cluster's IAM roles and instance profiles before `ray up`, so that no node
gets the launcher's default ray-autoscaler-v1 profile (AmazonEC2FullAccess + AmazonS3FullAccess).

    python cluster/iam.py --bucket YOUR-BUCKET [--prefix dermray] --region us-east-1

- worker (cluster/p3.yaml: gpu_worker IamInstanceProfile): read/write the one bucket (or prefix);
- head (head IamInstanceProfile): the same bucket, plus what Ray's AWS node provider calls to run
  the autoscaler: launch instances tagged with this cluster's name, tag, stop, start and terminate
  only instances carrying that tag, describe, and pass the worker role (no other).

Idempotent: roles and profiles are created if missing, the inline policies rewritten each run, so
rerunning with another bucket moves the access there. Profile names come from --config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
POLICY_NAME = "dermray-cluster"
CLUSTER_TAG = "ray-cluster-name"  # ray.autoscaler.tags.TAG_RAY_CLUSTER_NAME, on every node


def bucket_statements(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """List the bucket (under the prefix only, when given); get/put/delete objects under it."""
    prefix = prefix.strip("/")
    listing: dict[str, Any] = {"Effect": "Allow", "Resource": f"arn:aws:s3:::{bucket}",
                               "Action": ["s3:ListBucket", "s3:GetBucketLocation"]}
    if prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    objects = f"arn:aws:s3:::{bucket}/{prefix}/*" if prefix else f"arn:aws:s3:::{bucket}/*"
    return [listing, {"Effect": "Allow", "Resource": objects, "Action": [
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]}]


def head_statements(region: str, account: str, cluster: str, worker_role_arn: str,
                    ) -> list[dict[str, Any]]:
    """What the head's autoscaler needs (ray/autoscaler/_private/aws/node_provider.py): narrower
    than the launcher's default AmazonEC2FullAccess."""
    ec2 = f"arn:aws:ec2:{region}:{account}"
    tagged = {"StringEquals": {f"aws:ResourceTag/{CLUSTER_TAG}": cluster}}
    return [
        {"Effect": "Allow", "Resource": "*", "Action": [  # Describe* has no resource-level scope
            "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages",
            "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs"]},
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": f"{ec2}:instance/*",
         "Condition": {"StringEquals": {f"aws:RequestTag/{CLUSTER_TAG}": cluster}}},
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": [
            f"{ec2}:volume/*", f"{ec2}:network-interface/*", f"{ec2}:subnet/*",
            f"{ec2}:security-group/*", f"{ec2}:key-pair/*", f"arn:aws:ec2:{region}::image/*"]},
        {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": f"{ec2}:instance/*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Effect": "Allow", "Resource": f"{ec2}:instance/*", "Condition": tagged, "Action": [
            "ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]},
        # node configs may name the AMI as resolve:ssm:/aws/service/... (cluster/g6.yaml)
        {"Effect": "Allow", "Action": "ssm:GetParameters",
         "Resource": f"arn:aws:ssm:{region}::parameter/aws/service/*"},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": worker_role_arn},
    ]


def ensure_profile(iam, name: str, statements: list[dict[str, Any]]) -> dict[str, Any]:
    """Role and instance profile ``name`` with exactly one inline policy: ``statements``."""
    try:
        role = iam.get_role(RoleName=name)["Role"]
        created_role = False
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST),
                               Description="dermray Ray cluster node role (cluster/iam.py)")["Role"]
        created_role = True
    iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in {r["RoleName"] for r in profile.get("Roles", [])}:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    print(f"{'created' if created_role else 'updated'} role and instance profile {name}")
    return role


def profile_names(config: dict[str, Any]) -> tuple[str, str]:
    """(head, worker) instance profile names from the cluster yaml; one worker profile."""
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {n["node_config"]["IamInstanceProfile"]["Name"]
               for k, n in nodes.items() if k != config["head_node_type"]}
    if len(workers) != 1:
        raise SystemExit(f"the worker node types must share one IamInstanceProfile; got {workers}")
    return head, workers.pop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", required=True, help="the one bucket nodes may read and write")
    parser.add_argument("--prefix", default="", help="limit access to this key prefix")
    parser.add_argument("--region", required=True)
    parser.add_argument("--config", default="cluster/p3.yaml",
                        help="cluster yaml: its cluster_name and IamInstanceProfile names")
    args = parser.parse_args(argv)
    if args.bucket.startswith("s3://") or "/" in args.bucket:
        raise SystemExit(f"--bucket must be a bucket name (use --prefix for a folder). "
                         f"Got {args.bucket!r}.")
    import boto3

    with open(args.config) as fh:
        config = yaml.safe_load(fh)
    head_name, worker_name = profile_names(config)
    account = boto3.client("sts", region_name=args.region).get_caller_identity()["Account"]
    iam = boto3.client("iam", region_name=args.region)
    storage = bucket_statements(args.bucket, args.prefix)
    worker = ensure_profile(iam, worker_name, storage)
    ensure_profile(iam, head_name, storage + head_statements(
        args.region, account, config["cluster_name"], worker["Arn"]))
    where = f"s3://{args.bucket}/{args.prefix.strip('/')}".rstrip("/")
    print(f"nodes may read and write {where} only; the head may launch and end "
          f"{config['cluster_name']}'s instances and pass {worker_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
