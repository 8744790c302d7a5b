"""What every command shares: the one-line user error, the parser that raises it, the
broker and image-map flags, loading settings and the image map as the user gave them,
and the exit codes of a job's statuses."""

from __future__ import annotations

import argparse
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from orchestrator.core.config import DaemonSettings, SettingsError, load_settings
from orchestrator.core.imagemap import DEFAULT_IMAGE_MAP, ImageMap, ImageMapError, load_image_map
from orchestrator.core.messages import JobStatus

# The object `add_subparsers` returns: each command module adds its parser to it.
Commands: TypeAlias = "argparse._SubParsersAction[Any]"
# What runs a command: its parsed arguments in, the process exit code out.
CommandFunction: TypeAlias = Callable[[argparse.Namespace], int]

STATUS_EXIT_CODES = {
    JobStatus.SUCCEEDED: 0,
    JobStatus.FAILED: 1,
    JobStatus.ERROR: 3,
    JobStatus.TIMEOUT: 124,
    JobStatus.CANCELLED: 130,
}


class CLIError(Exception):
    """An error that should be reflected back to the CLI user as one line.

    `main` prints it as `error: <message>` on stderr and exits with `exit_code` (2, a
    usage or input mistake, unless the command says otherwise); no traceback.
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are a `CLIError` instead of usage text."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{self.prog}: {message} (see --help)")


def add_command(commands: Commands, name: str, func: CommandFunction, **parser_options: Any) -> argparse.ArgumentParser:
    """A subcommand that runs `func`, with the broker and image-map flags every command takes."""
    parser = commands.add_parser(name, **parser_options)
    parser.add_argument("--amqp-url", help="broker URL (env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--amqp-prefix", help="name prefix of exchanges and queues (env AMQP_PREFIX; default ci)")
    parser.add_argument("--config", type=Path, help=f"image map YAML (env ORCH_CONFIG; default {DEFAULT_IMAGE_MAP})")
    parser.set_defaults(func=func)
    return parser


def parse_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def parse_job_id(text: str) -> uuid.UUID:
    """An argparse type: a job's id (its request's `request_id`)."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID (a job's request_id)") from None


def add_answer_timeout(parser: argparse.ArgumentParser, default_s: float) -> None:
    """`--answer-timeout`, for the commands that ask the hosts over the control exchange."""
    parser.add_argument(
        "--answer-timeout",
        type=parse_seconds,
        default=default_s,
        help=f"seconds to wait for hosts to answer (default {default_s:g})",
    )


def load_cli_settings(args: argparse.Namespace) -> DaemonSettings:
    """Settings from the flags given (over the environment); CLIError naming the bad one."""
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return load_settings(flags)
    except SettingsError as exc:
        raise CLIError(str(exc)) from None


def load_cli_image_map(settings: DaemonSettings) -> ImageMap:
    try:
        return load_image_map(settings.config, max_bytes=settings.map_max_bytes)
    except ImageMapError as exc:
        raise CLIError(str(exc)) from None
