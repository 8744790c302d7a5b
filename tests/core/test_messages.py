"""Wire schemas: strict known fields, ignored unknown ones, and junk that never crashes."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orchestrator.core.messages import (
    MAX_ENV_ENTRIES,
    MAX_ENV_VALUE_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_SCRIPT_BYTES,
    JobRequest,
    JobResult,
    JobStatus,
)
from orchestrator.core.requestbody import MalformedRequest, parse_request

VALID = {
    "schema_version": "jobrequest.v1",
    "request_id": str(uuid.uuid4()),
    "source": "forgejo",
    "repo_url": "https://git.example.org/org/repo.git",
    "commit_sha": "0123456789abcdef0123456789abcdef01234567",
    "runs_on": "ubuntu-22.04",
    "workflow_path": ".solstice/workflow.kdl",
    "workflow_job_id": "build",
    "repo_owner": "org",
    "repo_name": "repo",
    "submitted_at": "2026-01-01T00:00:00Z",
}


def test_reference_request_parses_and_unknown_fields_are_ignored():
    request = JobRequest.model_validate({**VALID, "future_field": {"x": 1}})
    assert request.runs_on == "ubuntu-22.04" and request.attempt == 1
    assert not hasattr(request, "future_field")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_id", "not-a-uuid"),
        ("commit_sha", "abc123"),
        ("commit_sha", "g" * 40),
        ("repo_url", "-oProxyCommand=evil"),
        ("repo_url", "https://x/$(reboot) y"),
        ("repo_url", "javascript:alert(1)"),
        ("runs_on", "../etc"),
        ("runs_on", "a b"),
        ("env", {"1BAD": "x"}),
        ("env", {"A;B": "x"}),
        ("env", {"OK": "nul\x00byte"}),
        ("timeout_s", 0),
        ("attempt", 0),
        ("schema_version", "jobrequest.v2"),
        ("workflow_job_id", "line\nbreak"),
    ],
)
def test_bad_known_field_is_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as error:
        JobRequest.model_validate({**VALID, field: value})
    assert error.value.errors()[0]["loc"][0] == field


def test_result_echoes_request_identity_and_success_follows_status():
    request = JobRequest.model_validate(VALID)
    result = JobResult.for_request(request, status=JobStatus.FAILED, summary="x", exit_code=1)
    wire = json.loads(result.model_dump_json())
    assert wire["schema_version"] == "jobresult.v1"
    assert wire["request_id"] == VALID["request_id"] and wire["repo_name"] == "repo"
    assert wire["success"] is False and wire["status"] == "failed"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_junk_bytes_are_refused_with_a_reason_never_an_exception(body):
    try:
        parse_request(body)
    except ValueError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(VALID) + ["env", "script", "timeout_s", "deadline", "attempt"]), json_values)
)
def test_junk_fields_are_refused_with_a_reason_or_parse_strictly(fields):
    body = json.dumps({**VALID, **fields}).encode()
    try:
        request = parse_request(body)
    except ValueError as exc:
        assert str(exc).startswith(("invalid job request:", "not JSON", "not a JSON object"))
        return
    # Whatever got through is well-formed.
    assert len(request.commit_sha) in (40, 64)
    assert all(name.isidentifier() for name in request.env)


def test_script_limit_counts_utf8_bytes_not_characters():
    three_byte = "\u20ac"  # €
    with pytest.raises(ValidationError) as error:
        JobRequest.model_validate({**VALID, "script": three_byte * MAX_SCRIPT_BYTES})
    (problem,) = error.value.errors()
    assert problem["loc"] == ("script",)
    assert problem["msg"] == f"is {3 * MAX_SCRIPT_BYTES} bytes as UTF-8, over the limit of {MAX_SCRIPT_BYTES} bytes"
    assert JobRequest.model_validate({**VALID, "script": three_byte * (MAX_SCRIPT_BYTES // 3)}).script
    assert JobRequest.model_validate({**VALID, "script": "#" * MAX_SCRIPT_BYTES}).script


def test_env_values_are_counted_in_bytes_by_the_same_rule_naming_the_variable():
    with pytest.raises(ValidationError) as error:
        JobRequest.model_validate({**VALID, "env": {"OK": "v", "BIG": "\u20ac" * (MAX_ENV_VALUE_BYTES // 3 + 1)}})
    (problem,) = error.value.errors()
    assert problem["loc"] == ("env", "BIG")
    assert (
        problem["msg"]
        == f"is {3 * (MAX_ENV_VALUE_BYTES // 3 + 1)} bytes as UTF-8, over the limit of {MAX_ENV_VALUE_BYTES} bytes"
    )
    assert JobRequest.model_validate({**VALID, "env": {"FULL": "v" * MAX_ENV_VALUE_BYTES}}).env["FULL"]


@pytest.mark.parametrize("field", ["script", "env"])
def test_text_that_is_not_utf8_is_refused_naming_the_field(field):
    value = "echo \ud800" if field == "script" else {"X": "\ud800"}
    with pytest.raises(ValidationError) as error:
        JobRequest.model_validate({**VALID, field: value})
    assert error.value.errors()[0]["loc"][0] == field
    assert "not UTF-8 text" in error.value.errors()[0]["msg"]


def _reason(body: bytes, **limits: int) -> str:
    with pytest.raises(MalformedRequest) as error:
        parse_request(body, **limits)
    return str(error.value)


def _json(**fields: object) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            _json(deadline="9999-12-31T23:59:59-14:00"),
            (
                "invalid job request: deadline: out of range: 9999-12-31T23:59:59-14:00 is outside "
                "0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z in UTC"
            ),
        ),
        (_json(submitted_at="0001-01-01T00:00:00+01:00"), "invalid job request: submitted_at: out of range: "),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b'{"a": {"b": [' + b"1" * 5000 + b"]}}", "number too long: a.b.0 has 5000 digits, at most 4300 are read"),
        (
            _json(timeout_s=0).replace(b'"timeout_s": 0', b'"timeout_s": -' + b"9" * 4301),
            "number too long: timeout_s has 4301 digits",
        ),
        (b"[1, 2]", "not a JSON object but a JSON array"),
        (b'{"request_id": "\xff"}', "not UTF-8 text: byte 0xff at offset 16 is invalid (invalid start byte)"),
        (
            _json(env={"A" * 10_000: "x"}),
            "invalid job request: env." + "A" * 64 + "....[key]: String should match pattern",
        ),
    ],
    ids=["deadline", "submitted_at", "nesting", "long-number", "long-number-field", "array", "utf8", "long-key"],
)
def test_hostile_bodies_are_refused_with_a_reason_a_publisher_can_act_on(body, reason):
    assert _reason(body).startswith(reason)


def test_body_over_the_size_limit_is_refused_before_parsing_naming_size_limit_and_setting():
    body = b"[" * 4097  # would be a parse error (or worse) if it were parsed
    assert _reason(body, max_bytes=4096) == "message is 4097 bytes, over the limit of 4096 bytes (MAX_MESSAGE_BYTES)"


def test_default_size_limit_admits_the_largest_valid_request_written_with_escapes():
    # Every byte of script and env written as a six-byte `\u0001` escape: the worst any encoder does.
    env = {f"V{i:03d}".ljust(128, "_"): "\x01" * MAX_ENV_VALUE_BYTES for i in range(MAX_ENV_ENTRIES)}
    body = _json(script="\x01" * MAX_SCRIPT_BYTES, env=env, repo_owner="\u20ac" * 512)
    assert len(body) <= MAX_MESSAGE_BYTES
    request = parse_request(body)
    assert len(request.env) == MAX_ENV_ENTRIES and len(request.script) == MAX_SCRIPT_BYTES


def test_a_copy_differs_only_in_what_it_asks_the_host_to_run():
    first = JobRequest.model_validate({**VALID, "script": "make", "env": {"A": "1"}})
    retry = JobRequest.model_validate(
        {**VALID, "script": "make", "env": {"A": "1"}, "attempt": 2, "submitted_at": "2027-01-01T00:00:00Z"}
    )
    assert first.fields_differing_from(retry) == []
    other = JobRequest.model_validate({**VALID, "script": "make test", "env": {"A": "2"}})
    assert first.fields_differing_from(other) == ["script", "env"]
