"""cluster.yaml on AWS, through Ray's own code for `ray up`, its autoscaler and its rsync, with moto standing in for AWS.

Only AWS is emulated (moto, in-process: no request leaves this machine); every Ray code path is the real one.
"""

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import boto3
import moto
import moto.settings
import pytest
import yaml
from botocore.exceptions import ClientError
from moto.iam.access_control import IAMPolicy, PermissionResult
from ray.autoscaler._private.aws import config as aws_config
from ray.autoscaler._private.aws import utils as aws_utils
from ray.autoscaler._private.aws.config import bootstrap_aws
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.event_summarizer import EventSummarizer
from ray.autoscaler._private.node_launcher import BaseNodeLauncher
from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
from ray.autoscaler._private.util import ConcurrentCounter, hash_launch_conf, prepare_config, validate_config
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UNINITIALIZED,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

pytestmark = pytest.mark.slow  # an AWS emulator and Ray's cluster launcher

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-west-2"  # the shipped region
BUCKET = "tune-alexnet-results"
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def shipped() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def pyproject_pins() -> dict[str, str]:
    """The versions pyproject.toml pins: Ray, and torch and torchvision on x86_64 (the cluster's machines)."""
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    pins = {"ray": re.search(r"\bray\[[^\]]*\]==([\d.]+)", deps).group(1)}
    for pkg in ("torch", "torchvision"):
        pins[pkg] = re.search(rf"\b{pkg}==([\d.]+); platform_machine == 'x86_64'", deps).group(1)
    return pins


PINS = pyproject_pins()


def clear_ray_aws_caches():
    # Ray caches boto3 clients and subnet look-ups per process: none may outlive one emulated account.
    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()
    aws_config._get_subnets_or_die.cache_clear()


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """A fresh emulated AWS account; fake credentials; HOME in tmp_path (Ray writes the new SSH key to ~/.ssh)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):  # no profile, endpoint or real key may leak in
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # AmazonEC2FullAccess etc., as Ray attaches them
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # not needed (ImageId is an SSM reference); saves 1.5 s
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # Stricter than moto's default: unknown key pairs and instance types in the region are refused, as on AWS.
    monkeypatch.setattr(moto.settings, "ENABLE_KEYPAIR_VALIDATION", True)
    monkeypatch.setattr(moto.settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)
    # Ray sleeps 15 s twice after creating its IAM role and profile, for AWS to propagate them; moto needs no wait.
    monkeypatch.setattr(aws_config, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    clear_ray_aws_caches()
    with moto.mock_aws():
        yield
    clear_ray_aws_caches()


def bootstrap(config: dict, fill_out_resources: bool = False) -> dict:
    """What `ray up` does before it launches anything: prepare, fill out, validate, then Ray's AWS bootstrap.

    The fill-out (resources read from the instance types) takes 3 s in moto: only the first test runs it.
    """
    if fill_out_resources:
        return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return bootstrap_aws(config)


def launch_head(config: dict, provider: AWSNodeProvider) -> str:
    """The head launch of `ray up` (commands.get_or_create_head_node): the bootstrap's head_node fields first."""
    node_type = config["head_node_type"]
    node_config = copy.deepcopy(config["head_node"])
    node_config.update(config["available_node_types"][node_type]["node_config"])
    tags = {
        TAG_RAY_NODE_KIND: NODE_KIND_HEAD,
        TAG_RAY_USER_NODE_TYPE: node_type,
        TAG_RAY_LAUNCH_CONFIG: hash_launch_conf(node_config, config["auth"]),
        TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-head",
        TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
    }
    provider.create_node(node_config, tags, 1)
    (head,) = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    return head


def launch_gpu_worker(config: dict, provider: AWSNodeProvider) -> tuple[list[str], list[str]]:
    """A worker launch exactly as the head's autoscaler makes it (its foreground node launcher): (ids, errors)."""
    pending, events = ConcurrentCounter(), EventSummarizer()
    launcher = BaseNodeLauncher(
        provider, pending, events, NodeProviderAvailabilityTracker(), node_types=config["available_node_types"]
    )
    pending.inc("gpu_worker", 1)
    created = launcher.launch_node(config, 1, "gpu_worker")
    return list(created or {}), events.summary()


