"""The layers contract (docs/layout.md) holds on the tree, and import-linter catches an
upward import: a copy of the tree where the shared core imports the host daemon, the
host daemon imports the bridge, or a backend imports the orchestrator, is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # The tree's packages come first on the path, before the editable install's.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )


def copy_of_the_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("orchestrator", "hypervisors"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("orchestrator/core/messages.py", "import orchestrator.host.daemon", "Parts are layered"),
        ("orchestrator/web/sessions.py", "import orchestrator.host.journal", "Parts are layered"),
        (
            "orchestrator/host/outbox.py",
            "import orchestrator.forge.journal",
            "The bridge and the host daemon are independent",
        ),
        ("hypervisors/noop.py", "import orchestrator.core.messages", "hypervisors/ imports nothing from orchestrator/"),
    ],
    ids=["core-imports-host", "web-imports-host", "host-imports-bridge", "backend-imports-orchestrator"],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward, contract):
    tree = copy_of_the_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{upward}  # an upward import, on purpose\n")
    run = lint_imports(tree)
    assert run.returncode != 0
    assert f"{contract}" in run.stdout and "BROKEN" in run.stdout, run.stdout[-3000:]
