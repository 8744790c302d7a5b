"""Wire schemas: strict known fields, ignored unknown ones, and junk that never crashes."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orchestrator.intake import parse_request
from orchestrator.messages import JobRequest, JobResult, JobStatus

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
@given(st.dictionaries(st.sampled_from(sorted(VALID) + ["env", "script", "timeout_s", "deadline", "attempt"]), json_values))
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