def instance(instance_id: str) -> dict:
    return boto3.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def ingress(group_id: str) -> list[dict]:
    return boto3.client("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]


def open_to_the_world(rules: list[dict]) -> list[dict]:
    return [r for r in rules if any(ip["CidrIp"] == "0.0.0.0/0" for ip in r.get("IpRanges", []))]


def role_policies(role_name: str) -> list[dict]:
    """Every policy document in force for a role: attached managed policies and inline ones."""
    iam = boto3.client("iam")
    docs = []
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        policy = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)
        docs.append(policy["PolicyVersion"]["Document"])
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        docs.append(iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"])
    return docs


def allows(docs: list[dict], action: str, resource: str) -> bool:
    """moto's IAM policy evaluator: some statement allows the action on the resource and none denies it."""
    results = [IAMPolicy(json.dumps(doc)).is_action_permitted(action, resource) for doc in docs]
    return PermissionResult.PERMITTED in results and PermissionResult.DENIED not in results


def documented_iam_step() -> dict:
    """The `aws iam put-role-policy` command of cluster.yaml's header, read as a shell would after the `#`s go."""
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "aws iam put-role-policy" in line)
    block = []
    for line in lines[start:]:
        block.append(line.lstrip("#"))
        if line.rstrip().endswith("'"):
            break
    argv = shlex.split("\n".join(block))
    assert argv[:3] == ["aws", "iam", "put-role-policy"]
    options = dict(zip(argv[3::2], argv[4::2]))
    return {
        "RoleName": options["--role-name"],
        "PolicyName": options["--policy-name"],
        "PolicyDocument": options["--policy-document"],
    }


def ssm_parameter_arn(image_id: str) -> str:
    """The ARN of an AWS public SSM parameter named by `resolve:ssm:NAME` (public parameters have no account)."""
    assert image_id.startswith("resolve:ssm:/aws/service/")
    return f"arn:aws:ssm:{REGION}::parameter{image_id.removeprefix('resolve:ssm:')}"


# --- `ray up` gets through AWS as shipped ---------------------------------------------------------


