#!/usr/bin/env bash
# Installs the benchmark's peers (ZooKeeper, Redis) and its Python clients.
# The benchmark starts and stops its own servers on loopback; the system services are not used.
# Run from the repository root, as root (or with sudo), inside the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# Install without starting the packages' system services (RUNLEVEL=1 makes invoke-rc.d skip).
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq zookeeper redis-server
python -m pip install -q -e '.[bench]'
