#!/usr/bin/env bash
# Runs one real CI job end to end: installs and starts RabbitMQ and libvirtd when
# missing, builds the tiny test image once, starts the daemon, enqueues a job, prints
# its log and result, stops the daemon.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/bootstrap-host.sh"
exec "$here/.venv/bin/python" "$here/examples/demo.py"