def test_shipped_yaml_bootstraps_and_launches_a_head_and_a_spot_gpu_worker(aws):
    config = bootstrap(shipped(), fill_out_resources=True)
    nodes = config["available_node_types"]
    head_cfg, worker_cfg = nodes["head"]["node_config"], nodes["gpu_worker"]["node_config"]
    # The region offers the instance types, and Ray sees the worker's GPU; our own numbers win.
    assert nodes["gpu_worker"]["resources"]["accelerator_type:A10G"] == 1
    assert (nodes["gpu_worker"]["resources"]["GPU"], nodes["head"]["resources"]["CPU"]) == (1, 0)

    # Key pair: created by Ray, private key written 0600 under ~/.ssh, named on both node types.
    key_path = Path(config["auth"]["ssh_private_key"])
    assert key_path.parent == Path(os.environ["HOME"]) / ".ssh" and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert head_cfg["KeyName"] == worker_cfg["KeyName"]
    assert boto3.client("ec2").describe_key_pairs(KeyNames=[head_cfg["KeyName"]])["KeyPairs"]

    # IAM: Ray created its default role (EC2 and S3 full access) and profile for the head; the workers name it.
    profile_arn = config["head_node"]["IamInstanceProfile"]["Arn"]
    profile = boto3.client("iam").get_instance_profile(InstanceProfileName=worker_cfg["IamInstanceProfile"]["Name"])
    assert profile["InstanceProfile"]["Arn"] == profile_arn
    (role,) = profile["InstanceProfile"]["Roles"]
    attached = boto3.client("iam").list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
    assert {p["PolicyName"] for p in attached} == {"AmazonEC2FullAccess", "AmazonS3FullAccess"}

    # Subnets: public ones of a single VPC; one security group for both node types.
    subnets = boto3.client("ec2").describe_subnets(SubnetIds=head_cfg["SubnetIds"])["Subnets"]
    assert subnets and len({s["VpcId"] for s in subnets}) == 1 and all(s["MapPublicIpOnLaunch"] for s in subnets)
    assert head_cfg["SecurityGroupIds"] == worker_cfg["SecurityGroupIds"]
    (group,) = head_cfg["SecurityGroupIds"]
    # Ray's two rules and nothing else: all traffic inside the cluster, SSH from anywhere. No dashboard port is open.
    rules = ingress(group)
    assert len(rules) == 2
    assert [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort")) for r in open_to_the_world(rules)] == [
        ("tcp", 22, 22)
    ]
    (inside,) = [r for r in rules if r["UserIdGroupPairs"]]
    assert inside["IpProtocol"] == "-1" and [p["GroupId"] for p in inside["UserIdGroupPairs"]] == [group]

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head = instance(launch_head(config, provider))
    workers, errors = launch_gpu_worker(config, provider)
    assert len(workers) == 1, errors
    worker_id = workers[0]
    worker = instance(worker_id)
    for node, node_cfg in ((head, head_cfg), (worker, worker_cfg)):
        assert node["InstanceType"] == node_cfg["InstanceType"]
        assert node["IamInstanceProfile"]["Arn"] == profile_arn
        assert [g["GroupId"] for g in node["SecurityGroups"]] == [group]
        assert node["KeyName"] == head_cfg["KeyName"] and node["SubnetId"] in head_cfg["SubnetIds"]
        # Ray hands the SSM reference to EC2 as it is; AWS resolves it at launch (moto stores it unresolved).
        assert node["ImageId"] == node_cfg["ImageId"]
        assert node["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1"
    assert worker["InstanceType"] == "g5.2xlarge" and worker.get("InstanceLifecycle") == "spot"
    assert head.get("InstanceLifecycle") != "spot"

    # The autoscaler's view, then an idle worker going away: terminated, not stopped.
    assert set(provider.non_terminated_nodes({})) == {head["InstanceId"], worker_id}
    provider.terminate_node(worker_id)
    assert instance(worker_id)["State"]["Name"] == "terminated"
    assert provider.non_terminated_nodes({}) == [head["InstanceId"]]

    # A second `ray up` finds and keeps what the first created (no duplicate rule, role or key).
    clear_ray_aws_caches()
    again = bootstrap(shipped())
    assert again["available_node_types"]["head"]["node_config"]["SecurityGroupIds"] == [group]
    assert again["head_node"] == config["head_node"] and again["auth"] == config["auth"]
    assert ingress(group) == rules


# --- permissions --------------------------------------------------------------------------------


def test_the_documented_iam_step_lets_the_head_pass_the_worker_profile_and_resolve_the_ami(aws):
    config = bootstrap(shipped())
    worker_cfg = config["available_node_types"]["gpu_worker"]["node_config"]
    profile = boto3.client("iam").get_instance_profile(InstanceProfileName=worker_cfg["IamInstanceProfile"]["Name"])
    (role,) = profile["InstanceProfile"]["Roles"]
    ami_parameter = ssm_parameter_arn(worker_cfg["ImageId"])
    checkpoint = f"arn:aws:s3:::{BUCKET}/tune-alexnet/study/train_cifar_0/checkpoint_000001/model.pt"
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}

    # Ray's role alone: EC2 and S3, but neither the hand-over of a profile nor the AMI parameter. Hence the step.
    docs = role_policies(role["RoleName"])
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"):
        assert allows(docs, action, "*")
    assert allows(docs, "s3:PutObject", checkpoint) and allows(docs, "s3:GetObject", checkpoint)
    assert not allows(docs, "iam:PassRole", role["Arn"])
    assert not allows(docs, "ssm:GetParameters", ami_parameter)

    step = documented_iam_step()
    assert step["RoleName"] == role["RoleName"]
    boto3.client("iam").put_role_policy(**step)
    docs = role_policies(role["RoleName"])
    assert allows(docs, "iam:PassRole", role["Arn"])
    assert not allows(docs, "iam:PassRole", "arn:aws:iam::123456789012:role/Admin")  # its own role only
    for action in ("ssm:GetParameter", "ssm:GetParameters"):
        assert allows(docs, action, ami_parameter)
    assert not allows(docs, "ssm:GetParameter", f"arn:aws:ssm:{REGION}:123456789012:parameter/secret")
    for action in ("ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
        assert allows(docs, action, "*")


def test_with_iam_enforced_the_head_role_runs_workers_and_the_worker_role_writes_the_bucket(aws, monkeypatch):
    config = bootstrap(shipped())
    iam, sts = boto3.client("iam"), boto3.client("sts")
    iam.put_role_policy(**documented_iam_step())
    profile_name = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    (role,) = iam.get_instance_profile(InstanceProfileName=profile_name)["InstanceProfile"]["Roles"]
    boto3.client("s3").create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})

    def credentials(role_arn: str) -> dict:  # what a node with that role gets from its instance metadata
        c = sts.assume_role(RoleArn=role_arn, RoleSessionName="node")["Credentials"]
        keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        return dict(zip(keys, (c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])))

    def control_role(name: str, policy: str) -> dict:  # a role with one of the two grants only
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))["Role"]["Arn"]
        iam.attach_role_policy(RoleName=name, PolicyArn=f"arn:aws:iam::aws:policy/{policy}")
        return credentials(arn)

    node_role, ec2_only, s3_only = (
        credentials(role["Arn"]),
        control_role("ec2-only", "AmazonEC2FullAccess"),
        control_role("s3-only", "AmazonS3FullAccess"),
    )
    key = "tune-alexnet/study/train_cifar_0/checkpoint_000001/model.pt"

    with monkeypatch.context() as m:
        m.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from here on moto checks every request's IAM
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            boto3.client("s3").list_buckets()  # the fake user key is unknown now: enforcement is on
        # The head: Ray's provider and node launcher, signed with the head's role. The S3-only control may not launch.
        provider = AWSNodeProvider({**config["provider"], "aws_credentials": node_role}, config["cluster_name"])
        workers, errors = launch_gpu_worker(config, provider)
        assert len(workers) == 1, errors
        assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == workers
        provider.terminate_node(workers[0])
        assert provider.non_terminated_nodes({}) == []
        denied = AWSNodeProvider({**config["provider"], "aws_credentials": s3_only}, config["cluster_name"])
        workers, errors = launch_gpu_worker(config, denied)
        assert not workers and "not authorized to perform: ec2:RunInstances" in " ".join(errors)
        # A worker (same role) writes and reads its checkpoint. The EC2-only control may not.
        s3 = boto3.client("s3", **node_role)
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"weights")
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"weights"
        with pytest.raises(ClientError, match="AccessDenied"):
            boto3.client("s3", **ec2_only).put_object(Bucket=BUCKET, Key=key, Body=b"weights")


