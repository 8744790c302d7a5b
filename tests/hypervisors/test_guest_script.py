"""The user-data script: hostile request values run exactly the intended commands."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from hypervisors.guest import build_user_data, find_exit_code, result_line
from tests.support.fakes.guest_sandbox import sandbox_user_data

HOSTILE = [
    "it's",
    '"; touch /tmp/pwned-dq; "',
    "$(touch pwned-subst)",
    "`touch pwned-backtick`",
    "line1\nline2\n; touch pwned-newline",
    "\\'; touch pwned-escape; echo '",
    "ORCH_EOF_deadbeef",
    "*",
]


def run_sandboxed(script: bytes, sandbox: Path) -> subprocess.CompletedProcess[str]:
    """Run the user-data with its console, workdir and poweroff pointed into `sandbox`."""
    text = sandbox_user_data(
        script,
        console=sandbox / "console",
        workdir=sandbox / "work",
        poweroff=f"touch {shlex.quote(str(sandbox))}/powered-off",
    )
    (sandbox / "console").touch()
    path = sandbox / "user-data"
    path.write_text(text)
    return subprocess.run(["sh", str(path)], cwd=sandbox, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_env_values_and_script_run_exactly_as_written(tmp_path, hostile):
    script = 'printf "%s|" "$VALUE"\nprintf "%s" \'' + hostile.replace("'", "'\\''") + "'\nexit 7\n"
    user_data = build_user_data(
        job_id="j",
        nonce="abc123",
        env={"VALUE": hostile},
        repo_url=None,
        commit_sha=None,
        checkout=False,
        script=script,
        script_path=None,
    )
    assert subprocess.run(["sh", "-n"], input=user_data, capture_output=True).returncode == 0
    run_sandboxed(user_data, tmp_path)
    console = (tmp_path / "console").read_text()
    assert f"{hostile}|{hostile}" in console
    assert find_exit_code(console, "abc123") == 7
    assert (tmp_path / "powered-off").exists()
    assert not any(p.name.startswith("pwned") for p in tmp_path.rglob("*"))
    assert not Path("/tmp/pwned-dq").exists()


def test_script_containing_heredoc_delimiter_like_lines_is_kept_intact(tmp_path):
    script = "cat <<'EOF'\nORCH_EOF_0000000000000000\nEOF\necho done\n"
    user_data = build_user_data(
        job_id="j", nonce="ff", env={}, repo_url=None, commit_sha=None, checkout=False, script=script, script_path=None
    )
    run_sandboxed(user_data, tmp_path)
    console = (tmp_path / "console").read_text()
    assert "ORCH_EOF_0000000000000000\ndone" in console and find_exit_code(console, "ff") == 0


def test_checkout_uses_quoted_repo_and_commit(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "hello.sh").write_text("echo from-repo\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "x"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "config", "uploadpack.allowReachableSHA1InWant", "true"], check=True)
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    sandbox = tmp_path / "vm"
    sandbox.mkdir()
    user_data = build_user_data(
        job_id="j",
        nonce="aa",
        env={},
        repo_url=f"file://{repo}",
        commit_sha=sha,
        checkout=True,
        script=None,
        script_path="hello.sh",
    )
    run_sandboxed(user_data, sandbox)
    console = (sandbox / "console").read_text()
    assert "from-repo" in console and find_exit_code(console, "aa") == 0


def test_result_line_needs_the_nonce():
    text = "\n".join([result_line("0000", 0), "noise", result_line("abcd", 5)])
    assert find_exit_code(text, "abcd") == 5
    assert find_exit_code(text, "ffff") is None


def test_a_sandbox_whose_hook_is_missing_or_repeated_is_refused():
    user_data = build_user_data(
        job_id="j", nonce="ff", env={}, repo_url=None, commit_sha=None, checkout=False, script="true", script_path=None
    )
    where = {"console": Path("/nonexistent/console"), "workdir": Path("/nonexistent/work"), "poweroff": "true"}
    assert "orch_poweroff=true" in sandbox_user_data(user_data, **where)
    without = user_data.replace(b"\norch_poweroff=", b"\n: orch_poweroff=")
    with pytest.raises(ValueError, match="assigns orch_poweroff on 0 lines"):
        sandbox_user_data(without, **where)
    with pytest.raises(ValueError, match="assigns orch_workdir on 2 lines"):
        sandbox_user_data(user_data + b"orch_workdir=/elsewhere\n", **where)
