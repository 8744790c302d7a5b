"""The HTTP API's OpenAPI document (orchestrator/openapi.json): valid OpenAPI 3.1, served
at /openapi.json, in step with the wire models, and kept by a live daemon (schemathesis)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator

from orchestrator import __version__
from orchestrator.core.httpserver import HttpLimits, HttpLoad
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import Heartbeat, JobResult, JobStatus
from orchestrator.host.journal import JobState
from orchestrator.web.app import OPENAPI_DOCUMENT, build_app
from tests.conftest import NOOP_MAP, wait_for
from tests.web.test_httpapi import CONSOLE, free_port

DOCUMENT: dict[str, Any] = json.loads(OPENAPI_DOCUMENT)
SCHEMAS = DOCUMENT["components"]["schemas"]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Needs no credentials even with HTTP_TOKEN set.
OPEN_OPERATIONS = frozenset({("GET", "/healthz"), ("POST", "/login")})

MAX_EXAMPLES = 25  # per operation and generation mode (derandomized: the same cases every run)
RUN_BUDGET_S = 45


def documented_operations() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item if method in METHODS}


def served_operations() -> set[tuple[str, str]]:
    """What the daemon's app routes, as (method, path template); HEAD comes with every GET."""
    app = build_app(object(), token=None, load=HttpLoad(HttpLimits()))  # type: ignore[arg-type]  # routes only
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"].startswith("3.1.")
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OpenAPIV31SpecValidator(DOCUMENT).iter_errors()
    ]
    assert errors == []


def test_every_served_route_is_documented_and_every_documented_one_served():
    documented, served = documented_operations(), served_operations()
    assert served - documented == set(), "document these routes in orchestrator/openapi.json"
    assert documented - served == set(), "documented but not served"


def test_every_operation_names_its_errors_and_its_credentials():
    for method, path in documented_operations():
        operation = DOCUMENT["paths"][path][method.lower()]
        open_ = (method, path) in OPEN_OPERATIONS
        assert (operation.get("security") == []) is open_, (method, path)
        if not open_:
            assert "401" in operation["responses"], (method, path)
    assert set(DOCUMENT["components"]["securitySchemes"]) == {"bearerToken", "sessionCookie"}
    assert DOCUMENT["components"]["securitySchemes"]["sessionCookie"]["name"] == "orch_session"


def test_document_is_in_step_with_the_wire_models():
    assert DOCUMENT["info"]["version"] == __version__
    assert set(SCHEMAS["JobResult"]["properties"]) == set(JobResult.model_fields)
    assert SCHEMAS["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert SCHEMAS["JobState"]["enum"] == [s.value for s in JobState]
    assert set(Heartbeat.model_fields) <= set(SCHEMAS["Status"]["properties"])


async def test_openapi_json_serves_the_document_behind_the_token(daemon_factory):
    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}", http_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/openapi.json") as response:
            assert response.status == 401
        async with http.get(f"http://127.0.0.1:{port}/openapi.json", headers=AUTH) as response:
            assert response.status == 200 and response.content_type == "application/json"
            assert await response.json() == DOCUMENT


# --- the live run ----------------------------------------------------------------------------


def describe_failure(exc: BaseException) -> list[str]:
    """A schemathesis failure (or a group of them) as entries a test report can show,
    each with the request that caused it (hypothesis's notes: a curl command line)."""
    found = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
    notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", []))
    return [
        f"{getattr(failure, 'title', type(failure).__name__)}: {getattr(failure, 'message', str(failure)).strip()[:2000]}{notes}"
        for failure in found
    ]


def fuzz(base_url: str, *, job_id: str) -> list[str]:
    """Schemathesis against the daemon at `base_url`: every operation it serves, with
    data that fits the document and data that does not, with credentials and without;
    and the job-log operations once more on `job_id`, a job with a log. Returns one entry
    per failure (a 5xx, or a response the document does not describe)."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    # An explicit config: no schemathesis.toml a developer keeps around changes the run.
    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", config=schemathesis.Config(), headers=AUTH, timeout=10
    )
    served = served_operations()
    failures: list[str] = []
    started = time.monotonic()

    def run(operation: Any, mode: Any, *, headers: dict[str, str], examples: int, **fixed: Any) -> None:
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            report_multiple_bugs=False,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def one(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=10)
            case.validate_response(response, checks=checks)

        try:
            one()
        except hypothesis.errors.Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label  # nothing there to make invalid
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis's FailureGroup is a BaseExceptionGroup
            # Each failure is reported, and the other operations still run.
            where = f"{operation.label} ({mode.value} data, {'with' if headers else 'without'} credentials)"
            failures.extend(f"{where}: {line}" for line in describe_failure(exc))

    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in served:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run(operation, mode, headers=AUTH, examples=MAX_EXAMPLES)
            if "job_id" in operation.path:
                run(operation, mode, headers=AUTH, examples=MAX_EXAMPLES, path_parameters={"job_id": job_id})
        run(operation, schemathesis.GenerationMode.POSITIVE, headers={}, examples=5)
    assert time.monotonic() - started < RUN_BUDGET_S
    return failures


def live_map(tmp_path: Path, image_dir: Path) -> Path:
    """The noop map with something in every part of /status: a warm pool, an image
    prepared from its source and one whose source is not there."""
    (tmp_path / "gamma.raw").write_bytes(b"\0" * 65536)
    document = yaml.safe_load(NOOP_MAP)
    document["images"]["alpha"]["warm"] = {"ready": 1}
    document["images"]["gamma"] = {
        "backend": "noop",
        "source": f"file://{tmp_path}/gamma.raw",
        "format": "raw",
        "local_path": f"{image_dir}/gamma.img",
    }
    document["images"]["delta"] = {
        "backend": "noop",
        "source": f"file://{tmp_path}/missing.raw",
        "local_path": f"{image_dir}/delta.img",
    }
    path = tmp_path / "live-map.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_the_daemon_keeps_to_its_document(daemon_factory, broker, cleanup_topology, tmp_path):
    cleanup_topology += ["gamma", "delta"]
    image_dir = tmp_path / "images"
    config = live_map(tmp_path, image_dir)
    port = free_port()
    daemon = await daemon_factory(
        load_image_map(config),
        config=config,
        image_dir=image_dir,
        http_listen=f"127.0.0.1:{port}",
        http_token=TOKEN,
    )

    def status_shows_everything() -> bool:
        status = daemon.status()
        images, warm = status["images"], status["warm"]
        assert isinstance(images, dict) and isinstance(warm, dict)
        return (
            images.get("gamma", {}).get("state") == "ready"
            and images.get("delta", {}).get("state", "").startswith("failed")
            and warm.get("alpha", {}).get("ready") == 1
        )

    await wait_for(status_shows_everything, what="the images prepared (or failed) and the warm pool full")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": CONSOLE})
    await broker.next_result()
    await wait_for(lambda: not daemon.job_running(job.job_id), what="the job to leave the runner")
    # Schemathesis calls with a blocking client: in a thread, so this loop serves it.
    failures = await asyncio.to_thread(fuzz, f"http://127.0.0.1:{port}", job_id=job.job_id)
    assert not failures, "\n\n".join(failures)
