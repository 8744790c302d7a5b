"""`orchestrator forge`: the forge bridge service; `orchestrator forge check`: validate
its configuration (and read every token and secret it names) without starting it."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.cli.common import CLIError, Commands, OneLineParser, load_cli_settings

if TYPE_CHECKING:  # imported when a command runs: the forge modules are not every command's
    from orchestrator.core.config import DaemonSettings
    from orchestrator.forge.config import LoadedForgeConfig

DEFAULT_FORGE_CONFIG = Path("/etc/orchestrator/forge.yaml")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="forge_config",
        type=Path,
        help=f"the bridge's YAML (env ORCH_FORGE_CONFIG; default {DEFAULT_FORGE_CONFIG})",
    )
    parser.add_argument("--amqp-url", help="broker URL (env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--amqp-prefix", help="name prefix of exchanges and queues (env AMQP_PREFIX; default ci)")
    parser.add_argument("--log-format", choices=["json", "text"], help="log line format (env LOG_FORMAT; default json)")


def register(commands: Commands) -> None:
    forge = commands.add_parser(
        "forge",
        help="the forge bridge: webhooks in, jobs out, commit statuses back",
        description="Receive GitHub, Forgejo/Gitea and GitLab webhooks, publish the jobs each commit's jobs file "
        "asks for, and set commit statuses from their results (until SIGINT/SIGTERM).",
    )
    _flags(forge)
    forge.set_defaults(func=cmd_forge)
    sub = forge.add_subparsers(dest="forge_command", parser_class=OneLineParser)
    check = sub.add_parser("check", help="validate the bridge's configuration and read its secrets")
    _flags(check)
    check.set_defaults(func=cmd_forge_check)
    catch_up = sub.add_parser(
        "catch-up",
        help="run a catch-up pass now and print what it found and ran",
        description="List every repository's branches and open pull/merge requests and run the heads that moved "
        "without a webhook (beside a running bridge: they share the journal, nothing runs twice).",
    )
    _flags(catch_up)
    catch_up.add_argument("--repo", metavar="OWNER/NAME", help="only this repository")
    catch_up.add_argument("--dry-run", action="store_true", help="say what would run; publish and record nothing")
    catch_up.set_defaults(func=cmd_forge_catch_up)
    rerun = sub.add_parser("rerun", help="run a commit's jobs again, with fresh pending statuses")
    _flags(rerun)
    rerun.add_argument("repo", metavar="OWNER/NAME")
    rerun.add_argument("sha", metavar="SHA", help="the full commit SHA")
    rerun.add_argument("--job", metavar="NAME", help="only this job")
    rerun.set_defaults(func=cmd_forge_rerun)


def _load(args: argparse.Namespace) -> tuple[Path, DaemonSettings, LoadedForgeConfig]:
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
        print(
            f"repository {repo.repo} on {repo.forge}: jobs file {repo.jobs_file}, secrets {sorted(repo.secrets) or '-'}"
            + (f", {', '.join(flags)}" if flags else "")
            + (f", fallback {repo.fallback.script_path}" if repo.fallback else "")
        )
    return 0


def cmd_forge(args: argparse.Namespace) -> int:
    from orchestrator.core.lifecycle import StartupError
    from orchestrator.core.logsetup import configure_logging
    from orchestrator.forge.service import run_bridge

    _, settings, loaded = _load(args)
    configure_logging(fmt=settings.log_format)
    try:
        asyncio.run(run_bridge(settings, loaded))
    except StartupError as exc:
        raise CLIError(str(exc), exit_code=1) from None
    return 0


def _run_tool(coro_factory, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from orchestrator.core.lifecycle import StartupError
    from orchestrator.core.logsetup import configure_logging

    _, settings, loaded = _load(args)
    configure_logging(fmt=settings.log_format)
    try:
        return asyncio.run(coro_factory(settings, loaded))
    except StartupError as exc:
        raise CLIError(str(exc), exit_code=1) from None


def cmd_forge_catch_up(args: argparse.Namespace) -> int:
    from orchestrator.forge.service import catch_up_once

    reports = _run_tool(lambda s, c: catch_up_once(s, c, repo=args.repo, dry_run=args.dry_run), args)
    for report in reports:
        print(report.line())
    if args.repo and not reports:
        raise CLIError(f"--repo {args.repo}: not a repository this bridge catches up (see forge check)")
    return 1 if any(r.error for r in reports) else 0


def cmd_forge_rerun(args: argparse.Namespace) -> int:
    import re

    from orchestrator.forge.service import rerun_once

    if not re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", args.sha):
        raise CLIError(f"SHA: {args.sha!r} is not a full commit SHA (40 or 64 hex digits)")
    runs = _run_tool(lambda s, c: rerun_once(s, c, repo=args.repo, commit_sha=args.sha.lower(), job=args.job), args)
    if not runs:
        raise CLIError(
            f"no run of {args.repo} at {args.sha}"
            + (f" with job {args.job}" if args.job else "")
            + " in the bridge's journal: push it, or wait for catch-up"
        )
    for line in runs:
        print(f"rerun {line}")
    return 0
