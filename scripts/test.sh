#!/usr/bin/env bash
# Installs everything (idempotent) and runs the whole test suite against the real
# RabbitMQ and libvirt/QEMU on this machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/bootstrap-host.sh"
cd "$here"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
