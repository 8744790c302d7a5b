"""The job request `orchestrator enqueue` publishes, from its flags: `--env` entries and
`--script-file` checked one by one, and every rule a request breaks named by the flag
the user typed."""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from typing import Any

from pydantic import ValidationError

from orchestrator.cli.common import CLIError
from orchestrator.core.messages import (
    ENV_NAME_PATTERN,
    MAX_ENV_ENTRIES,
    MAX_ENV_VALUE_BYTES,
    MAX_SCRIPT_BYTES,
    JobRequest,
)

# ENV_NAME_PATTERN in words; a test keeps the two in step.
ENV_NAME_RULE = "letters, digits and _, not starting with a digit, at most 128 characters"

# How much of a user's text an error line repeats.
SHOWN_CHARACTERS = 60

# The flag each JobRequest field comes from, so a validation error names what the user typed.
FLAG_OF_FIELD = {
    "request_id": "--request-id",
    "repo_url": "--repo",
    "commit_sha": "--commit",
    "runs_on": "--runs-on",
    "env": "--env",
    "script": "--script",
    "script_path": "--script-path",
    "size": "--size",
    "timeout_s": "--timeout",
}


def request_from_flags(args: argparse.Namespace) -> JobRequest:
    """The job request `enqueue`'s flags describe; CLIError naming the flag (and the entry
    or file) when it breaks a rule of `JobRequest`."""
    script = args.script if args.script_file is None else _read_script_file(args.script_file)
    fields: dict[str, Any] = {
        "request_id": args.request_id or str(uuid.uuid4()),
        "source": "cli",
        "repo_url": args.repo,
        "commit_sha": args.commit,
        "runs_on": args.runs_on,
        "script": script,
        "script_path": args.script_path,
        "env": _parse_env(args.env),
        "size": args.size,
        "timeout_s": args.timeout,
    }
    try:
        return JobRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "request"
        if field == "script" and args.script_file is not None:
            flag = f"--script-file {args.script_file!r}"
        else:
            flag = FLAG_OF_FIELD.get(field, field)
        # pydantic prefixes the text of a validator's ValueError; the flag says enough.
        raise CLIError(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None


def _parse_env(pairs: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` entries as the job's env; CLIError naming the entry and the rule it breaks."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        problem = _env_entry_problem(name, value) if sep else "expected NAME=VALUE"
        if problem is None and name not in env and len(env) == MAX_ENV_ENTRIES:
            problem = f"more than {MAX_ENV_ENTRIES} variables, the most a job may have"
        if problem is not None:
            raise CLIError(f"--env {_shortened(pair)}: {problem}")
        env[name] = value
    return env


def _env_entry_problem(name: str, value: str) -> str | None:
    """What is wrong with one env entry by the rules of `JobRequest.env`, or None."""
    if not re.fullmatch(ENV_NAME_PATTERN, name):
        shown = name if name and name.isprintable() and len(name) <= SHOWN_CHARACTERS else _shortened(name)
        return f"{shown} is not a valid variable name ({ENV_NAME_RULE})"
    if "\x00" in value:
        return "the value contains a NUL byte"
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # bytes in argv that are not UTF-8 arrive as surrogates
        return "the value is not UTF-8"
    if size > MAX_ENV_VALUE_BYTES:
        return f"the value is {size} bytes, more than the {MAX_ENV_VALUE_BYTES} bytes allowed"
    return None


def _shortened(text: str) -> str:
    """`text` quoted for an error line, cut short so a huge value stays one readable line."""
    return repr(text) if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]!r}..."


def _read_script_file(path: str) -> str:
    """The script in `path` ('-': stdin); CLIError naming the file when it cannot be read,
    is over MAX_SCRIPT_BYTES or is not UTF-8."""
    # One byte more than the limit tells "too large" without reading a huge file whole.
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_SCRIPT_BYTES + 1)
        else:
            with open(path, "rb") as file:
                data = file.read(MAX_SCRIPT_BYTES + 1)
    except OSError as exc:
        raise CLIError(f"--script-file {path!r}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_SCRIPT_BYTES:
        raise CLIError(f"--script-file {path!r}: larger than {MAX_SCRIPT_BYTES} bytes, the most a job script may be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"--script-file {path!r}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
