#!/usr/bin/env bash
# The l2t cluster's security group, made once before `ray up`: all traffic
# between the cluster's own nodes, and SSH from one network you name, nothing
# else. Ray's cluster launcher, left to make a group itself, always adds SSH
# from 0.0.0.0/0 (whatever provider.security_group.IpPermissions says), so
# infra/aws/cluster.yaml names this group in every node_config instead
# (SecurityGroupIds: [L2T_SECURITY_GROUP_ID]).
#
#   infra/aws/security-group.sh VPC_ID SSH_CIDR      # SSH_CIDR: your network, e.g. 203.0.113.7/32
#   -> prints the group id: put it in place of L2T_SECURITY_GROUP_ID
set -euo pipefail

usage="usage: $0 VPC_ID SSH_CIDR (SSH_CIDR: the network SSH may come from, e.g. 203.0.113.7/32)"
vpc=${1:?$usage}
ssh_cidr=${2:?$usage}
case "$ssh_cidr" in
  0.0.0.0/0 | ::/0 | SSH_CIDR)
    echo "refusing SSH_CIDR=$ssh_cidr: name your own network (e.g. \$(curl -s https://checkip.amazonaws.com)/32)" >&2
    exit 2 ;;
esac
if ! [[ "$ssh_cidr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]]; then
  echo "SSH_CIDR=$ssh_cidr is not an IPv4 CIDR such as 203.0.113.7/32" >&2
  exit 2
fi
region=${AWS_REGION:-us-west-2}

group=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" --group-name l2t-ray \
  --description "l2t Ray cluster: node to node, SSH from one network" --query GroupId --output text)
# Node to node: GCS, object manager, Ray workers, NCCL.
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$group" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$group}]" > /dev/null
# SSH (ray up, ray attach, ray dashboard's tunnel) from SSH_CIDR only.
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$group" \
  --protocol tcp --port 22 --cidr "$ssh_cidr" > /dev/null
echo "$group"
