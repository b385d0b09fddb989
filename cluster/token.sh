#!/usr/bin/env bash
# Fetch the Ray job-API token from the cluster's head (through SSH, like the dashboard tunnel)
# into ~/.ray/auth_token on this machine, so that `RAY_AUTH_MODE=token ray job submit` works.
#   cluster/token.sh [cluster/p3.yaml]
set -euo pipefail
config="${1:-cluster/p3.yaml}"
mkdir -p ~/.ray
token="$(ray exec "$config" 'cat ~/.ray/auth_token' 2>/dev/null | tail -n 1 | tr -d '\r')"
if [ -z "$token" ]; then
  echo "no token on the head: was it started with RAY_AUTH_MODE=token (cluster/p3.yaml does)?" >&2
  exit 1
fi
umask 077
printf '%s' "$token" > ~/.ray/auth_token
echo "wrote ~/.ray/auth_token; now: export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265"
