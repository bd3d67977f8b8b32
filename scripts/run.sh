#!/usr/bin/env bash
# The main job of tcmu-py on this machine:
#
#   bash scripts/run.sh
#
# Sets the machine up (scripts/bootstrap.sh), then boots Debian's kernel under QEMU (the VM lab,
# tcmu_py.lab) with LIO and TCMU loaded and reports what it found.
# (The daemon demo and benchmarks are added here as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m tcmu_py.lab "$@"
