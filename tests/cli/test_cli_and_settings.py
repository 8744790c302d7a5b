"""CLI and settings: one clear line and exit code 2 for every mistake."""

from __future__ import annotations

import io
import re
import sys

import pytest

from orchestrator.cli import main
from orchestrator.cli.request import ENV_NAME_RULE
from orchestrator.core.config import SettingsError, load_settings, parse_capacity_map
from orchestrator.core.lifecycle import StartupError
from orchestrator.core.messages import ENV_NAME_PATTERN, MAX_ENV_ENTRIES, MAX_ENV_VALUE_BYTES, MAX_SCRIPT_BYTES

ENQUEUE = ["enqueue", "--repo", "https://x/y", "--commit", "a" * 40]


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
        (
            ["enqueue", "--repo", "https://x/y", "--commit", "a" * 40, "--env", "NOEQUALS"],
            "--env 'NOEQUALS': expected NAME=VALUE",
        ),
        (
            ["enqueue", "--repo", "https://x/y", "--commit", "a" * 40, "--runs-on", "nope"],
            "runs_on: unknown label 'nope'",
        ),
        (["run", "--max-concurrency", "0"], "--max-concurrency / MAX_CONCURRENCY"),
        (["run", "--config", "/no/such.yaml"], "/no/such.yaml: cannot read the image map"),
        (["frobnicate"], "invalid choice"),
        (["hosts", "--answer-timeout", "nan"], "argument --answer-timeout: 'nan': give a number of seconds above 0"),
        (["jobs", "--answer-timeout", "-1"], "argument --answer-timeout: '-1': give a number of seconds above 0"),
        (["drain", "--wait", "--wait-timeout", "soon"], "argument --wait-timeout: 'soon' is not a number of seconds"),
        (
            ["enqueue", "--repo", "https://x/y", "--commit", "a" * 40, "--wait-timeout", "inf"],
            "argument --wait-timeout: 'inf'",
        ),
        (["cancel", "job-1"], "argument job_id: 'job-1' is not a UUID (a job's request_id)"),
        (
            ["logs", "--answer-timeout", "0", "0" * 32],
            "argument --answer-timeout: '0': give a number of seconds above 0",
        ),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (["BAD-NAME=x"], f"--env 'BAD-NAME=x': BAD-NAME is not a valid variable name ({ENV_NAME_RULE})"),
        (["1ABC=x"], f"--env '1ABC=x': 1ABC is not a valid variable name ({ENV_NAME_RULE})"),
        (["=x"], f"--env '=x': '' is not a valid variable name ({ENV_NAME_RULE})"),
        ([f"{'N' * 129}=x"], f"is not a valid variable name ({ENV_NAME_RULE})"),
        (["NUL=a\x00b"], "--env 'NUL=a\\x00b': the value contains a NUL byte"),
        (
            [f"BIG={'v' * (MAX_ENV_VALUE_BYTES + 1)}"],
            f"...: the value is {MAX_ENV_VALUE_BYTES + 1} bytes, more than the {MAX_ENV_VALUE_BYTES} bytes allowed",
        ),
        (
            [f"V{i}=x" for i in range(MAX_ENV_ENTRIES + 1)],
            f"--env 'V{MAX_ENV_ENTRIES}=x': more than {MAX_ENV_ENTRIES} variables, the most a job may have",
        ),
    ],
)
def test_bad_env_entries_name_the_entry_and_the_rule(capsys, env, message):
    argv = ENQUEUE + [arg for entry in env for arg in ("--env", entry)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("--env ") and message in line
    assert len(line) < 300  # a 32 KiB value is cut short, not echoed


def test_env_name_rule_says_what_the_pattern_accepts():
    assert "at most 128 characters" in ENV_NAME_RULE
    assert re.fullmatch(ENV_NAME_PATTERN, "A" * 128) and not re.fullmatch(ENV_NAME_PATTERN, "A" * 129)
    assert re.fullmatch(ENV_NAME_PATTERN, "_a1") and not re.fullmatch(ENV_NAME_PATTERN, "1a")
    assert not re.fullmatch(ENV_NAME_PATTERN, "A-B")


def test_as_many_env_entries_as_allowed_and_repeated_names_pass(capsys):
    # Repeating a name replaces its value, as in a shell: it is not one entry more.
    entries = [f"V{i}=x" for i in range(MAX_ENV_ENTRIES)] + ["V0=y"]
    argv = ENQUEUE + [arg for entry in entries for arg in ("--env", entry)] + ["--amqp-url", "amqp://127.0.0.1:1/"]
    assert main(argv) == 2
    assert one_error_line(capsys).startswith("cannot connect to the broker")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout", "0"], "--timeout: Input should be greater than or equal to 1"),
        (["--size", "two words"], "--size: String should match pattern"),
        (["--runs-on", "no/slash"], "--runs-on: String should match pattern"),
        (["--request-id", "job-1"], "--request-id: Input should be a valid UUID"),
        (["--script", "a\x00b"], "--script: must not contain NUL bytes"),
        (["--script-path", "a\nb"], "--script-path: must not contain control characters"),
    ],
)
def test_request_errors_name_the_flag_the_user_typed(capsys, flags, message):
    assert main(ENQUEUE + flags) == 2
    assert one_error_line(capsys).startswith(message)


