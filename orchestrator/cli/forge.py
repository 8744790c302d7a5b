"""`orchestrator forge`: the forge bridge service; `orchestrator forge check`: validate
its configuration (and read every token and secret it names) without starting it."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from orchestrator.cli.common import CLIError, Commands, OneLineParser, load_cli_settings

DEFAULT_FORGE_CONFIG = Path("/etc/orchestrator/forge.yaml")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="forge_config", type=Path,
                        help=f"the bridge's YAML (env ORCH_FORGE_CONFIG; default {DEFAULT_FORGE_CONFIG})")
    parser.add_argument("--amqp-url", help="broker URL (env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--amqp-prefix", help="name prefix of exchanges and queues (env AMQP_PREFIX; default ci)")
    parser.add_argument("--log-format", choices=["json", "text"], help="log line format (env LOG_FORMAT; default json)")


def register(commands: Commands) -> None:
    forge = commands.add_parser(
        "forge", help="the forge bridge: webhooks in, jobs out, commit statuses back",
        description="Receive GitHub, Forgejo/Gitea and GitLab webhooks, publish the jobs each commit's jobs file "
                    "asks for, and set commit statuses from their results (until SIGINT/SIGTERM).",
    )
    _flags(forge)
    forge.set_defaults(func=cmd_forge)
    sub = forge.add_subparsers(dest="forge_command", parser_class=OneLineParser)
    check = sub.add_parser("check", help="validate the bridge's configuration and read its secrets")
    _flags(check)
    check.set_defaults(func=cmd_forge_check)


def _load(args: argparse.Namespace):  # -> tuple[DaemonSettings, LoadedForgeConfig]
    from orchestrator.forge.config import ForgeConfigError, load_forge_config

    path = args.forge_config or Path(os.environ.get("ORCH_FORGE_CONFIG") or DEFAULT_FORGE_CONFIG)
    settings = load_cli_settings(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "forge_config"}))
    try:
        return path, settings, load_forge_config(path)
    except ForgeConfigError as exc:
        raise CLIError(str(exc)) from None


def cmd_forge_check(args: argparse.Namespace) -> int:
    path, _, loaded = _load(args)
    config = loaded.config
    print(f"forge config {path}: OK (every token and secret it names was read)")
    print(f"listen {config.listen}, state_dir {config.state_dir}")
    for name, forge in sorted(config.forges.items()):
        print(f"forge {name}: {config.kind_of(name).value} at {forge.api_url}, webhook URL /hooks/{name}")
    for repo in config.repositories:
        flags = [f for f, on in (("forks", repo.forks), ("cancel_superseded", repo.cancel_superseded)) if on]
        print(f"repository {repo.repo} on {repo.forge}: jobs file {repo.jobs_file}, secrets {sorted(repo.secrets) or '-'}"
              + (f", {', '.join(flags)}" if flags else "") + (f", fallback {repo.fallback.script_path}" if repo.fallback else ""))
    return 0


def cmd_forge(args: argparse.Namespace) -> int:
    from orchestrator.daemon import StartupError
    from orchestrator.forge.service import run_bridge
    from orchestrator.logsetup import configure_logging

    _, settings, loaded = _load(args)
    configure_logging(fmt=settings.log_format)
    try:
        asyncio.run(run_bridge(settings, loaded))
    except StartupError as exc:
        raise CLIError(str(exc), exit_code=1) from None
    return 0
