"""Create or update the cluster's security group before `ray up`: traffic within the group, and
SSH from the operator's address only (never 0.0.0.0/0). Idempotent: rerun it when your address
changes; rules for other addresses that it added earlier are revoked.

    python cluster/security_group.py --cidr 203.0.113.7/32 --region us-east-1

Ray's AWS launcher, finding a group of the configured name (cluster/p3.yaml:
provider.security_group.GroupName) that already has rules, attaches it and adds nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

import yaml

DEFAULT_NAME = "dermray-sg"
TAG = "dermray-managed"


def open_to_world(permission: dict[str, Any]) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for r in permission.get("IpRanges", [])) or any(
        r.get("CidrIpv6") == "::/0" for r in permission.get("Ipv6Ranges", []))


def check_cidr(cidr: str) -> str:
    """The operator's CIDR; the whole internet is refused."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise SystemExit(f"--cidr must be an address range like 203.0.113.7/32. Got {cidr!r}.")
    if net.prefixlen == 0:
        raise SystemExit("--cidr must not be the whole internet (0.0.0.0/0 or ::/0); pass your "
                         "own address, e.g. $(curl -s https://checkip.amazonaws.com)/32.")
    return str(net)


def default_vpc(ec2) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SystemExit("This region has no default VPC; pass --vpc-id (the VPC of the subnets "
                         "the cluster will use).")
    return vpcs[0]["VpcId"]


def ensure_group(ec2, name: str, vpc_id: str, cidr: str, cluster_name: str) -> dict[str, Any]:
    """Create the group if missing; make its ingress exactly: self (all), SSH from ``cidr``."""
    found = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}
    ])["SecurityGroups"]
    if found:
        group_id = found[0]["GroupId"]
    else:
        group_id = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id,
            Description=f"dermray Ray cluster {cluster_name}: intra-cluster + SSH from operator",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                {"Key": TAG, "Value": "true"}, {"Key": "ray-cluster-name", "Value": cluster_name},
            ]}],
        )["GroupId"]
    wanted = [
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": cidr, "Description": "SSH from the operator"}]},
    ]
    current = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    # revoke what is not wanted (an old operator address, anything open to the world)
    stale = []
    for perm in current.get("IpPermissions", []):
        is_self = any(p.get("GroupId") == group_id for p in perm.get("UserIdGroupPairs", []))
        is_ssh = perm.get("FromPort") == 22 and perm.get("IpProtocol") == "tcp"
        ranges = [r["CidrIp"] for r in perm.get("IpRanges", [])]
        if is_self and perm.get("IpProtocol") == "-1" and not ranges:
            continue
        if is_ssh and ranges == [cidr] and not perm.get("Ipv6Ranges") \
                and not perm.get("UserIdGroupPairs"):
            continue
        stale.append({k: v for k, v in perm.items() if k in (
            "IpProtocol", "FromPort", "ToPort", "IpRanges", "Ipv6Ranges", "UserIdGroupPairs",
            "PrefixListIds")})
    if stale:
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=stale)
    current = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    have_self = any(any(p.get("GroupId") == group_id for p in perm.get("UserIdGroupPairs", []))
                    for perm in current.get("IpPermissions", []))
    have_ssh = any(perm.get("FromPort") == 22 and [r["CidrIp"] for r in perm.get("IpRanges", [])]
                   == [cidr] for perm in current.get("IpPermissions", []))
    missing = ([wanted[0]] if not have_self else []) + ([wanted[1]] if not have_ssh else [])
    if missing:
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)
    final = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert not any(open_to_world(p) for p in final["IpPermissions"])
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cidr", required=True, help="your address, e.g. 203.0.113.7/32")
    parser.add_argument("--region", required=True)
    parser.add_argument("--config", default="cluster/p3.yaml",
                        help="cluster config whose provider.security_group.GroupName to use")
    parser.add_argument("--name", help=f"group name (default: from --config, else {DEFAULT_NAME})")
    parser.add_argument("--vpc-id", help="default: the region's default VPC")
    args = parser.parse_args(argv)
    import boto3

    cidr = check_cidr(args.cidr)
    name, cluster_name = args.name, "dermray"
    try:
        with open(args.config) as fh:
            config = yaml.safe_load(fh)
        name = name or config["provider"]["security_group"]["GroupName"]
        cluster_name = config.get("cluster_name", cluster_name)
    except (OSError, KeyError, TypeError):
        name = name or DEFAULT_NAME
    ec2 = boto3.client("ec2", region_name=args.region)
    vpc_id = args.vpc_id or default_vpc(ec2)
    group = ensure_group(ec2, name, vpc_id, cidr, cluster_name)
    print(f"security group {group['GroupName']} ({group['GroupId']}) in {vpc_id}: "
          f"intra-cluster traffic, SSH from {cidr} only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
