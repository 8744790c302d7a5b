"""The `orchestrator` command: run, enqueue, cancel, hosts, jobs, logs, drain, resume,
images, config check, forge.

Each command is one module here with a `register(commands)` that adds its subparser and
sets `func` to the function that runs it; `main` calls that function. Errors a user can
fix are one line on stderr (`CLIError`, exit code 2 unless it says otherwise); the job's
own status decides the exit code of `enqueue --wait` (see `STATUS_EXIT_CODES`).

Command modules import the daemon, the broker client and the image preparer inside the
functions that use them, so `--help` and a mistyped flag answer without loading them.

Rule: the top of the tree; it may import every part, and no part imports it.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli import cancel, config, drain, enqueue, forge, hosts, images, jobs, logs, run
from orchestrator.cli.common import CLIError, CommandFunction, OneLineParser

# tests/core/test_images.py imports it from here; drop this once that import names
# orchestrator.cli.progress.
from orchestrator.cli.progress import ProgressPrinter  # noqa: F401

COMMANDS = (run, enqueue, cancel, hosts, jobs, logs, drain, images, config, forge)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="orchestrator", description="CI VM orchestrator: runs CI jobs from RabbitMQ in throwaway VMs."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        run_command: CommandFunction = args.func
        return run_command(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `orchestrator ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