def test_script_file_errors_name_the_file(capsys, tmp_path):
    missing = tmp_path / "missing.sh"
    assert main(ENQUEUE + ["--script-file", str(missing)]) == 2
    assert one_error_line(capsys) == f"--script-file {str(missing)!r}: cannot read it: No such file or directory"

    latin1 = tmp_path / "latin1.sh"
    latin1.write_bytes("echo café\n".encode("latin-1"))
    assert main(ENQUEUE + ["--script-file", str(latin1)]) == 2
    assert one_error_line(capsys) == f"--script-file {str(latin1)!r}: not UTF-8 text (byte 0xe9 at offset 8)"

    oversize = tmp_path / "oversize.sh"
    oversize.write_bytes(b"#" * (MAX_SCRIPT_BYTES + 1))
    assert main(ENQUEUE + ["--script-file", str(oversize)]) == 2
    assert (
        one_error_line(capsys)
        == f"--script-file {str(oversize)!r}: larger than {MAX_SCRIPT_BYTES} bytes, the most a job script may be"
    )

    with_nul = tmp_path / "nul.sh"
    with_nul.write_bytes(b"echo a\x00b\n")
    assert main(ENQUEUE + ["--script-file", str(with_nul)]) == 2
    assert one_error_line(capsys) == f"--script-file {str(with_nul)!r}: must not contain NUL bytes"


def test_oversize_script_on_stdin_is_refused_after_reading_one_byte_over_the_limit(capsys, monkeypatch):
    stdin = io.BytesIO(b"#" * (2 * MAX_SCRIPT_BYTES))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
    assert main(ENQUEUE + ["--script-file", "-"]) == 2
    assert (
        one_error_line(capsys)
        == f"--script-file '-': larger than {MAX_SCRIPT_BYTES} bytes, the most a job script may be"
    )
    assert stdin.tell() == MAX_SCRIPT_BYTES + 1


def test_script_file_excludes_the_other_script_flags(capsys, tmp_path):
    assert main(ENQUEUE + ["--script", "true", "--script-file", str(tmp_path / "s.sh")]) == 2
    assert "argument --script-file: not allowed with argument --script" in one_error_line(capsys)