def test_an_own_security_group_really_narrows_ssh(aws):
    ec2 = boto3.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="tune-alexnet-ssh", Description="tune-alexnet", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]},
        ],
    )
    rules = ingress(group)
    # What the user does: uncomment SecurityGroupIds in both node types, with their group's id.
    text = (ROOT / "cluster.yaml").read_text()
    commented = re.compile(r"# SecurityGroupIds: \[sg-[0-9a-f]+\]")
    assert len(commented.findall(text)) == 2
    config = bootstrap(yaml.safe_load(commented.sub(f"SecurityGroupIds: [{group}]", text)))

    for node in config["available_node_types"].values():
        assert node["node_config"]["SecurityGroupIds"] == [group]
    assert ingress(group) == rules  # Ray added nothing: no SSH from 0.0.0.0/0
    assert not open_to_the_world(rules)
    assert [
        g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
    ] == ["tune-alexnet-ssh"]  # and created no group of its own
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    workers, errors = launch_gpu_worker(config, provider)
    assert len(workers) == 1, errors
    for node_id in (launch_head(config, provider), *workers):
        assert [g["GroupId"] for g in instance(node_id)["SecurityGroups"]] == [group]


def test_a_cidr_under_provider_security_group_cannot_narrow_rays_own_group(aws):
    # Why cluster.yaml says so: Ray adds SSH from 0.0.0.0/0 first and the yaml's rules on top.
    config = shipped()
    ssh_from_me = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}
    config["provider"]["security_group"] = {"GroupName": "narrowed", "IpPermissions": [ssh_from_me]}
    (group,) = bootstrap(config)["available_node_types"]["head"]["node_config"]["SecurityGroupIds"]
    (ssh,) = [r for r in ingress(group) if r.get("FromPort") == 22]
    assert {ip["CidrIp"] for ip in ssh["IpRanges"]} == {"0.0.0.0/0", "203.0.113.7/32"}


