"""`orchestrator run`: the host daemon in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from orchestrator.cli.common import CLIError, Commands, add_command, load_cli_image_map, load_cli_settings


def register(commands: Commands) -> None:
    run = add_command(
        commands,
        "run",
        cmd_run,
        help="run the host daemon",
        description="Consume jobs and run each in a VM until SIGINT/SIGTERM.",
    )
    run.add_argument("--max-concurrency", type=int, help="jobs at once on this host (env MAX_CONCURRENCY; default 2)")
    run.add_argument("--capacity-map", help="per-label limits label=n,... (env CAPACITY_MAP)")
    run.add_argument("--host-cpus", type=int, help="vCPU budget (env HOST_CPUS; default: this machine's CPUs)")
    run.add_argument(
        "--host-memory-mb", type=int, help="memory budget in MiB (env HOST_MEMORY_MB; default: this machine's)"
    )
    run.add_argument("--host-name", help="name in results and heartbeats (env HOST_NAME)")
    run.add_argument(
        "--state-dir", type=Path, help="journal, overlays, seeds, logs (env STATE_DIR; default /var/lib/orchestrator)"
    )
    run.add_argument(
        "--backend",
        choices=["libvirt", "zones", "noop"],
        help="default backend for images without one (env ORCH_BACKEND; default libvirt)",
    )
    run.add_argument(
        "--drain-timeout-s",
        type=float,
        help="how long running jobs may finish on shutdown (env DRAIN_TIMEOUT_S; default 300)",
    )
    run.add_argument("--log-format", choices=["json", "text"], help="log line format (env LOG_FORMAT; default json)")


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.core.lifecycle import StartupError
    from orchestrator.core.logsetup import configure_logging
    from orchestrator.host.daemon import run_daemon

    settings = load_cli_settings(args)
    image_map = load_cli_image_map(settings)
    configure_logging(fmt=settings.log_format)
    try:
        asyncio.run(run_daemon(settings, image_map))
    except StartupError as exc:
        # Exit 1, not 2: the command line was fine, the host is not ready to serve.
        raise CLIError(str(exc), exit_code=1) from None
    return 0
