"""CLI and settings: one clear line and exit code 2 for every mistake."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import SettingsError, load_settings, parse_capacity_map
from orchestrator.daemon import StartupError


def test_capacity_map_parses_and_bad_entries_name_the_setting():
    assert parse_capacity_map("illumos-latest=2, ubuntu-22.04=4") == {"illumos-latest": 2, "ubuntu-22.04": 4}
    with pytest.raises(SettingsError, match=r"--capacity-map / CAPACITY_MAP: entry 'x' is not label=N"):
        load_settings({}, {"CAPACITY_MAP": "x"})


def test_flags_override_environment_and_bad_values_name_flag_and_variable():
    assert load_settings({"max_concurrency": 5}, {"MAX_CONCURRENCY": "3"}).max_concurrency == 5
    assert load_settings({}, {"MAX_CONCURRENCY": "3"}).max_concurrency == 3
    with pytest.raises(SettingsError, match=r"^--max-concurrency / MAX_CONCURRENCY: .*greater than or equal to 1"):
        load_settings({}, {"MAX_CONCURRENCY": "0"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["enqueue", "--repo", "https://x/y", "--commit", "abc"], "--commit: String should match pattern"),
        (["enqueue", "--repo", "-x", "--commit", "a" * 40], "--repo:"),
        (["enqueue", "--repo", "https://x/y", "--commit", "a" * 40, "--env", "NOEQUALS"], "--env 'NOEQUALS': expected NAME=VALUE"),
        (["enqueue", "--repo", "https://x/y", "--commit", "a" * 40, "--runs-on", "nope"], "runs_on: unknown label 'nope'"),
        (["run", "--max-concurrency", "0"], "--max-concurrency / MAX_CONCURRENCY"),
        (["run", "--config", "/no/such.yaml"], "/no/such.yaml: cannot read the image map"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_run_that_cannot_start_says_why_in_one_line_and_exits_1(capsys, monkeypatch, noop_map_path, tmp_path):
    async def cannot_start(settings, image_map):
        raise StartupError("libvirt: cannot connect to qemu:///system (start libvirtd)")

    monkeypatch.setattr("orchestrator.daemon.run_daemon", cannot_start)
    monkeypatch.setattr("orchestrator.logsetup.configure_logging", lambda **_: None)
    assert main(["run", "--config", str(noop_map_path), "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: libvirt: cannot connect to qemu:///system (start libvirtd)\n"


def test_config_check_prints_resolved_labels_and_masks_secrets(capsys, monkeypatch):
    monkeypatch.setenv("AMQP_URL", "amqp://user:s3cret@broker:5672/")
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert "default label: illumos-latest -> openindiana-hipster" in out
    assert "size medium: 2 CPU, 2048 MiB" in out
    assert "s3cret" not in out and "amqp://user:****@broker:5672/" in out


def test_help_is_available_for_every_command(capsys):
    for argv in (["--help"], ["run", "--help"], ["enqueue", "--help"], ["config", "check", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "--wait" in capsys.readouterr().out