# --- only the project travels ----------------------------------------------------------------------

FAKE_SSH = r"""#!/bin/sh
# Stands in for ssh: skips the options and user@host, then runs the remote command (rsync's server) here.
while [ $# -gt 0 ]; do
  case "$1" in
    -i|-o|-l|-p|-L|-F) shift 2 ;;
    -*) shift ;;
    *) shift; break ;;
  esac
done
exec sh -c "$*"
"""

TRAVELS = [
    "pyproject.toml",
    "README.md",
    "cluster.yaml",
    "Dockerfile",
    ".gitignore",
    "tune_alexnet/__init__.py",
    "tune_alexnet/data.py",
    "tune_alexnet/reference/results_sgd.csv",
    "tests/test_model.py",
    "bench/device.sh",
    "bench/.gitignore",
    "docs/heatmaps.png",
]
STAYS = [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/HEAD",
    ".git/objects/ab/cdef",
    "ray_results/.gitkeep",
    "ray_results/study/train_cifar_0/checkpoint_000001/model.pt",
    "tune_alexnet/__pycache__/data.cpython-311.pyc",
    "tests/__pycache__/test_model.cpython-311-pytest-8.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".tune-alexnet-cache/cifar10.npz",
    "data/cifar10/train/cat/0001.png",
    "device-data/cifar10/test/dog/0001.png",
    "best.pt",
    "bench/out/model.pt",
    "bench/scratch/notes.txt",  # ignored by bench/.gitignore: the checkout's .gitignore files apply too
]


# Ray's file_mounts copy with the system's rsync, which pip cannot install. Without it this test says so and
# skips; CI (.ci/run) installs rsync and sets TUNE_ALEXNET_NEEDS_RSYNC=1, so there a missing rsync fails instead.
RSYNC_MISSING = "rsync is not installed: Ray's file_mounts copy the project with it (apt-get install -y rsync)"


