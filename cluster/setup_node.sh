#!/usr/bin/env bash
# Build (or fetch) the node's Python environment: uv-managed Python 3.11 in ~/dermray-env with
# this checkout's dermray[gpu,aws] (ray==2.60.0, as pinned in pyproject.toml). The AMI's own
# Python (3.10 on the Ubuntu 22.04 DLAMIs) is never used. Run by the cluster yamls'
# setup_commands from the mounted checkout; idempotent: a node whose env matches does nothing.
#
#   DERMRAY_ENV_CACHE=s3://bucket/prefix bash ~/dermray/cluster/setup_node.sh
#
# With DERMRAY_ENV_CACHE set, the built env is a tarball on S3 named by a key (a hash of
# pyproject.toml, this script, with its uv and Python versions, the OS and the machine): a node
# unpacks it if present (one download instead of ~3.4 GB of wheels), else builds and uploads it.
set -euo pipefail

UV_VERSION=0.13.9
PYTHON_VERSION=3.11
CHECKOUT="$HOME/dermray"
ENV_DIR="$HOME/dermray-env"
export UV_PYTHON_INSTALL_DIR="$HOME/.local/share/uv/python"  # packed with the env
export UV_PYTHON_PREFERENCE=only-managed                     # never the AMI's Python
export PATH="$HOME/.local/bin:$PATH"

log() { echo "setup_node: $*" >&2; }

# A GPU node without a working driver gets NVIDIA's proprietary one when the yaml names its
# branch (p3.yaml: DERMRAY_NVIDIA_DRIVER=580-server, the last branch for Volta), through
# Canonical's documented `ubuntu-drivers install --gpgpu nvidia:<branch>`; it loads without a
# reboot on a fresh instance. A GPU still without a driver fails here, not in an actor.
if [ -n "${DERMRAY_NVIDIA_DRIVER:-}" ] && lspci 2>/dev/null | grep -qi nvidia \
    && ! nvidia-smi > /dev/null 2>&1; then
  log "installing the NVIDIA $DERMRAY_NVIDIA_DRIVER driver (proprietary kernel module)"
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ubuntu-drivers-common
  sudo ubuntu-drivers install --gpgpu "nvidia:$DERMRAY_NVIDIA_DRIVER"
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "nvidia-utils-$DERMRAY_NVIDIA_DRIVER"
  sudo modprobe nvidia || true
fi
if lspci 2>/dev/null | grep -qi nvidia && ! nvidia-smi > /dev/null 2>&1; then
  log "an NVIDIA GPU is present but nvidia-smi fails: the AMI's driver does not drive it" \
      "(a V100 needs NVIDIA's proprietary kernel module, R580 branch or older; see docs/cluster.md)"
  exit 1
fi

if ! command -v uv > /dev/null || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | env UV_NO_MODIFY_PATH=1 sh
fi

key="$( (cat "$CHECKOUT/pyproject.toml" "$0"; uname -m; . /etc/os-release; echo "$ID $VERSION_ID";
         echo "$HOME") | sha256sum | cut -c1-16)"
if [ "$(cat "$ENV_DIR/.dermray-env-key" 2>/dev/null)" = "$key" ]; then
  log "$ENV_DIR is up to date ($key)"
  exit 0
fi

# S3 through the AWS CLI (on the DLAMIs); where it is missing, uv runs it without installing.
s3() { if command -v aws > /dev/null; then aws s3 "$@"; else uv tool run --from awscli aws s3 "$@"; fi; }
tarball="${DERMRAY_ENV_CACHE%/}/dermray-env-$key.tar.gz"
ray_pin="$(grep -o 'ray\[[^]]*\]==[0-9.]*' "$CHECKOUT/pyproject.toml" | cut -d= -f3)"
check() { "$ENV_DIR/bin/python" -c "import ray; assert ray.__version__ == '$ray_pin', ray.__version__"; }

unpack() {
  [ -n "${DERMRAY_ENV_CACHE:-}" ] && s3 ls "$tarball" > /dev/null 2>&1 || return 1
  log "unpacking $tarball"
  s3 cp --only-show-errors "$tarball" - | tar -xzf - -C "$HOME" \
    && [ "$(cat "$ENV_DIR/.dermray-env-key")" = "$key" ] && check
}

build() {
  log "building $ENV_DIR (Python $PYTHON_VERSION, dermray[gpu,aws])"
  rm -rf "$ENV_DIR"
  uv python install "$PYTHON_VERSION"
  uv venv --python "$PYTHON_VERSION" "$ENV_DIR"
  uv pip install --python "$ENV_DIR/bin/python" -e "$CHECKOUT[gpu,aws]"
  check
  echo "$key" > "$ENV_DIR/.dermray-env-key"  # last: a failed build is never taken as done
  if [ -n "${DERMRAY_ENV_CACHE:-}" ]; then
    log "uploading $tarball"
    tar -czf - -C "$HOME" dermray-env .local/share/uv/python \
      | s3 cp --only-show-errors - "$tarball" || log "upload failed; this node goes on without it"
  fi
}

rm -rf "$ENV_DIR"
unpack || build

# Interactive shells (`ray attach`, `ray exec`) get the env first on PATH too.
line='export PATH="$HOME/dermray-env/bin:$PATH"'
grep -qxF "$line" "$HOME/.bashrc" 2>/dev/null || echo "$line" >> "$HOME/.bashrc"
