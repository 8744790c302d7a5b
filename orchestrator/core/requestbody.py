"""A job request's body, parsed once and strictly, with a reason fit for the DLQ.

Every publisher's message is untrusted: its size is checked before it is parsed, its JSON
read without integers longer than Python reads by default, and the reason of a refusal
names the field (cut short: a hostile field name cannot make the reason as large as the
message) or the limit and its setting. The host's intake, its dead-letter answers and
the bridge's jobs file (`describe_validation_error`) share it.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from orchestrator.core.messages import MAX_MESSAGE_BYTES, JobRequest

SHOWN_KEY_CHARS = 64  # of a field name from the message, in a reason or log line


def _where(loc: tuple[int | str, ...]) -> str:
    """A dotted field path for a reason; names taken from the message are cut short, so
    a hostile one cannot make the reason (and the log line) as large as the message."""
    parts = [
        str(part) if len(str(part)) <= SHOWN_KEY_CHARS else f"{str(part)[:SHOWN_KEY_CHARS]}..." for part in loc[:8]
    ]
    return ".".join(parts) + (".(...)" if len(loc) > 8 else "") or "(message)"


def describe_validation_error(exc: ValidationError) -> str:
    parts = [f"{_where(error['loc'])}: {error['msg']}" for error in exc.errors()[:5]]
    return "invalid job request: " + "; ".join(parts)


class MalformedRequest(ValueError):
    """A body that is no job request. `str()` is the reason for the DLQ header, fit for
    its publisher: it names the field, or the limit and its setting, where there is one."""

    def __init__(self, reason: str, *, request_id: uuid.UUID | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id  # for the log, when the body had a readable one


# Longer integers are refused by int() itself (sys.set_int_max_str_digits); counting the
# digits first gives the refusal a reason and the field.
MAX_NUMBER_DIGITS = sys.int_info.default_max_str_digits


@dataclass(frozen=True)
class _LongNumber:
    """Stands in for a number too long to convert, so the reason can name where it is."""

    digits: int


def _path_to(data: object, target: object) -> tuple[int | str, ...]:
    """Where `target` is in a parsed document, as a pydantic-style `loc`. Iterative: the
    document may be nested as deep as the JSON parser allows."""
    stack: list[tuple[tuple[int | str, ...], object]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if value is target:
            return loc
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(((*loc, key), item) for key, item in items)
    return ()


def _load_json(body: bytes) -> object:
    long_numbers: list[_LongNumber] = []

    def parse_int(text: str) -> int | _LongNumber:
        digits = len(text.lstrip("-"))
        if digits <= MAX_NUMBER_DIGITS:
            return int(text)
        long_numbers.append(_LongNumber(digits))
        return long_numbers[-1]

    try:
        data = json.loads(body, parse_int=parse_int)
    except UnicodeDecodeError as exc:
        raise MalformedRequest(
            f"not {exc.encoding.upper()} text: byte {exc.object[exc.start]:#04x} at offset {exc.start} is invalid ({exc.reason})"
        ) from None
    except json.JSONDecodeError as exc:
        raise MalformedRequest(f"not JSON: {exc}") from None
    except RecursionError:
        raise MalformedRequest("JSON nested too deeply: a job request nests 2 levels, this one hundreds") from None
    if long_numbers:
        number = long_numbers[0]
        raise MalformedRequest(
            f"number too long: {_where(_path_to(data, number))} has {number.digits} digits, at most {MAX_NUMBER_DIGITS} are read"
        )
    return data


def parse_request(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> JobRequest:
    """The request in `body`, parsed once; raises `MalformedRequest` with the reason."""
    if len(body) > max_bytes:
        raise MalformedRequest(f"message is {len(body)} bytes, over the limit of {max_bytes} bytes (MAX_MESSAGE_BYTES)")
    data = _load_json(body)
    if not isinstance(data, dict):
        raise MalformedRequest(f"not a JSON object but a JSON {_json_kind(data)}")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise MalformedRequest(describe_validation_error(exc), request_id=_request_id_in(data)) from None


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _request_id_in(data: dict[str, object]) -> uuid.UUID | None:
    value = data.get("request_id")
    try:
        return uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        return None