@pytest.mark.skipif(
    shutil.which("rsync") is None and not os.environ.get("TUNE_ALEXNET_NEEDS_RSYNC"), reason=RSYNC_MISSING
)
def test_file_mounts_copy_only_the_project(aws, tmp_path, monkeypatch):
    assert shutil.which("rsync"), RSYNC_MISSING
    checkout, node = tmp_path / "checkout", tmp_path / "node"
    for rel in TRAVELS + STAYS:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(rel)
    (checkout / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    (checkout / "bench/.gitignore").write_text("scratch/\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    config = bootstrap(shipped())
    assert config["file_mounts"] == {"/home/ray/tune-alexnet": "."}
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head = launch_head(config, provider)
    # Ray's own runner for that node, as the updater builds it; the Docker runner hands the host copy to it too.
    runner = provider.get_command_runner(
        "test", head, config["auth"], config["cluster_name"], subprocess, use_internal_ip=False, docker_config=None
    )
    # The options NodeUpdater.rsync_up passes (from the config); the source with "/" as sync_file_mounts adds it.
    options = {k: config[k] for k in ("rsync_exclude", "rsync_filter")} | {"docker_mount_if_possible": True}
    runner.run_rsync_up(f"{checkout}/", f"{node}/", options=options)

    arrived = sorted(str(p.relative_to(node)) for p in node.rglob("*") if p.is_file())
    assert arrived == sorted(TRAVELS)
    assert (node / "tune_alexnet/data.py").read_text() == "tune_alexnet/data.py"


# --- the image and the pins -------------------------------------------------------------------------------

USER_IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/tune-alexnet:0.1.0"


TORCH, VISION = PINS["torch"], PINS["torchvision"]


@pytest.mark.parametrize(
    "installed, installs_torch",
    [
        ({"torch": TORCH, "torchvision": VISION}, False),  # the project's image
        ({"torch": f"{TORCH}+cu126", "torchvision": f"{VISION}+cu126"}, False),  # the same from PyTorch's own index
        ({"torch": "2.0.0", "torchvision": VISION}, True),
        ({}, True),  # rayproject/ray: no torch
    ],
)
def test_setup_commands_install_torch_only_when_the_image_lacks_the_pinned_one(tmp_path, installed, installs_torch):
    site, bin_dir, log = tmp_path / "site", tmp_path / "bin", tmp_path / "pip.log"
    for name, version in installed.items():
        (site / f"{name}-{version}.dist-info").mkdir(parents=True)
        (site / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
    bin_dir.mkdir()
    # python sees only `site` (-S: no site-packages); pip only records what it was asked.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bin_dir / "pip").write_text('#!/bin/sh\necho "$*" >> "$PIP_LOG"\n')
    for tool in ("python", "pip"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(site), "PIP_LOG": str(log), "HOME": str(tmp_path)}

    for command in shipped()["setup_commands"]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[-1] == "install -q -e /home/ray/tune-alexnet"
    assert calls[:-1] == ([f"install -q torch=={TORCH} torchvision=={VISION}"] if installs_torch else [])


@pytest.mark.parametrize(
    "docker", [{"image": USER_IMAGE}, {"head_image": USER_IMAGE, "worker_image": USER_IMAGE}], ids=["image", "per-node"]
)
def test_yaml_with_the_users_image_passes_rays_validation(docker):
    config = shipped()
    if "head_image" in docker:
        del config["docker"]["image"]
    config["docker"].update(docker)
    prepared = prepare_config(config)
    validate_config(prepared)
    assert {prepared["docker"].get(k) for k in ("image", "head_image", "worker_image")} - {None} == {USER_IMAGE}


def test_cluster_yaml_passes_rays_own_validation():
    config = shipped()
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert config["idle_timeout_minutes"] > 0
    for node in config["available_node_types"].values():
        assert node["node_config"]["ImageId"]  # never Ray's stale default AMI
    # No rules of our own on Ray's group: they would come on top of its SSH-from-anywhere (a repeat is refused).
    assert "IpPermissions" not in config["provider"].get("security_group", {})


def test_ray_version_has_one_source_of_truth():
    image = f"rayproject/ray:{PINS['ray']}-py311-gpu"
    cluster_text, dockerfile = (ROOT / "cluster.yaml").read_text(), (ROOT / "Dockerfile").read_text()
    assert yaml.safe_load(cluster_text)["docker"]["image"] == image
    assert re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1) == image
    for pkg in ("torch", "torchvision"):
        assert re.findall(rf"\b{pkg}==([\d.]+)", dockerfile) == [PINS[pkg]]
        assert re.findall(rf"\b{pkg}==([\d.]+)", cluster_text) == [PINS[pkg]]
    # The skip-if-present check in setup_commands compares against the same pins.
    assert f'!= ["{TORCH}", "{VISION}"]' in " ".join(shipped()["setup_commands"])


def test_without_rsync_the_file_mounts_test_says_what_is_missing_and_skips(tmp_path):
    """A fresh machine without rsync runs the README's test command: that one test skips, naming what is missing."""
    bin_dir = tmp_path / "bin"  # a PATH with the tools pytest needs but no rsync
    bin_dir.mkdir()
    for tool in ("git", "sh"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "TUNE_ALEXNET_NEEDS_RSYNC"} | {"PATH": str(bin_dir)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          f"{__file__}::test_file_mounts_copy_only_the_project"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert RSYNC_MISSING in out.stdout
