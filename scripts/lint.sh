#!/usr/bin/env bash
# The checks that keep the code's shape (docs/layout.md), run before the tests:
#   import-linter  the parts' layers, the bridge independent of the host daemon, no circles
#   ruff           lint and format ([tool.ruff] in pyproject.toml)
#   mypy           types of orchestrator/ and hypervisors/ ([tool.mypy])
# Needs the venv scripts/bootstrap-host.sh makes. Exits non-zero on the first failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bin="$here/.venv/bin"
echo "lint: import-linter"
"$bin/lint-imports" --no-cache
echo "lint: ruff check"
"$bin/ruff" check --no-cache .
echo "lint: ruff format --check"
"$bin/ruff" format --check --no-cache .
echo "lint: mypy"
"$bin/mypy" orchestrator hypervisors
echo "lint: ok"
