#!/usr/bin/env bash
# Installs everything (idempotent), runs scripts/lint.sh, then the whole test suite
# against the real RabbitMQ and libvirt/QEMU on this machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/bootstrap-host.sh"
cd "$here"
# Layers, lint, format and types first: a broken contract fails before the suite runs.
bash "$here/scripts/lint.sh"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