def test_run_that_cannot_start_says_why_in_one_line_and_exits_1(capsys, monkeypatch, noop_map_path, tmp_path):
    async def cannot_start(settings, image_map):
        raise StartupError("libvirt: cannot connect to qemu:///system (start libvirtd)")

    monkeypatch.setattr("orchestrator.host.daemon.run_daemon", cannot_start)
    monkeypatch.setattr("orchestrator.core.logsetup.configure_logging", lambda **_: None)
    assert main(["run", "--config", str(noop_map_path), "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: libvirt: cannot connect to qemu:///system (start libvirtd)\n"


def test_config_check_prints_resolved_labels_and_masks_secrets(capsys, monkeypatch):
    monkeypatch.setenv("AMQP_URL", "amqp://user:s3cret@broker:5672/")
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert "default label: illumos-latest -> openindiana-hipster" in out
    assert "size medium: 2 CPU, 2048 MiB" in out
    assert "s3cret" not in out and "amqp://user:****@broker:5672/" in out


FLEET_MAP = """\
default_label: ubuntu
aliases:
  ubuntu-latest: ubuntu
sizes:
  small: {cpus: 1, memory_mb: 1024}
images:
  direct:
    local_path: direct.raw
    kernel: vmlinuz
    initrd: initrd.img
    cmdline: console=ttyS0 root=/dev/vda
    cpus: 2
    memory_mb: 2048
    timeout_s: 600
    boot_timeout_s: 45
  ubuntu:
    source: https://images.example/ubuntu.qcow2
    local_path: ubuntu.qcow2
    size: small
    disk_gb: 20
    max_cpus: 8
    max_memory_mb: 16384
    max_disk_gb: 100
    max_timeout_s: 1800
    warm: {ready: 2, max_age_s: 900, snapshot: true}
  fresh:
    source: https://images.example/fresh.qcow2
    local_path: fresh.qcow2
  sim:
    backend: noop
    local_path: /nonexistent/sim.img
"""


def label_lines(out: str, label: str) -> dict[str, str]:
    """`config check`'s `  name: value` lines under `label <label>`."""
    block = out.split(f"\nlabel {label}\n", 1)[1]
    lines = {}
    for line in block.splitlines():
        if not line.startswith("  "):
            break
        name, _, value = line.strip().partition(": ")
        lines[name] = value.strip()
    return lines


def test_config_check_shows_what_each_label_resolves_to(capsys, monkeypatch, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("direct.raw", "vmlinuz", "initrd.img", "ubuntu.qcow2"):
        (images / name).write_bytes(b"x" * 1024)
    config = images / "map.yaml"
    config.write_text(FLEET_MAP)
    monkeypatch.setenv("IMAGE_DIR", str(images))
    monkeypatch.setenv("DEFAULT_TIMEOUT_S", "7200")
    monkeypatch.setenv("BOOT_TIMEOUT_S", "90")
    assert main(["config", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"image dir: {images}\n" in out

    direct = label_lines(out, "direct")
    assert direct["backend"] == "libvirt (host ORCH_BACKEND)"
    assert direct["image"] == str(images / "direct.raw") and direct["state"] == "ready"
    assert direct["installed"].startswith("0 MiB format=? sha256=- source=-")
    assert direct["kernel"] == str(images / "vmlinuz") and direct["initrd"] == str(images / "initrd.img")
    assert direct["cmdline"] == "console=ttyS0 root=/dev/vda"
    assert direct["resources"] == "2 CPU, 2048 MiB" and direct["caps"] == "none"
    assert direct["timeout"] == "600 s (timeout_s), max none (no max_timeout_s)"
    assert direct["boot timeout"] == "45 s (boot_timeout_s)"
    assert direct["warm pool"] == "none" and direct["routing keys"] == "'direct'"

    ubuntu = label_lines(out, "ubuntu")
    assert ubuntu["state"] == "stale (no record of where it came from)"
    assert ubuntu["resources"] == "1 CPU, 1024 MiB, 20 GiB disk (size small)"
    assert ubuntu["caps"] == "max_cpus 8, max_memory_mb 16384, max_disk_gb 100"
    assert (
        ubuntu["timeout"] == "1800 s (host DEFAULT_TIMEOUT_S 7200 s, cut to max_timeout_s), max 1800 s (max_timeout_s)"
    )
    assert ubuntu["boot timeout"] == "90 s (host BOOT_TIMEOUT_S)"
    assert ubuntu["warm pool"] == "2 ready, replaced after 900 s, snapshot yes"
    assert ubuntu["routing keys"] == "'ubuntu', 'ubuntu-latest', '' ('' is a request without runs_on)"
    assert "kernel" not in ubuntu

    fresh = label_lines(out, "fresh")
    assert fresh["image"] == str(images / "fresh.qcow2")
    assert fresh["state"] == "missing" and fresh["source"] == "https://images.example/fresh.qcow2"
    assert fresh["timeout"] == "7200 s (host DEFAULT_TIMEOUT_S), max none (no max_timeout_s)"

    sim = label_lines(out, "sim")
    assert sim["backend"] == "noop" and "not read" in sim["image"] and "state" not in sim


def test_config_check_refuses_what_the_backend_cannot_do(capsys, monkeypatch, tmp_path):
    config = tmp_path / "map.yaml"
    config.write_text(
        "default_label: oi\nimages:\n  oi:\n    source: https://images.example/oi.img\n"
        f"    local_path: {tmp_path}/oi.img\n    warm: {{ready: 1}}\n"
    )
    monkeypatch.setenv("IMAGE_DIR", str(tmp_path))
    monkeypatch.setenv("ORCH_BACKEND", "zones")
    assert main(["config", "check", "--config", str(config)]) == 2
    assert one_error_line(capsys) == (
        f"{config}:6: images.oi.warm: the zones backend has no warm pools (remove warm, or give the image the libvirt backend)"
    )


def test_help_is_available_for_every_command(capsys):
    for argv in (["--help"], ["run", "--help"], ["enqueue", "--help"], ["config", "check", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "--wait" in capsys.readouterr().out


def test_every_setting_is_in_the_settings_table():
    from pathlib import Path

    from orchestrator.core.config import ENV_NAMES

    readme = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    assert [name for name in ENV_NAMES.values() if f"| `{name}`" not in readme and f"`{name}` |" not in readme] == []
