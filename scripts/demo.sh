#!/usr/bin/env bash
# The demo on a fresh machine: installs what it needs (Debian packages, a virtualenv), then
# runs a real registry, a supernode and four p2pd daemons on loopback and pulls a generated
# image through each with containerd. Extra arguments go to `p2p-bench demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
bash scripts/install.sh
exec .venv/bin/p2p-bench demo "$@"
